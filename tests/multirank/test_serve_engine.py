"""ServeEngine on several ranks: rank 0 plans, every rank runs the plan, ids come back.

The tiny model through launch/infer.py's own steps (prepare -> groups -> build_model) on
1 and 2 gloo ranks (ep_nccl: two data-parallel replicas in lockstep; pp2; tp_experts):
32 concurrent mixed-length greedy requests, with few rows, small prefill chunks and
buckets, give exactly the ids ``moe_ext.model.generate`` gives each prompt alone.

The control plane with a fake per-row-cache model: replicas share the load, an idle
server outlives the collective timeout (heartbeats), and a rank that dies mid-stream ends
every open stream with an error event, makes rank 0's run() return 1 (no hang) and new
requests fail with EngineUnavailable.
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from moe_ext.model.context import ParallelContext
from moe_ext.serve.engine import EngineUnavailable, SamplingParams, ServeEngine
from tests.serve_support import DyingModel, FakeModel, collect, greedy_alone
from tests.support import run_ranks

N_REQUESTS = 32
ROWS = 8
MAX_CONTEXT = 64
PREFILL_CHUNK = 8


def mixed_requests(n: int = N_REQUESTS, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) of mixed lengths: bytes of the tiny model's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    max_tokens = torch.randint(1, 12, (n,), generator=g).tolist()
    return [
        (torch.randint(32, 127, (length,), generator=g).tolist(), m)
        for length, m in zip(lengths, max_tokens)
    ]


SAMPLED = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.8, seed=7, ignore_eos=True)


def serve_all(
    engine: ServeEngine, requests, results: list, timeout: float = 300, sampled: bool = False
) -> None:
    """Rank 0's client thread: submit every request at once, collect, then drain.
    ``sampled``: also two seeded sampled requests (equal ids) and an unseeded one, among
    them (results gets their ids last)."""
    try:
        client = engine.client
        streams = [client.submit(p, SamplingParams(max_tokens=m)) for p, m in requests]
        if sampled:
            extra = [client.submit([40, 41, 42], SAMPLED) for _ in range(2)]
            extra.append(client.submit([40, 41, 42], replace(SAMPLED, seed=None)))
        results.extend(collect(s, timeout) for s in streams)
        if sampled:
            results.append([collect(s, timeout)[0] for s in extra])
    except BaseException as err:  # noqa: BLE001 - reported by the main thread
        results.append(err)
    finally:
        engine.drain()


def run_engine(engine: ServeEngine, rank: int, requests, sampled: bool = False) -> list:
    """engine.run() on this rank (rank 0 also serves ``requests`` from a thread)."""
    results: list = []
    thread = None
    if rank == 0:
        thread = threading.Thread(
            target=serve_all, args=(engine, requests, results), kwargs={"sampled": sampled}
        )
        thread.start()
    code = engine.run()
    if thread is not None:
        thread.join(60)
        assert not thread.is_alive(), "the client thread did not finish"
    assert code == 0, f"rank {rank}: engine.run() returned {code}"
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


# ---- the tiny model ------------------------------------------------------------------------


def tiny_cases(rank: int, world_size: int, cases, requests) -> None:
    from moe_ext.cli import infer
    from moe_ext.groups import ProcessGroups
    from moe_ext.model import generate
    from tests.support import launcher_conf, local_dist_env

    env = local_dist_env(rank, world_size)
    timeout = datetime.timedelta(seconds=120)
    failures = []
    for label, overrides in cases:
        cfg = launcher_conf(["dtype=fp32", *overrides])
        job = infer.prepare(cfg, env, cuda_available=False, num_local_gpus=0)
        groups = ProcessGroups.build(job.plan, backend="gloo", timeout=timeout)
        model = infer.build_model(job, groups, rank, torch.device("cpu"))
        stop = job.stop_ids or []
        pad = job.tokenizer.pad_id
        expected = [
            generate(model, [p], cfg.generate, eos_id=stop, pad_id=pad, max_new_tokens=m).tokens[0]
            for p, m in requests
        ]
        control = dist.new_group(backend="gloo", timeout=timeout) if world_size > 1 else None
        engine = ServeEngine(
            model,
            control,
            model_name="tiny",
            rows=ROWS,
            max_context=MAX_CONTEXT,
            prefill_chunk=PREFILL_CHUNK,
            max_queue=N_REQUESTS + 3,
            stop_ids=stop,
        )
        results = run_engine(engine, rank, requests, sampled=True)
        if model.context.lockstep:  # a replica joined the other's forwards idle, both kinds
            counts = torch.tensor([engine.counts["idle_decode"], engine.counts["idle_prefill"]])
            dist.all_reduce(counts)
            assert (counts > 0).all(), (label, counts)
        if rank == 0:
            assert not engine._warned_disagree, f"{label}: TP ranks sampled different ids"
            seeded_a, seeded_b, unseeded = results.pop()
            assert seeded_a == seeded_b and len(seeded_a) == len(unseeded) == 8, label
            got = [ids for ids, _ in results]
            bad = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
            if bad:
                failures.append(
                    f"{label} ({job.plan.describe()}): requests {bad} differ, e.g. "
                    f"{got[bad[0]]} != generate's {expected[bad[0]]}"
                )
            reasons = {r for _, r in results}
            assert reasons <= {"stop", "length"}, reasons
    assert not failures, "\n".join(failures)


def test_tiny_one_rank():
    run_ranks(tiny_cases, 1, args=([("auto", [])], mixed_requests()))


def test_tiny_two_ranks_ep_dp_pp():
    cases = [
        ("ep_nccl", ["strategy=ep_nccl"]),
        ("replicate pp=2", ["strategy=replicate", "parallel.pp=2"]),
    ]
    run_ranks(tiny_cases, 2, args=(cases, mixed_requests()))


@pytest.mark.slow  # the other two-rank plans
def test_tiny_two_ranks_ep_pp_and_tp():
    cases = [
        ("ep_nccl pp=2", ["strategy=ep_nccl", "parallel.pp=2"]),
        ("tp_experts", ["strategy=tp_experts"]),
        # EP over exactly the TP ranks (what auto picks below the replicas): no exchange,
        # one all-reduce per MoE layer
        ("ep_allgather tp=2", ["strategy=ep_allgather", "parallel.tp=2"]),
    ]
    run_ranks(tiny_cases, 2, args=(cases, mixed_requests()))


@pytest.mark.slow  # 4 ranks: lockstep replicas that are pipelines or TP groups
def test_tiny_four_ranks_ep_dp2_with_pp_or_tp():
    cases = [
        ("ep_nccl pp=2", ["strategy=ep_nccl", "parallel.pp=2"]),
        ("ep_nccl tp=2", ["strategy=ep_nccl", "parallel.tp=2"]),
    ]
    run_ranks(tiny_cases, 4, args=(cases, mixed_requests()))


# ---- the control plane with a fake model ------------------------------------------------


def fake_engine(rank: int, model_class=FakeModel, timeout_s: float = 30, **model_kw):
    context = ParallelContext(dp_size=2, dp_rank=rank, dp_group=dist.group.WORLD)
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    engine = ServeEngine(
        model_class(context, **model_kw),
        control,
        model_name="fake",
        rows=4,
        max_context=40,
        prefill_chunk=5,
        max_queue=64,
        stop_ids=[3],
        heartbeat_s=0.3,
    )
    return engine


def fake_replicas(rank: int, world_size: int) -> None:
    engine = fake_engine(rank, timeout_s=3)
    g = torch.Generator().manual_seed(1)
    requests = [
        (torch.randint(4, 90, (n,), generator=g).tolist(), 9)
        for n in torch.randint(1, 20, (12,), generator=g).tolist()
    ]
    results: list = []
    thread = None
    if rank == 0:

        def client_side():
            time.sleep(4.5)  # idle past the 3 s collective timeout: heartbeats keep it alive
            serve_all(engine, requests, results)

        thread = threading.Thread(target=client_side)
        thread.start()
    assert engine.run() == 0
    forwards = torch.tensor([engine.model.forwards])
    dist.all_reduce(forwards)
    if rank == 0:
        thread.join(30)
        assert [ids for ids, _ in results] == [greedy_alone(p, m, {3}) for p, m in requests]
        assert engine.model.forwards > 0 and forwards.item() > engine.model.forwards


def test_fake_replicas_and_heartbeat():
    run_ranks(fake_replicas, 2)


def dead_rank(rank: int, world_size: int) -> None:
    if rank == 1:
        engine = fake_engine(rank, DyingModel, timeout_s=20, die_after=6)
        engine.run()
        raise AssertionError("rank 1 should have died in its forward")
    engine = fake_engine(rank, timeout_s=20)
    outcome: dict = {}

    def client_side():
        client = engine.client
        streams = [client.submit([5, 6, 7], SamplingParams(max_tokens=30)) for _ in range(4)]
        outcome["events"] = [list(s.events(timeout=60)) for s in streams]
        try:
            client.submit([5], SamplingParams(max_tokens=2))
        except EngineUnavailable as err:
            outcome["refused"] = str(err)
        outcome["healthy"] = client.stats().healthy

    thread = threading.Thread(target=client_side)
    thread.start()
    start = time.monotonic()
    code = engine.run()
    thread.join(60)
    assert code == 1 and time.monotonic() - start < 30
    for events in outcome["events"]:
        assert events[-1].finish_reason == "error" and events[-1].error
    assert "restart" in outcome["refused"] and outcome["healthy"] is False


@pytest.mark.timeout(120)
def test_dead_rank_ends_streams_with_an_error():
    run_ranks(dead_rank, 2)

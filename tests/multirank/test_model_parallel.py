"""Parallelized native model (2 gloo ranks) == single-rank model: greedy ids for tp=2, pp=2,
ep_nccl (dp=2, lockstep) and ep_nccl with tp=2 (token split); lockstep decode through the
static-capacity exchange, with the CUDA-graph capture protocol emulated on CPU (and run for
real on 2 GPUs). Sharding and seeding in one process: tests/unit/test_model_parallel.py."""

from __future__ import annotations

import importlib
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moe_ext.config import GenerateConf
from moe_ext.model import Transformer, generate
from moe_ext.model.parallelize import (
    parallelize,
    shard_slices,
)
from moe_ext.model.weights import init_random_, init_random_full
from tests.support import plan_of, qwen2_args, run_ranks, tiny_args

PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 9, 200], [256, 33, 34, 35, 36], [256, 1]]
MAX_NEW = [10, 3, 7, 12]  # different lengths: one dp replica finishes first (lockstep)


def _reference(args, prompts=PROMPTS, max_new=MAX_NEW):
    model = Transformer(args)
    model.load_state_dict(init_random_full(args), strict=True)
    return generate(model, prompts, GenerateConf(), eos_id=257, pad_id=258, max_new_tokens=max_new)


class _StaticSpy:
    """Counts static-capacity exchanges (moe_ext.moe.dispatch.static.dispatch) in this
    process and records the (tokens, capacity) of each; ``uninstall`` restores the module."""

    def __init__(self):
        from moe_ext.moe.dispatch import static

        self.module, self.original = static, static.dispatch
        self.calls: list[tuple[int, int]] = []

        def spy(x, weights, expert_idx, capacity, dispatcher):
            self.calls.append((x.shape[0], capacity))
            return self.original(x, weights, expert_idx, capacity, dispatcher)

        static.dispatch = spy

    def uninstall(self):
        self.module.dispatch = self.original


def _capacities(model):
    return {
        block.mlp.dispatcher.max_tokens_per_rank for block in model.layers.values() if block.is_moe
    }


def _parallel_body(rank, world, cases):
    from moe_ext.groups import ProcessGroups

    spy = _StaticSpy()
    for family, plan_kwargs, from_meta in cases:
        args = tiny_args() if family == "tiny" else qwen2_args()
        expected = _reference(args).tokens
        plan = plan_of(**plan_kwargs)
        groups = ProcessGroups.build(plan, "gloo", timedelta(seconds=60))
        if from_meta:  # torchtitan path: build on meta, shard, then materialise this rank's slice
            with torch.device("meta"):
                model = Transformer(args)
            parallelize(model, plan, groups)
            init_random_(model, requests=shard_slices(plan, groups, args), device="cpu")
        else:  # slice a full model in place
            model = Transformer(args)
            model.load_state_dict(init_random_full(args))
            parallelize(model, plan, groups)
        before = len(spy.calls)
        got = generate(
            model,
            PROMPTS,
            GenerateConf(max_batch_size=3),
            eos_id=257,
            pad_id=258,
            max_new_tokens=MAX_NEW,
        )
        assert got.tokens == expected, (family, plan_kwargs, got.tokens, expected)
        # expert-parallel decode across replicas (lockstep) and only that ran the static
        # exchange, reset to dynamic after; EP over exactly the TP ranks exchanges nothing
        # (static.routed_replicated: one all-reduce)
        exchanges = plan.is_expert_parallel and plan.ep != plan.tp
        assert (len(spy.calls) > before) == exchanges, (
            plan_kwargs,
            len(spy.calls) - before,
        )
        assert _capacities(model) == {None}, plan_kwargs


def test_parallel_strategies_match_single_rank():
    cases = [
        ("tiny", dict(strategy="replicate", tp=2), True),
        ("tiny", dict(strategy="replicate", pp=2), False),
        ("tiny", dict(strategy="ep_nccl", dp=2, ep=2), True),
        ("qwen2", dict(strategy="ep_nccl", tp=2, ep=2), False),
        ("qwen2", dict(strategy="tp_experts", tp=2, etp=2), True),
    ]
    run_ranks(_parallel_body, world_size=2, args=(cases,))


# ---- lockstep decode: static exchange and the CUDA-graph capture protocol ---------------

PROMPTS5 = PROMPTS + [[256, 120, 121]]
MAX_NEW5 = MAX_NEW + [5]  # dp=2, max_batch_size=2: replica 0 runs [0, 1] and idles in
# round 1; replica 1 runs [2, 3] then [4]. Round capacities 2 and 1.


def _lockstep_model(strategy):
    from moe_ext.groups import ProcessGroups

    args = tiny_args()
    plan = plan_of(strategy, dp=2, ep=2)
    groups = ProcessGroups.build(plan, "gloo", timedelta(seconds=60))
    model = Transformer(args)
    model.load_state_dict(init_random_full(args))
    return parallelize(model, plan, groups), groups


def _lockstep_static_body(rank, world):
    """Plain lockstep decode (no graphs) for both CPU-capable EP dispatchers: same ids as one
    rank; every decode step ran the static exchange at its round's capacity (tokens within
    it), prefill at its chunk's, and the capacity is None again afterwards."""
    expected = _reference(tiny_args(), PROMPTS5, MAX_NEW5).tokens
    for strategy in ("ep_nccl", "ep_allgather"):
        model, _ = _lockstep_model(strategy)
        spy = _StaticSpy()
        try:
            got = generate(
                model,
                PROMPTS5,
                GenerateConf(max_batch_size=2),
                eos_id=257,
                pad_id=258,
                max_new_tokens=MAX_NEW5,
            )
        finally:
            spy.uninstall()
        assert got.tokens == expected, (strategy, got.tokens, expected)
        # decode at the round capacities 2 and 1; prefill (one chunk: prompts shorter than
        # generate.prefill_chunk) at the largest replica's rows x prompt length: 2 x 6, 1 x 3
        assert spy.calls and {c for _, c in spy.calls} == {1, 2, 3, 12}, (strategy, spy.calls)
        assert all(t <= c for t, c in spy.calls), (strategy, spy.calls)
        assert _capacities(model) == {None}, strategy


def test_lockstep_decode_uses_static_exchange():
    run_ranks(_lockstep_static_body, world_size=2)


def _fake_graph_class():
    """A DecodeGraph whose capture runs the two warm-up steps eagerly and records nothing
    (as CUDA capture launches no collectives) and whose replay runs the step eagerly: the
    collectives of a real capture/replay, on CPU."""
    gen = importlib.import_module("moe_ext.model.generate")  # the module, not the function

    class FakeGraph(gen.DecodeGraph):
        captures = 0

        def capture(self):
            for _ in range(2):
                self._step()
            FakeGraph.captures += 1
            owner = self

            class Replay:
                def replay(self):
                    owner.logits = owner._step()

            self.graph = Replay()

    return gen, FakeGraph


def _capture_protocol_body(rank, world):
    """Replicas capture at different rounds and calls (an idle replica, a replica replaying
    a graph while its peer captures): the non-capturing ones match the warm-up steps, so
    every rank runs the same number of exchanges and the ids are unchanged."""
    gen, fake = _fake_graph_class()
    gen.DecodeGraph = fake
    gen._graphs_usable = lambda model, conf, device, lockstep, pipelined=False: conf.cuda_graphs
    expected = _reference(tiny_args(), PROMPTS5, MAX_NEW5).tokens
    model, groups = _lockstep_model("ep_allgather")
    spy = _StaticSpy()
    conf = GenerateConf(max_batch_size=2)
    captures = []
    for _ in range(2):
        before = fake.captures
        got = generate(model, PROMPTS5, conf, eos_id=257, pad_id=258, max_new_tokens=MAX_NEW5)
        captures.append(fake.captures - before)
        assert got.tokens == expected, (got.tokens, expected)
        assert got.cuda_graphs
    spy.uninstall()
    # replica 0 captures once in call 1 (its one batch) and replays it in call 2; replica 1
    # captures both of its batches in both calls (its cache changes batch size each round)
    assert captures == ([1, 0] if groups.dp_rank == 0 else [2, 2]), captures
    counts = [None] * world
    dist.all_gather_object(counts, len(spy.calls))
    assert len(set(counts)) == 1, f"ranks ran different numbers of exchanges: {counts}"
    assert _capacities(model) == {None}


def test_lockstep_capture_protocol_matches_collectives():
    run_ranks(_capture_protocol_body, world_size=2)


def _gpu_graph_body(rank, world):
    from moe_ext.groups import ProcessGroups

    torch.manual_seed(0)
    args = tiny_args()
    for strategy in ("ep_nccl", "ep_allgather"):
        plan = plan_of(strategy, dp=2, ep=2)
        groups = ProcessGroups.build(plan, "nccl", timedelta(seconds=120))
        model = Transformer(args)
        model.load_state_dict(init_random_full(args))
        model = parallelize(model, plan, groups).to("cuda", torch.bfloat16)
        runs = {}
        # eager, capture, replay; then the compiled decode step captured and replayed
        for graphs, compiled in (
            (False, False),
            (True, False),
            (True, False),
            (True, True),
            (True, True),
        ):
            conf = GenerateConf(max_batch_size=2, cuda_graphs=graphs, compile_decode=compiled)
            result = generate(
                model, PROMPTS5, conf, eos_id=None, pad_id=258, max_new_tokens=[24, 9, 17, 30, 12]
            )
            assert result.cuda_graphs == graphs, (strategy, graphs, compiled)
            runs.setdefault((graphs, compiled), []).append(result.tokens)
        eager, graphed, compiled = runs[False, False], runs[True, False], runs[True, True]
        assert graphed[0] == eager[0] == graphed[1], (strategy, runs)
        assert compiled[0] == compiled[1], (strategy, compiled)  # inductor may round apart
        assert _capacities(model) == {None}


@pytest.mark.gpu
def test_gpu_lockstep_cuda_graph_decode_matches_eager():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_ranks(_gpu_graph_body, world_size=2, backend="nccl")

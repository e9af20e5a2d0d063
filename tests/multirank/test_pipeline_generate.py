"""Pipelined generation (moe_ext.model.pipeline_generate) and chunked expert-parallel
prefill on gloo ranks against the single-rank generate on the same weights.

- pp=2 on 2 ranks, micro-batches in flight: greedy ids equal the single-rank ids for
  batches of 1, 2, 3 and 5 rows, mixed prompt lengths, per-request max_new_tokens, EOS
  stops, prefill chunks shorter than the prompts, micro-batch counts pp and 3, and the
  one-at-a-time path (pipeline_microbatches=1).
- ep_nccl / ep_allgather with dp=2 on 2 ranks: prefill chunked on the static exchange
  gives the unchunked ids, and its exchange reads nothing back to the host.
- per-stage CUDA graphs emulated on CPU (capture = two warm-up steps, replay = the step
  from the static buffers): same ids, one capture per micro-batch, reused.
- 4 ranks (slow): pp2 x tp2, pp2 x ep2 over dp replicas (lockstep; also with emulated
  graphs), pp2 x ep2 over the TP ranks of each stage.
- the tiny model's launcher at pp=2 against transformers (slow).
Sampling is not compared with the old pp path: micro-batches draw from the generator in
another order, so seeded sampled ids differ (no contract to keep).
"""

from __future__ import annotations

import importlib
from datetime import timedelta

import pytest
import torch.distributed

from moe_ext.config import GenerateConf
from moe_ext.model import Transformer, generate
from moe_ext.model.parallelize import parallelize
from moe_ext.model.pipeline_generate import build_schedule, microbatch_bounds
from moe_ext.model.weights import init_random_full
from tests.support import plan_of, qwen2_args, run_ranks, stand_in_graph_capture, tiny_args

# mixed lengths (1 to 9 tokens); 256 is the tiny vocabulary's BOS-like id
PROMPTS = [
    [256, 72, 101, 108, 108, 111, 33, 34, 35],
    [256, 9],
    [256, 33, 34, 35, 36],
    [256],
    [256, 120, 121, 122, 123, 124, 125],
]
MAX_NEW = [7, 3, 5, 8, 4]
PAD = 258


def _full_model(args):
    model = Transformer(args)
    model.load_state_dict(init_random_full(args), strict=True)
    return model


def _greedy(model, prompts, max_new, eos, pad=PAD, **conf):
    return generate(
        model,
        prompts,
        GenerateConf(**conf),
        eos_id=eos,
        pad_id=pad,
        max_new_tokens=max_new,
    ).tokens


def _eos_from(reference_ids: list[list[int]]) -> int:
    """An id some request generates mid-way (not first): used as EOS it stops that
    request early, so the EOS bookkeeping is exercised."""
    for row in reference_ids:
        if len(row) > 2:
            return row[2]
    raise AssertionError(f"no request long enough to pick an EOS from: {reference_ids}")


def _fake_stage_graphs() -> list:
    """CUDA graphs stood in for on CPU (tests.support.stand_in_graph_capture) for the stage
    graphs, which generate takes as usable. Returns the list each capture appends its
    micro-batch size to."""
    gen = importlib.import_module("moe_ext.model.generate")
    pipeline = importlib.import_module("moe_ext.model.pipeline_generate")
    captures = stand_in_graph_capture(pipeline._StageGraph)
    gen._graphs_usable = lambda model, conf, device, static, pipelined=False: (
        pipelined and conf.cuda_graphs
    )
    return captures


# ---- the static schedule (no ranks) -----------------------------------------------------


def test_schedule_fills_the_ring_and_respects_dependencies():
    """M = P micro-batches: after prefill, every tick issues a decode item (no bubble),
    micro-batches in turn; a decode item comes at least P ticks after its micro-batch's
    previous item; prefill chunks come in order."""
    P = 2
    schedule = build_schedule([4, 4], prompt_len=6, chunk=4, stages=P)
    issued = {}
    for tick, item in enumerate(schedule):
        assert item is not None, schedule
        if item.index > 0:
            assert tick - issued[(item.mb, item.index - 1)] >= (P if item.decode else 1)
        issued[(item.mb, item.index)] = tick
    # 2 micro-batches x (2 chunks + 3 decode steps), no bubbles
    assert len(schedule) == 10
    decode = [it.mb for it in schedule if it.decode]
    assert decode == [0, 1, 0, 1, 0, 1], decode
    # one micro-batch on two stages: bubbles between its decode items
    lone = build_schedule([3], prompt_len=2, chunk=None, stages=P)
    assert [it is None for it in lone] == [False, True, False, True, False]
    assert microbatch_bounds(5, 2) == [0, 2, 5]


def test_prefill_chunks_cover_every_replica():
    """Chunk c's capacity: the most rows x chunk positions any replica feeds it; a replica
    with a shorter prompt (fewer chunks) or none adds nothing. Chunks grow past the
    minimum while the largest replica's rows x positions fit the token budget."""
    from moe_ext.model.generate import PrefillChunks, prefill_chunks

    # replica 0: 2 rows padded to 9 (chunks 4, 4, 1); replica 1: 3 rows padded to 5 (4, 1)
    assert prefill_chunks([[9, 2], [5, 1, 3], []], 4) == PrefillChunks(4, [12, 8, 2])
    assert prefill_chunks([[9, 2], [5, 1, 3]], None) == PrefillChunks(9, [18])
    assert prefill_chunks([[9, 2], [5, 1, 3]], 0) == PrefillChunks(9, [18])
    assert prefill_chunks([[], []], 4) is None
    # a budget of 15 tokens over 3 rows: chunks of 5 positions (chunks 5, 4 and 5)
    assert prefill_chunks([[9, 2], [5, 1, 3]], 4, 15) == PrefillChunks(5, [15, 8])
    # a budget below the minimum leaves the minimum; one above the prompt makes one chunk
    assert prefill_chunks([[9, 2], [5, 1, 3]], 4, 6) == PrefillChunks(4, [12, 8, 2])
    assert prefill_chunks([[9, 2], [5, 1, 3]], 4, 2048) == PrefillChunks(682, [18])


def test_generate_conf_refuses_bad_pipeline_fields():
    from moe_ext.config import ConfigError

    GenerateConf(pipeline_microbatches=1, prefill_chunk=0).check()
    GenerateConf(prefill_chunk=None).check()
    for field, value in (("pipeline_microbatches", 0), ("prefill_chunk", -1)):
        with pytest.raises(ConfigError, match=f"^generate.{field}={value}; use "):
            GenerateConf(**{field: value}).check()


# ---- pp = 2 -----------------------------------------------------------------------------


def _record_pipelined_batches() -> list[int]:
    """Make PipelineRunner.run (in this process) append each batch's size to the returned
    list: proof that generate took the pipelined path."""
    pipeline = importlib.import_module("moe_ext.model.pipeline_generate")
    runs: list[int] = []
    original = pipeline.PipelineRunner.run

    def spy(self, prompts, max_new, peers=None):
        runs.append(len(prompts))
        return original(self, prompts, max_new, peers)

    pipeline.PipelineRunner.run = spy
    return runs


def _pp_body(rank, world):
    from moe_ext.groups import ProcessGroups

    args = tiny_args()
    reference = _full_model(args)
    plan = plan_of("replicate", pp=2)
    groups = ProcessGroups.build(plan, "gloo", timedelta(seconds=60))
    model = parallelize(_full_model(args), plan, groups)
    runs = _record_pipelined_batches()
    # micro-batches have caches of their own: their rows are views, never gathered copies
    from moe_ext.model.layers import KVCache

    read = KVCache.read
    gathered = []

    def spy_read(self, batch, cache_rows=None, kv_len=None):
        gathered.append(cache_rows is not None)
        return read(self, batch, cache_rows, kv_len)

    KVCache.read = spy_read
    eos = _eos_from(_greedy(reference, PROMPTS, MAX_NEW, None))
    cases = [
        (1, dict(prefill_chunk=3)),
        (2, dict(prefill_chunk=4)),
        (3, dict(prefill_chunk=2)),
        (5, dict(prefill_chunk=3)),
        (5, dict(prefill_chunk=0, pipeline_microbatches=3)),
        (5, dict(prefill_chunk=4, max_batch_size=2)),  # 3 batches: caches and rows reused
        (3, dict(pipeline_microbatches=1)),  # the one-at-a-time path
    ]
    for n, conf in cases:
        prompts, max_new = PROMPTS[:n], MAX_NEW[:n]
        for stop in (None, eos):
            expected = _greedy(reference, prompts, max_new, stop)
            before = len(runs)
            got = _greedy(model, prompts, max_new, stop, **conf)
            assert got == expected, (n, conf, stop, got, expected)
            pipelined = conf.get("pipeline_microbatches") != 1
            assert (len(runs) > before) == pipelined, (conf, runs)
    assert gathered and not any(gathered)
    KVCache.read = read
    # an EOS stop actually cut a request short
    assert _greedy(reference, PROMPTS, MAX_NEW, eos) != _greedy(reference, PROMPTS, MAX_NEW, None)
    # per-stage graphs (emulated): the same ids from the static buffers, one capture per
    # micro-batch size, replayed by the next call on the same caches
    captures = _fake_stage_graphs()
    for n, sizes in ((3, [1, 2]), (5, [2, 3])):
        expected = _greedy(reference, PROMPTS[:n], MAX_NEW[:n], None)
        for call in range(2):
            result = generate(
                model, PROMPTS[:n], GenerateConf(prefill_chunk=3), None, PAD, MAX_NEW[:n]
            )
            assert result.cuda_graphs and result.tokens == expected, (n, result.tokens)
            assert sorted(captures) == sizes, (n, call, captures)  # none new in call 1
        captures.clear()
    # seeded sampling: no contract with the one-at-a-time path (micro-batches draw in
    # another order), but repeatable, and the same ids on every stage
    sampled = [
        generate(
            model, PROMPTS, GenerateConf(temperature=0.9, top_p=0.9), None, PAD, MAX_NEW, seed=3
        ).tokens
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    assert [len(row) for row in sampled[0]] == MAX_NEW
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, sampled[0])
    assert everyone[0] == everyone[1], everyone


def test_pp2_pipelined_greedy_matches_single_rank():
    run_ranks(_pp_body, world_size=2)


def _families_body(rank, world):
    """Attention kinds with their own caches and masks: gpt_oss (sinks, a sliding window
    shorter than the prompts and than the chunked prefill's reach) and deepseek_v3 (MLA's
    latent cache)."""
    import transformers

    from moe_ext.groups import ProcessGroups
    from moe_ext.model import ModelArgs
    from tests.support import GPT_OSS_PROMPTS, GPT_OSS_SHAPE, deepseek_hf_config

    plan = plan_of("replicate", pp=2)
    groups = ProcessGroups.build(plan, "gloo", timedelta(seconds=60))
    families = {
        "gpt_oss": transformers.GptOssConfig(**GPT_OSS_SHAPE).to_dict(),
        "deepseek_v3": deepseek_hf_config("v3").to_dict(),
    }
    max_new = [9, 4, 7, 5]
    for name, config in families.items():
        args = ModelArgs.from_hf_config(config)
        expected = _greedy(_full_model(args), GPT_OSS_PROMPTS, max_new, None, pad=0)
        model = parallelize(_full_model(args), plan, groups)
        for chunk in (4, 0):
            got = _greedy(model, GPT_OSS_PROMPTS, max_new, None, pad=0, prefill_chunk=chunk)
            assert got == expected, (name, chunk, got, expected)


def test_pp2_pipelined_attention_kinds_match_single_rank():
    pytest.importorskip("transformers")
    run_ranks(_families_body, world_size=2)


# ---- chunked expert-parallel prefill ----------------------------------------------------


def _ep_prefill_body(rank, world):
    from moe_ext.groups import ProcessGroups
    from tests.support import _NoHostReads

    args = tiny_args()
    reference = _full_model(args)
    prompts, max_new = PROMPTS + [[256, 50, 51]], MAX_NEW + [3]
    expected = _greedy(reference, prompts, max_new, None)
    for strategy in ("ep_nccl", "ep_allgather"):
        plan = plan_of(strategy, dp=2, ep=2)
        groups = ProcessGroups.build(plan, "gloo", timedelta(seconds=60))
        model = parallelize(_full_model(args), plan, groups)
        prefills: list[tuple[int, int, set]] = []  # (rows, positions, capacities)
        forward = model.forward

        def guarded(tokens, *rest, **kw):
            if tokens.shape[1] == 1:
                return forward(tokens, *rest, **kw)
            # a prefill chunk: the static exchange at a capacity, nothing read back to
            # the host (the guard raises on .item(), .tolist(), bool(), ...)
            capacities = {
                b.mlp.dispatcher.max_tokens_per_rank for b in model.layers.values() if b.is_moe
            }
            prefills.append((*tokens.shape, capacities))
            with _NoHostReads():
                return forward(tokens, *rest, **kw)

        model.forward = guarded
        whole = _greedy(model, prompts, max_new, None, prefill_chunk=0, max_batch_size=2)
        n_whole = len(prefills)
        # chunks of exactly 3 positions (no growth under the exchange's token budget)
        chunked = _greedy(
            model,
            prompts,
            max_new,
            None,
            prefill_chunk=3,
            prefill_exchange_tokens=0,
            max_batch_size=2,
        )
        assert whole == expected, (strategy, whole, expected)
        assert chunked == expected, (strategy, chunked, expected)
        # replica 0 runs prompts [0, 1] (9 and 2 tokens) then [2]; replica 1 [3, 4] then
        # [5]: round 0's capacity is 2 rows x 9 positions, or 2 x 3 per chunk
        assert prefills[0][2] == {18}, (strategy, prefills)
        assert all(len(c) == 1 and None not in c for _, _, c in prefills), prefills
        chunks = prefills[n_whole:]
        assert all(s <= 3 and max(c) <= 6 for _, s, c in chunks), (strategy, chunks)
        assert len(chunks) > n_whole, (strategy, prefills)


def test_chunked_ep_prefill_matches_unchunked_without_host_sync():
    run_ranks(_ep_prefill_body, world_size=2)


# ---- 4 ranks ----------------------------------------------------------------------------


def _four_rank_body(rank, world, strategy, degrees, graphs=False):
    from moe_ext.groups import ProcessGroups

    args = qwen2_args() if strategy != "replicate" else tiny_args()
    reference = _full_model(args)
    plan = plan_of(strategy, world=4, **degrees)
    groups = ProcessGroups.build(plan, "gloo", timedelta(seconds=120))
    model = parallelize(_full_model(args), plan, groups)
    runs = _record_pipelined_batches()
    if graphs:
        _fake_stage_graphs()
    for n in (1, 3, 5):
        expected = _greedy(reference, PROMPTS[:n], MAX_NEW[:n], None)
        got = _greedy(
            model, PROMPTS[:n], MAX_NEW[:n], None, prefill_chunk=3, prefill_exchange_tokens=0
        )
        assert got == expected, (strategy, degrees, n, got, expected)
    assert runs, "the pipelined path did not run"


@pytest.mark.slow
def test_pp2_tp2_pipelined_matches_single_rank():
    run_ranks(_four_rank_body, world_size=4, args=("replicate", dict(pp=2, tp=2)))


@pytest.mark.slow
def test_pp2_ep2_with_replicas_matches_single_rank():
    """pp2 x ep2 over two data-parallel replicas (lockstep EP): both replicas run one
    schedule, the one with fewer rows (none, at batch 1) joining the exchanges idle."""
    run_ranks(_four_rank_body, world_size=4, args=("ep_nccl", dict(pp=2, dp=2, ep=2)))


@pytest.mark.slow
def test_pp2_ep2_with_replicas_stage_graphs_match_single_rank():
    """The same with per-stage graphs (emulated): the replicas that do not capture join
    the capturing one's warm-up exchanges idle."""
    run_ranks(_four_rank_body, world_size=4, args=("ep_nccl", dict(pp=2, dp=2, ep=2), True))


@pytest.mark.slow
def test_pp2_ep2_over_tp_ranks_matches_single_rank():
    """pp2 x ep2 where the EP ranks are a stage's TP ranks: pipelined, each item on the
    static exchange."""
    run_ranks(_four_rank_body, world_size=4, args=("ep_nccl", dict(pp=2, tp=2, ep=2)))


# ---- against transformers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory) -> dict:
    pytest.importorskip("transformers")
    from tests.support import make_infer_checkpoints

    return make_infer_checkpoints(tmp_path_factory.mktemp("hf"), families=("qwen3_moe",))


def test_pp2_pipelined_launcher_matches_transformers(qwen3_checkpoint):
    """launch/infer.py's steps at pp=2 (qwen3_moe saved by transformers, three prompts of
    3 to 8 tokens) give transformers' greedy ids: micro-batches in flight with prefill
    chunks of 3 positions, and 3 micro-batches of one row each."""
    from tests.support import INFER_NEW_TOKENS, check_launcher_cases, launcher_cases

    plans = [
        ("pp=2 chunk 3", ["strategy=replicate", "parallel.pp=2", "generate.prefill_chunk=3"]),
        (
            "pp=2 3 micro-batches",
            ["strategy=replicate", "parallel.pp=2", "generate.pipeline_microbatches=3"],
        ),
    ]
    cases = launcher_cases(qwen3_checkpoint, ("qwen3_moe",), plans, INFER_NEW_TOKENS)
    run_ranks(check_launcher_cases, 2, args=(cases,))

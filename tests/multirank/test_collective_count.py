"""Collectives per decode step (moe_ext.bench.collectives) on 2 gloo ranks, exact, per plan:
a change that adds a collective to the decode step fails here. The counter itself (kinds,
a group of one): tests/unit/test_collective_count.py.

# L layers (tiny: 4, all MoE; qwen2: 3, layer 1 dense), B batch

Per layer, from the code:
- attention under tp: one all-reduce of o_proj's partial sums (layers.output_projection);
- tp_experts: one all-reduce of the experts' partial sums (tp_sharded.combine); a TP-sharded
  dense MLP one all-reduce (layers.DenseMLP); the router and a shared expert none;
- ep_* static exchange (decode): one all-gather (tokens, weights and ids packed) and one
  reduce-scatter (static.dispatch / combine); dynamic ep_nccl three all-to-alls (counts,
  rows, rows back), dynamic ep_allgather four all-gathers (count, rows, weights, ids) and
  one reduce-scatter;
- ep_* over tp = ep (one replica): the EP ranks are the TP ranks, so the MoE is one
  all-reduce (static.routed_replicated); before, the token split took 1/tp of the tokens,
  exchanged them (all-gather + reduce-scatter) and all-gathered the slices;
- pp 2: one send of the hidden states (stage 0), one receive (stage 1).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from tests.support import plan_of, qwen2_args, run_ranks, tiny_args

BATCH = 2


def _model(args, plan):
    from moe_ext.groups import ProcessGroups
    from moe_ext.model import Transformer
    from moe_ext.model.parallelize import parallelize
    from moe_ext.model.weights import init_random_full

    groups = ProcessGroups.build(plan, "gloo", timedelta(seconds=60))
    model = Transformer(args)
    model.load_state_dict(init_random_full(args))
    return parallelize(model, plan, groups)


def _expected(rank: int) -> list:
    """(family, plan kwargs, capacity, counts on this rank) per case."""
    L = 4  # tiny: 4 MoE layers
    return [
        ("tiny", dict(strategy="replicate", dp=2), None, {}),
        ("tiny", dict(strategy="tp_experts", tp=2, etp=2), None, {"all_reduce": 2 * L}),
        ("qwen2", dict(strategy="tp_experts", tp=2, etp=2), None, {"all_reduce": 2 * 3}),
        (
            "tiny",
            dict(strategy="ep_nccl", dp=2, ep=2),
            BATCH,
            {"all_gather": L, "reduce_scatter": L},
        ),
        (
            "tiny",
            dict(strategy="ep_allgather", dp=2, ep=2),
            BATCH,
            {"all_gather": L, "reduce_scatter": L},
        ),
        ("tiny", dict(strategy="ep_nccl", dp=2, ep=2), None, {"all_to_all": 3 * L}),
        (
            "tiny",
            dict(strategy="ep_allgather", dp=2, ep=2),
            None,
            {"all_gather": 4 * L, "reduce_scatter": L},
        ),
        # was all_reduce L + all_gather 2L + reduce_scatter L (16) before routed_replicated
        ("tiny", dict(strategy="ep_nccl", tp=2, ep=2), BATCH, {"all_reduce": 2 * L}),
        ("tiny", dict(strategy="ep_allgather", tp=2, ep=2), BATCH, {"all_reduce": 2 * L}),
        # qwen2 over tp 2: 2 MoE layers (2 all-reduces each), 1 dense (attention + MLP)
        ("qwen2", dict(strategy="ep_nccl", tp=2, ep=2), BATCH, {"all_reduce": 2 * 3}),
        ("tiny", dict(strategy="replicate", pp=2), None, {"send": 1} if rank == 0 else {"recv": 1}),
    ]


def _count_body(rank, world):
    from moe_ext.bench.collectives import decode_step_collectives

    for family, plan_kwargs, capacity, want in _expected(rank):
        args = tiny_args() if family == "tiny" else qwen2_args()
        model = _model(args, plan_of(**plan_kwargs))
        got = decode_step_collectives(model, BATCH, capacity=capacity)
        assert got == want, (family, plan_kwargs, capacity, got, want)
        assert all(
            block.mlp.dispatcher.max_tokens_per_rank is None
            for block in model.layers.values()
            if block.is_moe
        ), "the count must leave the dynamic exchange set"


@pytest.mark.timeout(180)
def test_collectives_per_decode_step_world2():
    run_ranks(_count_body, world_size=2)


def _replicated_equal_body(rank, world):
    """ep over tp = ep (routed_replicated) decodes the single-rank model's logits, at a
    batch that does not split evenly over tp (3)."""
    from moe_ext.model import Transformer
    from moe_ext.model.weights import init_random_full

    args = tiny_args()
    ref = Transformer(args)
    ref.load_state_dict(init_random_full(args))
    tokens = torch.tensor([[256, 72, 101], [256, 9, 200], [256, 33, 34]])  # [3, 3]
    with torch.no_grad():
        want = ref(tokens)
    for strategy in ("ep_nccl", "ep_allgather"):
        model = _model(args, plan_of(strategy, tp=2, ep=2))
        with torch.no_grad():
            got = model(tokens)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=strategy)


@pytest.mark.timeout(120)
def test_ep_over_tp_ranks_matches_single_rank_world2():
    run_ranks(_replicated_equal_body, world_size=2)

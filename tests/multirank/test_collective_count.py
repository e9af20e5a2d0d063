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
- ep_* over tp x dp (4 ranks): attention all-reduce, all-gather, and one reduce-scatter
  that hands each rank its whole replica (static.routed_replicas); before, a further
  all-gather of the TP slices;
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


def _replicated_grad_body(rank, world):
    """routed_replicated in training: output, input and routing-weight gradients full on
    every rank (Megatron's convention for TP-replicated activations), expert gradients
    this rank's shard of the single-rank layer's, for T not a multiple of tp (5)."""
    import torch.distributed as dist

    from moe_ext.model.decoder import split_tokens_forward
    from moe_ext.moe.dispatch import DispatchGroups
    from moe_ext.moe.layer import build_moe_layer, expert_shard, load_full_expert_weights

    H, F, E, k = 12, 8, 4, 2
    gen = torch.Generator().manual_seed(0)  # the same weights and tokens on both ranks
    gate_up = torch.randn(E, 2 * F, H, generator=gen, dtype=torch.float64) * 0.3
    down = torch.randn(E, H, F, generator=gen, dtype=torch.float64) * 0.3
    router = torch.randn(E, H, generator=gen, dtype=torch.float64)
    x_full = torch.randn(5, H, generator=gen, dtype=torch.float64)
    cot = torch.randn(5, H, generator=gen, dtype=torch.float64)
    layers = []
    ep_groups = DispatchGroups(ep=dist.group.WORLD)
    for name, groups in (("local", DispatchGroups()), ("nccl_a2a", ep_groups)):
        layer = build_moe_layer(
            H, F, E, k, dispatcher=name, groups=groups, dtype=torch.float64, shared_expert_size=4
        )
        with torch.no_grad():
            layer.router.weight.copy_(router)
            for p in layer.shared_expert.parameters():
                p.copy_(torch.linspace(-0.2, 0.2, p.numel(), dtype=torch.float64).view_as(p))
        load_full_expert_weights(layer, gate_up, down)
        layers.append(layer)
    ref, ep = layers
    assert ep.dispatcher.replicates_over(dist.group.WORLD)
    x_ref, x = x_full.clone().requires_grad_(), x_full.clone().requires_grad_()
    y_ref = ref(x_ref)
    (y_ref * cot).sum().backward()
    y = split_tokens_forward(ep, x, dist.group.WORLD, "replicated")
    (y * cot).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ep.router.weight.grad, ref.router.weight.grad)
    gate_up_ref, down_ref = expert_shard(
        ref.experts.gate_up_proj.grad, ref.experts.down_proj.grad, ep.dispatcher
    )
    torch.testing.assert_close(ep.experts.gate_up_proj.grad, gate_up_ref)
    torch.testing.assert_close(ep.experts.down_proj.grad, down_ref)
    for p, p_ref in zip(ep.shared_expert.parameters(), ref.shared_expert.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad)


@pytest.mark.timeout(60)
def test_ep_over_tp_ranks_gradients_world2():
    run_ranks(_replicated_grad_body, world_size=2)


def _four_rank_body(rank, world):
    """ep over tp 2 x dp 2 (ep 4, lockstep replicas): decode makes all-reduce + all-gather +
    reduce-scatter per layer (static.routed_replicas; was + an all-gather of the TP slices),
    and greedy ids equal the single-rank model's; ep 2 over each TP pair (tp 2, dp 2)
    makes two all-reduces."""
    from moe_ext.bench.collectives import decode_step_collectives
    from moe_ext.config import GenerateConf
    from moe_ext.model import generate
    from tests.multirank.test_model_parallel import MAX_NEW, PROMPTS, _reference

    L, args = 4, tiny_args()
    expected = _reference(args).tokens
    cases = [
        (dict(tp=2, dp=2, ep=4), {"all_reduce": L, "all_gather": L, "reduce_scatter": L}),
        (dict(tp=2, dp=2, ep=2), {"all_reduce": 2 * L}),
    ]
    for degrees, want in cases:
        model = _model(args, plan_of("ep_nccl", world=4, **degrees))
        got = decode_step_collectives(model, BATCH, capacity=BATCH)
        assert got == want, (degrees, got, want)
        out = generate(
            model,
            PROMPTS,
            GenerateConf(max_batch_size=2),
            eos_id=257,
            pad_id=258,
            max_new_tokens=MAX_NEW,
        )
        assert out.tokens == expected, (degrees, out.tokens, expected)


@pytest.mark.slow  # 4 ranks; the 2-rank counts run by default
@pytest.mark.timeout(180)
def test_collectives_and_ids_ep_over_tp_dp_world4():
    run_ranks(_four_rank_body, world_size=4)

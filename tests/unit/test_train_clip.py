"""moe_ext.train.clip without processes: over every rank of a plan, the squares the
placements count add up to the full model's squared gradient norm, for plans with tp, pp,
ep, etp and dp, TP-replicated kv heads (nKV < tp) and a tied embedding on two stages; ZeRO
partitions count on every data rank. Refusals: ZeRO-3 and offload without ZeRO."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_ext.groups import ProcessGroups, rank_layout
from moe_ext.model import Transformer
from moe_ext.model.parallelize import RankCoords, shard_slices, take_shard
from moe_ext.train.clip import GradPlacement, clip_, grad_placements, square_sum
from tests.support import layout_plan, qwen2_args, tiny_args


def _groups(plan, rank: int) -> ProcessGroups:
    """Rank layout only (no process group): what grad_placements reads."""
    layout = rank_layout(plan)
    members = {name: next((g for g in gs if rank in g), None) for name, gs in layout.items()}
    return ProcessGroups(plan, rank, layout, {k: None for k in layout}, members)


class _Shard(torch.nn.Module):
    """A stand-in parallelized model: this rank's slices of ``full`` as parameters."""

    def __init__(self, args, full, requests):
        super().__init__()
        self.args = args
        self.names = list(requests)
        for i, name in enumerate(self.names):
            self.register_parameter(
                f"p{i}", torch.nn.Parameter(take_shard(full[name], requests[name]))
            )

    def named_parameters(self, *a, **k):
        for i, name in enumerate(self.names):
            yield name, getattr(self, f"p{i}")


def _full_grads(args, seed=0):
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Transformer(args).named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}


PLANS = [
    ("replicate", 2, dict()),
    ("ep_nccl", 4, dict(ep=2)),  # ep2 x edp2
    ("ep_nccl", 4, dict(tp=2)),  # tokens split over tp, ep = 4
    ("ep_nccl", 8, dict(tp=2, pp=2)),
    ("tp_experts", 4, dict(tp=2)),  # etp = 2
    ("tp_experts", 8, dict(tp=4, pp=2)),  # kv heads replicated in pairs (nKV=2 < tp=4)
    ("replicate", 4, dict(pp=2)),
]


@pytest.mark.parametrize("strategy, world, degrees", PLANS)
@pytest.mark.parametrize("model", ["tiny", "qwen2", "tiny_tied"])
def test_counted_squares_add_up_to_full_norm(strategy, world, degrees, model):
    args = {"tiny": tiny_args, "qwen2": qwen2_args, "tiny_tied": tiny_args}[model]()
    if model == "tiny_tied":
        args = dataclasses.replace(args, tie_word_embeddings=True)
    if model == "qwen2" and degrees.get("tp", 1) == 4:
        pytest.skip("4 heads, nKV=1: covered at tp=2")
    plan = layout_plan(strategy, world, **degrees)
    full = _full_grads(args)
    if args.tie_word_embeddings:
        full.pop("lm_head.weight", None)
    expected = sum(g.pow(2).sum() for g in full.values())
    for partitioned in (False, True):
        total = torch.zeros((), dtype=torch.float64)
        for rank in range(world):
            groups = _groups(plan, rank)
            requests = shard_slices(plan, RankCoords.of(plan, rank), args)
            shard = _Shard(args, full, requests)
            placements = grad_placements(shard, groups, args)
            pieces = []
            for name, param in shard.named_parameters():
                grad = param.detach()
                if partitioned:  # ZeRO: this data rank's share of the flat gradient
                    p = placements[name]
                    size = plan.edp if p.expert else plan.dp
                    grad = grad.reshape(-1).tensor_split(size)[p.data_rank]
                pieces.append((placements[name], grad))
            total += square_sum(pieces, partitioned, torch.device("cpu")).double()
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)


def test_replicas_counted_once():
    """tp_experts tp=2 dp=2: the router is replicated over tp and dp, experts' F slices differ
    over etp; down_proj_bias-free tiny has gate_up/down sharded on F."""
    args = tiny_args()
    plan = layout_plan("tp_experts", 4, tp=2)
    seen = {}
    for rank in range(4):
        shard = _Shard(args, _full_grads(args), shard_slices(plan, RankCoords.of(plan, rank), args))
        seen[rank] = grad_placements(shard, _groups(plan, rank), args)
    router = "layers.0.mlp.router.weight"
    experts = "layers.0.mlp.experts.gate_up_proj"
    q = "layers.0.self_attn.q_proj.weight"
    assert [seen[r][router].counted(False) for r in range(4)] == [True, False, False, False]
    assert [seen[r][router].counted(True) for r in range(4)] == [True, False, True, False]
    assert [seen[r][experts].counted(False) for r in range(4)] == [True, True, False, False]
    assert [seen[r][q].counted(False) for r in range(4)] == [True, True, False, False]
    assert all(seen[r][experts].expert and not seen[r][q].expert for r in range(4))


def test_clip_scales_like_torch():
    grads = [torch.randn(5, 3), torch.randn(7)]
    ref = [g.clone().requires_grad_() for g in grads]
    for r, g in zip(ref, grads):
        r.grad = g.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    p = GradPlacement(expert=False, first_copy=True, data_rank=0)
    norm = square_sum([(p, g) for g in grads], False, torch.device("cpu")).sqrt()
    clip_(grads, norm, 0.5)
    torch.testing.assert_close(norm, expected_norm)
    for r, g in zip(ref, grads):
        torch.testing.assert_close(g, r.grad)


def test_zero3_and_offload_refusals():
    from moe_ext.deepspeed.engine import DeepSpeedSetupError, deepspeed_config

    with pytest.raises(DeepSpeedSetupError, match="zero_stage=2 train.offload_optimizer=true"):
        deepspeed_config(2, 2, 3, torch.float32)
    with pytest.raises(DeepSpeedSetupError, match="zero_stage=1 or 2"):
        deepspeed_config(2, 2, 0, torch.float32, offload_optimizer=True)
    config = deepspeed_config(2, 2, 2, torch.float32, offload_optimizer=True)
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["gradient_clipping"] == 0.0


@pytest.mark.parametrize(
    "strategy, world, degrees", [("replicate", 2, dict(pp=2)), ("ep_nccl", 4, dict(ep=2, pp=2))]
)
def test_adapters_placed_like_their_base(strategy, world, degrees):
    """LoRA adapters (not in shard_slices) under pp and ep: each counts where its base does."""
    from moe_ext.train.lora import adapter_base_name

    args = tiny_args()
    plan = layout_plan(strategy, world, **degrees)
    adapters = {
        "self_attn.q_proj.lora.A": "self_attn.q_proj.weight",
        "mlp.experts.lora.gate_up_A": "mlp.experts.gate_up_proj",
    }
    for rank in range(world):
        requests = shard_slices(plan, RankCoords.of(plan, rank), args)
        shard = _Shard(args, _full_grads(args), requests)
        for name in [n for n in requests if n.startswith("layers.")]:
            for adapter, base in adapters.items():
                if name.endswith(base):
                    full = name.removesuffix(base) + adapter
                    assert adapter_base_name(full) == name
                    shard.names.append(full)
                    shard.register_parameter(
                        f"p{len(shard.names) - 1}", torch.nn.Parameter(torch.ones(2))
                    )
        placements = grad_placements(shard, _groups(plan, rank), args)
        for name, placement in placements.items():
            base = adapter_base_name(name)
            if base is not None:
                assert placement == placements[base], name
        assert any(adapter_base_name(n) for n in placements)

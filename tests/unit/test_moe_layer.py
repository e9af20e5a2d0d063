"""Grouped experts and the MoE layer against transformers' MoE blocks and the reference.

# T tokens, H hidden, E experts, k top-k, F expert FFN size
"""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from moe_ext.moe.dispatch.local import LocalDispatcher
from moe_ext.moe.experts import GroupedExperts, grouped_mm_qualifies
from moe_ext.moe.layer import MoELayer, build_moe_layer, expert_shard, load_full_expert_weights
from tests.support import swiglu

H, F, E = 16, 32, 4


def _expert_reference(x, counts, gate_up, down):
    ffn = gate_up.shape[1] // 2
    out, start = [], 0
    for e, n in enumerate(counts):
        gu = gate_up[e].double()
        out.append(swiglu(x[start : start + n].double(), gu[:ffn], gu[ffn:], down[e].double()))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 0], [10, 0, 0, 0], [1, 1, 1, 1]])
def test_grouped_experts_match_per_expert_swiglu(backend, counts):
    torch.manual_seed(0)
    experts = GroupedExperts(E, H, F, backend=backend)
    x = torch.randn(sum(counts), H, requires_grad=True)
    tokens_per_expert = torch.tensor(counts)
    y = experts(x, tokens_per_expert)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    x_ref = x.detach().double().requires_grad_()
    gu_ref = experts.gate_up_proj.detach().double().requires_grad_()
    dn_ref = experts.down_proj.detach().double().requires_grad_()
    y_ref = _expert_reference(x_ref, counts, gu_ref, dn_ref)
    (y_ref * upstream.double()).sum().backward()
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        experts.gate_up_proj.grad.double(), gu_ref.grad, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(experts.down_proj.grad.double(), dn_ref.grad, rtol=1e-5, atol=1e-6)


def test_grouped_mm_accepts_expanded_gradients_and_bf16():
    experts = GroupedExperts(E, H, F, backend="grouped_mm")
    x = torch.randn(6, H, requires_grad=True)
    experts(x, torch.tensor([2, 0, 3, 1])).sum().backward()  # expanded (stride-0) gradient
    assert x.grad.shape == x.shape
    bf16 = GroupedExperts(E, H, F, backend="grouped_mm", dtype=torch.bfloat16)
    xb = torch.randn(6, H, dtype=torch.bfloat16)
    yb = bf16(xb, torch.tensor([2, 0, 3, 1]))
    loop = GroupedExperts(E, H, F, backend="loop", dtype=torch.bfloat16)
    loop.load_state_dict(bf16.state_dict())
    torch.testing.assert_close(
        yb.float(), loop(xb, torch.tensor([2, 0, 3, 1])).float(), rtol=2e-2, atol=2e-2
    )


def test_auto_backend_falls_back_on_unaligned_shapes():
    odd = GroupedExperts(E, 10, 6)  # 40-byte rows: grouped_mm rejects them on CPU
    x = torch.randn(5, 10)
    assert not grouped_mm_qualifies(x, odd.gate_up_proj, odd.down_proj)
    assert not odd.uses_grouped_mm(x)
    assert odd(x, torch.tensor([1, 2, 0, 2])).shape == (5, 10)
    assert grouped_mm_qualifies(torch.randn(5, H), *GroupedExperts(E, H, F).parameters())
    assert not grouped_mm_qualifies(
        torch.randn(5, H).double(), *GroupedExperts(E, H, F, dtype=torch.float64).parameters()
    )
    with pytest.raises(ValueError, match="loop"):
        GroupedExperts(E, 10, 6, backend="grouped_mm")(x, torch.tensor([1, 2, 0, 2]))
    with pytest.raises(ValueError, match="backend"):
        GroupedExperts(E, H, F, backend="cutlass")
    with pytest.raises(ValueError, match="tokens_per_expert"):
        GroupedExperts(E, H, F)(torch.randn(3, H), torch.tensor([3]))


def _hf_block(family, top_k, norm=True):
    if family == "mixtral":
        cfg = MixtralConfig(
            hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=top_k
        )
        return cfg, MixtralSparseMoeBlock(cfg)
    if family == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            hidden_size=H,
            moe_intermediate_size=F,
            num_experts=E,
            num_experts_per_tok=top_k,
            norm_topk_prob=norm,
        )
        return cfg, Qwen3MoeSparseMoeBlock(cfg)
    cfg = Qwen2MoeConfig(
        hidden_size=H,
        moe_intermediate_size=F,
        num_experts=E,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm,
        shared_expert_intermediate_size=24,
    )
    return cfg, Qwen2MoeSparseMoeBlock(cfg)


@pytest.mark.parametrize(
    "family,top_k,norm",
    [("mixtral", 2, True), ("qwen3_moe", 3, True), ("qwen2_moe", 2, False), ("qwen2_moe", E, True)],
)
def test_layer_matches_transformers_block(family, top_k, norm):
    torch.manual_seed(1)
    _, hf = _hf_block(family, top_k, norm)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    shared = family == "qwen2_moe"
    layer = build_moe_layer(
        H,
        F,
        E,
        top_k,
        norm_topk_prob=norm,
        shared_expert_size=24 if shared else None,
        shared_expert_gate=shared,
    )
    state = {("router.weight" if k == "gate.weight" else k): v for k, v in hf.state_dict().items()}
    layer.load_state_dict(state)
    x = torch.randn(2, 5, H)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf = hf(x_hf)
    y = layer(x_ours)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(y)
    (y_hf * upstream).sum().backward()
    (y * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        layer.experts.gate_up_proj.grad, hf.experts.gate_up_proj.grad, rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(layer.router.weight.grad, hf.gate.weight.grad, rtol=1e-4, atol=1e-5)


def test_layer_keeps_router_losses():
    layer = build_moe_layer(H, F, E, 2).train()
    layer(torch.randn(7, H))
    assert layer.aux_loss.ndim == 0 and layer.aux_loss.item() > 0 and layer.z_loss.item() > 0
    layer.eval()
    layer(torch.randn(7, H))
    assert layer.aux_loss.item() == 0.0


def test_bf16_layer_runs_and_keeps_dtype():
    layer = build_moe_layer(H, F, E, 2, dtype=torch.bfloat16)
    x = torch.randn(3, 4, H, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y.float().sum().backward()
    assert x.grad is not None and layer.experts.gate_up_proj.grad is not None


class _ShardedForTest(LocalDispatcher):
    """A local dispatcher pretending to be rank 1 of 2 FFN shards and owning experts 2..3
    of 4, to exercise shard slicing without process groups."""

    def __init__(self, num_experts):
        super().__init__(num_experts)
        self.num_local_experts, self.local_expert_start = 2, 2

    @property
    def ffn_shards(self):
        return 2

    @property
    def ffn_shard_rank(self):
        return 1


def test_load_full_expert_weights_slices_experts_and_ffn():
    dispatcher = _ShardedForTest(E)
    layer = build_moe_layer(H, F, E, 2, dispatcher=dispatcher)
    assert layer.experts.gate_up_proj.shape == (2, F, H)  # 2 experts, 2 * F/2 rows
    gate_up = torch.randn(E, 2 * F, H)
    down = torch.randn(E, H, F)
    load_full_expert_weights(layer, gate_up, down)
    half = F // 2
    torch.testing.assert_close(layer.experts.gate_up_proj[:, :half], gate_up[2:4, half:F])
    torch.testing.assert_close(layer.experts.gate_up_proj[:, half:], gate_up[2:4, F + half :])
    torch.testing.assert_close(layer.experts.down_proj, down[2:4, :, half:])
    gu, dn = expert_shard(gate_up, down, dispatcher)
    assert gu.shape == (2, F, H) and dn.shape == (2, H, half)
    with pytest.raises(ValueError, match="experts"):
        load_full_expert_weights(layer, gate_up[:3], down[:3])


def test_build_and_layer_reject_inconsistent_parts():
    with pytest.raises(ValueError, match="shared_expert_size"):
        build_moe_layer(H, F, E, 2, shared_expert_gate=True)
    with pytest.raises(ValueError, match="etp"):
        build_moe_layer(H, 31, E, 2, dispatcher=_ShardedForTest(E))
    with pytest.raises(ValueError, match="unknown dispatcher"):
        build_moe_layer(H, F, E, 2, dispatcher="smoke_signals")
    layer = build_moe_layer(H, F, E, 2)
    with pytest.raises(ValueError, match="local experts"):
        MoELayer(layer.router, GroupedExperts(E - 1, H, F), layer.dispatcher)


@pytest.mark.gpu
def test_grouped_mm_on_cuda_bf16_matches_loop():
    torch.manual_seed(2)
    device = torch.device("cuda")
    fast = GroupedExperts(E, 256, 512, backend="auto", dtype=torch.bfloat16, device=device)
    slow = GroupedExperts(E, 256, 512, backend="loop", dtype=torch.bfloat16, device=device)
    slow.load_state_dict(fast.state_dict())
    counts = torch.tensor([37, 0, 100, 5], device=device)
    x = torch.randn(142, 256, dtype=torch.bfloat16, device=device)
    assert fast.uses_grouped_mm(x), "bf16 on CUDA should take the grouped_mm path"
    x_fast, x_slow = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_slow = fast(x_fast, counts), slow(x_slow, counts)
    scale = y_slow.float().abs().max().item()
    assert (y_fast.float() - y_slow.float()).abs().max().item() <= 2e-2 * scale
    y_fast.float().sum().backward()
    y_slow.float().sum().backward()
    for a, b in (
        (x_fast.grad, x_slow.grad),
        (fast.gate_up_proj.grad, slow.gate_up_proj.grad),
        (fast.down_proj.grad, slow.down_proj.grad),
    ):
        assert (a.float() - b.float()).abs().max().item() <= 3e-2 * b.float().abs().max().item()

"""Routers against Hugging Face transformers' routers and the float64 reference.

# T tokens, H hidden, E experts, k top-k
"""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter, load_balancing_loss_func
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from moe_ext.moe.router import TopKRouter
from tests.support import RoutingSpec, reference_gates

T, H, E = 33, 16, 8


def _sorted_by_expert(weights, idx):
    """Put each token's picks in expert order, so routers that differ only in the order
    of their top-k output (sorted=False) compare equal."""
    idx_sorted, perm = idx.sort(dim=-1)
    return weights.gather(1, perm), idx_sorted


def _ours_from(hf_router, **kwargs):
    ours = TopKRouter(H, E, kwargs.pop("top_k"), **kwargs)
    with torch.no_grad():
        ours.weight.copy_(hf_router.weight)
        if (
            getattr(hf_router, "e_score_correction_bias", None) is not None
            and ours.e_score_correction_bias is not None
        ):
            ours.e_score_correction_bias.copy_(hf_router.e_score_correction_bias)
    return ours


@pytest.mark.parametrize(
    "family,top_k,norm",
    [
        ("mixtral", 2, True),
        ("mixtral", 1, True),
        ("qwen3_moe", 4, True),
        ("qwen3_moe", 4, False),
        ("qwen2_moe", 2, False),
        ("qwen2_moe", E, True),
    ],
)
def test_softmax_router_matches_transformers(family, top_k, norm):
    torch.manual_seed(0)
    if family == "mixtral":
        hf = MixtralTopKRouter(
            MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=top_k)
        )
    elif family == "qwen3_moe":
        hf = Qwen3MoeTopKRouter(
            Qwen3MoeConfig(
                hidden_size=H, num_experts=E, num_experts_per_tok=top_k, norm_topk_prob=norm
            )
        )
    else:
        hf = Qwen2MoeTopKRouter(
            Qwen2MoeConfig(
                hidden_size=H, num_experts=E, num_experts_per_tok=top_k, norm_topk_prob=norm
            )
        )
    torch.nn.init.normal_(hf.weight)
    x = torch.randn(T, H)
    _, hf_weights, hf_idx = hf(x)
    out = _ours_from(hf, top_k=top_k, norm_topk_prob=norm)(x)
    assert out.weights.dtype == torch.float32 and out.expert_idx.dtype == torch.int64
    assert torch.equal(out.expert_idx, hf_idx)
    torch.testing.assert_close(out.weights, hf_weights.float(), rtol=1e-6, atol=1e-7)
    if norm:
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(T))


def test_mixtral_renormalised_equals_softmax_over_topk_logits():
    torch.manual_seed(1)
    router = TopKRouter(H, E, 2)
    x = torch.randn(T, H)
    out = router(x)
    picked = out.logits.gather(1, out.expert_idx)
    torch.testing.assert_close(out.weights, torch.softmax(picked, -1))


def test_sigmoid_group_limited_router_matches_deepseek_v3():
    torch.manual_seed(2)
    cfg = DeepseekV3Config(
        hidden_size=H,
        n_routed_experts=E,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    hf = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(hf.weight)
    hf.e_score_correction_bias.copy_(torch.randn(E) * 0.3)
    x = torch.randn(T, H)
    _, hf_weights, hf_idx = hf(x)
    ours = _ours_from(
        hf,
        top_k=3,
        score_func="sigmoid",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        correction_bias=True,
    )
    out = ours(x)
    w, i = _sorted_by_expert(out.weights, out.expert_idx)
    hw, hi = _sorted_by_expert(hf_weights, hf_idx)
    assert torch.equal(i, hi)
    torch.testing.assert_close(w, hw, rtol=1e-6, atol=1e-7)
    # Only topk_group of n_group groups (2 experts each) may be used by any token.
    assert max(len(set(row)) for row in (out.expert_idx // 2).tolist()) <= 2


def test_correction_bias_steers_selection_not_weights():
    torch.manual_seed(3)
    router = TopKRouter(H, E, 2, score_func="sigmoid", norm_topk_prob=False, correction_bias=True)
    x = torch.randn(T, H)
    router.e_score_correction_bias[5] = 50.0
    out = router(x)
    assert (out.expert_idx == 5).any(-1).all()
    scores = torch.sigmoid(out.logits)
    torch.testing.assert_close(out.weights, scores.gather(1, out.expert_idx))
    assert (out.weights < 1).all()  # the bias (50) never reaches the weights


@pytest.mark.parametrize(
    "spec",
    [
        RoutingSpec(top_k=2),
        RoutingSpec(top_k=3, norm_topk_prob=False),
        RoutingSpec(
            top_k=2, score_func="sigmoid", n_group=4, topk_group=3, routed_scaling_factor=1.5
        ),
        RoutingSpec(top_k=1, score_func="softmax", n_group=2, topk_group=1),
    ],
)
def test_router_weights_and_gradients_match_reference(spec):
    torch.manual_seed(4)
    router = TopKRouter(
        H,
        E,
        spec.top_k,
        score_func=spec.score_func,
        norm_topk_prob=spec.norm_topk_prob,
        n_group=spec.n_group,
        topk_group=spec.topk_group,
        routed_scaling_factor=spec.routed_scaling_factor,
    )
    x = torch.randn(T, H, requires_grad=True)
    out = router(x)
    dense = torch.zeros(T, E).scatter(1, out.expert_idx, out.weights)
    upstream = torch.randn(T, E)
    (dense * upstream).sum().backward()
    x_ref = x.detach().double().requires_grad_()
    w_ref = router.weight.detach().double().requires_grad_()
    gates = reference_gates(x_ref, w_ref, spec)
    (gates * upstream.double()).sum().backward()
    torch.testing.assert_close(dense.double(), gates.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(router.weight.grad.double(), w_ref.grad, rtol=1e-4, atol=1e-5)


def test_aux_loss_matches_transformers_and_z_loss():
    torch.manual_seed(5)
    router = TopKRouter(H, E, 2).train()
    x = torch.randn(T, H)
    out = router(x)
    expected = load_balancing_loss_func((out.logits,), num_experts=E, top_k=2)
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.z_loss, torch.logsumexp(out.logits, -1).pow(2).mean())
    assert out.aux_loss.requires_grad and out.z_loss.requires_grad
    router.eval()
    out = router(x)
    assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0


def test_expert_load_counters_accumulate_and_reset():
    torch.manual_seed(6)
    router = TopKRouter(H, E, 2)
    x1, x2 = torch.randn(T, H), torch.randn(5, H)
    i1, i2 = router(x1).expert_idx, router(x2).expert_idx
    expected = torch.bincount(torch.cat([i1.flatten(), i2.flatten()]), minlength=E)
    assert torch.equal(router.read_expert_load(), expected)
    assert torch.equal(router.read_expert_load(reset=True), expected)
    assert int(router.read_expert_load().sum()) == 0
    assert "expert_load" not in router.state_dict()
    router.record_load = False
    router(x1)
    assert int(router.read_expert_load().sum()) == 0


def test_bf16_router_math_runs_in_float32():
    router = TopKRouter(H, E, 2, dtype=torch.bfloat16)
    out = router(torch.randn(4, H, dtype=torch.bfloat16))
    assert out.weights.dtype == torch.float32 and out.logits.dtype == torch.float32


def test_router_rejects_bad_configuration():
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(H, E, E + 1)
    with pytest.raises(ValueError, match="score_func"):
        TopKRouter(H, E, 2, score_func="relu")
    with pytest.raises(ValueError, match="n_group"):
        TopKRouter(H, E, 2, n_group=3, topk_group=1)
    with pytest.raises(ValueError, match="topk_group"):
        TopKRouter(H, E, 4, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="both"):
        TopKRouter(H, E, 2, n_group=4)
    with pytest.raises(ValueError, match=r"\[T, 16\]"):
        TopKRouter(H, E, 2)(torch.randn(2, 3, H))

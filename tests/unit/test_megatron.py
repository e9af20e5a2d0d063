"""Megatron-core integration on CPU, one process (megatron-core 0.16.1 here; the code is also
written for 0.19.x): config mapping checked against Megatron's own routing and aux-loss
functions, refusals, spec building, weight-name round trips, and the router losses in
training. MoEExtLayer and GPTModel on 2 ranks: tests/multirank/test_megatron.py.

# T tokens, H hidden, E experts, k top-k
"""

from __future__ import annotations

import datetime
import os
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|DEPRECATED).*")

from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from moe_ext.megatron import (  # noqa: E402
    MegatronConfigError,
    get_gpt_decoder_block_spec,
    get_gpt_layer_spec,
    is_moe_slot,
    loss_coeffs,
    megatron_spec_style,
    megatron_to_native,
    moe_layer_kwargs,
    moe_layer_spec,
    native_to_megatron,
    router_kwargs,
    transformer_config_kwargs,
)
from moe_ext.model import init_random_full  # noqa: E402
from moe_ext.moe.router import TopKRouter  # noqa: E402
from tests.support import MEGATRON_E as E  # noqa: E402
from tests.support import MEGATRON_H as H  # noqa: E402
from tests.support import free_port, megatron_args, megatron_config, megatron_plan  # noqa: E402

# ---- router mapping vs Megatron's routing function -----------------------------------

ROUTER_CASES = {
    "softmax_topk_then_softmax": dict(),
    "softmax_pre_softmax": dict(moe_router_pre_softmax=True),
    "softmax_scaled": dict(moe_router_topk_scaling_factor=2.5),
    "sigmoid_bias_groups": dict(
        moe_router_score_function="sigmoid",
        moe_router_topk=4,
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=4,
        moe_router_group_topk=2,
        moe_router_topk_scaling_factor=2.0,
    ),
    "sigmoid_top1": dict(moe_router_score_function="sigmoid", moe_router_topk=1),
    "softmax_pre_softmax_groups": dict(
        moe_router_pre_softmax=True,
        moe_router_topk=4,
        moe_router_num_groups=2,
        moe_router_group_topk=2,
    ),
}


@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_router_mapping_matches_megatron_routing(case):
    config = megatron_config(**ROUTER_CASES[case])
    kwargs = router_kwargs(config)
    router = TopKRouter(H, E, config.moe_router_topk, **kwargs).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=gen))
        bias = None
        if router.e_score_correction_bias is not None:
            bias = torch.randn(E, generator=gen) * 0.5
            router.e_score_correction_bias.copy_(bias)
    x = torch.randn(64, H, generator=gen)
    out = router(x)
    logits = x @ router.weight.t()  # [T, E]
    ref_probs, ref_map = moe_utils.topk_routing_with_score_function(
        logits,
        config.moe_router_topk,
        use_pre_softmax=config.moe_router_pre_softmax,
        num_groups=config.moe_router_num_groups,
        group_topk=config.moe_router_group_topk,
        scaling_factor=config.moe_router_topk_scaling_factor,
        score_function=config.moe_router_score_function,
        expert_bias=bias,
    )
    ours = torch.zeros(64, E).scatter(1, out.expert_idx, out.weights)  # [T, E]
    picked = torch.zeros(64, E, dtype=torch.bool).scatter(1, out.expert_idx, True)
    assert torch.equal(picked, ref_map), f"{case}: different experts picked"
    torch.testing.assert_close(ours, ref_probs.float(), rtol=1e-5, atol=1e-6)


def test_aux_loss_coefficient_matches_megatron_switch_loss():
    config = megatron_config(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, moe_router_topk=2)
    aux_coeff, z_coeff = loss_coeffs(config)
    assert z_coeff == 0.001
    router = TopKRouter(H, E, 2, **router_kwargs(config)).train()
    x = torch.randn(50, H, generator=torch.Generator().manual_seed(1))
    out = router(x)
    probs = torch.softmax(out.logits, dim=-1)
    tokens_per_expert = torch.bincount(out.expert_idx.reshape(-1), minlength=E)
    theirs = moe_utils.switch_load_balancing_loss_func(probs, tokens_per_expert, 50, 2, E, 0.01)
    torch.testing.assert_close(aux_coeff * out.aux_loss, theirs, rtol=1e-5, atol=1e-8)
    assert (
        loss_coeffs(
            megatron_config(moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="none")
        )[0]
        == 0.0
    )


REFUSED = {
    "capacity": (
        dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"),
        "moe_expert_capacity_factor",
    ),
    "bias_linear": (dict(add_bias_linear=True), "add_bias_linear"),
    "not_glu": (dict(gated_linear_unit=False), "SwiGLU"),
    "gelu": (dict(activation_func=F.gelu), "SwiGLU"),
    "sinkhorn": (dict(moe_router_load_balancing_type="sinkhorn"), "sinkhorn"),
    "logit_groups": (
        dict(moe_router_topk=4, moe_router_num_groups=2, moe_router_group_topk=2),
        "moe_router_pre_softmax=True",
    ),
    "group_score": (
        dict(
            moe_router_score_function="sigmoid",
            moe_router_topk=6,
            moe_router_num_groups=4,
            moe_router_group_topk=2,
        ),
        "topk // group_topk",
    ),
    "jitter": (dict(moe_input_jitter_eps=0.1), "moe_input_jitter_eps"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_settings_are_one_line_errors(case):
    kw, needle = REFUSED[case]
    with pytest.raises(MegatronConfigError, match=needle.replace("(", r"\(")) as info:
        moe_layer_kwargs(megatron_config(**kw))
    assert "\n" not in str(info.value)


def test_moe_layer_kwargs_shared_expert_and_sizes():
    config = megatron_config(moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True)
    kw = moe_layer_kwargs(config)
    assert (kw["hidden_size"], kw["ffn_size"], kw["num_experts"], kw["top_k"]) == (H, 16, E, 2)
    assert kw["shared_expert_size"] == 48 and kw["shared_expert_gate"] is True
    assert kw["norm_topk_prob"] is True and kw["score_func"] == "softmax"


# ---- config from native args, specs ----------------------------------------------------


def test_transformer_config_from_native_args():
    args = megatron_args("qwen2_moe")
    plan = megatron_plan("ep_nccl", 2)
    config = TransformerConfig(**transformer_config_kwargs(args, plan, use_cpu_initialization=True))
    assert config.moe_layer_freq == [1, 0]
    assert (config.num_query_groups, config.kv_channels, config.add_qkv_bias) == (2, 8, True)
    assert config.expert_model_parallel_size == 2 and config.moe_router_pre_softmax is True
    assert config.moe_shared_expert_intermediate_size == 24 and config.moe_shared_expert_gate
    mapped = moe_layer_kwargs(config)
    assert mapped["norm_topk_prob"] is False and mapped["shared_expert_gate"] is True
    with pytest.raises(MegatronConfigError, match="sliding"):
        transformer_config_kwargs(megatron_args("mixtral", sliding_window=16))


def test_decoder_block_spec_swaps_only_moe_layers():
    from megatron.core.transformer.mlp import MLP

    from moe_ext.megatron import MoEExtLayer

    config = megatron_config(num_layers=4, moe_layer_freq=[1, 0, 1, 1])
    plan = megatron_plan("replicate", 1)
    # stands in for ProcessGroups: bound into the spec, never used (nothing is built here)
    sentinel = types.SimpleNamespace(pp_rank=0)
    block = get_gpt_decoder_block_spec(config, plan, sentinel)
    kinds = []
    for spec in block.layer_specs:
        mlp = spec.submodules.mlp
        cls = mlp.func if hasattr(mlp, "func") else mlp.module
        kinds.append(cls)
    assert kinds[0] is MoEExtLayer and kinds[2] is MoEExtLayer and kinds[3] is MoEExtLayer
    # the dense slot stays Megatron's MLP (0.16: the class; 0.19: MLP.as_mlp_submodule)
    assert kinds[1] is MLP or getattr(kinds[1], "__self__", None) is MLP
    assert not is_moe_slot(block.layer_specs[1].submodules.mlp)
    assert all(is_moe_slot(block.layer_specs[i].submodules.mlp) for i in (0, 2, 3))
    style = megatron_spec_style()
    ours = block.layer_specs[0].submodules.mlp
    bound = ours.keywords if style == "partial" else ours.params
    assert bound["plan"] is plan and bound["groups"] is sentinel
    layer = get_gpt_layer_spec(plan, sentinel, qk_layernorm=True)
    assert is_moe_slot(layer.submodules.mlp)
    with pytest.raises(MegatronConfigError, match="capacity"):
        get_gpt_decoder_block_spec(
            megatron_config(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"),
            plan,
            sentinel,
        )


def test_moe_layer_spec_needs_groups_where_megatron_does_not_pass_them():
    plan = megatron_plan("replicate", 1)
    if megatron_spec_style() == "partial":
        assert moe_layer_spec(plan).keywords["groups"] is None
    else:
        with pytest.raises(MegatronConfigError, match="groups="):
            moe_layer_spec(plan)


# ---- weights -------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_weight_names_round_trip_and_qkv_layout(model_type):
    args = megatron_args(model_type)
    full = init_random_full(args)
    mega = native_to_megatron(full, args)
    back = megatron_to_native(mega, args)
    assert set(back) == set(full)
    for name, tensor in full.items():
        assert torch.equal(back[name], tensor), name
    # Megatron's layout: query group g = its nH/nKV q heads, then k_g, then v_g
    D, per_group = args.head_dim, args.num_attention_heads // args.num_key_value_heads
    qkv = mega["decoder.layers.0.self_attention.linear_qkv.weight"]
    q = full["layers.0.self_attn.q_proj.weight"]
    k = full["layers.0.self_attn.k_proj.weight"]
    v = full["layers.0.self_attn.v_proj.weight"]
    stride = (per_group + 2) * D
    for g in range(args.num_key_value_heads):
        block = qkv[g * stride : (g + 1) * stride]
        assert torch.equal(block[: per_group * D], q[g * per_group * D : (g + 1) * per_group * D])
        assert torch.equal(block[per_group * D : (per_group + 1) * D], k[g * D : (g + 1) * D])
        assert torch.equal(block[(per_group + 1) * D :], v[g * D : (g + 1) * D])


def test_training_forward_attaches_weighted_router_losses():
    """In training the weighted aux/z losses reach the router through backward (Megatron's
    MoEAuxLossAutoScaler), on top of the output's own gradient."""
    import torch.distributed as dist

    from moe_ext.megatron import MoEExtLayer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    own_init = not dist.is_initialized()
    if own_init:
        dist.init_process_group(
            "gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
        )
    try:
        from moe_ext.groups import ProcessGroups

        plan = megatron_plan("replicate", 1)
        groups = ProcessGroups.build(plan, "gloo", datetime.timedelta(seconds=60))
        grads = {}
        for coeff in (0.0, 10.0):
            torch.manual_seed(0)
            layer = MoEExtLayer(
                megatron_config(moe_aux_loss_coeff=coeff), plan=plan, groups=groups
            ).train()
            x = torch.randn(6, 2, H, generator=torch.Generator().manual_seed(3))
            y, _ = layer(x)
            y.sum().backward()
            grads[coeff] = layer.router.weight.grad.clone()
            aux = layer.aux_loss.detach()
        assert aux > 0
        assert not torch.allclose(grads[0.0], grads[10.0])
    finally:
        if own_init:
            dist.destroy_process_group()

"""Megatron-core integration on CPU (megatron-core 0.16.1 here; the code is also written
for 0.19.x): config mapping checked against Megatron's own routing and aux-loss functions,
refusals, spec building, weight-name round trips, MoEExtLayer vs a single-rank float64
reference for every strategy at world 2 (gloo), and GPTModel with our layer vs the native
decoder (Megatron's CUDA-only helpers redirected to CPU inside the spawned ranks).

# T tokens, H hidden, E experts, k top-k
"""
from __future__ import annotations

import contextlib
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
from moe_ext.model import ModelArgs, init_random_full  # noqa: E402
from moe_ext.moe.router import TopKRouter  # noqa: E402
from moe_ext.plan import plan_with_degrees  # noqa: E402
from tests.multirank import run_ranks  # noqa: E402

H, E = 32, 8


def _config(**kw) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=H, num_attention_heads=4, ffn_hidden_size=64,
                num_moe_experts=E, moe_router_topk=2, moe_ffn_hidden_size=16,
                normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
                moe_router_dtype="fp32", use_cpu_initialization=True)
    base.update(kw)
    return TransformerConfig(**base)


def plan_for(strategy: str, world: int, tp: int = 1):
    return plan_with_degrees(strategy, world, tp, reason="test")


def _tiny_args(model_type: str = "qwen3_moe", **kw) -> ModelArgs:
    base = dict(model_type=model_type, vocab_size=64, hidden_size=H, intermediate_size=64,
                moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                rope_theta=10000.0, qk_norm=model_type == "qwen3_moe",
                qkv_bias=model_type == "qwen2_moe")
    if model_type == "qwen2_moe":
        base.update(shared_expert_intermediate_size=24, shared_expert_gate=True,
                    mlp_only_layers=[1], norm_topk_prob=False)
    base.update(kw)
    return ModelArgs(**base)


# ---- router mapping vs Megatron's routing function -----------------------------------

ROUTER_CASES = {
    "softmax_topk_then_softmax": dict(),
    "softmax_pre_softmax": dict(moe_router_pre_softmax=True),
    "softmax_scaled": dict(moe_router_topk_scaling_factor=2.5),
    "sigmoid_bias_groups": dict(moe_router_score_function="sigmoid", moe_router_topk=4,
                                moe_router_enable_expert_bias=True, moe_router_num_groups=4,
                                moe_router_group_topk=2, moe_router_topk_scaling_factor=2.0),
    "sigmoid_top1": dict(moe_router_score_function="sigmoid", moe_router_topk=1),
    "softmax_pre_softmax_groups": dict(moe_router_pre_softmax=True, moe_router_topk=4,
                                       moe_router_num_groups=2, moe_router_group_topk=2),
}


@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_router_mapping_matches_megatron_routing(case):
    config = _config(**ROUTER_CASES[case])
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
        logits, config.moe_router_topk, use_pre_softmax=config.moe_router_pre_softmax,
        num_groups=config.moe_router_num_groups, group_topk=config.moe_router_group_topk,
        scaling_factor=config.moe_router_topk_scaling_factor,
        score_function=config.moe_router_score_function, expert_bias=bias)
    ours = torch.zeros(64, E).scatter(1, out.expert_idx, out.weights)  # [T, E]
    picked = torch.zeros(64, E, dtype=torch.bool).scatter(1, out.expert_idx, True)
    assert torch.equal(picked, ref_map), f"{case}: different experts picked"
    torch.testing.assert_close(ours, ref_probs.float(), rtol=1e-5, atol=1e-6)


def test_aux_loss_coefficient_matches_megatron_switch_loss():
    config = _config(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, moe_router_topk=2)
    aux_coeff, z_coeff = loss_coeffs(config)
    assert z_coeff == 0.001
    router = TopKRouter(H, E, 2, **router_kwargs(config)).train()
    x = torch.randn(50, H, generator=torch.Generator().manual_seed(1))
    out = router(x)
    probs = torch.softmax(out.logits, dim=-1)
    tokens_per_expert = torch.bincount(out.expert_idx.reshape(-1), minlength=E)
    theirs = moe_utils.switch_load_balancing_loss_func(probs, tokens_per_expert, 50, 2, E, 0.01)
    torch.testing.assert_close(aux_coeff * out.aux_loss, theirs, rtol=1e-5, atol=1e-8)
    assert loss_coeffs(_config(moe_aux_loss_coeff=0.01,
                               moe_router_load_balancing_type="none"))[0] == 0.0


REFUSED = {
    "capacity": (dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"),
                 "moe_expert_capacity_factor"),
    "bias_linear": (dict(add_bias_linear=True), "add_bias_linear"),
    "not_glu": (dict(gated_linear_unit=False), "SwiGLU"),
    "gelu": (dict(activation_func=F.gelu), "SwiGLU"),
    "sinkhorn": (dict(moe_router_load_balancing_type="sinkhorn"), "sinkhorn"),
    "logit_groups": (dict(moe_router_topk=4, moe_router_num_groups=2, moe_router_group_topk=2),
                     "moe_router_pre_softmax=True"),
    "group_score": (dict(moe_router_score_function="sigmoid", moe_router_topk=6,
                         moe_router_num_groups=4, moe_router_group_topk=2), "topk // group_topk"),
    "jitter": (dict(moe_input_jitter_eps=0.1), "moe_input_jitter_eps"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_settings_are_one_line_errors(case):
    kw, needle = REFUSED[case]
    with pytest.raises(MegatronConfigError, match=needle.replace("(", r"\(")) as info:
        moe_layer_kwargs(_config(**kw))
    assert "\n" not in str(info.value)


def test_moe_layer_kwargs_shared_expert_and_sizes():
    config = _config(moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True)
    kw = moe_layer_kwargs(config)
    assert (kw["hidden_size"], kw["ffn_size"], kw["num_experts"], kw["top_k"]) == (H, 16, E, 2)
    assert kw["shared_expert_size"] == 48 and kw["shared_expert_gate"] is True
    assert kw["norm_topk_prob"] is True and kw["score_func"] == "softmax"


# ---- config from native args, specs ----------------------------------------------------

def test_transformer_config_from_native_args():
    args = _tiny_args("qwen2_moe")
    plan = plan_for("ep_nccl", 2)
    config = TransformerConfig(**transformer_config_kwargs(args, plan,
                                                           use_cpu_initialization=True))
    assert config.moe_layer_freq == [1, 0]
    assert (config.num_query_groups, config.kv_channels, config.add_qkv_bias) == (2, 8, True)
    assert config.expert_model_parallel_size == 2 and config.moe_router_pre_softmax is True
    assert config.moe_shared_expert_intermediate_size == 24 and config.moe_shared_expert_gate
    mapped = moe_layer_kwargs(config)
    assert mapped["norm_topk_prob"] is False and mapped["shared_expert_gate"] is True
    with pytest.raises(MegatronConfigError, match="sliding"):
        transformer_config_kwargs(_tiny_args("mixtral", sliding_window=16))


def test_decoder_block_spec_swaps_only_moe_layers():
    from megatron.core.transformer.mlp import MLP

    from moe_ext.megatron import MoEExtLayer
    config = _config(num_layers=4, moe_layer_freq=[1, 0, 1, 1])
    plan = plan_for("replicate", 1)
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
        get_gpt_decoder_block_spec(_config(moe_expert_capacity_factor=1.0,
                                           moe_token_drop_policy="probs"), plan, sentinel)


def test_moe_layer_spec_needs_groups_where_megatron_does_not_pass_them():
    plan = plan_for("replicate", 1)
    if megatron_spec_style() == "partial":
        assert moe_layer_spec(plan).keywords["groups"] is None
    else:
        with pytest.raises(MegatronConfigError, match="groups="):
            moe_layer_spec(plan)


# ---- weights -------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_weight_names_round_trip_and_qkv_layout(model_type):
    args = _tiny_args(model_type)
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
        block = qkv[g * stride:(g + 1) * stride]
        assert torch.equal(block[:per_group * D], q[g * per_group * D:(g + 1) * per_group * D])
        assert torch.equal(block[per_group * D:(per_group + 1) * D], k[g * D:(g + 1) * D])
        assert torch.equal(block[(per_group + 1) * D:], v[g * D:(g + 1) * D])


# ---- multi-rank: our layer vs a float64 single-rank reference ------------------------

# (strategy, tp, sequence parallel): under sequence parallelism each TP rank holds its own
# tokens, so tp_experts gathers them over TP and ep_* / replicate use them as they are
LAYER_PLANS = [("replicate", 1, False), ("tp_experts", 2, False), ("ep_allgather", 1, False),
               ("ep_nccl", 1, False), ("ep_nccl", 2, False), ("tp_experts", 2, True),
               ("ep_nccl", 2, True)]


def _layer_body(rank, world):
    from moe_ext.groups import ProcessGroups
    from moe_ext.megatron import MoEExtLayer
    from moe_ext.moe.layer import build_moe_layer

    config_kw = dict(moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True,
                     moe_router_pre_softmax=True, moe_aux_loss_coeff=0.0)
    gen = torch.Generator().manual_seed(7)
    ref = build_moe_layer(H, 16, E, 2, norm_topk_prob=False, shared_expert_size=24,
                          shared_expert_gate=True, dtype=torch.float64)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    full = {n: p.detach().float() for n, p in ref.named_parameters()}
    for strategy, tp, sequence_parallel in LAYER_PLANS:
        plan = plan_for(strategy, world, tp)
        groups = ProcessGroups.build(plan, "gloo", datetime.timedelta(seconds=60))
        config = _config(tensor_model_parallel_size=tp, expert_model_parallel_size=plan.ep,
                         expert_tensor_parallel_size=plan.etp,
                         sequence_parallel=sequence_parallel, **config_kw)
        layer = MoEExtLayer(config, plan=plan, groups=groups, experts_backend="loop")
        from moe_ext.moe.layer import expert_shard
        gate_up, down = expert_shard(full["experts.gate_up_proj"], full["experts.down_proj"],
                                     layer.dispatcher)
        state = dict(full, **{"experts.gate_up_proj": gate_up, "experts.down_proj": down})
        layer.load_state_dict(state)
        # TP ranks see the same tokens, except under sequence parallelism; the reference
        # runs each rank's own tokens (the layer is per token)
        seed = 100 + (groups.dp_rank if tp > 1 and not sequence_parallel else rank)
        x = torch.randn(5, 3, H, generator=torch.Generator().manual_seed(seed))
        x.requires_grad_(True)
        y, bias = layer(x)
        assert bias is None and y.shape == x.shape
        (y * torch.linspace(-1, 1, H)).sum().backward()
        x64 = x.detach().double().requires_grad_(True)
        ref.zero_grad()
        y_ref = ref(x64.reshape(-1, H)).reshape(x.shape)
        (y_ref * torch.linspace(-1, 1, H, dtype=torch.float64)).sum().backward()
        where = f"{strategy} tp={tp} sp={sequence_parallel} rank {rank}"
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5, msg=where)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5, msg=where)
        # replicated router: every rank's gradient is the full one for its own tokens
        if tp > 1:
            torch.testing.assert_close(layer.router.weight.grad.double(), ref.router.weight.grad,
                                       rtol=1e-4, atol=1e-5, msg=where)


@pytest.mark.timeout(240)
def test_layer_matches_reference_every_strategy_world2():
    run_ranks(_layer_body, world_size=2)


# ---- multi-rank: GPTModel with our layer vs the native decoder -------------------------

@contextlib.contextmanager
def _cpu_megatron():
    """Inside a spawned rank only: Megatron's CUDA-only helpers (current device, causal mask
    on "cuda", CUDA RNG tracker) redirected to CPU, so GPTModel runs on the CPU."""
    from megatron.core.tensor_parallel import random as mrandom
    torch.cuda.current_device = lambda: "cpu"
    mrandom.CudaRNGStatesTracker.fork = lambda *a, **k: contextlib.nullcontext()
    yield


GPT_CASES = [("mixtral", "ep_nccl"), ("qwen2_moe", "ep_allgather"), ("qwen3_moe", "replicate"),
             ("qwen3_moe", "tp_experts")]


def _gpt_body(rank, world):
    from megatron.core.models.gpt import GPTModel

    from moe_ext.groups import ProcessGroups
    from moe_ext.megatron import (
        gpt_model_kwargs,
        install_parallel_state,
        load_into_megatron,
        pg_collection,
        uninstall_parallel_state,
    )
    from moe_ext.model import Transformer

    with _cpu_megatron():
        for model_type, strategy in GPT_CASES:
            args = _tiny_args(model_type)
            tp = 2 if strategy == "tp_experts" else 1
            plan = plan_for(strategy, world, tp)
            groups = ProcessGroups.build(plan, "gloo", datetime.timedelta(seconds=60))
            install_parallel_state(groups)
            try:
                config = TransformerConfig(**transformer_config_kwargs(
                    args, plan, use_cpu_initialization=True))
                spec = get_gpt_decoder_block_spec(config, plan, groups)
                model = GPTModel(config, spec, pg_collection=pg_collection(groups),
                                 **gpt_model_kwargs(args)).eval()
                full = init_random_full(args)
                load_into_megatron(model, native_to_megatron(full, args, plan, groups))
                native = Transformer(args).eval()
                native.load_state_dict(full)
                seed = 11 + (groups.dp_rank if tp > 1 else rank)
                tokens = torch.randint(0, args.vocab_size, (2, 6),
                                       generator=torch.Generator().manual_seed(seed))
                positions = torch.arange(6)[None].expand(2, 6)
                mask = torch.triu(torch.ones(6, 6), 1).bool()[None, None]  # True = hidden
                with torch.no_grad():
                    logits = model(tokens, positions, mask)  # [B, S, V / tp]
                    ref = native(tokens)
                if tp > 1:
                    vocab = args.vocab_size // tp
                    ref = ref[..., groups.tp_rank * vocab:(groups.tp_rank + 1) * vocab]
                torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4,
                                           msg=f"{model_type} {strategy} rank {rank}")
            finally:
                uninstall_parallel_state()


@pytest.mark.timeout(240)
def test_gptmodel_with_our_layer_matches_native_decoder_world2():
    run_ranks(_gpt_body, world_size=2)


# ---- init, expert-bias hooks, parallel_state -------------------------------------------

def _state_body(rank, world):
    from megatron.core import parallel_state as ps

    from moe_ext.groups import ProcessGroups
    from moe_ext.megatron import (
        MoEExtLayer,
        ParallelStateError,
        install_parallel_state,
        uninstall_parallel_state,
    )

    plan = plan_for("ep_nccl", world)
    groups = ProcessGroups.build(plan, "gloo", datetime.timedelta(seconds=60))
    install_parallel_state(groups)
    try:
        assert ps.get_expert_model_parallel_group() is groups.ep
        assert ps.get_tensor_model_parallel_group() is groups.tp
        assert ps.get_data_parallel_group() is groups.dp
        assert ps.get_expert_model_parallel_world_size() == 2
        assert ps.get_expert_model_parallel_rank() == groups.ep_rank
        assert ps.model_parallel_is_initialized()
        install_parallel_state(groups)  # idempotent for the same groups
        other = ProcessGroups.build(plan, "gloo", datetime.timedelta(seconds=60))
        with pytest.raises(ParallelStateError):
            install_parallel_state(other)
        # megatron's default pg collection (used when none is passed) is ours
        config = _config(expert_model_parallel_size=2, perform_initialization=True,
                         init_method_std=0.02, moe_router_enable_expert_bias=True,
                         moe_router_score_function="sigmoid")
        layer = MoEExtLayer(config, pg_collection=None, plan=plan, groups=groups)
        assert layer.num_local_experts == E // 2 and layer.experts.num_experts == E // 2
        assert layer.local_expert_indices[0] == groups.ep_rank * E // 2
        std = layer.router.weight.std().item()
        assert 0.015 < std < 0.025, std  # Megatron's init_method, not ours (H**-0.5 = 0.18)
        assert all(p.allreduce is False for p in layer.experts.parameters())
        assert layer.expert_bias is layer.router.e_score_correction_bias
        layer(torch.randn(4, 2, H))
        assert int(layer.local_tokens_per_expert.sum()) == 4 * 2 * 2
        plain = MoEExtLayer(_config(expert_model_parallel_size=2), plan=plan, groups=groups)
        assert not hasattr(plain, "expert_bias")  # Megatron's bias update skips it
        with pytest.raises(MegatronConfigError, match="expert_model_parallel_size"):
            MoEExtLayer(_config(expert_model_parallel_size=1), plan=plan, groups=groups)
    finally:
        uninstall_parallel_state()
    assert not ps.model_parallel_is_initialized()


@pytest.mark.timeout(120)
def test_parallel_state_from_our_groups_and_layer_hooks_world2():
    run_ranks(_state_body, world_size=2)


def test_training_forward_attaches_weighted_router_losses():
    """In training the weighted aux/z losses reach the router through backward (Megatron's
    MoEAuxLossAutoScaler), on top of the output's own gradient."""
    import torch.distributed as dist

    from moe_ext.megatron import MoEExtLayer
    from tests.multirank import _free_port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    own_init = not dist.is_initialized()
    if own_init:
        dist.init_process_group("gloo", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
    try:
        from moe_ext.groups import ProcessGroups
        plan = plan_for("replicate", 1)
        groups = ProcessGroups.build(plan, "gloo", datetime.timedelta(seconds=60))
        grads = {}
        for coeff in (0.0, 10.0):
            torch.manual_seed(0)
            layer = MoEExtLayer(_config(moe_aux_loss_coeff=coeff), plan=plan,
                                groups=groups).train()
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

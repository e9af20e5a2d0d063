"""Megatron-core TransformerConfig <-> moe_ext settings, both directions, version-tolerant.

``moe_layer_kwargs(config)`` reads the MoE fields of a TransformerConfig (0.16.x or 0.19.x)
and gives the ``moe_ext.moe.layer.build_moe_layer`` arguments that compute the same
function; a field our layer cannot honour is a one-line ``MegatronConfigError`` naming the
fix. ``transformer_config_kwargs(args, plan)`` / ``gpt_model_kwargs(args)`` go the other way:
a native ``ModelArgs`` shape as TransformerConfig / GPTModel arguments, keeping only fields
the installed megatron-core declares.

Router semantics (megatron.core.transformer.moe.moe_utils.topk_routing_with_score_function):
- softmax, ``moe_router_pre_softmax=False``: top-k of the logits, softmax over them, which
  equals our softmax router with ``norm_topk_prob=True``;
- softmax, ``moe_router_pre_softmax=True``: top-k of the full softmax, no renormalisation
  (``norm_topk_prob=False``);
- sigmoid: selection on sigmoid scores + ``expert_bias``, weights renormalised whenever
  k > 1 (``norm_topk_prob = k > 1``);
- ``moe_router_topk_scaling_factor`` -> ``routed_scaling_factor``;
- group-limited (``moe_router_num_groups`` / ``moe_router_group_topk``): Megatron scores a
  group by the sum of its best k/group_topk scores, ours by its best min(2, E/groups); the
  two agree only when those numbers are equal (DeepSeek-V3: 8/4 = 2), so other settings
  are refused. Softmax without pre-softmax groups on raw logits, which we do not do.
Auxiliary loss: Megatron's ``aux_loss`` type is ``coeff * E/(k*T^2) * sum_e tokens_e *
probs_e``; our router's load_balancing_loss is the same sum without the 1/k, hence
``aux_loss_coeff = moe_aux_loss_coeff / k``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from moe_ext.errors import MoeExtError


class MegatronConfigError(MoeExtError):
    """A Megatron setting moe_ext's layer cannot honour (one line: problem and fix)."""


def _get(config: Any, name: str, default: Any = None) -> Any:
    return getattr(config, name, default)


def _is_silu(fn: Any) -> bool:
    return fn is torch.nn.functional.silu or getattr(fn, "__name__", "") == "silu"


def _load_balancing_types(config: Any) -> list[str]:
    value = _get(config, "moe_router_load_balancing_type", "aux_loss")
    return [value] if isinstance(value, str) else list(value)


def check_supported(config: Any) -> None:
    """Refuse TransformerConfig MoE settings our layer would silently compute differently."""
    if not _get(config, "num_moe_experts"):
        raise MegatronConfigError(
            "config.num_moe_experts is not set; the moe_ext layer is a "
            "MoE layer, set num_moe_experts (and moe_router_topk)"
        )
    if not _get(config, "gated_linear_unit", False) or not _is_silu(
        _get(config, "activation_func")
    ):
        raise MegatronConfigError(
            "moe_ext experts are SwiGLU; set gated_linear_unit=True and "
            "activation_func=torch.nn.functional.silu"
        )
    if _get(config, "add_bias_linear", False):
        raise MegatronConfigError(
            "moe_ext experts have no biases but add_bias_linear=True; set "
            "add_bias_linear=False (add_qkv_bias stays available)"
        )
    refused = {
        "moe_expert_capacity_factor": "token dropping is not implemented; leave it None",
        "moe_input_jitter_eps": "router input jitter is not implemented; leave it None",
        "moe_latent_size": "latent MoE projections are not implemented; leave it None",
        "moe_apply_probs_on_input": "probabilities are applied on the expert output; set it False",
        "moe_router_force_load_balancing": "forced balancing is a benchmark mode; set it False",
        "moe_mlp_glu_interleave_size": "experts use the gate-then-up layout; leave it None",
        "moe_shared_expert_glu_interleave_size": "the shared expert uses gate-then-up; "
        "leave it None",
        "moe_router_force_biased": "set it False",
    }
    for name, fix in refused.items():
        if _get(config, name):
            raise MegatronConfigError(
                f"config.{name}={_get(config, name)!r} is not supported by the moe_ext layer: {fix}"
            )
    bad = [t for t in _load_balancing_types(config) if t not in ("aux_loss", "none")]
    if bad:
        raise MegatronConfigError(
            f"moe_router_load_balancing_type {bad} is not supported by the "
            f"moe_ext router; use 'aux_loss' or 'none'"
        )


def router_kwargs(config: Any) -> dict[str, Any]:
    """TopKRouter keyword arguments (score_func, norm_topk_prob, n_group, topk_group,
    routed_scaling_factor, correction_bias) equivalent to the config's router options."""
    num_experts, top_k = int(config.num_moe_experts), int(config.moe_router_topk)
    score = _get(config, "moe_router_score_function", "softmax")
    pre_softmax = bool(_get(config, "moe_router_pre_softmax", False))
    if score == "softmax":
        norm = not pre_softmax
    elif score == "sigmoid":
        norm = top_k > 1  # Megatron always renormalises sigmoid picks when k > 1
    else:
        raise MegatronConfigError(
            f"moe_router_score_function={score!r} is not supported by the "
            f"moe_ext router; use 'softmax' or 'sigmoid'"
        )
    n_group, topk_group = (
        _get(config, "moe_router_num_groups"),
        _get(config, "moe_router_group_topk"),
    )
    if bool(n_group) != bool(topk_group):
        raise MegatronConfigError(
            "set both moe_router_num_groups and moe_router_group_topk "
            "for group-limited routing, or neither"
        )
    if n_group:
        if score == "softmax" and not pre_softmax:
            raise MegatronConfigError(
                "group-limited softmax routing with moe_router_pre_softmax="
                "False ranks groups by raw logits; set "
                "moe_router_pre_softmax=True (or use sigmoid scores)"
            )
        if num_experts % n_group:
            raise MegatronConfigError(
                f"moe_router_num_groups={n_group} does not divide num_moe_experts={num_experts}"
            )
        theirs, ours = top_k // topk_group, min(2, num_experts // n_group)
        if theirs != ours:
            raise MegatronConfigError(
                f"group score: Megatron sums the best moe_router_topk/moe_router_group_topk = "
                f"{theirs} scores per group, moe_ext the best {ours}; choose topk and "
                f"group_topk with topk // group_topk == {ours}"
            )
    else:
        n_group = topk_group = None
    scale = _get(config, "moe_router_topk_scaling_factor")
    return dict(
        score_func=score,
        norm_topk_prob=norm,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=float(scale) if scale else 1.0,
        correction_bias=bool(_get(config, "moe_router_enable_expert_bias", False)),
    )


def moe_layer_kwargs(config: Any) -> dict[str, Any]:
    """``build_moe_layer`` arguments (all but dispatcher/dtype/device) for this config."""
    check_supported(config)
    ffn = _get(config, "moe_ffn_hidden_size") or config.ffn_hidden_size
    shared = _get(config, "moe_shared_expert_intermediate_size")
    return dict(
        hidden_size=int(config.hidden_size),
        ffn_size=int(ffn),
        num_experts=int(config.num_moe_experts),
        top_k=int(config.moe_router_topk),
        shared_expert_size=int(shared) if shared else None,
        shared_expert_gate=bool(shared) and bool(_get(config, "moe_shared_expert_gate")),
        **router_kwargs(config),
    )


def loss_coeffs(config: Any) -> tuple[float, float]:
    """(aux, z) coefficients that make our router's losses equal Megatron's (see module doc)."""
    types = _load_balancing_types(config)
    raw = _get(config, "moe_aux_loss_coeff", 0.0) or 0.0
    if "aux_loss" not in types:
        aux = 0.0
    elif isinstance(raw, (list, tuple)):  # 0.19: one coefficient per load-balancing type
        aux = float(raw[types.index("aux_loss")])
    else:
        aux = float(raw)
    z = float(_get(config, "moe_z_loss_coeff", 0.0) or 0.0)
    return aux / int(config.moe_router_topk), z


# ---------------------------------------------------------------------------------------
# native ModelArgs -> Megatron
# ---------------------------------------------------------------------------------------


def declared_fields(cls: Optional[type] = None) -> set[str]:
    """Field names of the installed TransformerConfig (or ``cls``)."""
    if cls is None:
        from megatron.core.transformer.transformer_config import TransformerConfig as cls
    return {f.name for f in dataclasses.fields(cls)}


def transformer_config_kwargs(
    args: Any, plan: Any = None, *, params_dtype: torch.dtype = torch.float32, **overrides: Any
) -> dict[str, Any]:
    """TransformerConfig keyword arguments for a native ``ModelArgs`` shape under ``plan``
    (degrees tp/pp/ep/etp; None = one rank). Fields the installed megatron-core does not
    declare are dropped; ``overrides`` win. Dense and MoE layers follow
    ``args.is_moe_layer`` through ``moe_layer_freq``."""
    if args.rope_scaling is not None:
        raise MegatronConfigError(
            f"rope scaling {args.rope_scaling.get('rope_type')!r} has no "
            f"Megatron GPTModel equivalent here; use a model without "
            f"rope_scaling for engine=megatron"
        )
    if args.kv_lora_rank is not None:
        raise MegatronConfigError(
            f"{args.model_type}'s Multi-head Latent Attention is not mapped to Megatron; use "
            f"the native engine for this model"
        )
    if args.partial_rotary_factor != 1.0 or args.qk_norm_type != "per_head":
        raise MegatronConfigError(
            f"{args.model_type}'s attention (partial_rotary_factor="
            f"{args.partial_rotary_factor}, qk_norm_type={args.qk_norm_type}) is not mapped to "
            f"Megatron; use the native engine for this model"
        )
    if args.sliding_window is not None:
        raise MegatronConfigError(
            "sliding-window attention is not mapped to Megatron; use the "
            "native engine for this model"
        )
    if args.o_bias:
        raise MegatronConfigError(
            "attention output bias needs add_bias_linear, which would "
            "give the experts biases too; use the native engine"
        )
    if args.score_func != "softmax" or args.n_group is not None or args.routed_scaling_factor != 1:
        raise MegatronConfigError(
            f"{args.model_type}'s router (score_func={args.score_func}, n_group={args.n_group}, "
            f"routed_scaling_factor={args.routed_scaling_factor}) is not mapped to Megatron; use "
            f"the native engine for this model"
        )
    shared = args.shared_expert_intermediate_size if args.has_shared_expert else None
    kwargs: dict[str, Any] = dict(
        num_layers=args.num_hidden_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_key_value_heads,
        kv_channels=args.head_dim,
        ffn_hidden_size=args.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=args.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(args.qkv_bias),
        qk_layernorm=bool(args.qk_norm),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        num_moe_experts=args.num_experts,
        moe_router_topk=args.num_experts_per_tok,
        moe_ffn_hidden_size=args.moe_intermediate_size,
        moe_router_pre_softmax=not args.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=args.shared_expert_gate,
        moe_layer_freq=[1 if args.is_moe_layer(i) else 0 for i in range(args.num_hidden_layers)],
        moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=False,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
    )
    if plan is not None:
        kwargs.update(
            tensor_model_parallel_size=plan.tp,
            pipeline_model_parallel_size=plan.pp,
            expert_model_parallel_size=plan.ep,
            expert_tensor_parallel_size=plan.etp,
        )
        if plan.pp > 1:
            kwargs["pipeline_dtype"] = params_dtype
    kwargs.update(overrides)
    known = declared_fields()
    return {k: v for k, v in kwargs.items() if k in known}


def uninitialised_transformer_config(
    args: Any, plan: Any, dtype: torch.dtype, device: torch.device, **overrides: Any
) -> Any:
    """Megatron TransformerConfig of ``args`` under ``plan`` for modules our code fills
    (Megatron's initialisation off): parameters in ``dtype``, created on the CPU when
    ``device`` is the CPU. ``overrides``: further TransformerConfig fields."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        **transformer_config_kwargs(
            args,
            plan,
            params_dtype=dtype,
            perform_initialization=False,
            use_cpu_initialization=device.type == "cpu",
            **overrides,
        )
    )


def gpt_model_kwargs(args: Any) -> dict[str, Any]:
    """GPTModel keyword arguments (besides config and layer spec) for a native shape."""
    return dict(
        vocab_size=args.vocab_size,
        max_sequence_length=args.max_position_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(args.rope_theta)
        if float(args.rope_theta).is_integer()
        else args.rope_theta,
        share_embeddings_and_output_weights=bool(args.tie_word_embeddings),
    )

"""GLM-4.5 MoE (``model_type: glm4_moe``: GLM-4.5, GLM-4.5-Air, GLM-4.6).

What differs from the Qwen MoE families, as transformers 5 ``modeling_glm4_moe`` computes it:
- partial rotary: RoPE on the first ``partial_rotary_factor`` of each head (default 0.5),
  rotate-half pairs within those dims (not interleaved), the rest unrotated;
- q/k/v biases iff ``attention_bias`` (o_proj never has one); per-head q/k RMSNorm iff
  ``use_qk_norm``;
- a sigmoid router whose ``e_score_correction_bias`` steers the picks only, group-limited
  (``n_group`` / ``topk_group``, a group scored by its two best biased experts), weights
  renormalised iff ``norm_topk_prob`` and scaled by ``routed_scaling_factor``;
- an ungated shared expert of ``n_shared_experts * moe_intermediate_size`` in every MoE
  layer, and dense-MLP layers (``intermediate_size``) before ``first_k_dense_replace``.
Checkpoints name the router ``mlp.gate`` (its bias ``mlp.gate.e_score_correction_bias``) and
the shared expert ``mlp.shared_experts``, and store ``num_nextn_predict_layers`` MTP layers
after the decoder's (skipped on import, as transformers does)."""

from __future__ import annotations

from typing import Any, Optional

from moe_ext.model.args import ModelArgs, ModelArgsError
from moe_ext.model.families.base import Family
from moe_ext.model.families.fields import ConfigFields


def router_groups(
    cfg: ConfigFields, experts: int, top_k: int
) -> tuple[Optional[int], Optional[int]]:
    """(n_group, topk_group) of a group-limited sigmoid router; (None, None) when one group
    holds every expert (no restriction). Shapes that cannot route are one-line errors."""
    n_group, topk_group = cfg.int("n_group", 1), cfg.int("topk_group", 1)
    if n_group < 1 or experts % n_group:
        raise ModelArgsError(
            f"{cfg.source}: n_group {n_group} must divide the {experts} routed experts"
        )
    if not 1 <= topk_group <= n_group:
        raise ModelArgsError(f"{cfg.source}: topk_group {topk_group} must be in 1..n_group")
    if topk_group * (experts // n_group) < top_k:
        raise ModelArgsError(
            f"{cfg.source}: topk_group {topk_group} groups of {experts // n_group} experts "
            f"cannot supply num_experts_per_tok {top_k}; raise topk_group"
        )
    return (None, None) if n_group == 1 else (n_group, topk_group)


def check_value(cfg: ConfigFields, key: str, supported: tuple[Any, ...], default: Any) -> None:
    """A config field transformers ignores but the model was trained with: refuse values
    this engine (and transformers) do not compute, naming the field."""
    value = cfg.raw(key, default)
    if value not in supported:
        raise ModelArgsError(
            f"{cfg.source}: {key} {value!r} is not supported for this family; "
            f"supported: {', '.join(map(repr, supported))}"
        )


class Glm4Moe(Family):
    model_type = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    default_rope_theta = 10_000.0  # transformers' default; the released configs set it
    partial_rotary = True
    hf_renames = (("mlp.router.", "mlp.gate."), ("mlp.shared_expert.", "mlp.shared_experts."))

    def default_partial_rotary_factor(self, cfg: ConfigFields) -> float:
        return 0.5  # transformers' Glm4MoeConfig default

    def family_args(self, cfg: ConfigFields) -> dict[str, Any]:
        # transformers 5 maps num_local_experts onto n_routed_experts (attribute_map)
        experts = cfg.int("n_routed_experts", None) or cfg.int("num_local_experts", 128)
        moe_ffn = cfg.int("moe_intermediate_size", 1408)
        shared = cfg.int("n_shared_experts", 1)
        dense = cfg.int("first_k_dense_replace", 1)
        if shared < 0 or dense < 0:
            raise ModelArgsError(
                f"{cfg.source}: n_shared_experts and first_k_dense_replace must be >= 0"
            )
        check_value(cfg, "scoring_func", ("sigmoid",), "sigmoid")
        check_value(cfg, "topk_method", ("noaux_tc",), "noaux_tc")
        n_group, topk_group = router_groups(cfg, experts, cfg.int("num_experts_per_tok"))
        bias = cfg.bool("attention_bias", False)
        mtp = cfg.int("num_nextn_predict_layers", None)
        return dict(
            num_experts=experts,
            moe_intermediate_size=moe_ffn,
            shared_expert_intermediate_size=shared * moe_ffn or None,
            mlp_only_layers=list(range(dense)),
            score_func="sigmoid",
            router_correction_bias=True,
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=cfg.float("routed_scaling_factor", 1.0),
            norm_topk_prob=cfg.bool("norm_topk_prob", True),
            qkv_bias=bias,
            qk_norm=cfg.bool("use_qk_norm", False),
            mtp_layers=cfg.int("num_mtp_layers", 1) if mtp is None else mtp,
        )

    def family_config(self, args: ModelArgs) -> dict[str, Any]:
        shared = args.shared_expert_intermediate_size or 0
        return dict(
            n_routed_experts=args.num_experts,
            moe_intermediate_size=args.moe_intermediate_size,
            n_shared_experts=shared // args.moe_intermediate_size,
            first_k_dense_replace=len(args.mlp_only_layers),
            n_group=args.n_group or 1,
            topk_group=args.topk_group or 1,
            routed_scaling_factor=args.routed_scaling_factor,
            norm_topk_prob=args.norm_topk_prob,
            attention_bias=args.qkv_bias,
            use_qk_norm=args.qk_norm,
            partial_rotary_factor=args.partial_rotary_factor,
            num_nextn_predict_layers=args.mtp_layers,
        )


FAMILY = Glm4Moe()

"""Qwen MoE families: ``qwen2_moe`` (Qwen1.5-MoE, Qwen2-57B-A14B: q/k/v bias, a sigmoid-
gated shared expert) and ``qwen3_moe`` (Qwen3-30B-A3B, Qwen3-235B-A22B: per-head q/k
RMSNorm, optional attention bias, optional sliding window). Both place dense-MLP layers
by ``decoder_sparse_step`` and ``mlp_only_layers`` and may renormalise the top-k."""

from __future__ import annotations

from typing import Any

from moe_ext.model.args import ModelArgs, ModelArgsError
from moe_ext.model.families.base import Family
from moe_ext.model.families.fields import ConfigFields


class _QwenMoe(Family):
    architecture: str

    def routed_args(self, cfg: ConfigFields) -> dict[str, Any]:
        # transformers 5 writes num_local_experts for qwen3_moe, older files num_experts
        experts = cfg.int("num_local_experts", None) or cfg.int("num_experts")
        return dict(
            num_experts=experts,
            moe_intermediate_size=cfg.int("moe_intermediate_size", None),
            norm_topk_prob=cfg.bool("norm_topk_prob", False),
            decoder_sparse_step=cfg.int("decoder_sparse_step", 1),
            mlp_only_layers=cfg.int_list("mlp_only_layers"),
        )

    def routed_config(self, args: ModelArgs) -> dict[str, Any]:
        return dict(
            num_experts=args.num_experts,
            moe_intermediate_size=args.moe_intermediate_size,
            norm_topk_prob=args.norm_topk_prob,
            decoder_sparse_step=args.decoder_sparse_step,
            mlp_only_layers=list(args.mlp_only_layers),
        )


class Qwen2Moe(_QwenMoe):
    model_type = "qwen2_moe"
    gates_shared_expert = True
    architecture = "Qwen2MoeForCausalLM"

    def family_args(self, cfg: ConfigFields) -> dict[str, Any]:
        cfg.raw("sliding_window")  # only used with use_sliding_window
        if cfg.bool("use_sliding_window", False):
            # HF qwen2_moe windows only some layers (layer_types / max_window_layers)
            raise ModelArgsError(
                f"{cfg.source}: qwen2_moe with use_sliding_window=true is "
                f"not supported; set use_sliding_window=false"
            )
        return dict(
            **self.routed_args(cfg),
            shared_expert_intermediate_size=cfg.int("shared_expert_intermediate_size", None),
            # Qwen1.5-MoE configs predate the key and always had q/k/v biases
            qkv_bias=cfg.bool("qkv_bias", True),
        )

    def family_config(self, args: ModelArgs) -> dict[str, Any]:
        return dict(
            **self.routed_config(args),
            shared_expert_intermediate_size=args.shared_expert_intermediate_size,
            qkv_bias=args.qkv_bias,
            use_sliding_window=False,
        )


class Qwen3Moe(_QwenMoe):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"

    def family_args(self, cfg: ConfigFields) -> dict[str, Any]:
        bias = cfg.bool("attention_bias", False)
        window = cfg.int("sliding_window", None)
        windowed = cfg.bool("use_sliding_window", False)
        return dict(
            **self.routed_args(cfg),
            qkv_bias=bias,
            o_bias=bias,
            qk_norm=True,
            sliding_window=window if windowed else None,
        )

    def family_config(self, args: ModelArgs) -> dict[str, Any]:
        return dict(
            **self.routed_config(args),
            attention_bias=args.o_bias,
            use_sliding_window=args.sliding_window is not None,
            sliding_window=args.sliding_window,
        )


QWEN2_MOE = Qwen2Moe()
QWEN3_MOE = Qwen3Moe()

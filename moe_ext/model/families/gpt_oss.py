"""gpt-oss (``model_type: gpt_oss``; gpt-oss-20b, gpt-oss-120b): every layer MoE.

- attention: q/k/v/o biases, a learned sink logit per head, sliding-window layers
  alternating with full ones (``layer_types``; sliding layers keep a ring-buffer cache of
  ``sliding_window`` slots), yarn RoPE (moe_ext.model.sink_attention);
- router: a linear layer with bias, softmax over the top-k logits;
- experts: biases and the clamped SwiGLU (``swiglu_alpha``, ``swiglu_limit``).

# H hidden, E experts, F expert FFN (intermediate_size), nH heads

Checkpoints store the experts fused, transposed and with gate/up interleaved:
``mlp.experts.gate_up_proj`` [E, H, 2F] (column 2j gate j, 2j+1 up j),
``gate_up_proj_bias`` [E, 2F] (interleaved likewise), ``down_proj`` [E, F, H],
``down_proj_bias`` [E, H], and the router as ``mlp.router.weight`` / ``.bias``; the
checkpoint reader converts to the native [E, 2F, H] gate-rows-then-up-rows and back
(``hf_expert_transforms``). The published checkpoints store the experts in MXFP4
(``moe_ext.quant``): ``gate_up_proj_blocks`` [E, 2F, H/32, 16] with its rows interleaved
gate/up like the bias, and ``down_proj_blocks`` [E, H, F/32, 16], neither transposed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from moe_ext.model.args import ModelArgs, ModelArgsError
from moe_ext.model.families.base import Family
from moe_ext.model.families.fields import ConfigFields

if TYPE_CHECKING:
    from torch import nn

    from moe_ext.checkpoint.shard import ShardRequest

SLIDING, FULL = "sliding_attention", "full_attention"
# transformers' GptOssConfig defaults
DEFAULT_WINDOW = 128
DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


class GptOss(Family):
    model_type = "gpt_oss"
    architecture = "GptOssForCausalLM"
    default_rope_theta = 150_000.0
    hf_router = "router"
    # native expert tensor -> how checkpoints store it (moe_ext.checkpoint.hf_maps)
    hf_expert_transforms = (
        ("experts.gate_up_proj", "interleaved_transposed"),
        ("experts.gate_up_proj_bias", "interleaved"),
        ("experts.down_proj", "transposed"),
    )

    # ---- config mapping -------------------------------------------------------------
    def args_from_config(self, cfg: ConfigFields) -> ModelArgs:
        explicit_rope = "rope_parameters" in cfg or "rope_scaling" in cfg
        args = super().args_from_config(cfg)
        if not explicit_rope:  # transformers' default for gpt_oss is yarn, not plain RoPE
            args = dataclasses.replace(args, rope_scaling=dict(DEFAULT_ROPE))
        return args

    def family_args(self, cfg: ConfigFields) -> dict[str, Any]:
        layers = cfg.int("num_hidden_layers")
        bias = cfg.bool("attention_bias", True)
        window = cfg.int("sliding_window", DEFAULT_WINDOW)
        if window < 1:
            raise ModelArgsError(f"{cfg.source}: sliding_window {window} must be >= 1")
        limit = cfg.float("swiglu_limit", 7.0)
        if limit <= 0:
            raise ModelArgsError(f"{cfg.source}: swiglu_limit {limit} must be > 0")
        return dict(
            num_experts=cfg.int("num_local_experts", None) or cfg.int("num_experts"),
            qkv_bias=bias,
            o_bias=bias,
            sliding_window=window,
            layer_types=_layer_types(cfg, layers),
            attention_sinks=True,
            score_func="topk_softmax",
            norm_topk_prob=True,
            router_bias=True,
            expert_bias=True,
            swiglu_limit=limit,
            swiglu_alpha=cfg.float("swiglu_alpha", 1.702),
        )

    def family_config(self, args: ModelArgs) -> dict[str, Any]:
        return {
            "num_local_experts": args.num_experts,
            "attention_bias": args.o_bias,
            "sliding_window": args.sliding_window,
            "layer_types": list(args.layer_types),
            "swiglu_alpha": args.swiglu_alpha,
            "swiglu_limit": args.swiglu_limit,
        }

    # ---- tensors --------------------------------------------------------------------
    def attention_shapes(self, args: ModelArgs) -> dict[str, tuple[int, ...]]:
        # the module's own parameter first, as state_dict lists it
        return {"sinks": (args.num_attention_heads,), **super().attention_shapes(args)}

    def attention_shards(self, args: ModelArgs, tp: int, tp_rank: int) -> dict[str, "ShardRequest"]:
        from moe_ext.checkpoint.shard import ShardRequest

        heads = args.num_attention_heads // tp
        sinks = ShardRequest.block(0, tp_rank * heads, (tp_rank + 1) * heads)
        return {"sinks": sinks, **super().attention_shards(args, tp, tp_rank)}

    def moe_shapes(self, args: ModelArgs) -> dict[str, tuple[int, ...]]:
        H, E, F = args.hidden_size, args.num_experts, args.moe_intermediate_size
        return {
            "router.weight": (E, H),
            "router.bias": (E,),
            "experts.gate_up_proj": (E, 2 * F, H),
            "experts.gate_up_proj_bias": (E, 2 * F),
            "experts.down_proj": (E, H, F),
            "experts.down_proj_bias": (E, H),
        }

    # ---- blocks ---------------------------------------------------------------------
    def build_attention(self, args: ModelArgs, layer_id: int) -> "nn.Module":
        from moe_ext.model.sink_attention import SinkAttention

        return SinkAttention(args, layer_id)

    def moe_options(self, args: ModelArgs) -> dict[str, Any]:
        return {
            **super().moe_options(args),
            "router_bias": args.router_bias,
            "expert_bias": args.expert_bias,
            "swiglu_limit": args.swiglu_limit,
            "swiglu_alpha": args.swiglu_alpha,
        }

    def kv_cache_bytes_per_token(self, args: ModelArgs, tp: int, dtype_bytes: int = 2) -> int:
        """KV bytes one more cached token costs one TP rank once a sequence is longer than
        the window: the full-attention layers' K and V only (the sliding layers' ring
        buffers are full already; ``kv_cache_bytes`` counts them)."""
        full = sum(t != SLIDING for t in args.layer_types)
        return full * _kv_slot_bytes(args, tp, dtype_bytes)

    def kv_cache_bytes(self, args: ModelArgs, tp: int, slots: int, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one TP rank holds for one sequence of ``slots`` cache slots: full
        layers keep every slot, sliding layers at most ``sliding_window`` (their ring)."""
        windowed = sum(t == SLIDING for t in args.layer_types)
        full = args.num_hidden_layers - windowed
        per_slot = _kv_slot_bytes(args, tp, dtype_bytes)
        return per_slot * (full * slots + windowed * min(slots, args.sliding_window))


def _kv_slot_bytes(args: ModelArgs, tp: int, dtype_bytes: int) -> int:
    """K and V of one slot of one layer on one TP rank (kv heads replicated when < tp)."""
    return 2 * max(1, args.num_key_value_heads // tp) * args.head_dim * dtype_bytes


def _layer_types(cfg: ConfigFields, layers: int) -> list[str]:
    """``layer_types`` checked, or transformers' default: sliding, full, sliding, ..."""
    value = cfg.raw("layer_types")
    if value is None:
        return [SLIDING if (i + 1) % 2 else FULL for i in range(layers)]
    if (
        not isinstance(value, (list, tuple))
        or len(value) != layers
        or any(t not in (SLIDING, FULL) for t in value)
    ):
        raise ModelArgsError(
            f"{cfg.source}: layer_types must list {layers} entries (num_hidden_layers), each "
            f"{FULL!r} or {SLIDING!r}; got {value!r}"
        )
    return list(value)


FAMILY = GptOss()

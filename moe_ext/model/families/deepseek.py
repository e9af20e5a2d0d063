"""DeepSeek families: ``deepseek_v2`` (DeepSeek-V2, V2-Lite) and ``deepseek_v3``
(DeepSeek-V3/R1, Moonlight; ``kimi_k2`` reads as deepseek_v3).

Both: Multi-head Latent Attention (moe_ext.model.mla) with q/kv LoRA ranks (``q_lora_rank``
null: a plain q_proj), YaRN with DeepSeek's mscale, dense MLP layers before
``first_k_dense_replace`` (and off ``moe_layer_freq``), ``n_shared_experts`` ungated shared
experts of ``moe_intermediate_size`` each (one SwiGLU of n·F), ``routed_scaling_factor``.
Routing, as transformers 5 computes it:
- deepseek_v2: softmax; ``topk_method`` greedy (top-k of all experts) or
  group_limited_greedy (top-k within the ``topk_group`` groups of ``n_group`` whose best
  expert scores highest); the weights are never renormalised (transformers ignores
  ``norm_topk_prob``; a config asking for it is refused);
- deepseek_v3: sigmoid, picks steered by ``e_score_correction_bias`` within the best
  groups (group score = sum of its two best biased scores, ``noaux_tc``), weights the
  unbiased scores renormalised iff ``norm_topk_prob``.
"""

from __future__ import annotations

from typing import Any, Optional

from moe_ext.model.args import ModelArgs, ModelArgsError
from moe_ext.model.families.base import Family
from moe_ext.model.families.fields import ConfigFields

# H hidden, n heads, Dn / Dr / Dv per-head no-position, rotated and value dims,
# C kv_lora_rank, Q q_lora_rank


class _DeepSeek(Family):
    default_rope_theta = 10_000.0
    hf_renames = (
        ("mlp.shared_expert.", "mlp.shared_experts."),
        ("mlp.router.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),
    )
    # transformers' defaults for keys a config leaves out
    default_first_k_dense = 0
    default_shared_experts = 2
    default_scaling = 1.0
    default_groups = (1, 1)  # (n_group, topk_group)

    # ---- config mapping -------------------------------------------------------------
    def args_from_config(self, cfg: ConfigFields) -> ModelArgs:
        # MLA has no separate kv heads, and RoPE tables span the rotated dims: transformers
        # overrides num_key_value_heads / head_dim the same way whatever the file says
        cfg.int("num_key_value_heads", None)
        cfg.int("head_dim", None)
        fixed = cfg.overridden(
            num_key_value_heads=cfg.int("num_attention_heads"),
            head_dim=self._positive(cfg, "qk_rope_head_dim"),
        )
        return super().args_from_config(fixed)

    def family_args(self, cfg: ConfigFields) -> dict[str, Any]:
        src = cfg.source
        if cfg.bool("mlp_bias", False):
            raise ModelArgsError(f"{src}: mlp_bias=true is not supported; DeepSeek MLPs have none")
        rope_dim = cfg.int("qk_rope_head_dim")
        if rope_dim % 2:
            raise ModelArgsError(f"{src}: qk_rope_head_dim {rope_dim} must be even (RoPE pairs)")
        F = self._positive(cfg, "moe_intermediate_size")
        shared = cfg.int("n_shared_experts", self.default_shared_experts)
        layers = cfg.int("num_hidden_layers")
        first_dense = cfg.int("first_k_dense_replace", self.default_first_k_dense)
        freq = cfg.int("moe_layer_freq", 1)
        if freq < 1:
            raise ModelArgsError(f"{src}: moe_layer_freq {freq} must be >= 1")
        bias = cfg.bool("attention_bias", False)
        q_rank = cfg.int("q_lora_rank", None)
        return dict(
            num_experts=cfg.int("n_routed_experts"),
            moe_intermediate_size=F,
            shared_expert_intermediate_size=shared * F if shared else None,
            kv_lora_rank=self._positive(cfg, "kv_lora_rank"),
            q_lora_rank=None if q_rank is None else self._positive(cfg, "q_lora_rank"),
            qk_nope_head_dim=self._positive(cfg, "qk_nope_head_dim"),
            v_head_dim=self._positive(cfg, "v_head_dim"),
            qkv_bias=bias,
            o_bias=bias,
            first_k_dense_replace=first_dense,
            moe_layer_freq=freq,
            # the original DeepSeek rule (transformers ignores moe_layer_freq; all published
            # configs have 1)
            mlp_only_layers=[i for i in range(layers) if i < first_dense or i % freq],
            routed_scaling_factor=cfg.float("routed_scaling_factor", self.default_scaling),
            **self.routing_args(cfg),
        )

    def routing_args(self, cfg: ConfigFields) -> dict[str, Any]:
        raise NotImplementedError

    def family_config(self, args: ModelArgs) -> dict[str, Any]:
        F, S = args.moe_intermediate_size, args.shared_expert_intermediate_size or 0
        return dict(
            n_routed_experts=args.num_experts,
            moe_intermediate_size=F,
            n_shared_experts=S // F,
            kv_lora_rank=args.kv_lora_rank,
            q_lora_rank=args.q_lora_rank,
            qk_nope_head_dim=args.qk_nope_head_dim,
            qk_rope_head_dim=args.head_dim,
            v_head_dim=args.v_head_dim,
            attention_bias=args.o_bias,
            first_k_dense_replace=args.first_k_dense_replace,
            moe_layer_freq=args.moe_layer_freq,
            routed_scaling_factor=args.routed_scaling_factor,
            n_group=args.n_group,
            topk_group=args.topk_group,
            topk_method=args.topk_method,
            scoring_func=args.score_func,
            norm_topk_prob=args.norm_topk_prob,
        )

    def _choice(self, cfg: ConfigFields, key: str, allowed: tuple[str, ...]) -> str:
        value = cfg.str(key, allowed[0])
        if value not in allowed:
            raise ModelArgsError(
                f"{cfg.source}: {key} {value!r} is not supported for {self.model_type}; "
                f"use {' or '.join(map(repr, allowed))}"
            )
        return value

    @staticmethod
    def _positive(cfg: ConfigFields, key: str) -> int:
        value = cfg.int(key)
        if value < 1:
            raise ModelArgsError(f"{cfg.source}: {key} {value} must be >= 1; fix the config")
        return value

    def _groups(self, cfg: ConfigFields, method: str) -> tuple[int, int]:
        """(n_group, topk_group) for group-limited routing."""
        n_group = cfg.int("n_group", self.default_groups[0])
        topk_group = cfg.int("topk_group", self.default_groups[1])
        if n_group < 1 or topk_group < 1:
            raise ModelArgsError(
                f"{cfg.source}: topk_method {method} needs n_group and topk_group >= 1, got "
                f"{n_group} and {topk_group}"
            )
        return n_group, topk_group

    # ---- tensors --------------------------------------------------------------------
    def attention_shapes(self, args: ModelArgs) -> dict[str, tuple[int, ...]]:
        H, n, C = args.hidden_size, args.num_attention_heads, args.kv_lora_rank
        Dn, Dr, Dv, Q = args.qk_nope_head_dim, args.head_dim, args.v_head_dim, args.q_lora_rank
        out: dict[str, tuple[int, ...]] = {}
        if Q is None:
            out["q_proj.weight"] = (n * (Dn + Dr), H)
        else:
            out["q_a_proj.weight"] = (Q, H)
            if args.qkv_bias:
                out["q_a_proj.bias"] = (Q,)
            out["q_a_layernorm.weight"] = (Q,)
            out["q_b_proj.weight"] = (n * (Dn + Dr), Q)
        out["kv_a_proj_with_mqa.weight"] = (C + Dr, H)
        if args.qkv_bias:
            out["kv_a_proj_with_mqa.bias"] = (C + Dr,)
        out["kv_a_layernorm.weight"] = (C,)
        out["kv_b_proj.weight"] = (n * (Dn + Dv), C)
        out["o_proj.weight"] = (H, n * Dv)
        if args.o_bias:
            out["o_proj.bias"] = (H,)
        return out

    def attention_shards(self, args: ModelArgs, tp: int, tp_rank: int) -> dict[str, Any]:
        """Heads split over TP: q_proj / q_b_proj and kv_b_proj rows, o_proj columns; the
        latent path (q_a_proj, kv_a_proj_with_mqa, their norms) and o_proj's bias whole."""
        from moe_ext.checkpoint.shard import ShardRequest

        per_rank = args.num_attention_heads // tp
        h0, h1 = tp_rank * per_rank, (tp_rank + 1) * per_rank
        qk, kv = args.qk_nope_head_dim + args.head_dim, args.qk_nope_head_dim + args.v_head_dim
        heads = {
            "q_proj.weight": ShardRequest.block(0, h0 * qk, h1 * qk),
            "q_b_proj.weight": ShardRequest.block(0, h0 * qk, h1 * qk),
            "kv_b_proj.weight": ShardRequest.block(0, h0 * kv, h1 * kv),
            "o_proj.weight": ShardRequest.block(1, h0 * args.v_head_dim, h1 * args.v_head_dim),
        }
        return {name: heads.get(name, ShardRequest.full()) for name in self.attention_shapes(args)}

    def kv_cache_bytes_per_token(self, args: ModelArgs, tp: int, dtype_bytes: int = 2) -> int:
        """The latent cache: C + Dr values per token and layer, whole on every TP rank."""
        return args.num_hidden_layers * (args.kv_lora_rank + args.head_dim) * dtype_bytes

    # ---- blocks ---------------------------------------------------------------------
    def rope_layout(self, args: ModelArgs) -> str:
        raise NotImplementedError

    def build_attention(self, args: ModelArgs, layer_id: int) -> Any:
        from moe_ext.model.mla import MLAttention

        return MLAttention(args, self.rope_layout(args))

    def moe_options(self, args: ModelArgs) -> dict[str, Any]:
        # V2's group-limited greedy scores a group by its best expert, V3 by its best two
        group_score = "max" if args.topk_method == "group_limited_greedy" else "top2_sum"
        return {**super().moe_options(args), "group_score": group_score}


class DeepSeekV2(_DeepSeek):
    model_type = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"

    def routing_args(self, cfg: ConfigFields) -> dict[str, Any]:
        self._choice(cfg, "scoring_func", ("softmax",))
        method = self._choice(cfg, "topk_method", ("greedy", "group_limited_greedy"))
        if cfg.bool("norm_topk_prob", False):
            raise ModelArgsError(
                f"{cfg.source}: norm_topk_prob=true is not supported for deepseek_v2 "
                f"(transformers never renormalises its weights); set it to false"
            )
        groups: tuple[Optional[int], Optional[int]] = (None, None)
        if method == "group_limited_greedy":
            groups = self._groups(cfg, method)
        else:
            cfg.raw("n_group"), cfg.raw("topk_group")  # greedy ignores the groups
        return dict(
            score_func="softmax",
            topk_method=method,
            n_group=groups[0],
            topk_group=groups[1],
            norm_topk_prob=False,
        )

    def rope_layout(self, args: ModelArgs) -> str:
        return "complex"


class DeepSeekV3(_DeepSeek):
    model_type = "deepseek_v3"
    aliases = ("kimi_k2",)
    architecture = "DeepseekV3ForCausalLM"
    default_first_k_dense = 3
    default_shared_experts = 1
    default_scaling = 2.5
    default_groups = (8, 4)

    def routing_args(self, cfg: ConfigFields) -> dict[str, Any]:
        self._choice(cfg, "scoring_func", ("sigmoid",))
        method = self._choice(cfg, "topk_method", ("noaux_tc",))
        n_group, topk_group = self._groups(cfg, method)
        return dict(
            score_func="sigmoid",
            router_correction_bias=True,
            topk_method=method,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=cfg.bool("norm_topk_prob", True),
            rope_interleave=cfg.bool("rope_interleave", True),
            mtp_layers=cfg.int("num_nextn_predict_layers", 0),
        )

    def family_config(self, args: ModelArgs) -> dict[str, Any]:
        return dict(
            **super().family_config(args),
            rope_interleave=args.rope_interleave,
            num_nextn_predict_layers=args.mtp_layers,
        )

    def rope_layout(self, args: ModelArgs) -> str:
        return "interleave" if args.rope_interleave else "half"


DEEPSEEK_V2 = DeepSeekV2()
DEEPSEEK_V3 = DeepSeekV3()

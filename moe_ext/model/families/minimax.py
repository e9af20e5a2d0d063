"""MiniMax-M2 (``model_type: minimax_m2``), as transformers 5 ``modeling_minimax_m2``
computes it:
- q/k RMSNorm over the whole q and k projections (``qk_norm_type: per_layer``: all heads'
  nH·D values share one mean square, weights [nH·D] / [nKV·D]) before the heads are split;
  under TP the weights shard with the heads and the mean square is all-reduced
  (layers.projection_rms), so ``attention_shards`` slices q_norm/k_norm like q/k rows;
- partial rotary: ``rotary_dim`` of each head's D (rotate-half pairs), the rest unrotated;
- every layer MoE (``intermediate_size`` is the expert FFN), no shared expert; a sigmoid
  router whose ``e_score_correction_bias`` (``use_routing_bias``) steers the picks only,
  the picks' unbiased scores renormalised;
- checkpoints as Mixtral's: ``block_sparse_moe.experts.{j}.w1/w3/w2``, router
  ``block_sparse_moe.gate``, the bias ``block_sparse_moe.e_score_correction_bias``
  (transformers' in-memory ``mlp.e_score_correction_bias`` reads too), and
  ``num_mtp_modules`` MTP layers after the decoder's (skipped on import).
Config fields of the released model that transformers ignores but that would change the
computation (``scoring_func``, ``use_qk_norm``, ``qk_norm_type``, ``attn_type_list``'s
lightning layers, ``shared_intermediate_size``, ``routed_scaling_factor``) are checked:
a value this engine does not compute is a one-line error naming the field."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moe_ext.model.args import ModelArgs, ModelArgsError
from moe_ext.model.families.base import Family
from moe_ext.model.families.fields import ConfigFields
from moe_ext.model.families.glm import check_value

if TYPE_CHECKING:
    from moe_ext.checkpoint.shard import ShardRequest

_BIAS = "mlp.router.e_score_correction_bias"


class MiniMaxM2(Family):
    model_type = "minimax_m2"
    architecture = "MiniMaxM2ForCausalLM"
    default_rope_theta = 5_000_000.0  # transformers' MiniMaxM2Config default
    partial_rotary = True
    hf_moe_block = "block_sparse_moe"
    hf_expert_parts = ("w1", "w3", "w2")
    # files keep block_sparse_moe; transformers 5 holds the bias at mlp. in memory
    hf_renames = (
        (_BIAS, "block_sparse_moe.e_score_correction_bias"),
        (_BIAS, "mlp.e_score_correction_bias"),
    )

    def hf_renames_for(self, layout: str) -> tuple[tuple[str, str], ...]:
        # per-expert files name the block block_sparse_moe; the fused layout is
        # transformers' in-memory naming (mlp.)
        return self.hf_renames[:1] if layout == "per-expert" else self.hf_renames[1:]

    def default_partial_rotary_factor(self, cfg: ConfigFields) -> float:
        # released configs state rotary_dim (transformers turns it into the factor)
        rotary = cfg.int("rotary_dim", None)
        if rotary is None:
            return 1.0
        head_dim = cfg.int("head_dim", None) or (
            cfg.int("hidden_size") // cfg.int("num_attention_heads")
        )
        return rotary / head_dim

    def family_args(self, cfg: ConfigFields) -> dict[str, Any]:
        check_value(cfg, "scoring_func", ("sigmoid",), "sigmoid")
        check_value(cfg, "use_qk_norm", (True,), True)
        check_value(cfg, "qk_norm_type", ("per_layer",), "per_layer")
        check_value(cfg, "shared_intermediate_size", (0,), 0)
        check_value(cfg, "routed_scaling_factor", (1, 1.0), 1.0)
        kinds = cfg.raw("attn_type_list", [])
        if not isinstance(kinds, list) or any(k != 1 for k in kinds):
            raise ModelArgsError(
                f"{cfg.source}: attn_type_list {kinds!r} has layers other than 1 (softmax "
                "attention); lightning-attention layers are not supported"
            )
        for key in ("use_mtp", "mtp_transformer_layers"):
            cfg.raw(key)  # MTP modules are not run; their layers are skipped on import
        experts = cfg.int("num_local_experts", None) or cfg.int("num_experts")
        return dict(
            num_experts=experts,
            score_func="sigmoid",
            router_correction_bias=cfg.bool("use_routing_bias", True),
            norm_topk_prob=True,
            qk_norm=True,
            qk_norm_type="per_layer",
            mtp_layers=cfg.int("num_mtp_modules", 0),
        )

    def family_config(self, args: ModelArgs) -> dict[str, Any]:
        return dict(
            num_local_experts=args.num_experts,
            use_routing_bias=args.router_correction_bias,
            scoring_func="sigmoid",
            use_qk_norm=True,
            qk_norm_type="per_layer",
            rotary_dim=int(args.head_dim * args.partial_rotary_factor),
            partial_rotary_factor=args.partial_rotary_factor,
            shared_intermediate_size=0,
            attn_type_list=[1] * args.num_hidden_layers,
            num_mtp_modules=args.mtp_layers,
        )

    def attention_shapes(self, args: ModelArgs) -> dict[str, tuple[int, ...]]:
        out = super().attention_shapes(args)
        # one norm over the whole projection: a weight per element of q / k
        out["q_norm.weight"] = (args.num_attention_heads * args.head_dim,)
        out["k_norm.weight"] = (args.num_key_value_heads * args.head_dim,)
        return out

    def attention_shards(self, args: ModelArgs, tp: int, tp_rank: int) -> dict[str, "ShardRequest"]:
        """The GQA rule, with q_norm / k_norm weights sliced by heads like the q / k rows
        they scale (the mean square itself is all-reduced over TP in the forward)."""
        out = super().attention_shards(args, tp, tp_rank)
        out["q_norm.weight"] = out["q_proj.weight"]
        out["k_norm.weight"] = out["k_proj.weight"]
        return out


FAMILY = MiniMaxM2()

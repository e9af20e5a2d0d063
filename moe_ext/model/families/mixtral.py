"""Mixtral (``model_type: mixtral``): every layer MoE, softmax top-k router renormalised
over the k picks, experts as w1/w3/w2 under ``block_sparse_moe``, optional sliding window."""

from __future__ import annotations

from typing import Any

from moe_ext.model.args import ModelArgs
from moe_ext.model.families.base import Family
from moe_ext.model.families.fields import ConfigFields


class Mixtral(Family):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    default_rope_theta = 1_000_000.0
    # transformers 5 renames block_sparse_moe to mlp in memory; files keep the old name
    hf_moe_block = "block_sparse_moe"
    hf_expert_parts = ("w1", "w3", "w2")

    def family_args(self, cfg: ConfigFields) -> dict[str, Any]:
        # Mixtral's FFN size is intermediate_size; num_experts is the conf/model spelling
        experts = cfg.int("num_local_experts", None) or cfg.int("num_experts")
        return dict(
            num_experts=experts, norm_topk_prob=True, sliding_window=cfg.int("sliding_window", None)
        )

    def family_config(self, args: ModelArgs) -> dict[str, Any]:
        return {"num_local_experts": args.num_experts, "sliding_window": args.sliding_window}


FAMILY = Mixtral()

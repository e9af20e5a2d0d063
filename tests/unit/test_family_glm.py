"""glm4_moe (GLM-4.5, GLM-4.5-Air, GLM-4.6) against Hugging Face transformers (CPU, fp32):
logits and greedy ids of tiny random checkpoints read through the checkpoint reader (HF
names: mlp.gate, its e_score_correction_bias, mlp.shared_experts), with every term that
differs from Qwen MoE non-zero and shown to matter; one-line config errors."""

from __future__ import annotations

import json

import pytest
import torch

from moe_ext.errors import MoeExtError
from moe_ext.model import ModelArgs
from tests.support import GLM_VARIANTS as VARIANTS
from tests.support import (
    check_against_transformers,
    check_compiled_decode,
    masked_logits,
    native_from_dir,
)
from tests.support import glm_hf_model as hf_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_greedy_match_transformers(variant, tmp_path):
    check_against_transformers(hf_model(variant), tmp_path)


@pytest.mark.parametrize(
    "term", ["correction bias", "attention bias", "q/k norm", "partial rotary"]
)
def test_every_glm_term_moves_the_logits(term):
    """The reference checkpoint exercises each term: dropping it from transformers' model
    moves the logits far beyond the 1e-4 the match above allows."""
    hf = hf_model("grouped")
    base = masked_logits(hf)
    with torch.no_grad():
        if term == "correction bias":
            for name, b in hf.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.zero_()
        elif term == "attention bias":
            for name, p in hf.named_parameters():
                if name.endswith("_proj.bias"):
                    p.zero_()
        elif term == "q/k norm":
            hf = hf_model("grouped", use_qk_norm=False)
            hf.load_state_dict(
                {k: v for k, v in hf_model("grouped").state_dict().items() if "_norm" not in k},
                strict=False,
            )
        else:
            hf = hf_model("grouped", partial_rotary_factor=1.0)
    assert (masked_logits(hf) - base).abs().max() > 1e-2


def test_config_reads_glm_fields():
    config = hf_model("grouped").config.to_dict()
    args = ModelArgs.from_hf_config(json.loads(json.dumps(config)))
    assert (args.score_func, args.router_correction_bias, args.norm_topk_prob) == (
        "sigmoid",
        True,
        True,
    )
    assert (args.n_group, args.topk_group, args.routed_scaling_factor) == (4, 2, 2.5)
    assert args.shared_expert_intermediate_size == 2 * 32 and not args.shared_expert_gate
    assert args.mlp_only_layers == [0, 1] and args.intermediate_size == 96
    assert (args.qkv_bias, args.o_bias, args.qk_norm, args.qk_norm_type) == (
        True,
        False,
        True,
        "per_head",
    )
    assert (args.partial_rotary_factor, args.mtp_layers) == (0.5, 1)
    # transformers' default partial_rotary_factor for glm4_moe is 0.5 too
    del config["rope_parameters"]
    assert ModelArgs.from_hf_config(config).partial_rotary_factor == 0.5


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(scoring_func="softmax"), "scoring_func 'softmax' is not supported"),
        (dict(topk_method="greedy"), "topk_method 'greedy' is not supported"),
        (dict(rope_parameters={"rope_type": "longrope"}), "rope type 'longrope' is not supported"),
        (dict(n_group=3), "n_group 3 must divide the 8 routed experts"),
        (dict(topk_group=5), "topk_group 5 must be in 1..n_group"),
        (dict(partial_rotary_factor=0.1875), "rotates 3 dims; it must be an even number"),
        (dict(partial_rotary_factor="half"), "partial_rotary_factor must be a number"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        (dict(n_routed_experts="8"), "n_routed_experts must be an integer"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(change, message):
    config = {
        **hf_model("air").config.to_dict(),
        "n_group": 4,
        "topk_group": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        **change,
    }
    with pytest.raises(MoeExtError) as info:
        ModelArgs.from_hf_config(config, "ckpt/config.json")
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith("ckpt/config.json")


def test_compiled_decode_matches_eager(tmp_path):
    hf_model("grouped").save_pretrained(tmp_path)
    check_compiled_decode(native_from_dir(tmp_path))

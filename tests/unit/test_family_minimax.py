"""minimax_m2 (MiniMax-M2) against Hugging Face transformers (CPU, fp32): logits and greedy
ids of tiny random checkpoints read through the checkpoint reader (HF names:
block_sparse_moe.experts.{j}.w1/w3/w2, block_sparse_moe.gate and its
e_score_correction_bias), and one-line errors for config fields the engine does not
compute. The whole-projection q/k norm split over TP ranks against the unsplit one:
tests/multirank/test_family_minimax.py."""

from __future__ import annotations

import json

import pytest
import torch

from moe_ext.errors import MoeExtError
from moe_ext.model import ModelArgs
from moe_ext.model.parallelize import take_shard
from tests.support import MINIMAX_VARIANTS as VARIANTS
from tests.support import (
    check_against_transformers,
    check_compiled_decode,
    glm_hf_model,
    masked_logits,
    native_from_dir,
)
from tests.support import minimax_hf_model as hf_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_greedy_match_transformers(variant, tmp_path):
    check_against_transformers(hf_model(variant), tmp_path)


@pytest.mark.parametrize("term", ["correction bias", "per_layer norm", "partial rotary"])
def test_every_minimax_term_moves_the_logits(term):
    """Each term shows in the reference logits (far beyond the 1e-4 match): the correction
    bias, the norm over the whole projection (vs the same weights per head), rotary_dim."""
    hf = hf_model("m2")
    base = masked_logits(hf)
    with torch.no_grad():
        if term == "correction bias":
            for name, b in hf.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.zero_()
        elif term == "per_layer norm":
            for layer in hf.model.layers:
                attn = layer.self_attn
                for norm, heads in ((attn.q_norm, 4), (attn.k_norm, 2)):
                    per_head = norm.forward  # the same weights, a mean square per head

                    def by_head(x, per_head=per_head, heads=heads):
                        parts = x.view(*x.shape[:-1], heads, -1)
                        ms = parts.float().pow(2).mean(-1, keepdim=True)
                        normed = (parts.float() * torch.rsqrt(ms + 1e-6)).view_as(x)
                        return per_head.__self__.weight * normed.to(x.dtype)

                    norm.forward = by_head
        else:
            hf = hf_model("m2", rotary_dim=16)
    assert (masked_logits(hf) - base).abs().max() > 1e-2


def test_attention_shards_slice_the_norm_weights_with_the_heads():
    args = ModelArgs.from_hf_config(hf_model("m2").config.to_dict())
    shapes = args.family.attention_shapes(args)
    assert (shapes["q_norm.weight"], shapes["k_norm.weight"]) == ((64,), (32,))
    rows = [args.family.attention_shards(args, 2, r) for r in range(2)]
    full = torch.arange(64.0)
    assert torch.equal(torch.cat([take_shard(full, r["q_norm.weight"]) for r in rows]), full)
    assert [r["k_norm.weight"].bounds((32,)) for r in rows] == [[((0, 16),)], [((16, 32),)]]


def test_config_reads_minimax_fields():
    config = json.loads(json.dumps(hf_model("m2").config.to_dict()))
    args = ModelArgs.from_hf_config(config)
    assert (args.qk_norm, args.qk_norm_type, args.partial_rotary_factor) == (
        True,
        "per_layer",
        0.5,
    )
    assert (args.score_func, args.router_correction_bias, args.norm_topk_prob) == (
        "sigmoid",
        True,
        True,
    )
    assert args.moe_intermediate_size == 32 and not args.has_shared_expert
    assert all(args.is_moe_layer(i) for i in range(3))
    # the released config.json states rotary_dim only (no rope_parameters)
    released = {**config, "rope_theta": 5e6, "rotary_dim": 4, "use_routing_bias": False}
    del released["rope_parameters"]
    args = ModelArgs.from_hf_config(released)
    assert (args.partial_rotary_factor, args.rope_theta) == (0.25, 5e6)
    assert not args.router_correction_bias
    assert "mlp.router.e_score_correction_bias" not in str(args.family.param_shapes(args))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(scoring_func="softmax"), "scoring_func 'softmax' is not supported"),
        (dict(use_qk_norm=False), "use_qk_norm False is not supported"),
        (dict(qk_norm_type="per_head"), "qk_norm_type 'per_head' is not supported"),
        (dict(shared_intermediate_size=64), "shared_intermediate_size 64 is not supported"),
        (dict(routed_scaling_factor=2.0), "routed_scaling_factor 2.0 is not supported"),
        (dict(attn_type_list=[1, 0, 1]), "attn_type_list [1, 0, 1] has layers other than 1"),
        (dict(rotary_dim=3), "rotates 3 dims; it must be an even number"),
        (dict(rope_parameters={"rope_type": "su"}), "rope type 'su' is not supported"),
        (dict(use_routing_bias="yes"), "use_routing_bias must be true or false"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(change, message):
    config = {**hf_model("m2").config.to_dict(), **change}
    if "rotary_dim" in change:
        del config["rope_parameters"]  # rotary_dim counts when the RoPE parameters are silent
    with pytest.raises(MoeExtError) as info:
        ModelArgs.from_hf_config(config, "ckpt/config.json")
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith("ckpt/config.json")


@pytest.mark.parametrize("family", ["glm4_moe", "minimax_m2"])
def test_megatron_engine_refuses_the_attention_in_one_line(family):
    """engine=megatron maps neither partial rotary nor the whole-projection q/k norm: a
    one-line error before anything is built, naming them (not a wrong model)."""
    from moe_ext.megatron.config import MegatronConfigError, transformer_config_kwargs

    model = glm_hf_model("air") if family == "glm4_moe" else hf_model("m2")
    args = ModelArgs.from_hf_config(model.config.to_dict())
    with pytest.raises(MegatronConfigError, match="partial_rotary_factor=0.5") as info:
        transformer_config_kwargs(args)
    assert "\n" not in str(info.value)


def test_compiled_decode_matches_eager(tmp_path):
    hf_model("m2").save_pretrained(tmp_path)
    check_compiled_decode(native_from_dir(tmp_path))

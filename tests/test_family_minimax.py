"""minimax_m2 (MiniMax-M2) against Hugging Face transformers (CPU, fp32): logits and greedy
ids of tiny random checkpoints read through the checkpoint reader (HF names:
block_sparse_moe.experts.{j}.w1/w3/w2, block_sparse_moe.gate and its
e_score_correction_bias), the whole-projection q/k norm split over TP ranks against the
unsplit one, and one-line errors for config fields the engine does not compute."""

from __future__ import annotations

import json

import pytest
import torch

from moe_ext.errors import MoeExtError
from moe_ext.model import ModelArgs
from moe_ext.model.parallelize import take_shard
from tests.multirank import run_ranks
from tests.test_family_glm import _logits, check_against_transformers

transformers = pytest.importorskip("transformers")

VARIANTS = {
    # the released layout: rotary_dim = head_dim / 2, routing bias
    "m2": dict(rotary_dim=8),
    # rotary_dim a quarter of the head, four kv heads
    "quarter": dict(rotary_dim=4, num_key_value_heads=4),
}


def hf_model(variant: str, **changes):
    """A tiny random MiniMaxM2ForCausalLM, fp32, eval mode; norms, the router and its
    correction bias random and non-zero."""
    config = transformers.MiniMaxM2Config(
        **{
            **dict(
                vocab_size=128,
                hidden_size=64,
                intermediate_size=32,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                num_local_experts=8,
                num_experts_per_tok=2,
                max_position_embeddings=128,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=None,
            ),
            **VARIANTS[variant],
            **changes,
        }
    )
    torch.manual_seed(0)
    model = transformers.MiniMaxM2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale, shift = (0.1, 1.0) if "norm" in name else (0.2, 0.0)
            p.copy_(shift + scale * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    return model.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_greedy_match_transformers(variant, tmp_path):
    check_against_transformers(hf_model(variant), tmp_path)


@pytest.mark.parametrize("term", ["correction bias", "per_layer norm", "partial rotary"])
def test_every_minimax_term_moves_the_logits(term):
    """Each term shows in the reference logits (far beyond the 1e-4 match): the correction
    bias, the norm over the whole projection (vs the same weights per head), rotary_dim."""
    hf = hf_model("m2")
    base = _logits(hf)
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
    assert (_logits(hf) - base).abs().max() > 1e-2


def _projection_norm_body(rank: int, world: int) -> None:
    """The per_layer q/k norm with q/k split by heads over ``world`` TP ranks (norm weights
    sliced by the family's attention_shards): each rank's normalised q and k equal its
    rows of the unsplit computation, with kv heads split (2 over 2 ranks) or replicated
    (1 over 2); with split heads, the projections' gradients equal the unsplit ones."""
    import torch.distributed as dist

    from moe_ext.model.layers import Attention

    for kv_heads in (2, 1):
        config = hf_model("m2", num_key_value_heads=kv_heads).config.to_dict()
        args = ModelArgs.from_hf_config(config)
        torch.manual_seed(1)
        full = Attention(args)
        with torch.no_grad():
            for p in full.parameters():
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
        x = torch.randn(2, 5, args.hidden_size)
        q = full.q_proj(x).detach().requires_grad_(True)
        k = full.k_proj(x).detach().requires_grad_(True)
        ref_q, ref_k = full.q_norm(q), full.k_norm(k)
        weights_q, weights_k = torch.randn_like(ref_q), torch.randn_like(ref_k)
        ((ref_q * weights_q).sum() + (ref_k * weights_k).sum()).backward()

        shards = args.family.attention_shards(args, world, rank)
        q_rows = slice(*shards["q_norm.weight"].bounds(full.q_norm.weight.shape)[0][0])
        k_rows = slice(*shards["k_norm.weight"].bounds(full.k_norm.weight.shape)[0][0])
        local = Attention(args)
        with torch.no_grad():
            local.q_norm.weight.data = full.q_norm.weight[q_rows].clone()
            local.k_norm.weight.data = full.k_norm.weight[k_rows].clone()
        local.tp_group = dist.group.WORLD
        lq = q.detach()[..., q_rows].clone().requires_grad_(True)
        lk = k.detach()[..., k_rows].clone().requires_grad_(True)
        out_q, out_k = local.normalize_projections(lq, lk)
        torch.testing.assert_close(out_q, ref_q[..., q_rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_k, ref_k[..., k_rows], atol=1e-5, rtol=1e-5)
        if kv_heads % world == 0:  # no replicated head counted twice in the local losses
            (
                (out_q * weights_q[..., q_rows]).sum() + (out_k * weights_k[..., k_rows]).sum()
            ).backward()
            torch.testing.assert_close(lq.grad, q.grad[..., q_rows], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lk.grad, k.grad[..., k_rows], atol=1e-5, rtol=1e-5)


@pytest.mark.multirank
def test_projection_norm_split_over_tp_equals_unsplit():
    run_ranks(_projection_norm_body, 2)


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
    from tests.test_family_glm import hf_model as glm_model

    model = glm_model("air") if family == "glm4_moe" else hf_model("m2")
    args = ModelArgs.from_hf_config(model.config.to_dict())
    with pytest.raises(MegatronConfigError, match="partial_rotary_factor=0.5") as info:
        transformer_config_kwargs(args)
    assert "\n" not in str(info.value)


def test_compiled_decode_matches_eager(tmp_path):
    from tests.test_family_glm import check_compiled_decode, native_from_dir

    hf_model("m2").save_pretrained(tmp_path)
    check_compiled_decode(native_from_dir(tmp_path))

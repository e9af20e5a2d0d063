"""glm4_moe (GLM-4.5, GLM-4.5-Air, GLM-4.6) against Hugging Face transformers (CPU, fp32):
logits and greedy ids of tiny random checkpoints read through the checkpoint reader (HF
names: mlp.gate, its e_score_correction_bias, mlp.shared_experts), with every term that
differs from Qwen MoE non-zero and shown to matter; one-line config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_ext.checkpoint import CheckpointReader
from moe_ext.config import GenerateConf
from moe_ext.errors import MoeExtError
from moe_ext.model import ModelArgs, Transformer, generate

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 3, 42, 8, 9, 11], [7, 1, 30], [60, 2, 2, 19, 4, 77, 101, 3, 9]]
NEW_TOKENS = 10

VARIANTS = {
    # GLM-4.5-Air's layout: q/k/v biases, no q/k norm, one group, one shared expert
    "air": dict(attention_bias=True, use_qk_norm=False, n_group=1, topk_group=1),
    # GLM-4.6-like: per-head q/k norm, 4 groups of 2 experts (2 kept), scaled weights,
    # a shared expert twice the expert FFN, two dense layers first
    "grouped": dict(
        attention_bias=True,
        use_qk_norm=True,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        n_shared_experts=2,
        first_k_dense_replace=2,
    ),
    # YaRN over the rotated half of each head (the frequencies span Dr = D/2)
    "yarn": dict(
        attention_bias=True,
        use_qk_norm=True,
        n_group=2,
        topk_group=1,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
    ),
}


def hf_model(variant: str, **changes):
    """A tiny random Glm4MoeForCausalLM, fp32, eval mode; biases, norms and the router's
    correction bias all random and non-zero."""
    config = transformers.Glm4MoeConfig(
        **{
            **dict(
                vocab_size=128,
                hidden_size=64,
                intermediate_size=96,
                moe_intermediate_size=32,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                partial_rotary_factor=0.5,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_shared_experts=1,
                first_k_dense_replace=1,
                norm_topk_prob=True,
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
    model = transformers.Glm4MoeForCausalLM(config)
    randomize(model)
    return model.eval()


@torch.no_grad()
def randomize(model) -> None:
    """Every parameter and the correction biases random: a term the engine drops shows."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith(".bias"):
            p.copy_(0.3 * torch.randn_like(p))
        else:
            p.copy_(0.2 * torch.randn_like(p))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.randn_like(b))


def native_from_dir(directory: Path) -> Transformer:
    """The native model of a saved HF checkpoint, read through the checkpoint reader."""
    with CheckpointReader.open(directory) as reader:
        args = ModelArgs.from_hf_config(reader.config)
        state = {name: reader.read(name) for name in reader.names()}
    model = Transformer(args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(".expert_load" in m for m in missing), (missing, unexpected)
    return model.eval()


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_greedy(model, prompts, new_tokens=NEW_TOKENS) -> list[list[int]]:
    out = []
    for prompt in prompts:
        ids = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        out.append(ids[0, len(prompt) :].tolist())
    return out


def check_against_transformers(hf, tmp_path: Path) -> None:
    """Logits on left-padded prompts within 1e-4 and greedy ids equal."""
    hf.save_pretrained(tmp_path)
    model = native_from_dir(tmp_path)
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = model(ids, kv_start=(mask == 0).sum(1))
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=1e-4)
    got = generate(model, PROMPTS, GenerateConf(max_new_tokens=NEW_TOKENS), eos_id=None)
    assert got.tokens == hf_greedy(hf, PROMPTS)
    assert len({tuple(t) for t in got.tokens}) > 1  # not a degenerate continuation


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_greedy_match_transformers(variant, tmp_path):
    check_against_transformers(hf_model(variant), tmp_path)


def _logits(model) -> torch.Tensor:
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.parametrize(
    "term", ["correction bias", "attention bias", "q/k norm", "partial rotary"]
)
def test_every_glm_term_moves_the_logits(term):
    """The reference checkpoint exercises each term: dropping it from transformers' model
    moves the logits far beyond the 1e-4 the match above allows."""
    hf = hf_model("grouped")
    base = _logits(hf)
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
    assert (_logits(hf) - base).abs().max() > 1e-2


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


@torch.inference_mode()
def check_compiled_decode(model: Transformer) -> None:
    """compile_decode (aot_eager: dynamo and AOT autograd, no C compiler) traces the
    family's decode block (partial rotary's slices, its q/k norm, the sigmoid router) and
    gives the eager decode step's logits."""

    def decode_logits():
        ids = torch.tensor([p[:3] for p in PROMPTS])  # [3, 3]
        model.setup_caches(3, 64)
        kv_start = torch.zeros(3, dtype=torch.long)
        logits = model(ids, torch.arange(3), kv_start, 3, last_only=True, use_cache=True)
        step = logits[:, -1].argmax(-1, keepdim=True)  # [3, 1]
        return model(step, torch.tensor([3]), kv_start, None, last_only=True, use_cache=True)

    eager = decode_logits()
    model.compile_decode(backend="aot_eager")
    try:
        compiled = decode_logits()
    finally:
        model.compile_decode(False)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compiled_decode_matches_eager(tmp_path):
    hf_model("grouped").save_pretrained(tmp_path)
    check_compiled_decode(native_from_dir(tmp_path))

"""The native decoder against Hugging Face transformers (CPU, fp32): logits and greedy ids
for tiny random models of every supported family, with prompts of different lengths."""
from __future__ import annotations

import pytest
import torch

from moe_ext.config import GenerateConf
from moe_ext.model import ModelArgs, Transformer, generate

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 3, 42, 8, 9, 11], [7, 1, 30], [60, 2, 2, 19, 4]]
EOS = 13


def _hf_model(family: str, **extra):
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, pad_token_id=0, eos_token_id=EOS)
    if family == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=24, num_local_experts=4,
                                            num_experts_per_tok=2, **extra)
        model = transformers.MixtralForCausalLM(config)
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **common, intermediate_size=40, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
            mlp_only_layers=[1], norm_topk_prob=False, **extra)
        model = transformers.Qwen2MoeForCausalLM(config)
    else:
        config = transformers.Qwen3MoeConfig(
            **common, intermediate_size=40, moe_intermediate_size=16, head_dim=16,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, **extra)
        model = transformers.Qwen3MoeForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # random everything (norm weights and biases too) so every parameter matters
            p.copy_(torch.randn_like(p) * (0.2 if "norm" not in name else 0.1)
                    + (1.0 if "norm" in name else 0.0))
    return model.eval()


def _native_from_hf(hf_model) -> Transformer:
    args = ModelArgs.from_hf_config(hf_model.config.to_dict())
    model = Transformer(args)
    state = {}
    for name, value in hf_model.state_dict().items():
        name = name.removeprefix("model.").replace(".mlp.gate.weight", ".mlp.router.weight")
        state[name] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def _left_pad(prompts):
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _hf_greedy(hf_model, prompts, max_new):
    ids, mask = _left_pad(prompts)
    out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                            do_sample=False, eos_token_id=EOS, pad_token_id=0)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        if EOS in row:
            row = row[:row.index(EOS) + 1]
        rows.append(row)
    return rows


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_logits_and_greedy_match_transformers(family):
    hf = _hf_model(family)
    model = _native_from_hf(hf)
    ids, mask = _left_pad(PROMPTS)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        kv_start = (mask == 0).sum(1)
        ours = model(ids, kv_start=kv_start)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=1e-4)

    expected = _hf_greedy(hf, PROMPTS, 12)
    got = generate(model, PROMPTS, GenerateConf(max_new_tokens=12), eos_id=EOS)
    assert got.tokens == expected
    assert got.decode_steps > 0 and got.prefill_tokens == sum(map(len, PROMPTS))


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 3.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
])
def test_rope_scaling_matches_transformers(rope):
    # dynamic only rescales past max_position_embeddings: a short limit makes it kick in
    extra = {"rope_parameters": {"rope_theta": 10000.0, **rope}}
    hf = _hf_model("qwen3_moe", **extra)
    if rope["rope_type"] == "dynamic":
        hf.config.max_position_embeddings = 8
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    model = _native_from_hf(hf)
    assert model.args.rope_type == rope["rope_type"]
    prompts = [[5, 17, 3, 42, 8, 9], [7, 1, 30, 22]]
    expected = _hf_greedy(hf, prompts, 8)
    got = generate(model, prompts, GenerateConf(max_new_tokens=8), eos_id=EOS)
    assert got.tokens == expected


def test_mixtral_sliding_window_matches_transformers():
    hf = _hf_model("mixtral", sliding_window=4)
    model = _native_from_hf(hf)
    assert model.args.sliding_window == 4
    expected = _hf_greedy(hf, PROMPTS, 8)
    got = generate(model, PROMPTS, GenerateConf(max_new_tokens=8), eos_id=EOS)
    assert got.tokens == expected
    ids, mask = _left_pad(PROMPTS)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = model(ids, kv_start=(mask == 0).sum(1))
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)

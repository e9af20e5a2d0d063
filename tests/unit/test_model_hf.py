"""The native decoder against Hugging Face transformers (CPU, fp32): logits and greedy ids
for tiny random models of every supported family, with prompts of different lengths."""

from __future__ import annotations

import pytest
import torch

from moe_ext.config import GenerateConf
from moe_ext.model import ModelArgs, Transformer, generate
from tests.support import HF_EOS as EOS
from tests.support import HF_PROMPTS as PROMPTS
from tests.support import hf_greedy, hf_model, left_pad

transformers = pytest.importorskip("transformers")


def _native_from_hf(hf) -> Transformer:
    args = ModelArgs.from_hf_config(hf.config.to_dict())
    model = Transformer(args)
    state = {}
    for name, value in hf.state_dict().items():
        name = name.removeprefix("model.").replace(".mlp.gate.weight", ".mlp.router.weight")
        state[name] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_logits_and_greedy_match_transformers(family):
    hf = hf_model(family)
    model = _native_from_hf(hf)
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        kv_start = (mask == 0).sum(1)
        ours = model(ids, kv_start=kv_start)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=1e-4)

    expected = hf_greedy(hf, PROMPTS, 12)
    got = generate(model, PROMPTS, GenerateConf(max_new_tokens=12), eos_id=EOS)
    assert got.tokens == expected
    assert got.decode_steps > 0 and got.prefill_tokens == sum(map(len, PROMPTS))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 3.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ],
)
def test_rope_scaling_matches_transformers(rope):
    # dynamic only rescales past max_position_embeddings: a short limit makes it kick in
    extra = {"rope_parameters": {"rope_theta": 10000.0, **rope}}
    hf = hf_model("qwen3_moe", **extra)
    if rope["rope_type"] == "dynamic":
        hf.config.max_position_embeddings = 8
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    model = _native_from_hf(hf)
    assert model.args.rope_type == rope["rope_type"]
    prompts = [[5, 17, 3, 42, 8, 9], [7, 1, 30, 22]]
    expected = hf_greedy(hf, prompts, 8)
    got = generate(model, prompts, GenerateConf(max_new_tokens=8), eos_id=EOS)
    assert got.tokens == expected


def test_mixtral_sliding_window_matches_transformers():
    hf = hf_model("mixtral", sliding_window=4)
    model = _native_from_hf(hf)
    assert model.args.sliding_window == 4
    expected = hf_greedy(hf, PROMPTS, 8)
    got = generate(model, PROMPTS, GenerateConf(max_new_tokens=8), eos_id=EOS)
    assert got.tokens == expected
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = model(ids, kv_start=(mask == 0).sum(1))
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)

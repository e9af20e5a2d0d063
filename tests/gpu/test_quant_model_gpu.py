"""Quantized models on the GPU fast path (bf16 compute): the Triton kernels read the FP8 /
MXFP4 bytes inside the decode step, CUDA graphs and the compiled decode keep working.

Reference: the same architecture in bf16 holding the dequantized weights (every value a
quantized model can hold is exact in bf16). The kernels differ from it only by bf16
rounding of intermediate activations, so decode logits agree within 3% of their largest
magnitude (the bound the family fast-path tests use).

# B batch, L prompt length, V vocab
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_ext.config import GenerateConf
from moe_ext.model import ModelArgs, Transformer, generate
from moe_ext.model.weights import init_random_
from moe_ext.quant import QuantConfig
from moe_ext.quant.layout import dequantize_state
from tests.support import decode_logits, needs_triton

pytestmark = [pytest.mark.gpu, needs_triton]

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
QWEN3 = dict(
    model_type="qwen3_moe",
    vocab_size=512,
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=128,
    num_experts=16,
    num_experts_per_tok=4,
    qk_norm=True,
    max_position_embeddings=256,
    init_seed=3,
)
GPT_OSS = dict(
    model_type="gpt_oss",
    vocab_size=512,
    hidden_size=512,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_local_experts=16,
    num_experts_per_tok=4,
    sliding_window=8,
    max_position_embeddings=256,
)
CASES = {
    "qwen3-fp8": (QWEN3, QuantConfig("fp8", (128, 128))),
    "qwen3-mxfp4": (QWEN3, QuantConfig("mxfp4")),
    "gpt_oss-mxfp4": (GPT_OSS, QuantConfig("mxfp4")),
}


def _models(case: str):
    config, quant = CASES[case]
    plain = ModelArgs.from_hf_config(config)
    args = dataclasses.replace(plain, quantization=quant)
    quantized = init_random_(Transformer(args).to("cuda"))
    reference = Transformer(plain).to("cuda")
    reference.load_state_dict(dequantize_state(quantized.state_dict(), args), strict=True)
    return quantized.to(torch.bfloat16).eval(), reference.to(torch.bfloat16).eval()


def _decode_logits(model, steps: int = 6) -> torch.Tensor:
    """PROMPTS[0] twice, then ``steps`` greedy decode steps. Returns [steps, B, V]."""
    return decode_logits(model, torch.tensor([PROMPTS[0]] * 2, device="cuda"), steps)


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_decode_fast_path(case):
    quantized, reference = _models(case)
    with torch.inference_mode():
        want = _decode_logits(reference)
        eager = _decode_logits(quantized)
        scale = want.abs().max().item()
        assert (eager - want).abs().max().item() <= 0.03 * scale, "kernels vs dequantized"
        quantized.compile_decode()
        compiled = _decode_logits(quantized)
        assert (compiled - eager).abs().max().item() <= 0.03 * scale, "compiled vs eager"
        quantized.compile_decode(False)

    def run(**flags):
        conf = GenerateConf(max_new_tokens=16, **flags)
        return generate(quantized, PROMPTS, conf, eos_id=None, pad_id=0)

    eager_run = run(cuda_graphs=False, compile_decode=False)
    graphed = run(compile_decode=False)
    assert graphed.cuda_graphs and graphed.tokens == eager_run.tokens
    compiled_runs = [run(), run()]  # capture, then replay of the same graph
    assert compiled_runs[0].tokens == compiled_runs[1].tokens

"""Quantized models (moe_ext.quant) against models built from their dequantized weights.

Weight-only quantization dequantizes exactly in float32, so a quantized model computing in
float32 must give the very logits of the plain model loaded with the dequantized weights
(``dequantize_state``), whatever the family (GQA, MLA with absorbed kv_b_proj, gpt-oss
biases and clamped SwiGLU). Rank slices of the stored tensors must equal the stored form
of the logical slices, and a slice that cuts a scale block is refused naming the tensor.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_ext.model import ModelArgs, Transformer
from moe_ext.model.parallelize import RankCoords, shard_slices, take_shard
from moe_ext.model.weights import init_random_, init_random_full
from moe_ext.quant import QuantConfig, QuantizationError
from moe_ext.quant.layout import (
    dequantize_state,
    quantize_state,
    stored_requests,
    stored_tensors,
)
from tests.support import GPT_OSS_SHAPE, deepseek_hf_config, family_args, plan_of

FP8 = QuantConfig("fp8", weight_block_size=(8, 8))
MXFP4 = QuantConfig("mxfp4")


def _args(family: str) -> ModelArgs:
    if family == "qwen3_moe":
        return dataclasses.replace(family_args("qwen3_moe"), moe_intermediate_size=32)
    if family == "deepseek_v3":
        config = deepseek_hf_config("v3", moe_intermediate_size=32).to_dict()
        return ModelArgs.from_hf_config(config)
    config = {**GPT_OSS_SHAPE, "intermediate_size": 64, "model_type": "gpt_oss"}
    return ModelArgs.from_hf_config(config)


CASES = [("qwen3_moe", FP8), ("qwen3_moe", MXFP4), ("deepseek_v3", FP8), ("gpt_oss", MXFP4)]


@pytest.mark.parametrize("family, quant", CASES, ids=[f"{f}-{q.method}" for f, q in CASES])
def test_quantized_model_equals_dequantized_reference(family, quant):
    plain = _args(family)
    args = dataclasses.replace(plain, quantization=quant)
    model = init_random_(Transformer(args)).eval()
    state = model.state_dict()
    assert sorted(state) == sorted(stored_tensors(args))  # what checkpoints hold
    assert any(t.dtype in (torch.float8_e4m3fn, torch.uint8) for t in state.values())
    reference = Transformer(plain).eval()
    reference.load_state_dict(dequantize_state(state, args), strict=True)
    ids = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


def test_dtype_casts_move_but_never_cast_stored_tensors():
    args = dataclasses.replace(_args("qwen3_moe"), quantization=FP8)
    model = init_random_(Transformer(args))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16)
    after = model.state_dict()
    for name, spec in stored_tensors(args).items():
        if spec.dtype is not None:  # fp8 weights and float32 scales: untouched
            assert after[name].dtype == spec.dtype and torch.equal(
                after[name].float(), before[name].float()
            ), name
    assert after["embed_tokens.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "degrees",
    [dict(ep=2, dp=2), dict(tp=2, etp=2), dict(tp=2, ep=2, world=4, dp=2)],
    ids=["ep2", "tp2-etp2", "tp2-ep2"],
)
@pytest.mark.parametrize("quant", [FP8, MXFP4], ids=["fp8", "mxfp4"])
def test_rank_slices_of_stored_tensors_are_stored_slices(quant, degrees):
    """take_shard(full stored, stored_requests) == quantize(take_shard(full logical))."""
    args = dataclasses.replace(_args("qwen3_moe"), quantization=quant)
    if quant.method == "mxfp4":  # a 32-column group per TP slice: H 64, F 64
        args = dataclasses.replace(args, hidden_size=64, moe_intermediate_size=64)
    logical = init_random_full(args)
    stored = quantize_state(logical, args)
    plan = plan_of("ep_nccl" if degrees.get("ep", 1) > 1 else "tp_experts", **degrees)
    for rank in range(plan.world_size):
        requests = shard_slices(plan, RankCoords.of(plan, rank), args)
        by_logical = quantize_state(
            {n: take_shard(logical[n], r) for n, r in requests.items()}, args
        )
        for name, request in stored_requests(requests, args).items():
            assert torch.equal(take_shard(stored[name], request), by_logical[name]), name


def test_slice_that_cuts_a_scale_block_names_the_tensor():
    args = dataclasses.replace(_args("qwen3_moe"), quantization=QuantConfig("fp8", (32, 32)))
    plan = plan_of("tp_experts", tp=2, etp=2)  # F=32 -> 16 rows per rank, blocks of 32
    requests = shard_slices(plan, RankCoords.of(plan, 1), args)
    with pytest.raises(QuantizationError, match=r"layers\.\d+\.\S+: this rank's rows \[\d+, \d+\)"):
        stored_requests(requests, args)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(quant_method="awq"), "quant_method 'awq' is not supported"),
        (dict(weight_block_size=None), "weight_block_size must be [rows, columns]"),
        (dict(weight_block_size=[128]), "weight_block_size must be [rows, columns]"),
        (dict(fmt="e5m2"), "fmt 'e5m2' is not supported"),
        (dict(activation_scheme="static"), "activation_scheme 'static' is not supported"),
    ],
)
def test_bad_quantization_config_is_one_line(change, message):
    config = {**_args("qwen3_moe").family.hf_config(_args("qwen3_moe"))}
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [8, 8],
        **change,
    }
    with pytest.raises(QuantizationError) as err:
        ModelArgs.from_hf_config(config)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_fp8_expert_ffn_must_hold_whole_blocks():
    with pytest.raises(QuantizationError, match="moe_intermediate_size 32 is not a multiple"):
        dataclasses.replace(_args("qwen3_moe"), quantization=QuantConfig("fp8", (64, 64)))


def test_modules_to_not_convert_keep_the_model_dtype():
    quant = QuantConfig("fp8", (8, 8), not_converted=("model.layers.*.self_attn", "lm_head"))
    args = dataclasses.replace(_args("qwen3_moe"), quantization=quant)
    stored = stored_tensors(args)
    assert stored["layers.0.self_attn.q_proj.weight"].dtype is None
    assert stored["layers.1.mlp.experts.gate_up_proj"].dtype == torch.float8_e4m3fn
    assert "layers.0.mlp.gate_proj.weight_scale_inv" in stored  # dense MLP still fp8


def test_fp8_gpt_oss_is_refused_naming_its_format():
    with pytest.raises(QuantizationError, match="use mxfp4"):
        dataclasses.replace(_args("gpt_oss"), quantization=QuantConfig("fp8", (32, 32)))

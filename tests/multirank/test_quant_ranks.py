"""Quantized checkpoints through the launcher's own steps, against transformers.

Tiny models saved by transformers are quantized with the converter
(``moe_ext.checkpoint.convert.quantize``, what ``tools/convert_checkpoint.py quantize``
runs): qwen3_moe and deepseek_v3 in FP8 with small blocks, gpt_oss in MXFP4. The
reference is transformers loading that quantized checkpoint with ``dequantize=True``
(``FineGrainedFP8Config`` / ``Mxfp4Config``), i.e. its own dequantized copy. Greedy ids of
the launcher (fp32 compute on the stored FP8 / MXFP4 tensors) equal its greedy ids under
every strategy at 1 and 2 ranks and with pp=2.
"""

from __future__ import annotations

import json

import pytest
import torch

from moe_ext.checkpoint.convert import quantize
from tests.support import (
    GPT_OSS_SHAPE,
    check_launcher_cases,
    deepseek_hf_model,
    gpt_oss_hf_model,
    hf_greedy_each,
    launcher_cases,
    run_ranks,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' FP8 dequantizing loader needs it

PROMPTS = [[1, 5, 7, 9, 11, 13], [2, 4, 6], [3, 8, 30, 31, 32, 33, 34, 35]]
NEW_TOKENS = 6
CHECKPOINTS = ("qwen3_moe-fp8", "deepseek_v3-fp8", "gpt_oss-mxfp4")
STRATEGIES = [
    (s, [f"strategy={s}"]) for s in ("replicate", "tp_experts", "ep_allgather", "ep_nccl")
]
PIPELINES = [
    ("replicate pp=2", ["strategy=replicate", "parallel.pp=2"]),
    ("ep_nccl pp=2", ["strategy=ep_nccl", "parallel.pp=2"]),
]


def _qwen3_model():
    config = transformers.Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():  # larger router logits: routing decisions far from ties
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.mul_(8.0)
    return model


# name -> (model factory, quantize method and fp8 block, transformers' dequantizing config)
MODELS = {
    # TP=2 slices: q rows 32, kv rows 16, o columns 32, expert FFN 16 -> blocks of 16
    "qwen3_moe-fp8": (_qwen3_model, ["fp8", [16]], (16, 16)),
    # MLA under TP=2: kv_b_proj 28 rows and o_proj 12 columns per rank -> blocks of 4
    "deepseek_v3-fp8": (lambda: deepseek_hf_model("v3", num_hidden_layers=4), ["fp8", [4]], (4, 4)),
    # MXFP4 groups of 32 along each expert input: H 64, F 64
    "gpt_oss-mxfp4": (lambda: gpt_oss_hf_model(intermediate_size=64), ["mxfp4", None], None),
}
assert set(MODELS) == set(CHECKPOINTS) and GPT_OSS_SHAPE["hidden_size"] % 32 == 0


def _dequantizing_reference(directory, block):
    """transformers' own reading of the quantized checkpoint, dequantized to float32."""
    if block is None:
        quant = transformers.Mxfp4Config(dequantize=True)
    else:
        quant = transformers.FineGrainedFP8Config(dequantize=True, weight_block_size=block)
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quant, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """name -> (quantized directory, transformers' greedy ids on its dequantized copy)."""
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for name, (make, quantize_args, block) in MODELS.items():
        source, target = root / f"{name}-src", root / name
        make().save_pretrained(source)
        quantize(source, target, *quantize_args, progress=False)  # the CLI: test_quant_checkpoint
        reference = _dequantizing_reference(target, block)
        out[name] = (str(target), hf_greedy_each(reference, PROMPTS, NEW_TOKENS))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    out["prompts"] = str(prompts)
    return out


def test_checkpoints_hold_quantized_tensors(checkpoints):
    from safetensors import safe_open

    for name in CHECKPOINTS:
        directory = checkpoints[name][0]
        config = json.loads((__import__("pathlib").Path(directory) / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == name.split("-")[1]
        dtypes = set()
        for file in __import__("pathlib").Path(directory).glob("*.safetensors"):
            with safe_open(file, "pt") as f:
                dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
        assert ("F8_E4M3" if name.endswith("fp8") else "U8") in dtypes, (name, dtypes)


def test_single_rank_matches_transformers(checkpoints):
    run_ranks(
        check_launcher_cases,
        1,
        args=(launcher_cases(checkpoints, CHECKPOINTS, [("auto", [])], NEW_TOKENS),),
    )


def test_two_ranks_every_strategy_and_pipeline(checkpoints):
    run_ranks(
        check_launcher_cases,
        2,
        args=(launcher_cases(checkpoints, CHECKPOINTS, STRATEGIES + PIPELINES, NEW_TOKENS),),
    )

"""Quantized checkpoints (issue 17): ``convert_checkpoint.py quantize`` writes fp8
block-scaled (qwen3_moe, deepseek_v3; small blocks) and MXFP4 (gpt_oss) Hugging Face
checkpoints of tiny random models; the reader gives back exactly
``moe_ext.quant.layout.quantize_state`` of the originals under the stored names, whole and
in EP / TP slices (quantized parts never cast); the HF files themselves dequantize to the
originals within each format's rounding error (checked in plain torch here, on the HF
names: gate/up rows, per-expert scales, gpt-oss interleaved rows); export-hf / import-hf
keep the quantized bytes; verify checks scales and digests; bad input is one line and
writes nothing.

Shape legend: E experts, F expert FFN, H hidden; bo, bi fp8 block rows / columns.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_ext.checkpoint import CheckpointError, CheckpointReader, load_sharded
from moe_ext.checkpoint.convert import export_hf, import_hf, quantize, verify
from moe_ext.checkpoint.hf_maps import config_args
from moe_ext.errors import MoeExtError
from moe_ext.model.parallelize import RankCoords, shard_slices, take_shard
from moe_ext.quant.config import QuantizationError
from moe_ext.quant.layout import quantize_state, stored_requests, stored_tensors
from tests.support import (
    deepseek_hf_model,
    gpt_oss_hf_model,
    gpt_oss_native_state,
    plan_of,
    safetensors_dir,
    write_family_checkpoint,
)

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert_checkpoint.py"
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bytes of ``t`` (fp8 compared bit for bit, NaN-safe)."""
    return t.contiguous().view(torch.uint8)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Unquantized sources (their logical tensors) and their quantized conversions."""
    root = tmp_path_factory.mktemp("quant_ckpt")
    out = {}
    # qwen3_moe (moe_ext source, fp32): fp8 in 8x8 blocks, per-expert (the published
    # layout) and fused; F = 16, so an expert-TP of 2 keeps whole blocks
    qwen = write_family_checkpoint(root / "qwen", "qwen3_moe", torch.float32)
    quantize(root / "qwen", root / "qwen_fp8", "fp8", block=[8], progress=False)
    quantize(root / "qwen", root / "qwen_fp8_fused", "fp8", [8, 8], "fused", progress=False)
    out["qwen"] = (root / "qwen", qwen)
    # deepseek_v3 (HF source, fp32; MLA projections of 12, 20, 48, 56 rows: partial blocks)
    # through the command line, 16x16 blocks
    deepseek = deepseek_hf_model("v3")
    deepseek.save_pretrained(root / "deepseek")
    (root / "deepseek" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    res = _cli(
        "quantize",
        *(str(root / "deepseek"), str(root / "deepseek_fp8")),
        *("--format", "fp8", "--block", "16", "16"),
    )
    assert res.returncode == 0, res.stderr
    out["deepseek"] = (root / "deepseek", _native(root / "deepseek"))
    # gpt_oss (HF source; F = 128: whole 32-groups in both expert weights, also per
    # expert-TP rank of 2): mxfp4
    gpt = gpt_oss_hf_model(seed=2, intermediate_size=128, num_hidden_layers=2)
    gpt.save_pretrained(root / "gpt")
    quantize(root / "gpt", root / "gpt_mxfp4", "mxfp4", progress=False)
    out["gpt"] = (root / "gpt", gpt_oss_native_state(gpt.state_dict()))
    out["gpt_hf"] = gpt.state_dict()
    out["root"] = root
    return out


def _native(directory: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader.open(directory) as reader:
        return {n: reader.read(n) for n in reader.names()}


CASES = [("qwen", "qwen_fp8"), ("qwen", "qwen_fp8_fused"), ("deepseek", "deepseek_fp8")]
CASES += [("gpt", "gpt_mxfp4")]


@pytest.mark.parametrize("source, quantized", CASES)
def test_reader_gives_quantize_state_of_the_original(ckpts, source, quantized):
    _, original = ckpts[source]
    reader = CheckpointReader.open(ckpts["root"] / quantized)
    args = config_args(reader.config)
    specs = stored_tensors(args)
    assert reader.names() == list(specs)  # the quantized model's state_dict names, in order
    expected = quantize_state(original, args)
    assert expected.keys() == specs.keys()
    roles = set()
    for name, spec in specs.items():
        got = reader.read(name)
        assert got.dtype == expected[name].dtype and got.shape == spec.shape, name
        assert torch.equal(_bits(got), _bits(expected[name])), name
        roles.add(spec.role)
    method = args.quantization.method
    assert roles == ({"weight", "scale_inv"} if method == "fp8" else {"weight", "blocks", "scales"})


def _fp8_reference(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """float32 [R, C] of an fp8 [R, C] weight and its [ceil(R/bo), ceil(C/bi)] scale_inv,
    block by block."""
    bo, bi = block
    w = q.float()
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            w[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi] *= scale[r, c]
    return w


def _check_fp8_error(w: torch.Tensor, ref: torch.Tensor, block, what: str) -> None:
    """e4m3 keeps 3 mantissa bits: rounding is within 1/16 of the value, plus half the
    subnormal step (2^-10 of the block's scale, amax / 448)."""
    bo, bi = block
    for r in range(0, w.shape[0], bo):
        for c in range(0, w.shape[1], bi):
            tile, deq = ref[r : r + bo, c : c + bi], w[r : r + bo, c : c + bi]
            bound = tile.abs() / 16 + tile.abs().max() / 448 * 2**-9 + 1e-12
            assert ((deq - tile).abs() <= bound).all(), (what, r, c)


@pytest.mark.parametrize("source, quantized, block", [("qwen", "qwen_fp8", (8, 8))])
@pytest.mark.parametrize("layer", [0, 1])
def test_fp8_files_dequantize_to_the_original(ckpts, source, quantized, block, layer):
    """On the HF names: each expert's gate and up (separate tensors, separate scales) and
    the dense / attention linears dequantize to the source within e4m3 rounding."""
    _, original = ckpts[source]
    files = safetensors_dir(ckpts["root"] / quantized)
    config = json.loads((ckpts["root"] / quantized / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    pairs = {}
    if layer == 1:  # MoE layer (decoder_sparse_step 2)
        gate_up, down = (
            original[f"layers.1.mlp.experts.{p}"] for p in ("gate_up_proj", "down_proj")
        )
        F = gate_up.shape[1] // 2
        for j in range(gate_up.shape[0]):
            prefix = f"model.layers.1.mlp.experts.{j}."
            pairs[prefix + "gate_proj"] = gate_up[j, :F]
            pairs[prefix + "up_proj"] = gate_up[j, F:]
            pairs[prefix + "down_proj"] = down[j]
    else:
        for p in ("gate_proj", "up_proj", "down_proj"):
            pairs[f"model.layers.0.mlp.{p}"] = original[f"layers.0.mlp.{p}.weight"]
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        pairs[f"model.layers.{layer}.self_attn.{p}"] = original[
            f"layers.{layer}.self_attn.{p}.weight"
        ]
    for key, ref in pairs.items():
        q, scale = files[key + ".weight"], files[key + ".weight_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32, key
        assert scale.shape == (-(-ref.shape[0] // block[0]), -(-ref.shape[1] // block[1])), key
        _check_fp8_error(_fp8_reference(q, scale, block), ref, block, key)
    # norms, embedding and router stay as they were
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight"):
        native = key.removeprefix("model.").replace("mlp.gate.", "mlp.router.")
        assert files[key].dtype == torch.float32 and torch.equal(files[key], original[native])


def test_deepseek_partial_blocks_dequantize_to_the_original(ckpts):
    """MLA projections whose rows and columns are not multiples of 16 (last block partial)."""
    _, original = ckpts["deepseek"]
    files = safetensors_dir(ckpts["root"] / "deepseek_fp8")
    for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        key, ref = f"model.layers.1.self_attn.{p}", original[f"layers.1.self_attn.{p}.weight"]
        scale = files[key + ".weight_scale_inv"]
        assert scale.shape == (-(-ref.shape[0] // 16), -(-ref.shape[1] // 16)), key
        _check_fp8_error(
            _fp8_reference(files[key + ".weight"], scale, (16, 16)), ref, (16, 16), key
        )
    key = "model.layers.2.mlp.shared_experts.down_proj"  # the family's rename, like the weight
    ref = original["layers.2.mlp.shared_expert.down_proj.weight"]
    _check_fp8_error(
        _fp8_reference(files[key + ".weight"], files[key + ".weight_scale_inv"], (16, 16)),
        ref,
        (16, 16),
        key,
    )
    assert (ckpts["root"] / "deepseek_fp8" / "tokenizer_config.json").is_file()


def _mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [..., R, G * 32] of uint8 blocks [..., R, G, 16] and e8m0 scales [..., R, G]:
    element 2k in the low nibble of byte k, 2k + 1 in the high one."""
    low, high = E2M1[(blocks & 15).long()], E2M1[(blocks >> 4).long()]
    values = torch.stack((low, high), -1).flatten(-2)  # [..., R, G, 32]
    return (values * 2.0 ** (scales.float() - 127)[..., None]).flatten(-2)


def test_mxfp4_files_are_the_gpt_oss_layout(ckpts):
    """gate_up_proj_blocks [E, 2F, H/32, 16] with rows gate 0, up 0, gate 1, ... (the
    transposed, column-interleaved bf16 tensor's rows), down_proj_blocks [E, H, F/32, 16]
    not transposed; within e2m1 rounding (a quarter of the group's largest value)."""
    hf = ckpts["gpt_hf"]
    files = safetensors_dir(ckpts["root"] / "gpt_mxfp4")
    config = json.loads((ckpts["root"] / "gpt_mxfp4" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "mxfp4"}
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts."
        assert prefix + "gate_up_proj" not in files and prefix + "down_proj" not in files
        for part, ref in (
            ("gate_up_proj", hf[prefix + "gate_up_proj"].transpose(1, 2)),  # [E, 2F, H] interleaved
            ("down_proj", hf[prefix + "down_proj"].transpose(1, 2)),  # [E, H, F]
        ):
            blocks, scales = files[prefix + part + "_blocks"], files[prefix + part + "_scales"]
            assert blocks.dtype == scales.dtype == torch.uint8
            assert blocks.shape == (*ref.shape[:2], ref.shape[2] // 32, 16), part
            w = _mxfp4_reference(blocks, scales)
            amax = ref.unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True)  # [E, R, G, 1]
            err = (w - ref).unflatten(-1, (-1, 32)).abs()
            assert (err <= amax / 4 + 1e-12).all(), part
            assert (err.sum() / ref.abs().sum()) < 0.2, part  # most values are close
        for bias in ("gate_up_proj_bias", "down_proj_bias"):  # stay as they were
            assert torch.equal(files[prefix + bias], hf[prefix + bias])


def _sharded(directory: Path, plan, rank: int, dtype=None):
    reader = CheckpointReader.open(directory)
    args = config_args(reader.config)
    requests = stored_requests(shard_slices(plan, RankCoords.of(plan, rank), args), args)
    if dtype is None:  # what the launcher passes: each tensor in its model dtype
        dtype = {n: s.dtype or torch.float32 for n, s in stored_tensors(args).items()}
    got = load_sharded(reader, requests, dtype=dtype, progress=False)
    return reader, requests, got


@pytest.mark.parametrize(
    "quantized, plan, rank",
    [
        ("qwen_fp8", plan_of("ep_nccl", dp=2, ep=2), 1),
        ("qwen_fp8", plan_of("tp_experts", tp=2, etp=2), 1),
        ("qwen_fp8_fused", plan_of("tp_experts", tp=2, etp=2), 0),
        ("deepseek_fp8", plan_of("ep_nccl", dp=2, ep=2), 1),
        ("gpt_mxfp4", plan_of("ep_nccl", dp=2, ep=2), 0),
        ("gpt_mxfp4", plan_of("tp_experts", tp=2, etp=2), 1),
    ],
    ids=lambda v: getattr(v, "strategy", str(v)),
)
def test_sliced_reads_are_slices_of_the_full_read(ckpts, quantized, plan, rank):
    directory = ckpts["root"] / quantized
    full = _native(directory)
    reader, requests, got = _sharded(directory, plan, rank)
    assert any(n.endswith(("_scale_inv", "_blocks")) for n in requests)
    for name, request in requests.items():
        assert got[name].dtype == full[name].dtype, name
        assert torch.equal(_bits(got[name]), _bits(take_shard(full[name], request))), name
    assert reader.bytes_read == sum(t.numel() * t.element_size() for t in got.values())
    if plan.ep == 2:  # a rank reads half of every expert tensor
        experts = [n for n in requests if ".mlp.experts." in n and "bias" not in n]
        assert all(got[n].shape[0] * 2 == full[n].shape[0] for n in experts)


def test_loading_never_casts_quantized_parts(ckpts):
    plan = plan_of("replicate", world=1)
    _, _, got = _sharded(ckpts["root"] / "deepseek_fp8", plan, 0, dtype=torch.bfloat16)
    dtypes = {t.dtype for n, t in got.items() if n.endswith("_scale_inv")}
    assert dtypes == {torch.float32}
    assert got["layers.1.mlp.experts.gate_up_proj"].dtype == torch.float8_e4m3fn
    assert got["embed_tokens.weight"].dtype == torch.bfloat16  # the model dtype: cast
    with pytest.raises(QuantizationError) as info:
        _sharded(
            ckpts["root"] / "gpt_mxfp4",
            plan,
            0,
            dtype={"layers.0.mlp.experts.gate_up_proj_blocks": torch.bfloat16},
        )
    assert "layers.0.mlp.experts.gate_up_proj_blocks" in str(info.value)


@pytest.mark.parametrize("quantized", ["qwen_fp8", "gpt_mxfp4"])
def test_import_export_keep_the_quantized_bytes(ckpts, tmp_path, quantized):
    src = ckpts["root"] / quantized
    import_hf(src, tmp_path / "ext", dtype="bf16", progress=False)  # casts model-dtype ones only
    ext = CheckpointReader.open(tmp_path / "ext")
    assert ext.format == "moe_ext" and verify(tmp_path / "ext", progress=False) == []
    original = _native(src)
    for name, spec in ext.specs.items():
        if spec.dtype is None:
            assert ext.dtype(name) == torch.bfloat16, name
        else:
            assert torch.equal(_bits(ext.read(name)), _bits(original[name])), name
    import_hf(src, tmp_path / "ext_kept", progress=False)
    export_hf(tmp_path / "ext_kept", tmp_path / "back", progress=False)
    before, after = safetensors_dir(src), safetensors_dir(tmp_path / "back")
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(_bits(after[key]), _bits(tensor)), (
            key
        )
    assert json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"]
    export_hf(src, tmp_path / "fused", layout="fused", progress=False)  # HF -> HF, fused
    fused = _native(tmp_path / "fused")
    assert all(torch.equal(_bits(fused[n]), _bits(t)) for n, t in original.items())
    assert verify(tmp_path / "back", progress=False) == []


def test_verify_checks_digests_and_scales(ckpts, tmp_path):
    res = _cli("verify", str(ckpts["root"] / "deepseek_fp8"))
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr
    broken = tmp_path / "broken"
    shutil.copytree(ckpts["root"] / "qwen_fp8", broken)
    (path,) = broken.glob("*.safetensors")
    tensors = load_file(str(path))
    key = "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 1] = 0.0
    save_file(tensors, str(path), metadata={"format": "pt"})
    problems = verify(broken, progress=False)
    assert any("layers.1.mlp.experts.gate_up_proj_scale_inv has 1 scale" in p for p in problems)
    assert any(f"checksum mismatch for tensor {key}" in p for p in problems)
    assert all("\n" not in p for p in problems)


# ---- bad input: one line naming the tensor or field, nothing written ----------------------


def _edited(ckpts, tmp_path: Path, quantized: str, edit) -> Path:
    directory = tmp_path / "edited"
    shutil.copytree(ckpts["root"] / quantized, directory)
    config = json.loads((directory / "config.json").read_text())
    (path,) = directory.glob("*.safetensors")
    tensors = load_file(str(path))
    edit(config, tensors)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path))
    (directory / "moe_ext.digests.json").unlink()
    return directory


def _unknown_method(config, tensors):
    config["quantization_config"]["quant_method"] = "awq"


def _scale_shape(config, tensors):
    key = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    tensors[key] = torch.ones(tensors[key].shape[0] + 1, tensors[key].shape[1])


def _expert_scale_shape(config, tensors):
    key = "model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv"
    tensors[key] = torch.ones(tensors[key].shape[0], tensors[key].shape[1] * 2)


def _missing_scale(config, tensors):
    del tensors["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"]


def _no_quantization_config(config, tensors):
    del config["quantization_config"]


def _block_mismatch(config, tensors):  # scales written for 8x8 blocks, config says 16x16
    config["quantization_config"]["weight_block_size"] = [16, 16]


@pytest.mark.parametrize(
    "edit, words",
    [
        (_unknown_method, ["quantization_config.quant_method 'awq' is not supported"]),
        (
            _scale_shape,
            [
                "model.layers.0.self_attn.q_proj.weight_scale_inv",
                "has shape [9, 4], config.json implies [8, 4]",
                "weight_block_size [8, 8]",
            ],
        ),
        (
            _expert_scale_shape,
            ["model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv", "implies [2, 4]"],
        ),
        (
            _missing_scale,
            ["missing tensor model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"],
        ),
        (_no_quantization_config, ["is fp8_e4m3 (an fp8 weight)", "has no quantization_config"]),
        (_block_mismatch, ["weight_scale_inv", "weight_block_size [16, 16]"]),
    ],
)
def test_bad_quantized_input_is_one_line(ckpts, tmp_path, edit, words):
    directory = _edited(ckpts, tmp_path, "qwen_fp8", edit)
    with pytest.raises(MoeExtError) as info:
        CheckpointReader.open(directory)
    message = str(info.value)
    assert all(w in message for w in words) and "\n" not in message, message
    with pytest.raises(MoeExtError):  # a conversion of it writes nothing
        import_hf(directory, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out.*")) == []
    assert verify(directory, progress=False)  # verify reports it too


def test_mxfp4_blocks_without_quantization_config(ckpts, tmp_path):
    directory = _edited(ckpts, tmp_path, "gpt_mxfp4", _no_quantization_config)
    with pytest.raises(CheckpointError, match="_blocks in model.safetensors is an MXFP4 part"):
        CheckpointReader.open(directory)


@pytest.mark.parametrize(
    "source, method, block, words",
    [
        ("qwen", "fp8", [12], "moe_intermediate_size 16 is not a multiple of the block rows 12"),
        ("qwen", "fp8", None, "moe_intermediate_size 16 is not a multiple of the block rows 128"),
        ("qwen", "fp8", [8, 8, 8], "--block 8 8 8 must be one or two positive integers"),
        ("qwen", "mxfp4", None, "has 16 input columns, not a multiple of 32"),
        ("qwen", "int4", None, "--format int4 is not supported"),
        ("gpt", "fp8", [32], "use mxfp4"),
        ("gpt_mxfp4", "mxfp4", None, "is already quantized"),
    ],
)
def test_quantize_refusals_write_nothing(ckpts, tmp_path, source, method, block, words):
    src = ckpts["root"] / source
    with pytest.raises(MoeExtError) as info:
        quantize(src, tmp_path / "out", method, block, progress=False)
    assert words in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert list(tmp_path.iterdir()) == []

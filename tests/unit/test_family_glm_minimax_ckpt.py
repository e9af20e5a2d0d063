"""glm4_moe / minimax_m2 checkpoints: import-hf / export-hf round trips are bit-exact
(GLM's mlp.gate with its correction bias and mlp.shared_experts; MiniMax's
block_sparse_moe experts w1/w3/w2 and block_sparse_moe.e_score_correction_bias), the fused
export carries transformers' in-memory names, transformers loads both exports with
identical logits, a tp=2 rank reads its heads (MiniMax: its slice of the q/k norm
weights), and the MTP layers checkpoints store after the decoder's are skipped."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from moe_ext.checkpoint import CheckpointError, CheckpointReader, load_sharded
from moe_ext.checkpoint.convert import import_hf
from moe_ext.model import ModelArgs
from moe_ext.model.parallelize import RankCoords, shard_slices
from tests.support import TOOLS, check_hf_export_round_trip, safetensors_dir
from tests.support import glm_hf_model as glm_model
from tests.support import minimax_hf_model as minimax_model

transformers = pytest.importorskip("transformers")

TOOL = TOOLS / "convert_checkpoint.py"

BIAS_KEY = {
    "glm4_moe": "model.layers.1.mlp.gate.e_score_correction_bias",
    "minimax_m2": "model.layers.1.block_sparse_moe.e_score_correction_bias",
}


def _model(family: str, **changes):
    if family == "glm4_moe":
        return glm_model("grouped", num_hidden_layers=2, first_k_dense_replace=1, **changes)
    return minimax_model("m2", num_hidden_layers=2, **changes)


@pytest.fixture(scope="module", params=sorted(BIAS_KEY))
def saved(request, tmp_path_factory):
    """(family, save_pretrained directory, the model)."""
    model = _model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, directory, model


def test_roundtrip_bit_exact_and_transformers_loads_export(saved, tmp_path):
    family, src, model = saved
    original = safetensors_dir(src)
    assert original[BIAS_KEY[family]].abs().sum() > 0  # stored, non-zero, must come back
    ext = tmp_path / "ext"
    import_hf(src, ext, progress=False)
    native = safetensors_dir(ext)
    assert native["layers.1.mlp.router.e_score_correction_bias"].dtype == torch.float32
    assert ("layers.1.mlp.shared_expert.down_proj.weight" in native) == (family == "glm4_moe")

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    check_hf_export_round_trip(ext, original, model, ids, tmp_path)


def test_tp_rank_reads_its_heads(saved):
    """A tp=2 rank of a saved HF directory reads half of q/k/v rows (MiniMax: the same half
    of the whole-projection q/k norm weights) and the whole router, bias included."""
    family, src, _ = saved
    reader = CheckpointReader.open(src)
    args = ModelArgs.from_hf_config(json.loads((src / "config.json").read_text()))

    class Plan:
        tp, pp, ep, etp = 2, 1, 1, 1

    requests = shard_slices(Plan, RankCoords(tp_rank=1), args)
    shards = load_sharded(reader, requests, progress=False)
    full = load_sharded(reader, {n: r.full() for n, r in requests.items()}, progress=False)
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.q_norm.weight"):
        tensor = full["layers.1." + name]
        if family == "glm4_moe" and "norm" in name:
            assert torch.equal(shards["layers.1." + name], tensor)  # per head: whole
        else:
            assert torch.equal(shards["layers.1." + name], tensor[tensor.shape[0] // 2 :])
    bias = "layers.1.mlp.router.e_score_correction_bias"
    assert torch.equal(shards[bias], full[bias])


def _with_mtp_layers(model, src, count: int, extra_layer: int | None = None) -> None:
    """Save ``model`` plus ``count`` MTP-like layers after its last (copies of layer 1 with
    GLM's enorm / hnorm / eh_proj), and optionally one more stray layer."""
    model.save_pretrained(src)
    tensors = safetensors_dir(src)
    L = model.config.num_hidden_layers
    layers = [L + i for i in range(count)] + ([extra_layer] if extra_layer is not None else [])
    extra = {}
    for layer in layers:
        for key, value in tensors.items():
            if key.startswith("model.layers.1."):
                extra[key.replace("model.layers.1.", f"model.layers.{layer}.")] = value.clone()
        extra[f"model.layers.{layer}.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(extra, str(src / "mtp.safetensors"))
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in tensors}}
    index["weight_map"].update({k: "mtp.safetensors" for k in extra})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "family, changes, count",
    [
        ("glm4_moe", dict(num_nextn_predict_layers=1), 1),
        ("minimax_m2", dict(num_mtp_modules=3, mtp_transformer_layers=1, use_mtp=True), 3),
    ],
)
def test_mtp_layers_are_skipped_and_stray_layers_are_not(family, changes, count, tmp_path):
    """GLM-4.5 stores num_nextn_predict_layers MTP layers, MiniMax-M2 num_mtp_modules, as
    model.layers.{L..}; the engine does not run them, so import skips them as transformers
    does. A layer past those is still an unexpected tensor."""
    model = _model(family, **changes)
    src = tmp_path / "src"
    _with_mtp_layers(model, src, count)
    ext = tmp_path / "ext"
    import_hf(src, ext, progress=False)
    assert not any(name.startswith("layers.2.") for name in safetensors_dir(ext))
    assert CheckpointReader.open(ext).names() == CheckpointReader.open(src).names()

    stray = tmp_path / "stray"
    _with_mtp_layers(model, stray, count, extra_layer=2 + count)
    with pytest.raises(CheckpointError, match=f"unexpected tensor model.layers.{2 + count}"):
        CheckpointReader.open(stray)


def test_the_tool_round_trips_a_checkpoint_with_a_shard_limit(tmp_path):
    """tools/convert_checkpoint.py import-hf / export-hf on MiniMax-M2 (small shards, so the
    router bias and the experts land in different files) gives back every tensor bit for
    bit (one family: the tool is the same code the tests above call)."""
    src, ext, back = tmp_path / "src", tmp_path / "ext", tmp_path / "back"
    _model("minimax_m2").save_pretrained(src)
    for args in (["import-hf", src, ext], ["export-hf", ext, back]):
        command = [sys.executable, str(TOOL), *map(str, args), "--max-shard-size", "50KB"]
        done = subprocess.run(
            [*command, "--no-progress"], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
    assert len(list(back.glob("*.safetensors"))) > 1
    original, exported = safetensors_dir(src), safetensors_dir(back)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)

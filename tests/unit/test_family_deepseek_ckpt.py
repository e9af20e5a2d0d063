"""deepseek_v2 / deepseek_v3 checkpoints: import-hf / export-hf round trips are bit-exact
(MLA tensors, shared experts, the router's correction bias), transformers loads the exports
with identical logits, and a tensor-parallel rank reads only its heads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from moe_ext.checkpoint import CheckpointReader, load_sharded
from moe_ext.checkpoint.convert import import_hf
from moe_ext.model import ModelArgs, Transformer
from moe_ext.model.parallelize import RankCoords, shard_slices
from tests.support import check_hf_export_round_trip, safetensors_dir
from tests.support import deepseek_hf_model as hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["v2_lite", "v3"])
def saved(request, tmp_path_factory):
    """(variant, save_pretrained directory, the model)."""
    model = hf_model(request.param, num_hidden_layers=2)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, directory, model


def test_roundtrip_bit_exact_and_transformers_loads_export(saved, tmp_path):
    variant, src, model = saved
    original = safetensors_dir(src)
    if variant == "v3":  # the correction bias is stored, non-zero, and comes back
        bias = original["model.layers.1.mlp.gate.e_score_correction_bias"]
        assert bias.abs().sum() > 0
    ext = tmp_path / "ext"
    import_hf(src, ext, progress=False)
    native = safetensors_dir(ext)
    assert "layers.1.mlp.shared_expert.down_proj.weight" in native
    assert ("layers.1.mlp.router.e_score_correction_bias" in native) == (variant == "v3")

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    check_hf_export_round_trip(ext, original, model, ids, tmp_path)


def test_tp_rank_reads_its_heads_and_runs_like_the_full_model(saved):
    """Sharded loading of an HF DeepSeek directory: a tp=2 rank reads half of each head-split
    tensor and the whole latent path; the shards equal slices of the full tensors."""
    _, src, _ = saved
    reader = CheckpointReader.open(src)
    args = ModelArgs.from_hf_config(json.loads((src / "config.json").read_text()))

    class Plan:
        tp, pp, ep, etp = 2, 1, 1, 1

    requests = shard_slices(Plan, RankCoords(tp_rank=1), args)
    shards = load_sharded(reader, requests, progress=False)
    full = load_sharded(reader, {n: r.full() for n, r in requests.items()}, progress=False)
    kv_b = "layers.0.self_attn.kv_b_proj.weight"
    assert shards[kv_b].shape[0] == full[kv_b].shape[0] // 2
    assert torch.equal(shards[kv_b], full[kv_b][full[kv_b].shape[0] // 2 :])
    latent = "layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert torch.equal(shards[latent], full[latent])
    model = Transformer(args)
    missing, unexpected = model.load_state_dict(full, strict=False)
    assert not missing and not unexpected


def test_v3_multi_token_prediction_layer_is_skipped(tmp_path):
    """DeepSeek-V3 checkpoints store their MTP module as model.layers.{L} (L =
    num_hidden_layers) plus enorm / hnorm / eh_proj; the engine does not run it, so import
    skips it (as transformers does) instead of calling the checkpoint malformed."""
    model = hf_model("v3", num_hidden_layers=2, num_nextn_predict_layers=1)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tensors = safetensors_dir(src)
    mtp = {
        key.replace("model.layers.1.", "model.layers.2."): value.clone()
        for key, value in tensors.items()
        if key.startswith("model.layers.1.")
    }
    mtp.update(
        {
            "model.layers.2.enorm.weight": torch.ones(32),
            "model.layers.2.hnorm.weight": torch.ones(32),
            "model.layers.2.eh_proj.weight": torch.zeros(32, 64),
        }
    )
    save_file(mtp, str(src / "mtp.safetensors"))
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in tensors}}
    index["weight_map"].update({k: "mtp.safetensors" for k in mtp})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    ext = tmp_path / "ext"
    import_hf(src, ext, progress=False)
    assert not any(name.startswith("layers.2.") for name in safetensors_dir(ext))
    assert CheckpointReader.open(ext).names() == CheckpointReader.open(src).names()

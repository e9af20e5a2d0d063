"""moe_ext checkpoint <-> Megatron-core distributed checkpoint (moe_ext.megatron.dist_ckpt,
``convert_checkpoint.py export-megatron / import-megatron``).

Checked against independent references: the source safetensors bytes (round trips are
bit-exact), the torch_dist files read with plain ``torch.distributed.checkpoint`` (not
through Megatron or our mapping). One process here; loading the export on several ranks
(GPTModel at EP=2, expert-TP=2, replicated experts) and saving back from there:
tests/multirank/test_megatron_ckpt.py.

# E experts, F expert FFN size, H hidden, V vocab
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|DEPRECATED).*")

from safetensors.torch import load_file  # noqa: E402

from moe_ext.checkpoint.format import (  # noqa: E402
    SafetensorsWriter,
    TensorEntry,
    dtype_name,
    read_manifest,
    write_manifest,
)
from moe_ext.megatron.dist_ckpt import (  # noqa: E402
    MEGATRON_MANIFEST,
    MegatronCheckpointError,
    export_megatron,
    import_megatron,
)
from tests.support import TOOLS, export_megatron_families, family_args  # noqa: E402

TOOL = TOOLS / "convert_checkpoint.py"


def _read_torch_dist(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint, read with plain torch DCP (no Megatron)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    out = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in meta.items()
        if isinstance(m, TensorStorageMetadata)
    }
    dcp.load(out, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=True)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (moe_ext source dir, its tensors, Megatron export dir)."""
    return export_megatron_families(tmp_path_factory.mktemp("megatron_ckpt"))


# ---- one process ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_round_trip_bit_exact_and_megatron_layout(family, exported, tmp_path):
    src, state, meg = exported[family]
    # the export: Megatron's files, our config byte for byte, side file, source manifest
    for name in ("metadata.json", "common.pt", ".metadata", "tokenizer_config.json"):
        assert (meg / name).is_file(), name
    assert (meg / "config.json").read_bytes() == (src / "config.json").read_bytes()
    manifest = json.loads((meg / MEGATRON_MANIFEST).read_text())
    source_rows = read_manifest(src)["tensors"]
    assert {r["name"]: r["sha256"] for r in manifest["tensors"]} == {
        n: e.sha256 for n, e in source_rows.items()
    }
    # stored global tensors, read without Megatron, are the source's (native layout)
    stored = _read_torch_dist(meg)
    args = family_args(family)
    moe_layer = next(i for i in range(args.num_hidden_layers) if args.is_moe_layer(i))
    for native, key in (
        ("embed_tokens.weight", "embedding.word_embeddings.weight"),
        (
            f"layers.{moe_layer}.mlp.experts.gate_up_proj",
            f"decoder.layers.{moe_layer}.mlp.experts.gate_up_proj",
        ),
        (
            f"layers.{moe_layer}.mlp.experts.down_proj",
            f"decoder.layers.{moe_layer}.mlp.experts.down_proj",
        ),
        (f"layers.{moe_layer}.mlp.router.weight", f"decoder.layers.{moe_layer}.mlp.router.weight"),
        ("norm.weight", "decoder.final_layernorm.weight"),
    ):
        assert stored[key].dtype == state[native].dtype
        assert torch.equal(stored[key], state[native]), key
    assert ("output_layer.weight" in stored) != args.tie_word_embeddings
    if family == "qwen2_moe":
        assert torch.equal(
            stored["decoder.layers.0.mlp.shared_expert_gate.weight"],
            state["layers.0.mlp.shared_expert_gate.weight"],
        )
    # back to moe_ext: every tensor bit-identical to the source, side file kept
    back = tmp_path / "back"
    entries = import_megatron(meg, back, progress=False)
    assert len(entries) == len(state)
    tensors = load_file(str(back / "model.safetensors"))
    assert set(tensors) == set(state)
    for name, t in state.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name
    assert (back / "tokenizer_config.json").is_file()
    assert read_manifest(back)["dtype"] == dtype_name(state["norm.weight"].dtype)


def test_export_from_hugging_face_layout(exported, tmp_path):
    """An HF directory (per-expert tensors, as save_pretrained writes) exports to the same
    Megatron tensors as its moe_ext form and imports back to the source bits."""
    from moe_ext.checkpoint.convert import export_hf

    src, state, meg = exported["qwen2_moe"]
    hf, meg_hf, back = tmp_path / "hf", tmp_path / "meg_hf", tmp_path / "back"
    export_hf(src, hf, layout="per-expert", progress=False)
    export_megatron(hf, meg_hf, progress=False)
    ours, theirs = _read_torch_dist(meg), _read_torch_dist(meg_hf)
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    import_megatron(meg_hf, back, progress=False)
    tensors = load_file(str(back / "model.safetensors"))
    for name, t in state.items():
        assert torch.equal(tensors[name], t), name


def _left_at(dst: Path) -> list[str]:
    return sorted(
        p.name
        for p in dst.parent.iterdir()
        if p.name.startswith(f".{dst.name}") or p.name == dst.name
    )


def _copy(meg: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "bad_meg"
    shutil.copytree(meg, bad)
    return bad


def _edited_config(meg: Path, tmp_path: Path, **changes) -> Path:
    bad = _copy(meg, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **changes}))
    return bad


def _bad_config_ffn(meg, tmp_path):
    return (
        _edited_config(meg, tmp_path, moe_intermediate_size=8),
        "tensor decoder.layers.0.mlp.experts.gate_up_proj is [4, 32, 32] in",
    )


def _bad_config_layers(meg, tmp_path):
    return (_edited_config(meg, tmp_path, num_hidden_layers=3), "is missing from the checkpoint")


def _bad_sha(meg, tmp_path):
    bad = _copy(meg, tmp_path)
    manifest = json.loads((bad / MEGATRON_MANIFEST).read_text())
    manifest["tensors"][5]["sha256"] = "0" * 64
    (bad / MEGATRON_MANIFEST).write_text(json.dumps(manifest))
    return bad, f"tensor {manifest['tensors'][5]['name']} differs from the exported source"


def _bad_no_config(meg, tmp_path):
    bad = _copy(meg, tmp_path)
    (bad / "config.json").unlink()
    return bad, "config.json is missing; put the model's Hugging Face config.json next to"


def _bad_not_megatron(meg, tmp_path):
    bad = _copy(meg, tmp_path)
    (bad / "metadata.json").unlink()
    return bad, "is not a Megatron distributed checkpoint (no metadata.json)"


BAD = {
    "config_ffn": _bad_config_ffn,
    "config_layers": _bad_config_layers,
    "sha": _bad_sha,
    "no_config": _bad_no_config,
    "not_megatron": _bad_not_megatron,
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_error_and_leaves_nothing(case, exported, tmp_path):
    _, _, meg = exported["qwen2_moe"]
    bad, needle = BAD[case](meg, tmp_path)
    dst = tmp_path / "out"
    with pytest.raises(MegatronCheckpointError) as info:
        import_megatron(bad, dst, progress=False)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    if case == "config_layers":
        assert message.startswith("tensor decoder.layers.2."), message
    assert _left_at(dst) == []


def test_export_refusals(exported, tmp_path):
    src, state, meg = exported["qwen2_moe"]
    with pytest.raises(MegatronCheckpointError, match="exists; pass --force"):
        export_megatron(src, meg, progress=False)
    with pytest.raises(MegatronCheckpointError, match="overlaps the source"):
        export_megatron(src, src / "inside", progress=False)
    # a source with two dtypes cannot be one GPTModel: named, with the fix
    mixed = tmp_path / "mixed"
    shutil.copytree(src, mixed)
    tensors = {n: t.clone() for n, t in load_file(str(mixed / "model.safetensors")).items()}
    (mixed / "model.safetensors").unlink()  # load_file maps the file: never write into it
    tensors["norm.weight"] = tensors["norm.weight"].to(torch.bfloat16)
    layout = [(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    writer = SafetensorsWriter(mixed / "model.safetensors", layout)
    entries = [
        TensorEntry(n, s, dt, writer.write_tensor(n, [tensors[n]]), "model.safetensors")
        for n, dt, s in layout
    ]
    writer.close()
    write_manifest(mixed, "qwen2_moe", "mixed", entries)
    dst = tmp_path / "mixed_meg"
    with pytest.raises(
        MegatronCheckpointError, match="tensor norm.weight is bf16 while .* --dtype fp32"
    ):
        export_megatron(mixed, dst, progress=False)
    assert _left_at(dst) == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd="/",
    )


@pytest.mark.slow  # 31 s; export/import round trips run by default elsewhere
def test_cli_export_import_cast_and_overwrite_rules(exported, tmp_path):
    src, state, _ = exported["qwen3_moe"]
    meg = tmp_path / "meg"
    res = _cli("export-megatron", str(src), str(meg))
    assert res.returncode == 0, res.stderr
    assert (
        res.stdout.strip() == f"wrote a Megatron checkpoint of {len(state)} source tensors to {meg}"
    )
    dst = tmp_path / "bf16"
    res = _cli("import-megatron", str(meg), str(dst), "--dtype", "bf16")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {len(state)} tensors to {dst}"
    tensors = load_file(str(dst / "model.safetensors"))
    for name, t in state.items():
        assert torch.equal(tensors[name], t.to(torch.bfloat16)), name
    assert read_manifest(dst)["dtype"] == "bf16"
    res = _cli("import-megatron", str(meg), str(dst))
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: destination {dst} exists; pass --force to overwrite it"
    res = _cli("import-megatron", str(meg), str(dst), "--force")
    assert res.returncode == 0, res.stderr
    assert read_manifest(dst)["dtype"] == "fp32"

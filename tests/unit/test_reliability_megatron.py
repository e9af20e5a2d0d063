"""import-megatron runs no code from the checkpoint (issue 15): crafted pickles in
``.metadata``, ``common.pt`` and the ``*.distcp`` byte items are refused with one line and
never executed, and data files named by ``.metadata`` or the export manifest stay inside
the checkpoint directory.

Every crafted payload is first shown to run under plain unpickling (it creates a marker
file), so a test that finds no marker proves the refusal, not a harmless payload.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|DEPRECATED).*")

from moe_ext.checkpoint.errors import CheckpointError  # noqa: E402
from moe_ext.megatron.dist_ckpt import (  # noqa: E402
    MEGATRON_MANIFEST,
    checkpoint_tensors,
    export_megatron,
    import_megatron,
)
from moe_ext.megatron.safe_load import UnsafeCheckpointError, read_dcp_metadata  # noqa: E402
from tests.support import write_family_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert_checkpoint.py"


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _payload(marker: Path) -> bytes:
    data = pickle.dumps(_Payload(marker))
    pickle.loads(data)  # the reference: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    return data


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(moe_ext source, its Megatron export)."""
    root = tmp_path_factory.mktemp("megatron_reliability")
    write_family_checkpoint(root / "src", "mixtral", torch.bfloat16)
    export_megatron(root / "src", root / "meg", progress=False)
    return root / "src", root / "meg"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _left_at(dst: Path) -> list[str]:
    return sorted(
        p.name
        for p in dst.parent.iterdir()
        if p.name == dst.name or p.name.startswith(f".{dst.name}.")
    )


def _assert_refused(src: Path, dst: Path, marker: Path, where: str) -> str:
    with pytest.raises(UnsafeCheckpointError) as err:
        import_megatron(src, dst, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("refusing to unpickle posix.system from ") and where in message
    assert "--trust-checkpoint" in message
    assert not marker.exists()
    assert _left_at(dst) == []
    return message


def test_clean_export_still_imports_bit_exact(exported, tmp_path):
    """The restrictions let a checkpoint of tensors and plain data through (the export
    manifest's sha256 check inside import_megatron makes this bit-exact)."""
    _, meg = exported
    entries = import_megatron(meg, tmp_path / "back", progress=False)
    assert entries and (tmp_path / "back" / "moe_ext.json").is_file()


def test_crafted_metadata_is_refused_unrun(exported, tmp_path):
    """A ``.metadata`` whose unpickling calls os.system: refused before any model is
    built, by the library and the CLI, and the command never runs."""
    src, _ = exported
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copyfile(src / "config.json", bad / "config.json")
    (bad / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (bad / ".metadata").write_bytes(_payload(marker))
    dst = tmp_path / "out" / "ext"
    dst.parent.mkdir()
    message = _assert_refused(bad, dst, marker, str(bad / ".metadata"))
    with pytest.raises(UnsafeCheckpointError):
        checkpoint_tensors(bad)
    res = subprocess.run(
        [sys.executable, str(TOOL), "import-megatron", str(bad), str(dst), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd="/",
    )
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: {message}"
    assert not marker.exists() and _left_at(dst) == []


def test_crafted_common_pt_is_refused_unrun(exported, tmp_path):
    _, meg = exported
    marker = tmp_path / "pwned"
    bad = _copy(meg, tmp_path / "bad")
    torch.save(_Payload(marker), bad / "common.pt")
    torch.load(bad / "common.pt", weights_only=False)  # the reference: a full load runs it
    assert marker.exists()
    marker.unlink()
    _assert_refused(bad, tmp_path / "ext", marker, str(bad / "common.pt"))


def _plant_object(meg: Path, bad: Path, payload: bytes) -> None:
    """Point one byte item (an ``_extra_state`` ShardedObject) of ``bad``'s metadata at a
    new data file holding ``payload``; torch's load planner unpickles byte items with
    weights_only=False."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_dcp_metadata(meg)
    index = next(
        i
        for i in metadata.storage_data
        if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
    )
    (bad / "__9_0.distcp").write_bytes(payload)
    metadata.storage_data[index] = _StorageInfo("__9_0.distcp", 0, len(payload))
    with open(bad / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def test_crafted_object_in_distcp_is_refused_unrun(exported, tmp_path):
    """A ShardedObject's bytes that run os.system: refused while Megatron loads; with
    --trust-checkpoint (the reference) the same file does run it."""
    _, meg = exported
    marker = tmp_path / "pwned"
    bad = _copy(meg, tmp_path / "bad")
    buffer = tmp_path / "payload.pt"
    torch.save(_Payload(marker), buffer)
    _plant_object(meg, bad, buffer.read_bytes())
    _assert_refused(bad, tmp_path / "ext", marker, "a pickled object in the *.distcp files")
    with pytest.raises(Exception):  # noqa: B017 - whatever Megatron makes of os.system's 0
        import_megatron(bad, tmp_path / "trusted", progress=False, trust_checkpoint=True)
    assert marker.exists()


def test_data_file_outside_the_checkpoint_is_refused(exported, tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    _, meg = exported
    bad = _copy(meg, tmp_path / "bad")
    metadata = read_dcp_metadata(meg)
    index = next(iter(metadata.storage_data))
    info = metadata.storage_data[index]
    shutil.copyfile(bad / info.relative_path, tmp_path / "outside.distcp")
    metadata.storage_data[index] = _StorageInfo("../outside.distcp", info.offset, info.length)
    with open(bad / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(CheckpointError) as err:
        import_megatron(bad, tmp_path / "ext", progress=False)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(
        f"{bad / '.metadata'} (storage entry {index.fqn!r}) names "
        f"file '../outside.distcp', outside the checkpoint"
    )
    assert _left_at(tmp_path / "ext") == []


def test_manifest_side_file_outside_is_refused(exported, tmp_path):
    _, meg = exported
    bad = _copy(meg, tmp_path / "bad")
    (tmp_path / "secret.txt").write_text("not for the output")
    manifest = json.loads((bad / MEGATRON_MANIFEST).read_text())
    manifest["side_files"].append("../secret.txt")
    (bad / MEGATRON_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"\(side_files\) names file '\.\./secret\.txt'"):
        import_megatron(bad, tmp_path / "ext", progress=False)
    assert _left_at(tmp_path / "ext") == []


def test_help_documents_trust_checkpoint():
    res = subprocess.run(
        [sys.executable, str(TOOL), "import-megatron", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert res.returncode == 0 and "--trust-checkpoint" in res.stdout
    assert "can run code" in " ".join(res.stdout.split())

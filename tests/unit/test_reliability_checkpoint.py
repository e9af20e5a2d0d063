"""Reliability and security of checkpoint reading and writing (issue 15): file names a
checkpoint gives stay inside its directory, data verification on load, export and
converter destinations that must not be destroyed, one-line errors for full or read-only
disks, clean-up after killed writers, and resume from a damaged rank file.

The checkpoints are the tiny model's random weights written through the safetensors
writer (moe_ext) and exported as a sharded Hugging Face directory with an index.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_ext.checkpoint import CheckpointError, CheckpointReader, ShardRequest, load_sharded
from moe_ext.checkpoint import reader as reader_module
from moe_ext.checkpoint.convert import export_hf, import_hf, verify
from moe_ext.checkpoint.format import (
    HF_INDEX,
    MANIFEST,
    SafetensorsWriter,
    remove_stale_staging,
)
from moe_ext.launching import resolve_model_source
from moe_ext.model import Transformer
from moe_ext.train.export import ExportError, check_export_destination, export_moe_ext, hf_config
from moe_ext.train.state import ResumeError, ResumePoint, find_checkpoint, load_rank_state
from tests.support import REPO, plan_of, tiny_args, write_tiny_checkpoint

TOOL = REPO / "tools" / "convert_checkpoint.py"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(moe_ext dir, sharded HF dir with an index, the tensors)."""
    root = tmp_path_factory.mktemp("reliability")
    state = write_tiny_checkpoint(root / "ext")
    export_hf(root / "ext", root / "hf", max_shard_bytes=200_000, progress=False)
    assert (root / "hf" / HF_INDEX).is_file()
    return root / "ext", root / "hf", state


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _left_at(dst: Path) -> list[str]:
    """What a failed write left at or next to ``dst``."""
    if not dst.parent.exists():
        return []
    return sorted(
        p.name
        for p in dst.parent.iterdir()
        if p.name == dst.name or p.name.startswith(f".{dst.name}.")
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )


class _OpenSpy:
    """Records every path safetensors opens through the reader."""

    def __init__(self, monkeypatch):
        self.paths: list[Path] = []
        original = reader_module.safe_open

        def spy(path, *args, **kwargs):
            self.paths.append(Path(path).resolve())
            return original(path, *args, **kwargs)

        monkeypatch.setattr(reader_module, "safe_open", spy)


# ---- file names stay inside the checkpoint directory --------------------------------------


def _point_index_at(hf: Path, target: str) -> str:
    """Rewrite one weight_map entry of ``hf``'s index to ``target``; returns its key."""
    index = json.loads((hf / HF_INDEX).read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = target
    (hf / HF_INDEX).write_text(json.dumps(index))
    return key


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "etc_passwd", "symlink"])
def test_hf_index_naming_a_file_outside_is_refused_everywhere(kind, ckpts, tmp_path, monkeypatch):
    """A weight_map entry leading out of the directory (``../x``, an absolute path, a
    link) is refused with one line naming the index and the entry, before any file is
    opened: when loading (launch), by verify and by import-hf (CLI too)."""
    _, hf_src, _ = ckpts
    hf = _copy(hf_src, tmp_path / "ckpt" / "hf")
    shard = sorted(hf.glob("*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"  # a valid shard: only the check can refuse it
    shutil.copyfile(shard, outside)
    if kind == "dotdot":
        key = _point_index_at(hf, "../../outside.safetensors")
        bad = "../../outside.safetensors"
    elif kind == "absolute":
        key = _point_index_at(hf, str(outside))
        bad = str(outside)
    elif kind == "etc_passwd":
        key = _point_index_at(hf, "/etc/passwd")
        bad = "/etc/passwd"
    else:
        index = json.loads((hf / HF_INDEX).read_text())
        key = next(k for k, f in sorted(index["weight_map"].items()) if f == shard.name)
        shard.unlink()
        shard.symlink_to(outside)
        bad = shard.name
    spy = _OpenSpy(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        CheckpointReader.open(hf)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{hf / HF_INDEX} (weight_map entry {key!r}) names file {bad!r}")
    assert "outside the checkpoint directory" in message
    with pytest.raises(CheckpointError) as at_launch:  # what launch/*.py opens a checkpoint with
        resolve_model_source(str(hf), None)
    assert str(at_launch.value) == message
    problems = verify(hf, progress=False)
    assert len(problems) == 1 and problems[0] == message
    dst = tmp_path / "out" / "ext"
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        import_hf(hf, dst, progress=False)
    assert _left_at(dst) == []
    assert all(hf.resolve() in p.parents for p in spy.paths), spy.paths
    assert outside.resolve() not in spy.paths
    if kind == "dotdot":  # the CLI says the same in one line and exits 1
        for command in (("verify", str(hf)), ("import-hf", str(hf), str(dst))):
            res = _cli(*command)
            assert res.returncode == 1, res.stderr
            assert f"error: {message}" in res.stderr.splitlines()
            assert _left_at(dst) == []


def test_manifest_naming_a_file_outside_is_refused(ckpts, tmp_path):
    ext_src, _, _ = ckpts
    ext = _copy(ext_src, tmp_path / "ext")
    shutil.copyfile(ext / "model.safetensors", tmp_path / "x.safetensors")
    manifest = json.loads((ext / MANIFEST).read_text())
    for row in manifest["tensors"]:
        row["file"] = "../x.safetensors"
    (ext / MANIFEST).write_text(json.dumps(manifest))
    (ext / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        CheckpointReader.open(ext)
    assert "\n" not in str(err.value)
    assert str(ext / MANIFEST) in str(err.value) and "'../x.safetensors'" in str(err.value)
    assert any("outside the checkpoint directory" in p for p in verify(ext, progress=False))


def test_side_file_linked_outside_is_not_copied(ckpts, tmp_path):
    """import-hf copies tokenizer files along: a link leading out is refused, not copied."""
    _, hf_src, _ = ckpts
    hf = _copy(hf_src, tmp_path / "hf")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    (hf / "tokenizer_config.json").symlink_to(secret)
    dst = tmp_path / "ext"
    with pytest.raises(CheckpointError, match=r"'tokenizer_config.json', a link to .*secret.txt"):
        import_hf(hf, dst, progress=False)
    assert _left_at(dst) == []


def test_hub_cache_snapshot_links_are_followed(ckpts, tmp_path):
    """The Hugging Face hub cache links snapshots/<rev>/<file> to ../../blobs/<hash>: that
    layout loads (the one kind of link leading out that is allowed)."""
    _, hf_src, state = ckpts
    repo = tmp_path / "models--x--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(hf_src.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    with CheckpointReader.open(snapshot) as reader:
        assert torch.equal(reader.read("embed_tokens.weight"), state["embed_tokens.weight"])


# ---- verification on load -----------------------------------------------------------------


def _flip_data_byte(shard: Path, tensor: str) -> None:
    """Flip one byte inside ``tensor``'s data, leaving the header intact."""
    raw = bytearray(shard.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    start, _ = json.loads(raw[8 : 8 + header_len])[tensor]["data_offsets"]
    raw[8 + header_len + start + 5] ^= 0x40
    shard.write_bytes(bytes(raw))


def test_load_with_verify_catches_flipped_bytes_the_default_does_not(ckpts, tmp_path):
    """A flipped byte with the header intact: the default load (structure only) returns
    the corrupted data; verify=True raises one line naming tensor and file, even when the
    request covers only rows away from the flipped byte."""
    ext_src, _, state = ckpts
    expert = next(n for n in state if n.endswith("experts.gate_up_proj"))
    clean = load_sharded(ext_src, {expert: ShardRequest.full()}, progress=False, verify=True)
    assert torch.equal(clean[expert], state[expert])
    ext = _copy(ext_src, tmp_path / "ext")
    _flip_data_byte(ext / "model.safetensors", expert)
    corrupt = load_sharded(ext, {expert: ShardRequest.full()}, progress=False)
    assert not torch.equal(corrupt[expert], state[expert])  # the default does not notice
    far_rows = ShardRequest.block(0, state[expert].shape[0] - 1, state[expert].shape[0])
    for request in (ShardRequest.full(), far_rows):
        with pytest.raises(CheckpointError) as err:
            load_sharded(ext, {expert: request}, progress=False, verify=True)
        assert "\n" not in str(err.value)
        shard = ext / "model.safetensors"
        assert f"checksum mismatch for tensor {expert} in {shard}" in str(err.value)


def test_verify_on_load_needs_checksums(ckpts):
    _, hf, _ = ckpts
    with pytest.raises(CheckpointError, match="carries no checksums"):
        load_sharded(hf, {"norm.weight": ShardRequest.full()}, progress=False, verify=True)


# ---- training export destination ----------------------------------------------------------


def test_export_destination_rules(ckpts, tmp_path):
    """Absent or empty: fine. A file, or a non-empty directory that is not a moe_ext
    checkpoint: refused, untouched. A moe_ext checkpoint: only with overwrite."""
    ext_src, _, _ = ckpts
    check_export_destination(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    check_export_destination(str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        check_export_destination(str(tmp_path / "file"), overwrite=True)
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="not a moe_ext checkpoint"):
            check_export_destination(str(home), overwrite=overwrite)
    with pytest.raises(ExportError, match="train.overwrite_export=true"):
        check_export_destination(str(ext_src))
    check_export_destination(str(ext_src), overwrite=True)


def test_export_refuses_a_directory_that_is_not_a_checkpoint(ckpts, tmp_path):
    """export_moe_ext (one rank, replicate) refuses before writing anything and leaves the
    directory as it was; over a moe_ext checkpoint with overwrite it replaces it, and the
    result reads back as the model's weights."""
    ext_src, _, state = ckpts
    args = tiny_args()
    model = Transformer(args)
    model.load_state_dict(state, strict=True)
    plan = plan_of("replicate", world=1)
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a moe_ext checkpoint"):
        export_moe_ext(model, plan, 0, str(home), hf_config(args, "byte"), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    assert (home / "notes.txt").read_text() == "keep me"
    dst = _copy(ext_src, tmp_path / "model")
    with pytest.raises(ExportError, match="overwrite_export"):
        export_moe_ext(model, plan, 0, str(dst), hf_config(args, "byte"))
    export_moe_ext(model, plan, 0, str(dst), hf_config(args, "byte"), overwrite=True)
    assert verify(dst, progress=False) == []
    assert _left_at(dst) == ["model"]


# ---- converter destinations ---------------------------------------------------------------


def test_force_onto_a_file_is_refused_up_front(ckpts, tmp_path, monkeypatch):
    ext_src, _, _ = ckpts
    dst = tmp_path / "dst"
    dst.write_text("a file, not a checkpoint")
    opened = []

    def no_writing(self, path, *args, **kwargs):
        opened.append(path)
        raise AssertionError("nothing may be written")

    monkeypatch.setattr(SafetensorsWriter, "__init__", no_writing)
    expected = f"destination {dst} is a file, not a directory; remove it or choose another"
    for convert in (import_hf, export_hf):
        with pytest.raises(CheckpointError) as err:
            convert(ext_src, dst, force=True, progress=False)
        assert str(err.value) == expected
    assert opened == [] and _left_at(dst) == ["dst"] and dst.read_text().startswith("a file")
    res = _cli("export-hf", str(ext_src), str(dst), "--force")
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: {expected}"
    assert _left_at(dst) == ["dst"]


@pytest.mark.parametrize(
    "code,reason",
    [
        (errno.ENOSPC, "the disk is full"),
        (errno.EROFS, "the file system is read-only"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_write_errors_are_one_line_and_leave_nothing(code, reason, ckpts, tmp_path, monkeypatch):
    """A full disk mid-write, or a destination that cannot be created: one line naming the
    destination and the reason; neither the destination nor a staging directory is left;
    an existing destination survives a failed --force."""
    ext_src, _, _ = ckpts
    dst = tmp_path / "out" / "hf"
    if code == errno.ENOSPC:
        original = SafetensorsWriter.write_tensor
        calls = []

        def full(self, name, chunks):
            calls.append(name)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return original(self, name, chunks)

        monkeypatch.setattr(SafetensorsWriter, "write_tensor", full)
    else:
        original_mkdir = Path.mkdir

        def refuse(self, *args, **kwargs):
            if self.parent == dst.parent:
                raise OSError(code, os.strerror(code), str(self))
            return original_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(CheckpointError) as err:
        export_hf(ext_src, dst, progress=False)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"cannot write {dst}: {reason}")
    assert isinstance(err.value.__cause__, OSError)
    assert _left_at(dst) == []
    if code == errno.ENOSPC:  # an existing destination survives a failed --force
        dst.mkdir()
        (dst / "keep.txt").write_text("x")
        calls.clear()
        with pytest.raises(CheckpointError, match="the disk is full"):
            export_hf(ext_src, dst, force=True, progress=False)
        assert _left_at(dst) == ["hf"] and (dst / "keep.txt").exists()


def test_too_little_free_space_is_refused_before_writing(ckpts, tmp_path, monkeypatch):
    ext_src, _, _ = ckpts
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    dst = tmp_path / "hf"
    with pytest.raises(
        CheckpointError, match=r"writing .*hf needs about .* GiB, but .* has 0.00 GiB free"
    ):
        export_hf(ext_src, dst, progress=False)
    assert _left_at(dst) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_of_killed_writers_is_cleaned_up(tmp_path):
    """.NAME.tmp-<pid> of a dead writer goes; one of a running process stays; a
    .NAME.old-<pid> (killed while swapping) goes when NAME exists, else it is moved back."""
    dst = tmp_path / "ckpt"
    dead = _dead_pid()
    (tmp_path / f".ckpt.tmp-{dead}").mkdir()
    (tmp_path / f".ckpt.tmp-{os.getppid()}").mkdir()  # alive
    (tmp_path / f".other.tmp-{dead}").mkdir()  # another destination's
    old = tmp_path / f".ckpt.old-{dead}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    done = remove_stale_staging(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt", f".ckpt.tmp-{os.getppid()}", f".other.tmp-{dead}"]
    )
    assert (dst / "config.json").exists()
    assert len(done) == 2 and any("restored" in line for line in done)
    (tmp_path / f".ckpt.old-{dead}").mkdir()
    remove_stale_staging(dst)
    assert not (tmp_path / f".ckpt.old-{dead}").exists() and dst.exists()


# ---- resume from a damaged rank file ------------------------------------------------------


def _step(root: Path, step: int, world: int = 2) -> Path:
    directory = root / f"step_{step:08d}"
    directory.mkdir(parents=True)
    meta = {
        "format": "moe_ext-train",
        "format_version": 1,
        "step": step,
        "world_size": world,
        "plan": {},
        "zero_stage": 0,
        "model": {},
        "history": [],
        "evals": [],
    }
    (directory / "meta.json").write_text(json.dumps(meta))
    for r in range(world):
        torch.save(
            {"module": {"w": torch.arange(4000.0)}, "rng": torch.get_rng_state()},
            directory / f"rank_{r:05d}.pt",
        )
    (root / "latest").write_text(directory.name + "\n")
    return directory


def test_resume_from_a_truncated_rank_file_names_it_and_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    previous = _step(root, 2)
    latest = _step(root, 4)
    assert find_checkpoint(str(root)).directory == latest
    rank1 = latest / "rank_00001.pt"
    rank1.write_bytes(rank1.read_bytes()[: rank1.stat().st_size // 2])
    with pytest.raises(ResumeError) as err:
        find_checkpoint(str(root))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{rank1} is truncated or corrupt")
    assert message.endswith(f"resume from the previous checkpoint: resume={previous}")
    # found only while loading (the file broke after the check): the same one line
    point = ResumePoint(latest, json.loads((latest / "meta.json").read_text()))
    with pytest.raises(ResumeError, match=rf"cannot load {rank1} .*resume={previous}$"):
        load_rank_state(point, 1)
    # no earlier checkpoint to point to
    shutil.rmtree(previous)
    with pytest.raises(ResumeError, match=r"there is no earlier step_\* checkpoint in"):
        find_checkpoint(str(latest))


def test_resume_refuses_a_latest_pointing_elsewhere(tmp_path):
    root = tmp_path / "checkpoints"
    _step(root, 2)
    (root / "latest").write_text("../../elsewhere\n")
    with pytest.raises(ResumeError, match="not a step_\\* directory"):
        find_checkpoint(str(root))


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_resume_never_unpickles_code_from_a_rank_file(tmp_path):
    """A rank file whose unpickling would run a command: one line, the command never runs
    (a full unpickle, the reference, does run it)."""
    root = tmp_path / "checkpoints"
    latest = _step(root, 2, world=1)
    marker = tmp_path / "pwned"
    torch.save({"module": _Payload(marker)}, latest / "rank_00000.pt")
    torch.load(latest / "rank_00000.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    point = find_checkpoint(str(root))
    with pytest.raises(ResumeError) as err:
        load_rank_state(point, 0)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"refusing to unpickle posix.system from {latest}/")
    assert not marker.exists()

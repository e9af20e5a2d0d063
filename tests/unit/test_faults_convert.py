"""Fault injection into tools/convert_checkpoint.py (issue 15), marked ``faults``: SIGTERM,
SIGINT and kill -9 in the middle of writing a shard, a disk that fills up mid-write, and,
where this machine lets the test mount one, a real tiny or read-only tmpfs.

The converter runs as a subprocess through a small wrapper that pauses it right after
it has written the first tensor (a marker file says so), so the signal always lands
mid-write; the wrapper changes nothing else.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_ext.checkpoint.convert import verify
from tests.support import write_tiny_checkpoint

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert_checkpoint.py"

# Runs the converter with one fault hook on SafetensorsWriter.write_tensor: "pause" touches
# MARKER after the first tensor and sleeps, "enospc" fails the third tensor with ENOSPC.
_WRAPPER = """
import errno, os, pathlib, runpy, sys, time
sys.path.insert(0, {repo!r})
from moe_ext.checkpoint.format import SafetensorsWriter
original = SafetensorsWriter.write_tensor
calls = []
def hooked(self, name, chunks):
    calls.append(name)
    if {mode!r} == "enospc" and len(calls) == 3:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    digest = original(self, name, chunks)
    if {mode!r} == "pause":
        pathlib.Path({marker!r}).touch()
        time.sleep(60)
    return digest
SafetensorsWriter.write_tensor = hooked
sys.argv = [{tool!r}] + {argv!r}
runpy.run_path({tool!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("faults") / "ext"
    write_tiny_checkpoint(directory)
    return directory


def _start(mode: str, marker: Path, *argv: str) -> subprocess.Popen:
    code = _WRAPPER.format(
        repo=str(REPO), mode=mode, marker=str(marker), tool=str(TOOL), argv=[*argv, "--no-progress"]
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )


def _wait_for(marker: Path, proc: subprocess.Popen, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the converter never reached its first tensor"
        time.sleep(0.05)


def _left_at(dst: Path) -> list[str]:
    return sorted(
        p.name
        for p in dst.parent.iterdir()
        if p.name == dst.name or p.name.startswith(f".{dst.name}.")
    )


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *argv, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_write_removes_the_partial_output(sig, source, tmp_path):
    dst = tmp_path / "hf"
    marker = tmp_path / "paused"
    proc = _start("pause", marker, "export-hf", str(source), str(dst))
    _wait_for(marker, proc)
    assert _left_at(dst) == [f".hf.tmp-{proc.pid}"]  # it is mid-write
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert err.strip() == (
        f"error: interrupted by {signal.Signals(sig).name}; the partial output was removed"
    )
    assert _left_at(dst) == []


def test_kill_9_leaves_no_output_and_the_next_run_cleans_up(source, tmp_path):
    dst = tmp_path / "hf"
    marker = tmp_path / "paused"
    proc = _start("pause", marker, "export-hf", str(source), str(dst))
    _wait_for(marker, proc)
    proc.kill()
    proc.communicate(timeout=60)
    staging = tmp_path / f".hf.tmp-{proc.pid}"
    assert _left_at(dst) == [staging.name]  # no partial checkpoint at the destination
    res = _cli("export-hf", str(source), str(dst))
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == (
        f"removed {staging}, left by process {proc.pid} that no longer runs"
    )
    assert _left_at(dst) == ["hf"] and verify(dst, progress=False) == []


def test_disk_full_mid_write_is_one_line_and_leaves_nothing(source, tmp_path):
    dst = tmp_path / "hf"
    proc = _start("enospc", tmp_path / "unused", "export-hf", str(source), str(dst))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.strip() == (
        f"error: cannot write {dst}: the disk is full; nothing was written "
        f"there, free space or choose a writable destination"
    )
    assert _left_at(dst) == []


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs (options from the test) on a fresh directory; skips where this
    machine does not allow mounting."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def test_real_small_and_read_only_disks(source, tmpfs):
    small = tmpfs("size=64k")
    dst = small / "hf"
    res = _cli("export-hf", str(source), str(dst))
    assert res.returncode == 1
    assert res.stderr.startswith(f"error: writing {dst} needs about ")
    assert "free; free space or choose another destination" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and list(small.iterdir()) == []
    read_only = tmpfs("ro,size=4m")
    dst = read_only / "hf"
    res = _cli("export-hf", str(source), str(dst))
    assert res.returncode == 1
    assert res.stderr.strip().startswith(f"error: cannot write {dst}: the file system is read-only")
    assert len(res.stderr.strip().splitlines()) == 1 and list(read_only.iterdir()) == []

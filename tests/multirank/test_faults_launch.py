"""Fault injection into the launchers (issue 15), marked ``faults``: kill -9 and SIGTERM of
one rank of a 2-rank gloo job while it generates or trains, and a rank stopped with SIGSTOP
while its peer waits in a collective bounded by ``dist_timeout_s``.

Each test runs torchrun in a session of its own and finds its two workers through /proc
(torchrun starts each worker in a session of its own too); whatever happens, every one of
those process groups is killed at the end, so a failing test leaves no process behind. The
fault lands after a sign of progress (the weights loaded, a first checkpoint published), so
the test does not depend on how fast a loaded machine starts the job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from moe_ext.train.state import LATEST, find_checkpoint, load_rank_state
from tests.support import REPO
from tests.support import torchrun as torchrun_cmd

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(
        not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc (Linux)"
    ),
]

INFER, TRAIN = REPO / "launch" / "infer.py", REPO / "launch" / "train.py"
START_S = 120  # a loaded 2-core machine may take this long to import torch and DeepSpeed twice
EXIT_S = 60  # the whole job is gone this long after a rank died
# long enough that the fault always lands mid-generation: the demo prompts plus this many
# tokens fill the tiny model's 2048-token context, and each step is an all-to-all under EP
GENERATE = ["strategy=ep_nccl", "generate.max_new_tokens=2000", "generate.ignore_eos=true"]
# with ep_nccl rank 0 alone prints the load bar; the generation starts right after it
LOADED = "100%"


class Torchrun:
    """One ``torchrun --nproc-per-node 2`` job; stdout and stderr go to ``log``."""

    def __init__(self, script: Path, args: list[str], log: Path, cwd: Path):
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MOE_EXT_DEBUG")
        }
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log = log
        self.workers: dict[int, int] = {}  # rank -> pid
        with open(log, "wb") as sink:
            self.proc = subprocess.Popen(
                [*torchrun_cmd(2), str(script), *args],
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, ready: Callable[[], bool], what: str, limit_s: float = START_S) -> None:
        deadline = time.monotonic() + limit_s
        while not ready():
            assert self.proc.poll() is None, f"the job ended before {what}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {limit_s} s:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def find_workers(self) -> dict[int, int]:
        """rank -> pid of torchrun's two workers (children whose environment has RANK)."""

        def found() -> bool:
            for pid in _children(self.proc.pid):
                rank = _environ(pid).get("RANK")
                if rank is not None:
                    self.workers[int(rank)] = pid
            return len(self.workers) == 2

        self.wait_until(found, "two workers")
        return self.workers

    def wait(self, limit_s: float = EXIT_S) -> int:
        try:
            return self.proc.wait(limit_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still ran {limit_s} s after the fault:\n{self.text()[-3000:]}")

    def kill_everything(self) -> None:
        """SIGKILL torchrun's session and each worker's (a stopped process is continued
        first so nothing stays stopped), then reap torchrun."""
        for pid in (self.proc.pid, *self.workers.values()):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@contextlib.contextmanager
def torchrun(script: Path, args: list[str], tmp_path: Path) -> Iterator[Torchrun]:
    job = Torchrun(script, args, tmp_path / "job.log", cwd=tmp_path)
    try:
        yield job
    finally:
        job.kill_everything()


def _children(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # the name in parentheses may hold spaces; the ppid is the second field after it
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    children.append(int(entry.name))
    return children


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(
        item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item
    )


def _alive(pid: int) -> bool:
    """Running or stopped; a zombie (dead, not yet reaped) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _assert_all_gone(job: Torchrun, limit_s: float = 10) -> None:
    deadline = time.monotonic() + limit_s
    while any(_alive(pid) for pid in job.workers.values()):
        assert time.monotonic() < deadline, f"a worker outlived the job: {job.workers}"
        time.sleep(0.1)


def _left_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---- generate ---------------------------------------------------------------------------


def _generating(tmp_path: Path) -> tuple[list[str], Path]:
    """The infer arguments and the (empty) directory ``output=`` points into."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return [*GENERATE, "dist_timeout_s=60", f"output={out_dir / 'out.jsonl'}"], out_dir


@pytest.mark.parametrize(
    "rank, sig", [(1, signal.SIGKILL), (0, signal.SIGTERM)], ids=["kill_9_rank1", "sigterm_rank0"]
)
def test_rank_killed_during_generate_ends_the_job_and_writes_nothing(rank, sig, tmp_path):
    args, out_dir = _generating(tmp_path)
    with torchrun(INFER, args, tmp_path) as job:
        workers = job.find_workers()
        job.wait_until(lambda: LOADED in job.text(), "weights loaded")
        time.sleep(1.0)  # into the decode loop
        assert job.proc.poll() is None
        os.kill(workers[rank], sig)
        killed = time.monotonic()
        code = job.wait()
        took = time.monotonic() - killed
        assert code != 0, job.text()[-3000:]
        assert took < EXIT_S
        assert "wrote" not in job.text() and "decode:" not in job.text()  # it was mid-way
        _assert_all_gone(job)
    assert _left_in(out_dir) == []  # no output, no .out.jsonl.tmp<pid>


@pytest.mark.slow  # waits out a 15 s collective timeout
def test_stalled_rank_is_an_error_within_the_timeout(tmp_path):
    timeout_s = 15
    args, out_dir = _generating(tmp_path)
    args = [a for a in args if not a.startswith("dist_timeout_s=")]
    with torchrun(INFER, [*args, f"dist_timeout_s={timeout_s}"], tmp_path) as job:
        workers = job.find_workers()
        job.wait_until(lambda: LOADED in job.text(), "weights loaded")
        time.sleep(1.0)
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        # rank 0 waits in its next all-to-all until the timeout, then fails and exits;
        # torchrun cannot see a stopped worker, so rank 0 is what must not hang
        deadline = stopped + timeout_s + 30
        while _alive(workers[0]):
            assert time.monotonic() < deadline, "rank 0 waited past dist_timeout_s"
            time.sleep(0.1)
        took = time.monotonic() - stopped
        # its collective started at most a step before the stop
        assert took > timeout_s - 5, f"rank 0 ended {took:.1f} s after the stop, before the timeout"
        assert "timed out" in job.text().lower(), job.text()[-3000:]
        # torchrun's SIGTERM to rank 1 is pending until it runs again
        os.kill(workers[1], signal.SIGCONT)
        assert job.wait() != 0
        _assert_all_gone(job)
    assert _left_in(out_dir) == []


# ---- train ------------------------------------------------------------------------------


def test_rank_killed_during_training_publishes_no_export_and_no_partial_step(tmp_path):
    run_dir, export = tmp_path / "run", tmp_path / "export"
    checkpoints = run_dir / "checkpoints"
    args = [
        f"hydra.run.dir={run_dir}",
        f"export={export}",
        "train.steps=2000",
        "train.save_every=2",
        "train.keep_checkpoints=2",
        "train.eval_every=0",
        "train.micro_batch=2",
        "train.seq_len=16",
        "train.eval_batches=1",
        "sample.prompt=null",
        "progress=false",
        "dist_timeout_s=60",
    ]
    with torchrun(TRAIN, args, tmp_path) as job:
        workers = job.find_workers()
        job.wait_until(lambda: (checkpoints / LATEST).is_file(), "first checkpoint")
        time.sleep(0.3)  # a few steps on: mid-step or mid-checkpoint
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        assert job.wait() != 0, job.text()[-3000:]
        assert time.monotonic() - killed < EXIT_S
        _assert_all_gone(job)
    # nothing of the export: no directory, no staging next to it
    assert [p for p in tmp_path.iterdir() if p.name.startswith((".export", "export"))] == []
    assert not (run_dir / "model").exists()
    # `latest` names a complete step: its metadata, and every rank's file loads in full
    point = find_checkpoint(str(checkpoints))
    assert point.directory.name == (checkpoints / LATEST).read_text().strip()
    assert 0 < point.step < 2000 and point.step % 2 == 0
    for rank in range(2):
        state = load_rank_state(point, rank)
        assert state, f"rank {rank}'s file of {point.directory} is empty"

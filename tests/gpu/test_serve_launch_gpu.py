"""launch/serve.py on GPUs (fp32 tiny model, CUDA-graph decode and compiled blocks on, as a
user gets them): 32 concurrent greedy requests (completions and chats, streaming and not)
equal launch/infer.py's output on the same GPUs, on 1 GPU and on 2 (ep_nccl: NCCL for the
model, the gloo control group beside it); then SIGTERM to rank 0 drains and exits 0.

Helpers from tests/multirank/test_serve_launch.py (prompts, the infer reference, the
requests) and tests/multirank/test_faults_launch.py (torchrun in its own session).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.multirank.test_faults_launch import torchrun
from tests.multirank.test_serve_launch import (
    SERVE,
    SERVER,
    check_batching_changes_nothing,
    wait_healthy,
)
from tests.support import free_port

pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.gpu, pytest.mark.multirank]

GPU = ["device=cuda", "dtype=fp32"]
# H200 hosts: NVLink SHARP / multicast off (tests/gpu convention)
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


class OneProcess:
    """``python launch/serve.py`` on one GPU, stdout and stderr to ``log`` (what
    check_batching_changes_nothing / wait_healthy need of a job)."""

    def __init__(self, args: list[str], log: Path):
        env = {k: v for k, v in os.environ.items() if k != "MOE_EXT_DEBUG"}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log = log
        with open(log, "wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, str(SERVE), *args],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, ready, what: str, limit_s: float) -> None:
        import time

        deadline = time.monotonic() + limit_s
        while not ready():
            assert self.proc.poll() is None, f"the job ended before {what}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {limit_s} s:\n{self.text()[-3000:]}"
            time.sleep(0.1)


def test_one_gpu_graphs_equal_infer_and_drain(tmp_path):
    port = free_port()
    job = OneProcess([f"server.port={port}", *SERVER, *GPU], tmp_path / "serve.log")
    try:
        wait_healthy(job, f"http://127.0.0.1:{port}")
        check_batching_changes_nothing(tmp_path, port, GPU, nproc=1)
        job.proc.send_signal(signal.SIGTERM)
        assert job.proc.wait(120) == 0, job.text()[-3000:]
        assert "drained" in job.text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.proc.pid, signal.SIGKILL)


def test_two_gpus_ep_equal_infer_and_drain(tmp_path, monkeypatch):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    for key, value in NCCL_ENV.items():
        monkeypatch.setenv(key, value)
    plan = ["strategy=ep_nccl", *GPU]
    port = free_port()
    with torchrun(SERVE, [f"server.port={port}", *SERVER, *plan], tmp_path) as job:
        wait_healthy(job, f"http://127.0.0.1:{port}")
        job.find_workers()
        check_batching_changes_nothing(tmp_path, port, plan)
        os.kill(job.workers[0], signal.SIGTERM)
        assert job.wait(120) == 0, job.text()[-3000:]
        assert "drained" in job.text()

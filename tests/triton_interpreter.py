"""Triton kernel tests on CPU.

Triton decides when it is first imported (TRITON_INTERPRET=1 in the environment) whether
kernels compile or run in its CPU interpreter, so a test file's ``test_cpu_*`` cases are
marked ``needs_interpreter`` and rerun by ``run_cpu_cases_in_interpreter`` in a child
pytest with that variable set; in the parent process (compiled kernels or no GPU) they
skip. Without triton installed (CI installs only the project's dependencies; CUDA torch
brings triton) everything Triton-specific skips.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def interpreted() -> bool:
    """Whether this process runs Triton kernels in the interpreter."""
    if not HAS_TRITON:
        return False
    from moe_ext.moe.kernels import grouped_gemm
    return grouped_gemm.INTERPRETED


needs_interpreter = pytest.mark.skipif(
    not interpreted(), reason="runs in the TRITON_INTERPRET=1 child of test_kernels_under_interpreter")


def run_cpu_cases_in_interpreter(test_file: str) -> None:
    """Run ``test_file``'s ``test_cpu_*`` cases in a child pytest under the interpreter;
    fail with the child's output tail unless they all ran and passed."""
    if interpreted():
        pytest.skip("already inside the interpreter child")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_cpu_",
         str(Path(test_file).resolve())],
        cwd=root, env=env, capture_output=True, text=True, timeout=240)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter cases failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail

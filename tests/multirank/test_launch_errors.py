"""Launcher errors on two ranks (torchrun): a refusal is one ``error:`` line, printed once,
and nothing runs after it. The single-process cases are in tests/unit/test_launch_errors.py."""

from __future__ import annotations

import subprocess

from tests.support import REPO, run_launcher

INFER, TRAIN = REPO / "launch" / "infer.py", REPO / "launch" / "train.py"


def _error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


def test_train_unknown_strategy_is_one_line_once():
    res = run_launcher(TRAIN, ["strategy=ep_foo"], nproc=2)
    assert res.returncode != 0
    errors = _error_lines(res)
    assert len(errors) == 1 and "ep_foo" in errors[0] and "ep_nccl" in errors[0], res.stderr
    assert "strategy_schema" not in res.stderr and "Available options" not in res.stderr


def test_infer_refusals_print_once_on_two_ranks(tmp_path):
    res = run_launcher(INFER, ["generate.max_new_tokens=-1"], nproc=2)
    errors = _error_lines(res)
    assert res.returncode != 0 and errors == [
        "error: generate.max_new_tokens=-1; it must be at least 1"
    ], res.stderr[-2000:]
    assert "plan:" not in res.stdout + res.stderr  # refused before the plan and the weights

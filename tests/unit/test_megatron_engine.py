"""engine=megatron refusals (moe_ext.megatron.engine, launch/infer.py and launch/train.py):
without CUDA the launchers refuse engine=megatron with one line, before any process group;
plan and training settings it cannot run are one-line errors. On ranks:
tests/multirank/test_megatron_engine.py."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|DEPRECATED).*")

from moe_ext.launching import resolve_model_source  # noqa: E402
from tests.support import REPO, megatron_plan  # noqa: E402
from tests.support import TINY_CHECKPOINT as TINY  # noqa: E402


def test_refusals_are_one_line_value_errors():
    from moe_ext.megatron.engine import (
        MegatronEngineError,
        check_plan,
        check_train_settings,
        require_cuda,
    )

    with pytest.raises(
        ValueError,
        match=r"^engine=megatron needs CUDA \(Megatron-core is "
        r"CUDA-only\); use engine=native$",
    ):
        require_cuda("auto", False, fallback="native")
    with pytest.raises(MegatronEngineError, match="needs CUDA"):
        require_cuda("cpu", True, fallback="deepspeed")
    require_cuda("auto", True, fallback="native")
    args = resolve_model_source(str(TINY), None).args
    with pytest.raises(MegatronEngineError, match="pp=1"):
        check_plan(dataclasses.replace(megatron_plan("replicate", 2), pp=2, dp=1, edp=1), args)
    with pytest.raises(MegatronEngineError, match="tp=1"):
        check_plan(megatron_plan("tp_experts", 2, tp=2), args, training=True)
    check_plan(megatron_plan("tp_experts", 2, tp=2), args)  # inference takes tp
    check_train_settings("bf16", 0)  # Megatron's mixed-precision optimizer
    with pytest.raises(MegatronEngineError, match="dtype=bf16"):
        check_train_settings("fp32", 1)
    with pytest.raises(MegatronEngineError, match="zero_stage"):
        check_train_settings("auto", 2)


@pytest.mark.parametrize("launcher, fallback", [("infer.py", "native"), ("train.py", "deepspeed")])
def test_launchers_refuse_megatron_without_cuda(launcher, fallback):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / launcher),
            "engine=megatron",
            "hydra.run.dir=/tmp/moe_ext_megatron_refusal",
            "hydra.output_subdir=null",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: engine=megatron needs CUDA (Megatron-core is CUDA-only); use engine={fallback}"
    ], res.stderr[-2000:]
    assert "Traceback" not in res.stderr

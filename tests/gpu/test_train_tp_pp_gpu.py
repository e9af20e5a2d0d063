"""Native training with tp and pp on 2 GPUs (NCCL, the launcher): the loss trajectories of
pp2 (1F1B, 1 and 2 micro-batches), tp2·ep2 (ep_nccl, token split) and tp2 (tp_experts)
follow the one-GPU run of the same batches (data parallel degree 1 everywhere):

  - bf16 with ZeRO 1 (DeepSpeed's BF16_Optimizer, the launcher's default on GPUs) and
    activation checkpointing on the 2-GPU runs: every step's loss within 3% of the one-GPU
    bf16 run (bf16 rounds activations and gradients; a wrong TP/pipeline gradient or a
    missing micro-batch moves the trajectory by far more after a few clipped steps);
  - fp32 without ZeRO: within 1e-3 relative (GPU reductions are not bitwise).

Run on a 2-GPU machine: ``python -m pytest tests/gpu/test_train_tp_pp_gpu.py -m gpu``.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.multirank.test_train_tp_pp import TRAJECTORY_LAYOUTS, launcher_losses
from tests.support import NCCL_TEST_ENV

STEPS = 8


def _losses(tmp_path, name, nproc, *overrides):
    env = {k: v for k, v in NCCL_TEST_ENV.items() if k not in os.environ}
    return launcher_losses(tmp_path, name, nproc, "device=cuda", *overrides, steps=STEPS, env=env)


@pytest.mark.gpu
@pytest.mark.multirank
@pytest.mark.parametrize(
    "precision, rel",
    [(("dtype=bf16", "train.zero_stage=1"), 3e-2), (("dtype=fp32", "train.zero_stage=0"), 1e-3)],
    ids=["bf16-zero1", "fp32"],
)
def test_tp_pp_loss_trajectories_follow_one_gpu(tmp_path, precision, rel):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    reference = _losses(tmp_path, "one", 1, "strategy=replicate", *precision)
    layouts = dict(TRAJECTORY_LAYOUTS)
    layouts["pp2_m2"] = (*layouts["pp2"], "train.pipeline_microbatches=2")
    for name, layout in layouts.items():
        got = _losses(tmp_path, name, 2, *layout, *precision, "train.activation_checkpointing=true")
        tolerance = max(rel, 1e-3) if name == "pp2_m2" else rel  # per-micro-batch aux loss
        assert got == pytest.approx(reference, rel=tolerance), (name, got, reference)

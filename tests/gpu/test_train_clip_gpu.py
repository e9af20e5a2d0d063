"""Exact global-norm clipping on 2 GPUs (NCCL), the recipe issue 21 needs: bf16 + ZeRO 1/2
(+ CPU offload) + clipping + EP. Three clipped AdamW steps of the tiny model on each rank,
against the single-rank fp32 reference on CPU (tests/multirank/test_train_clip.py has the
cases' body and the reference):

  - bf16 (DeepSpeed's BF16_Optimizer for ZeRO 1, its ZeRO optimizer for ZeRO 2 and with
    offload): each of two steps' ``engine.get_global_grad_norm()`` within 5% of the
    reference's pre-clip global norm and every rank's loss within 5% (bf16 rounds the
    forward and the gradients to 8 bits of mantissa; a norm missing the other EP rank's
    experts or counting replicas twice is off by far more);
  - fp32 ZeRO 2 on GPU: norms within 1e-3, losses within 1e-4 and the weights after the
    clipped steps within 1e-4 relative / 1e-6 absolute.

Run on a 2-GPU machine: ``python -m pytest tests/gpu/test_train_clip_gpu.py -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

from tests.multirank.test_train_clip import clip_body
from tests.support import run_ranks

F32, BF16 = torch.float32, torch.bfloat16
EP2 = dict(dp=2, ep=2)


@pytest.mark.gpu
@pytest.mark.multirank
def test_exact_clipping_bf16_zero_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    cases = [
        ("ep_nccl", EP2, 1, BF16, False),  # BF16_Optimizer
        ("ep_nccl", EP2, 2, BF16, False),  # DeepSpeedZeroOptimizer, bf16
        ("ep_allgather", EP2, 1, BF16, False),
        ("ep_nccl", EP2, 2, BF16, True),  # optimizer states offloaded to CPU
        ("replicate", dict(dp=2), 2, BF16, False),
        ("ep_nccl", EP2, 2, F32, False),  # fp32 on GPU: tight tolerances
    ]
    run_ranks(clip_body, world_size=2, args=(cases, "cuda"), backend="nccl")

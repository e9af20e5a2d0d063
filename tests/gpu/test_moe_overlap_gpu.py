"""Dual-batch overlap of the eager EP layer on 2 GPUs over NCCL in bf16: ep_nccl and
ep_allgather, dynamic and static capacity, equal to the dense float64 reference (outputs
and gradients, bf16 tolerance) and to the same layer without overlap, one exchange per
micro-batch; the async collectives run on NCCL's stream and the layer waits on them
(comm.Inflight). The same checks on 2 gloo ranks: tests/multirank/test_moe_overlap.py.

Run on a 2-GPU machine: ``python -m pytest tests/gpu/test_moe_overlap_gpu.py -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

from tests.multirank.test_moe_overlap import overlap_body
from tests.support import run_ranks


@pytest.mark.gpu
@pytest.mark.multirank
def test_overlap_matches_reference_nccl_bf16():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_ranks(overlap_body, 2, args=("cuda", "bfloat16", 3e-2), backend="nccl")

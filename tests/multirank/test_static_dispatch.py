"""Static-capacity expert exchange on ranks: equals the dynamic exchange and the float64
reference (outputs and gradients) and makes no host sync. World size 1, the capacity
errors and padding rows: tests/unit/test_static_dispatch.py.

# T tokens on a rank, C capacity, H hidden, E experts, k top-k, G ep size

The EP dispatchers that can run it on CPU (allgather_rs = ep_allgather, nccl_a2a = ep_nccl;
nvshmem needs GPUs and uses the same module) run every routing case of
tests.support.CASES at capacities C = max T (one rank full, others below, some
empty) and C = max T + 2, on gloo at world 2 and 4 (there also in two groups of two);
the same runs check that dispatch + combine read nothing back to the host. On 2 GPUs
(gpu mark) the same checks run in bf16 over NCCL, nvshmem included, where the experts
take the Triton/grouped_mm paths that leave padding rows unwritten, and CUDA's sync debug
mode proves dispatch + experts + combine sync-free.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_ext.moe.dispatch import DispatchGroups
from tests.support import (
    CASES,
    STATIC,
    H,
    build_case_layer,
    case_tensors,
    check_static_equals_dynamic,
    no_sync_body,
    run_ranks,
    static_dispatcher,
)


def _equivalence_body(rank, world, seed):
    no_sync_body(rank, world)
    for name in STATIC:
        for extra in (0, 2):
            check_static_equals_dynamic(
                name, DispatchGroups(ep=dist.group.WORLD), seed, CASES, extra
            )
    if world == 4:
        # two groups of two: group ranks differ from global ranks
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        for name in STATIC:
            check_static_equals_dynamic(
                name, DispatchGroups(ep=pairs[rank // 2]), seed + 50, CASES[:2] + CASES[4:5], 0
            )


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_static_matches_dynamic_and_reference_gloo(world):
    run_ranks(_equivalence_body, world, args=(world * 10 + 1,))


def _gpu_body(rank, world):
    from moe_ext.moe.dispatch.nvshmem import nvshmem_available

    device = torch.device("cuda", rank)
    groups = DispatchGroups(ep=dist.group.WORLD)
    names = list(STATIC) + (["nvshmem"] if nvshmem_available() else [])
    for name in names:
        check_static_equals_dynamic(name, groups, 70, CASES, 0, torch.bfloat16, device, 3e-2)
        # decode shape: inference, bf16, few rows -> the Triton experts; no sync anywhere
        layer = build_case_layer(
            static_dispatcher(name, groups, 4),
            CASES[0][1],
            {},
            groups,
            case_tensors(5, CASES[0][1], [3] * world, {}, torch.bfloat16, device),
            torch.bfloat16,
            device,
        )
        x = torch.randn(3 if rank else 4, H, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            routing = layer.router(x)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                x_local, counts, handle = layer.dispatcher.dispatch(
                    x, routing.weights, routing.expert_idx
                )
                y = layer.dispatcher.combine(layer.experts(x_local, counts), handle)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.isfinite(y).all(), name


@pytest.mark.gpu
def test_gpu_static_matches_dynamic_nccl_bf16():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_ranks(_gpu_body, 2, backend="nccl")

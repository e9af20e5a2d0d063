"""Every dispatcher at world sizes 2 and 4 (gloo; 2 GPUs in bf16 over NCCL) computes the
dense reference's outputs and gradients (tests.support.check_strategy: EP strategies give
each rank its own tokens, the TP-sharded strategy every rank the whole batch). One spawned
run per world size does all strategies and routing cases (spawning ranks is the expensive
part). World size 1 and the errors: tests/unit/test_moe_dispatch.py.

# T tokens, H hidden, E experts, k top-k, F expert FFN size
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_ext.moe.dispatch import DispatchGroups
from tests.support import CASES, STRATEGIES, check_strategy, run_ranks


def _world_groups(strategy, world):
    group = None if world == 1 else dist.group.WORLD
    if strategy == "tp_sharded":
        return DispatchGroups(etp=group)
    if strategy == "local":
        return DispatchGroups()
    return DispatchGroups(ep=group)


def _equivalence_body(rank, world, seed, device_kind, dtype_name, tol):
    dtype = getattr(torch, dtype_name)
    device = torch.device("cpu")
    if device_kind == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    for strategy in STRATEGIES[1:]:
        check_strategy(strategy, _world_groups(strategy, world), seed, dtype, device, tol)
    if world == 4:
        # Two independent groups of two: group ranks differ from global ranks.
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        mine = pairs[rank // 2]
        for strategy in STRATEGIES[1:]:
            sharded = strategy == "tp_sharded"
            groups = DispatchGroups(etp=mine) if sharded else DispatchGroups(ep=mine)
            check_strategy(strategy, groups, seed + 100, dtype, device, tol, cases=CASES[:3])


@pytest.mark.parametrize("world", [2, 4])
def test_strategies_match_reference_gloo(world):
    run_ranks(_equivalence_body, world, args=(world * 10, "cpu", "float32", "fp32"))


@pytest.mark.gpu
def test_strategies_match_reference_nccl_bf16():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_ranks(_equivalence_body, 2, args=(7, "cuda", "bfloat16", 3e-2), backend="nccl")

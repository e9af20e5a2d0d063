"""All experts on this rank: dispatch is a permutation, no communication.

# T tokens, H hidden, k top-k, E experts (all local), N = T*k rows after dispatch

The expert sort is one Triton launch (:mod:`moe_ext.moe.kernels.permute`, op
``moe_ext::sort_pairs``: the stable order and the counts) when ``fused`` allows it, the
ids are on CUDA (or on CPU with Triton's interpreter already running: tests),
N <= ``permute.MAX_PAIRS`` (4096) and E <= ``permute.MAX_EXPERTS`` (1024); otherwise
``_permute.sort_by_bucket``. Both give the identical permutation and counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_ext.moe.dispatch._permute import (
    check_routing,
    gather_rows,
    sort_by_bucket,
    unpermute_weighted_sum,
)
from moe_ext.moe.dispatch.base import Dispatcher, DispatchGroups
from moe_ext.moe.kernels import kernels_for


@dataclass
class LocalHandle:
    order: torch.Tensor  # [N] int64 pair ids sorted by expert
    weights: torch.Tensor  # [T, k] float32 routing weights (autograd-connected)


def sort_pairs(
    expert_ids: torch.Tensor, num_experts: int, fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids: [N] int64 in [0, E). Returns (order [N] int64 pair ids grouped by expert,
    stable; counts [E] int64), from the fused kernel when eligible (module docstring)."""
    kernels = kernels_for("permute", expert_ids.device) if fused else None
    if (
        kernels is not None
        and expert_ids.shape[0] <= kernels.MAX_PAIRS
        and num_experts <= kernels.MAX_EXPERTS
    ):
        return kernels.sort_pairs(expert_ids, num_experts)
    return sort_by_bucket(expert_ids, num_experts)


def permute_local(
    x: torch.Tensor, expert_idx: torch.Tensor, num_experts: int, fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [T, H]; expert_idx: [T, k] int64 in [0, E). Returns (x_sorted [T*k, H] grouped by
    expert, tokens_per_expert [E] int64, order [T*k] int64). ``fused`` allows the one-launch
    sort kernel (same result)."""
    order, counts = sort_pairs(expert_idx.reshape(-1), num_experts, fused)  # [N], [E]
    return gather_rows(x, order, expert_idx.shape[1]), counts, order


class LocalDispatcher(Dispatcher):
    """Replicated experts (strategy ``replicate``): sort token-expert pairs by expert.
    ``fused`` (attribute, default True) allows the one-launch sort kernel."""

    splits_experts_over_ep = False
    shards_experts_on_ffn = False

    def __init__(self, num_experts: int, groups: DispatchGroups = DispatchGroups()):
        super().__init__(num_experts, groups)
        self.fused = True

    def dispatch(self, x, weights, expert_idx):
        check_routing(x, weights, expert_idx)
        x_sorted, tokens_per_expert, order = permute_local(
            x, expert_idx, self.num_experts, self.fused
        )
        return x_sorted, tokens_per_expert, LocalHandle(order, weights)

    def combine(self, y_local, handle: LocalHandle):
        return unpermute_weighted_sum(y_local, handle.order, handle.weights)  # [T, H]

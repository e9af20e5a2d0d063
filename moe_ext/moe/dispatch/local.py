"""All experts on this rank: dispatch is a permutation, no communication.

# T tokens, H hidden, k top-k, E experts (all local), N = T*k rows after dispatch
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_ext.moe.dispatch._permute import (check_routing, gather_rows, sort_by_bucket,
                                           unpermute_weighted_sum)
from moe_ext.moe.dispatch.base import DispatchGroups, Dispatcher


@dataclass
class LocalHandle:
    order: torch.Tensor  # [N] int64 pair ids sorted by expert
    weights: torch.Tensor  # [T, k] float32 routing weights (autograd-connected)


def permute_local(x: torch.Tensor, expert_idx: torch.Tensor, num_experts: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [T, H]; expert_idx: [T, k] int64 in [0, E). Returns (x_sorted [T*k, H] grouped by
    expert, tokens_per_expert [E] int64, order [T*k] int64)."""
    order, counts = sort_by_bucket(expert_idx.reshape(-1), num_experts)  # [N], [E]
    return gather_rows(x, order, expert_idx.shape[1]), counts, order


class LocalDispatcher(Dispatcher):
    """Replicated experts (strategy ``replicate``): sort token-expert pairs by expert."""

    def __init__(self, num_experts: int, groups: DispatchGroups = DispatchGroups()):
        super().__init__(num_experts, groups)
        if groups.ep_size != 1 or groups.etp_size != 1:
            raise ValueError(f"LocalDispatcher keeps every expert whole on every rank but got "
                             f"ep={groups.ep_size}, etp={groups.etp_size}; use nccl_a2a/"
                             f"allgather_rs for ep>1 or tp_sharded for etp>1")

    def dispatch(self, x, weights, expert_idx):
        check_routing(x, weights, expert_idx)
        x_sorted, tokens_per_expert, order = permute_local(x, expert_idx, self.num_experts)
        return x_sorted, tokens_per_expert, LocalHandle(order, weights)

    def combine(self, y_local, handle: LocalHandle):
        return unpermute_weighted_sum(y_local, handle.order, handle.weights)  # [T, H]

"""Expert parallelism through two variable-split all-to-alls (strategy ``ep_nccl``).

# T tokens on this rank, H hidden, k top-k, E experts, G = ep size, E_local = E / G,
# N = T*k rows sent, R rows received (= T' rows computed here)

Dispatch: sort this rank's token-expert pairs by global expert (experts are owned in
contiguous blocks, so this also groups them by destination rank), exchange per-expert
counts, exchange rows, then reorder the received rows from (source rank, local expert) to
(local expert, source rank) so each local expert's rows are contiguous. Combine undoes the
three steps in reverse and applies the routing weights on the token's home rank, so the
weights never travel.

With a static capacity (``set_capacity``) dispatch and combine use the all-gather +
reduce-scatter exchange of :mod:`moe_ext.moe.dispatch.static` instead: no host-side split
sizes, so the step can be captured in a CUDA graph (that module says why it is not an
all-to-all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moe_ext.moe.dispatch._permute import (
    gather_rows,
    invert_permutation,
    sort_by_bucket,
    unpermute_weighted_sum,
)
from moe_ext.moe.dispatch.comm import Inflight, all_to_all_async, all_to_all_raw
from moe_ext.moe.dispatch.static import ExpertParallelDispatcher


@dataclass
class AllToAllHandle:
    order: torch.Tensor  # [N] int64 pair ids sorted by global expert (send order)
    weights: torch.Tensor  # [T, k] float32 routing weights (autograd-connected)
    recv_order: Optional[torch.Tensor]  # [R] received-row index per expert-sorted row
    input_splits: list[int]  # rows sent to each EP rank
    output_splits: list[int]  # rows received from each EP rank


@dataclass
class _PendingDispatch:
    """A dynamic dispatch whose row all-to-all may be in flight."""

    x_recv: torch.Tensor  # [R, H] rows by (source rank, local expert), valid after the wait
    recv_counts: Optional[torch.Tensor]  # [G*E_local] int64; None for a group of one
    handle: AllToAllHandle  # recv_order still None


@dataclass
class _PendingCombine:
    y_send: torch.Tensor  # [N, H] in send order, valid after the wait
    handle: AllToAllHandle


class AllToAllDispatcher(ExpertParallelDispatcher):
    def dispatch_dynamic_start(self, x, weights, expert_idx, inflight: Inflight):
        group, world, num_local = self.groups.ep, self.groups.ep_size, self.num_local_experts
        order, counts = sort_by_bucket(expert_idx.reshape(-1), self.num_experts)  # [N], [E]
        x_send = gather_rows(x, order, expert_idx.shape[1])  # [N, H] grouped by expert
        if world == 1:
            return _PendingDispatch(x_send, counts, AllToAllHandle(order, weights, None, [], []))
        # recv_counts[s*E_local + e]: rows rank s sends for this rank's local expert e
        recv_counts = all_to_all_raw(counts, [num_local] * world, [num_local] * world, group)
        # sync: all_to_all_single takes split sizes as Python ints and the receive
        # buffer must be allocated with its size; one transfer carries both directions.
        splits = torch.cat(
            [counts.view(world, num_local).sum(1), recv_counts.view(world, num_local).sum(1)]
        ).tolist()
        input_splits, output_splits = splits[:world], splits[world:]
        x_recv = all_to_all_async(x_send, output_splits, input_splits, group, inflight)  # [R, H]
        handle = AllToAllHandle(order, weights, None, input_splits, output_splits)
        return _PendingDispatch(x_recv, recv_counts, handle)

    def dispatch_dynamic_finish(self, pending: _PendingDispatch):
        handle = pending.handle
        if self.groups.ep_size == 1:
            return pending.x_recv, pending.recv_counts, handle
        num_local = self.num_local_experts
        # Received rows are grouped by (source rank, local expert); tag each with its local
        # expert (output_size given: no sync) and sort stably to group by local expert.
        expert_of_slot = torch.arange(num_local, device=pending.x_recv.device).repeat(
            self.groups.ep_size
        )  # [G*E_local]
        recv_expert = torch.repeat_interleave(
            expert_of_slot, pending.recv_counts, output_size=sum(handle.output_splits)
        )  # [R]
        recv_order, tokens_per_local_expert = sort_by_bucket(recv_expert, num_local)
        x_local = pending.x_recv.index_select(0, recv_order)  # [R, H] sorted by local expert
        handle.recv_order = recv_order
        return x_local, tokens_per_local_expert, handle

    def combine_dynamic_start(self, y_local, handle: AllToAllHandle, inflight: Inflight):
        if handle.recv_order is None:
            return unpermute_weighted_sum(y_local, handle.order, handle.weights)  # [T, H]
        y_recv = y_local.index_select(0, invert_permutation(handle.recv_order))  # [R, H]
        y_send = all_to_all_async(
            y_recv, handle.input_splits, handle.output_splits, self.groups.ep, inflight
        )  # [N, H] in send order
        return _PendingCombine(y_send, handle)

    def combine_dynamic_finish(self, pending: _PendingCombine):
        handle = pending.handle
        return unpermute_weighted_sum(pending.y_send, handle.order, handle.weights)  # [T, H]

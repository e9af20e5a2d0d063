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
        return self.dispatch_dynamic_start_parts([(x, weights, expert_idx)], [inflight])[0]

    def dispatch_dynamic_start_parts(self, parts, inflights):
        """Every part's counts in one all-to-all and one host read, then each part's rows
        in its own async all-to-all. n parts; part i's tokens x_i [T_i, H]."""
        group, world, num_local = self.groups.ep, self.groups.ep_size, self.num_local_experts
        n = len(parts)
        sorted_parts = [
            sort_by_bucket(idx.reshape(-1), self.num_experts) for _, _, idx in parts
        ]  # (order [N_i], counts [E]) per part
        if world == 1:
            return [
                _PendingDispatch(
                    gather_rows(x, order, idx.shape[1]),
                    counts,
                    AllToAllHandle(order, w, None, [], []),
                )
                for (x, w, idx), (order, counts) in zip(parts, sorted_parts)
            ]
        counts = torch.stack([c for _, c in sorted_parts])  # [n, E]
        send = counts.view(n, world, num_local).transpose(0, 1).contiguous()  # [G, n, E_local]
        # recv[s, i, e]: rows rank s sends in part i for this rank's local expert e
        recv = all_to_all_raw(
            send.view(-1), [n * num_local] * world, [n * num_local] * world, group
        ).view(world, n, num_local)
        # sync: all_to_all_single takes split sizes as Python ints and the receive
        # buffer must be allocated with its size; one transfer carries every part's sizes
        # in both directions.
        sizes = torch.cat([send.sum(-1).t().reshape(-1), recv.sum(-1).t().reshape(-1)]).tolist()
        pending = []
        for i, ((x, w, idx), (order, _)) in enumerate(zip(parts, sorted_parts)):
            input_splits = sizes[i * world : (i + 1) * world]
            output_splits = sizes[(n + i) * world : (n + i + 1) * world]
            x_send = gather_rows(x, order, idx.shape[1])  # [N_i, H] grouped by expert
            x_recv = all_to_all_async(
                x_send, output_splits, input_splits, group, inflights[i]
            )  # [R_i, H]
            handle = AllToAllHandle(order, w, None, input_splits, output_splits)
            # [G*E_local]: index s*E_local + e, as the received rows are grouped
            pending.append(_PendingDispatch(x_recv, recv[:, i].reshape(-1), handle))
        return pending

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

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
from moe_ext.moe.dispatch.comm import all_to_all, all_to_all_raw
from moe_ext.moe.dispatch.static import ExpertParallelDispatcher


@dataclass
class AllToAllHandle:
    order: torch.Tensor  # [N] int64 pair ids sorted by global expert (send order)
    weights: torch.Tensor  # [T, k] float32 routing weights (autograd-connected)
    recv_order: Optional[torch.Tensor]  # [R] received-row index per expert-sorted row
    input_splits: list[int]  # rows sent to each EP rank
    output_splits: list[int]  # rows received from each EP rank


class AllToAllDispatcher(ExpertParallelDispatcher):
    def dispatch_dynamic(self, x, weights, expert_idx):
        group, world, num_local = self.groups.ep, self.groups.ep_size, self.num_local_experts
        order, counts = sort_by_bucket(expert_idx.reshape(-1), self.num_experts)  # [N], [E]
        x_send = gather_rows(x, order, expert_idx.shape[1])  # [N, H] grouped by expert
        if world == 1:
            return x_send, counts, AllToAllHandle(order, weights, None, [], [])
        # recv_counts[s*E_local + e]: rows rank s sends for this rank's local expert e
        recv_counts = all_to_all_raw(counts, [num_local] * world, [num_local] * world, group)
        # Host sync: all_to_all_single takes split sizes as Python ints and the receive
        # buffer must be allocated with its size; one transfer carries both directions.
        splits = torch.cat(
            [counts.view(world, num_local).sum(1), recv_counts.view(world, num_local).sum(1)]
        ).tolist()
        input_splits, output_splits = splits[:world], splits[world:]
        num_recv = sum(output_splits)
        x_recv = all_to_all(x_send, output_splits, input_splits, group)  # [R, H]
        # Received rows are grouped by (source rank, local expert); tag each with its local
        # expert (output_size given: no sync) and sort stably to group by local expert.
        expert_of_slot = torch.arange(num_local, device=x.device).repeat(world)  # [G*E_local]
        recv_expert = torch.repeat_interleave(
            expert_of_slot, recv_counts, output_size=num_recv
        )  # [R]
        recv_order, tokens_per_local_expert = sort_by_bucket(recv_expert, num_local)
        x_local = x_recv.index_select(0, recv_order)  # [R, H] sorted by local expert
        return (
            x_local,
            tokens_per_local_expert,
            AllToAllHandle(order, weights, recv_order, input_splits, output_splits),
        )

    def combine_dynamic(self, y_local, handle: AllToAllHandle):
        if handle.recv_order is None:
            return unpermute_weighted_sum(y_local, handle.order, handle.weights)  # [T, H]
        y_recv = y_local.index_select(0, invert_permutation(handle.recv_order))  # [R, H]
        y_send = all_to_all(
            y_recv, handle.input_splits, handle.output_splits, self.groups.ep
        )  # [N, H] in send order
        return unpermute_weighted_sum(y_send, handle.order, handle.weights)  # [T, H]

"""Expert parallelism through all-gather + reduce-scatter (strategy ``ep_allgather``).

# T tokens on this rank, T_max the largest T in the EP group, G = ep size, H hidden,
# k top-k, E experts, E_local = E / G, T' rows for this rank's experts

Every rank gathers every rank's tokens and routing, keeps the rows routed to its own
experts, and in combine scatter-adds its weighted outputs into a [G*T_max, H] buffer that a
reduce-scatter sums and hands back, each rank receiving its own tokens. More bytes than an
all-to-all, but two bulk collectives that NCCL runs well on PCIe rings and no split
bookkeeping on the wire.

With a static capacity (``set_capacity``) the same exchange runs padded to that capacity
instead of T_max, without the host reads (:mod:`moe_ext.moe.dispatch.static`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_ext.moe.dispatch._permute import gather_rows, scatter_weighted, sort_by_bucket
from moe_ext.moe.dispatch.comm import (
    Inflight,
    all_gather_async,
    all_gather_raw,
    all_gather_start,
    reduce_scatter_async,
)
from moe_ext.moe.dispatch.static import ExpertParallelDispatcher


@dataclass
class AllGatherHandle:
    pair_ids: torch.Tensor  # [T'] int64 pair ids into the gathered [G*T_max, k] routing
    weights_all: torch.Tensor  # [G*T_max, k] float32 gathered routing weights (autograd)
    num_tokens: int  # T on this rank
    max_tokens: int  # T_max: rows per rank in the gathered buffers


@dataclass
class _PendingDispatch:
    """A dynamic dispatch whose all-gathers may be in flight."""

    x_all: torch.Tensor  # [G*T_max, H], valid after the wait
    weights_all: torch.Tensor  # [G*T_max, k] float32
    idx_all: torch.Tensor  # [G*T_max, k] int64
    num_tokens: int
    max_tokens: int


class AllGatherDispatcher(ExpertParallelDispatcher):
    def dispatch_dynamic_start(self, x, weights, expert_idx, inflight: Inflight):
        return self.dispatch_dynamic_start_parts([(x, weights, expert_idx)], [inflight])[0]

    def dispatch_dynamic_start_parts(self, parts, inflights):
        """Every part's largest token count in one all-gather and one host read, then each
        part's padded rows, weights and ids in async all-gathers."""
        group, world = self.groups.ep, self.groups.ep_size
        if world == 1:
            return [_PendingDispatch(x, w, idx, x.shape[0], x.shape[0]) for x, w, idx in parts]
        device = parts[0][0].device
        counts = torch.tensor([x.shape[0] for x, _, _ in parts], dtype=torch.int64, device=device)
        # sync: all-gather needs equal-sized buffers, so every rank must learn the largest
        # token count in the group (per part) to pad to before it can size them.
        most = all_gather_raw(counts[None], group).amax(0).tolist()  # [n]
        pending = []
        for (x, w, idx), max_tokens, inflight in zip(parts, most, inflights):
            pad = max_tokens - x.shape[0]
            # Padding rows route to expert E, which no rank owns, so they are never kept.
            pending.append(
                _PendingDispatch(
                    all_gather_async(F.pad(x, (0, 0, 0, pad)), group, inflight),  # [G*T_max, H]
                    all_gather_async(F.pad(w, (0, 0, 0, pad)), group, inflight),  # [G*T_max, k]
                    all_gather_start(
                        F.pad(idx, (0, 0, 0, pad), value=self.num_experts), group, inflight
                    ),  # [G*T_max, k]
                    x.shape[0],
                    max_tokens,
                )
            )
        return pending

    def dispatch_dynamic_finish(self, pending: _PendingDispatch):
        top_k = pending.idx_all.shape[1]
        local_id = pending.idx_all.reshape(-1) - self.local_expert_start  # [G*T_max*k]
        is_local = (local_id >= 0) & (local_id < self.num_local_experts)
        # Rows for other ranks' experts go to a sentinel bucket E_local sorted last.
        bucket = torch.where(is_local, local_id, torch.full_like(local_id, self.num_local_experts))
        order, counts = sort_by_bucket(bucket, self.num_local_experts + 1)
        tokens_per_local_expert = counts[: self.num_local_experts]
        # sync: how many gathered rows belong to local experts is data-dependent and
        # sizes x_local (the output shape of this dispatch).
        num_rows = order.numel() - int(counts[self.num_local_experts].item())
        pair_ids = order[:num_rows]  # [T']
        x_local = gather_rows(pending.x_all, pair_ids, top_k)  # [T', H]
        return (
            x_local,
            tokens_per_local_expert,
            AllGatherHandle(pair_ids, pending.weights_all, pending.num_tokens, pending.max_tokens),
        )

    def combine_dynamic_start(self, y_local, handle: AllGatherHandle, inflight: Inflight):
        world = self.groups.ep_size
        y_all = scatter_weighted(
            y_local, handle.pair_ids, handle.weights_all, world * handle.max_tokens
        )  # [G*T_max, H]
        # [T_max, H] -> [T, H]: a view, no read of the (pending) rows
        return reduce_scatter_async(y_all, self.groups.ep, inflight)[: handle.num_tokens]

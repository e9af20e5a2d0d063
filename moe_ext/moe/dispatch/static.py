"""Static-capacity expert exchange: no host sync, shapes fixed by (C, k, H, G) alone.

# T tokens on this rank (0 <= T <= C), C capacity = max tokens per rank, G = ep size,
# H hidden, k top-k, E experts, E_local = E / G, R = G*C*k rows after dispatch,
# T' <= R rows of this rank's experts (the first T' of the R, counted on the device)

Decode with CUDA graphs needs every EP step to have the same shapes and no host reads.
With a token capacity C known in advance (DeepEP's low-latency mode works the same way),
every rank pads its tokens to C and all-gathers tokens and routing; pad rows route to the
sentinel expert E, which no rank owns. The G*C*k gathered token-expert pairs are sorted by
local expert with a sentinel bucket (other ranks' experts and padding) sorted last, so the
experts get a static R rows of which only the leading T' (``tokens_per_local_expert``
sums to T' on the device) are real; the trailing rows are padding whose outputs are
unspecified. Combine zeroes the padding rows with ``torch.where`` on ``row < T'`` (their
outputs may be garbage or NaN, and NaN * 0 is NaN, so they are never multiplied by 0),
scatter-adds the weighted rows into [G*C, H] and reduce-scatters, each rank keeping its C
rows and returning the first T.

Why an all-gather and not an all-to-all: with a fixed capacity every rank must reserve,
per destination, room for all of its C tokens (any of them may pick an expert there). A
deduplicated all-to-all (each token sent once per destination rank) therefore moves
exactly the all-gather's bytes, G*C rows per rank, and a per-(token, expert) padded
all-to-all moves up to k times more (C*k rows per destination). All-gather and
reduce-scatter are single, well-tuned NCCL collectives with no split sizes at all, so all
three EP dispatchers (``allgather_rs``, ``nccl_a2a``, ``nvshmem``) use this exchange when a
capacity is set; NCCL collectives are also capturable in a CUDA graph.

Without gradients (decode) tokens, routing weights and expert ids travel as one byte
all-gather; with gradients they go through the differentiable collectives of ``comm``
(the backward of the all-gather is a reduce-scatter and vice versa), so this path trains
too. Whether gradients are enabled must agree across the EP group (it does: every rank
runs the same step), because it decides which collectives run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_ext.moe.dispatch._permute import check_routing, gather_rows, sort_by_bucket
from moe_ext.moe.dispatch.base import Dispatcher
from moe_ext.moe.dispatch.comm import (
    Inflight,
    _pad_rows,
    _rows_of_rank,
    all_gather_async,
    all_gather_start,
    copy_to_partials,
    group_size,
    reduce_partials,
    reduce_scatter_async,
    reduce_scatter_raw,
)


@dataclass
class StaticHandle:
    order: torch.Tensor  # [R] int64 pair ids into the gathered routing, local experts first
    num_valid: torch.Tensor  # [] int64 T': rows of local experts (device, never read back)
    weights_all: torch.Tensor  # [G*C, k] float32 gathered routing weights (autograd)
    num_tokens: int  # T on this rank
    group: Optional[dist.ProcessGroup]  # the EP group


def check_capacity(num_tokens: int, capacity: int) -> None:
    if num_tokens > capacity:
        raise ValueError(
            f"{num_tokens} tokens on this rank exceed the static expert-exchange "
            f"capacity max_tokens_per_rank={capacity}; raise it with "
            f"set_capacity()/Transformer.set_moe_capacity() or pass None for the "
            f"dynamic exchange"
        )


def _pack(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Tensors [C, -] side by side as bytes: [C, total bytes] uint8."""
    return torch.cat([p.contiguous().view(torch.uint8) for p in parts], dim=1)


def _unpack(gathered: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The inverse of ``_pack`` on gathered rows: [G*C, bytes] -> one [G*C, -] per part."""
    out, start = [], 0
    for p in parts:
        width = p.shape[1] * p.element_size()
        out.append(gathered[:, start : start + width].contiguous().view(p.dtype))  # [G*C, -]
        start += width
    return out


@dataclass
class StaticPending:
    """A static dispatch issued (``dispatch_start``) whose all-gather may be in flight."""

    gathered: tuple  # (x_all, weights_all, idx_all) or (packed bytes [G*C, bytes], parts)
    packed: bool
    num_tokens: int
    top_k: int
    dispatcher: Dispatcher


def dispatch_start(
    x: torch.Tensor,
    weights: torch.Tensor,
    expert_idx: torch.Tensor,
    capacity: int,
    dispatcher: Dispatcher,
    inflight: Inflight,
) -> StaticPending:
    """Issue the static dispatch's all-gather (``dispatch``'s arguments); its rows are
    readable after ``inflight.wait()``, then ``dispatch_finish`` sorts them. No host sync.

    Without gradients (decode) tokens, weights and expert ids (as int32) travel as one byte
    all-gather; with gradients through the differentiable all-gathers of ``comm``."""
    num_tokens, top_k = expert_idx.shape
    check_capacity(num_tokens, capacity)
    group, num_experts = dispatcher.groups.ep, dispatcher.num_experts
    pad = capacity - num_tokens
    # Pad rows route to expert E, which no rank owns: they land in the sentinel bucket.
    x_pad = F.pad(x, (0, 0, 0, pad))  # [C, H]
    weights_pad = F.pad(weights, (0, 0, 0, pad))  # [C, k]
    idx_pad = F.pad(expert_idx, (0, 0, 0, pad), value=num_experts)  # [C, k]
    if torch.is_grad_enabled():
        gathered = (
            all_gather_async(x_pad, group, inflight),  # [G*C, H]
            all_gather_async(weights_pad, group, inflight),  # [G*C, k]
            all_gather_start(idx_pad, group, inflight),  # [G*C, k]
        )
        return StaticPending(gathered, False, num_tokens, top_k, dispatcher)
    parts = (x_pad, weights_pad, idx_pad.to(torch.int32))
    packed = all_gather_start(_pack(parts), group, inflight)  # [G*C, bytes]
    return StaticPending((packed, parts), True, num_tokens, top_k, dispatcher)


def _local_rows_first(
    expert_idx: torch.Tensor, dispatcher: Dispatcher
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_idx [N, k] int64 global ids -> (order [N*k]: the rows of this rank's experts
    first, by local expert, then the rest; tokens_per_local_expert [E_local] int64;
    num_valid [] int64, the local rows' count). On the device, no host sync."""
    num_local = dispatcher.num_local_experts
    local_id = expert_idx.reshape(-1) - dispatcher.local_expert_start  # [N*k]
    is_local = (local_id >= 0) & (local_id < num_local)
    bucket = torch.where(is_local, local_id, torch.full_like(local_id, num_local))
    order, counts = sort_by_bucket(bucket, num_local + 1)  # [N*k], [E_local + 1]
    return order, counts[:num_local], order.numel() - counts[num_local]


def dispatch_finish(
    pending: StaticPending,
) -> tuple[torch.Tensor, torch.Tensor, StaticHandle]:
    """The rows of a ``dispatch_start`` whose collectives completed, sorted for the experts:
    ``dispatch``'s result."""
    dispatcher, top_k = pending.dispatcher, pending.top_k
    if pending.packed:
        packed, parts = pending.gathered
        x_all, weights_all, idx_all = _unpack(packed, parts)
        idx_all = idx_all.long()
    else:
        x_all, weights_all, idx_all = pending.gathered
    order, tokens_per_local_expert, num_valid = _local_rows_first(idx_all, dispatcher)
    valid = _valid_rows(order.numel(), num_valid)  # [R, 1]
    # Padding rows enter the experts as zeros; the where also drops the gradient the
    # experts' backward leaves unspecified for rows past T' (grouped_mm writes garbage).
    x_local = torch.where(valid, gather_rows(x_all, order, top_k), 0)  # [R, H]
    return (
        x_local,
        tokens_per_local_expert,
        StaticHandle(order, num_valid, weights_all, pending.num_tokens, dispatcher.groups.ep),
    )


def dispatch(
    x: torch.Tensor,
    weights: torch.Tensor,
    expert_idx: torch.Tensor,
    capacity: int,
    dispatcher: Dispatcher,
) -> tuple[torch.Tensor, torch.Tensor, StaticHandle]:
    """x: [T, H]; weights: [T, k] float32; expert_idx: [T, k] int64 global ids; T <= capacity.

    ``dispatcher`` supplies the expert ownership (num_experts, local_expert_start,
    num_local_experts) and the EP group. Returns (x_local [G*C*k, H]: rows of local experts
    first, sorted by local expert, then padding rows; tokens_per_local_expert [E_local]
    int64 summing to T' on the device; handle). No host sync."""
    inflight = Inflight()
    pending = dispatch_start(x, weights, expert_idx, capacity, dispatcher, inflight)
    inflight.wait()
    return dispatch_finish(pending)


def _valid_rows(num_rows: int, num_valid: torch.Tensor) -> torch.Tensor:
    """[num_rows, 1] bool: row index < num_valid (a device scalar)."""
    return (torch.arange(num_rows, device=num_valid.device) < num_valid).unsqueeze(-1)


def _weighted_rows(y_local: torch.Tensor, handle: StaticHandle) -> torch.Tensor:
    """y_local [G*C*k, H] expert outputs in dispatch order -> [G*C, H]: every gathered
    token's outputs summed with its routing weights (this rank's experts only)."""
    weights_all = handle.weights_all
    top_k = weights_all.shape[1]
    row_weights = weights_all.reshape(-1).index_select(0, handle.order)  # [R] float32
    # where, not a multiply by the mask: padding rows may hold NaN. Masking before the
    # weighting also keeps NaN out of the weights' gradient (d/dw = grad * y).
    y_local = torch.where(_valid_rows(y_local.shape[0], handle.num_valid), y_local, 0)
    weighted = y_local * row_weights.to(y_local.dtype).unsqueeze(-1)  # [R, H]
    y_all = y_local.new_zeros(weights_all.shape[0], y_local.shape[-1])  # [G*C, H]
    return y_all.index_add(0, handle.order // top_k, weighted)  # [G*C, H]


def combine_start(y_local: torch.Tensor, handle: StaticHandle, inflight: Inflight) -> torch.Tensor:
    """``combine`` with its reduce-scatter issued asynchronously: the returned [T, H] is
    valid after ``inflight.wait()``."""
    y_all = _weighted_rows(y_local, handle)  # [G*C, H]
    # [C, H] -> [T, H]: a view, no read of the (pending) rows
    return reduce_scatter_async(y_all, handle.group, inflight)[: handle.num_tokens]


def combine_replicas(y_local: torch.Tensor, handle: StaticHandle, tp: int) -> torch.Tensor:
    """``combine`` for TP-split tokens that returns every token of this rank's replica, in
    one reduce-scatter where ``combine`` + gathering the TP slices take a reduce-scatter and
    an all-gather. The EP group must be whole TP groups in EP-rank order (EP rank s holds
    slice s % tp of replica s // tp: ``ExpertParallelDispatcher.gathers_replicas``).

    Each rank's weighted outputs [G*C, H] (row s*C + c: slot c of EP rank s's slice) are
    laid out per destination rank d as the tp*C rows of d's replica and reduce-scattered:
    rank d receives, summed over every rank's experts, all slices of its replica. tp times
    the reduce-scatter bytes of ``combine``, so for the small capacities of decode. No
    autograd (decode), no host sync.

    y_local: [G*C*k, H]. Returns [tp*C, H]: slice t's C rows at t*C (rows past each
    slice's tokens are zero)."""
    y_all = _weighted_rows(y_local, handle)  # [G*C, H]
    rows, hidden = y_all.shape
    replicas = dist.get_world_size(handle.group) // tp  # G / tp
    per_dest = y_all.view(replicas, 1, rows // replicas, hidden)  # [G/tp, 1, tp*C, H]
    laid_out = per_dest.expand(replicas, tp, rows // replicas, hidden)  # [G/tp, tp, tp*C, H]
    return reduce_scatter_raw(laid_out.reshape(-1, hidden), handle.group)  # [tp*C, H]


def combine(y_local: torch.Tensor, handle: StaticHandle) -> torch.Tensor:
    """y_local: [G*C*k, H] expert outputs in dispatch order (rows past T' unspecified).
    Returns y [T, H] in y_local's dtype: this rank's tokens, summed over experts with the
    routing weights. No host sync."""
    inflight = Inflight()
    y = combine_start(y_local, handle, inflight)
    inflight.wait()
    return y


def routed_replicated(
    dispatcher: Dispatcher,
    experts: torch.nn.Module,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    expert_idx: torch.Tensor,
) -> torch.Tensor:
    """The routed experts' output when every rank of the EP group holds the same tokens and
    routing (ep_* with attention TP over exactly the EP ranks): each rank runs its own
    experts on the rows routed to them and one all-reduce sums the outputs, in place of
    slicing the tokens, exchanging them (all-gather + reduce-scatter) and gathering the
    slices (all-gather). No host sync in inference: the experts get all R = T*k rows, the
    local ones first (``tokens_per_local_expert`` counts them on the device), the rest
    masked to zero; with gradients only the T' local rows (one sync, comment below).

    tokens: [T, H]; weights: [T, k] float32; expert_idx: [T, k] int64. Returns [T, H] in
    tokens' dtype. Gradients as ``tp_sharded``: tokens and weights feed only this rank's
    experts, so their gradients are summed over the group (``copy_to_partials``); the
    summed output is consumed identically on every rank (``reduce_partials``)."""
    check_routing(tokens, weights, expert_idx)
    group, top_k = dispatcher.groups.ep, expert_idx.shape[1]
    tokens = copy_to_partials(tokens, group)
    weights = copy_to_partials(weights, group)
    order, tokens_per_local_expert, num_valid = _local_rows_first(expert_idx, dispatcher)
    if torch.is_grad_enabled():
        # sync: training keeps only the local rows, as the experts' backward leaves
        # padding rows' gradients unspecified and biased experts (gpt-oss) would sum
        # them into their bias gradients; the dynamic exchange syncs as much
        order = order[: int(num_valid)]  # [T']
    valid = _valid_rows(order.numel(), num_valid)  # [T*k or T', 1]
    x_local = torch.where(valid, gather_rows(tokens, order, top_k), 0)  # [R, H]
    y_local = torch.where(valid, experts(x_local, tokens_per_local_expert), 0)  # [R, H]
    row_weights = weights.reshape(-1).index_select(0, order).to(y_local.dtype)  # [R]
    y = y_local.new_zeros(tokens.shape)  # [T, H]
    y = y.index_add(0, order // top_k, y_local * row_weights.unsqueeze(-1))  # [T, H]
    return reduce_partials(y, group)


def routed_replicas(
    dispatcher: "ExpertParallelDispatcher",
    experts: torch.nn.Module,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    expert_idx: torch.Tensor,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """The TP token split (``comm.run_on_token_slice``) of the static exchange in decode,
    with ``combine_replicas`` in place of combine + the all-gather of the slices: three
    collectives per layer become two (all-gather, reduce-scatter). Needs a static capacity,
    no autograd, and ``dispatcher.gathers_replicas(group)``.

    tokens: [T, H], weights: [T, k] float32, expert_idx: [T, k] int64, identical on the
    ranks of ``group`` (TP). Returns [T, H] (identical on them)."""
    tp, num_tokens = group_size(group), tokens.shape[0]
    per_rank = -(-num_tokens // tp)
    mine = [
        _rows_of_rank(_pad_rows(r, per_rank * tp), group) for r in (tokens, weights, expert_idx)
    ]
    x_local, tokens_per_expert, handle = dispatcher.dispatch(*mine)  # [G*C*k, H]
    y = combine_replicas(experts(x_local, tokens_per_expert), handle, tp)  # [tp*C, H]
    capacity = dispatcher.max_tokens_per_rank
    y = y.view(tp, capacity, y.shape[-1])[:, :per_rank]  # [tp, T/tp, H]
    return y.reshape(tp * per_rank, y.shape[-1])[:num_tokens]  # [T, H]


class ExpertParallelDispatcher(Dispatcher):
    """Experts split over the EP group (the ep_* strategies), no expert TP. Subclasses
    implement their dynamic exchange, either synchronously (``dispatch_dynamic`` /
    ``combine_dynamic``, same contracts as ``dispatch`` / ``combine``) or in two phases
    around asynchronous collectives (``dispatch_dynamic_start`` / ``_finish``,
    ``combine_dynamic_start`` / ``_finish``), which lets dual-batch overlap run one
    micro-batch's exchange under another's experts; with a static capacity
    (``set_capacity``) every one of them runs this module's exchange instead."""

    shards_experts_on_ffn = False
    overlaps_exchange = True

    def dispatch(self, x, weights, expert_idx):
        check_routing(x, weights, expert_idx)
        if self.max_tokens_per_rank is not None:
            return dispatch(x, weights, expert_idx, self.max_tokens_per_rank, self)
        return self.dispatch_dynamic(x, weights, expert_idx)

    def combine(self, y_local, handle):
        if isinstance(handle, StaticHandle):
            return combine(y_local, handle)  # [T, H]
        return self.combine_dynamic(y_local, handle)

    def replicates_over(self, group: Optional[dist.ProcessGroup]) -> bool:
        """Whether the EP group is exactly ``group``'s ranks (then tokens replicated over
        ``group`` go through ``routed_replicated``: one all-reduce, no exchange)."""
        ep = self.groups.ep
        if ep is None or group is None:
            return False
        return dist.get_process_group_ranks(ep) == dist.get_process_group_ranks(group)

    def gathers_replicas(self, group: Optional[dist.ProcessGroup]) -> bool:
        """Whether the EP group is whole copies of ``group``'s layout (TP groups): its
        ranks, in EP-rank order, are consecutive blocks of ``group``'s size, this rank's
        block being ``group`` (then ``combine_replicas`` applies). Read from global rank
        lists; the caller makes the EP group agree (static.agree)."""
        ep = self.groups.ep
        if ep is None or group is None:
            return False
        tp = dist.get_world_size(group)
        ranks = dist.get_process_group_ranks(ep)
        if tp < 2 or len(ranks) % tp or len(ranks) == tp:
            return False
        start = (self.groups.ep_rank // tp) * tp
        return ranks[start : start + tp] == dist.get_process_group_ranks(group)

    # ---- two-phase exchange (dual-batch overlap) ----------------------------------------
    def dispatch_start(self, x, weights, expert_idx, inflight, microbatches=1):
        check_routing(x, weights, expert_idx)
        if self.max_tokens_per_rank is not None:
            capacity = -(-self.max_tokens_per_rank // microbatches)
            return dispatch_start(x, weights, expert_idx, capacity, self, inflight)
        return self.dispatch_dynamic_start(x, weights, expert_idx, inflight)

    def dispatch_start_parts(self, parts, inflights):
        for x, w, idx in parts:
            check_routing(x, w, idx)
        if self.max_tokens_per_rank is not None:
            return super().dispatch_start_parts(parts, inflights)
        return self.dispatch_dynamic_start_parts(parts, inflights)

    def dispatch_finish(self, pending):
        if isinstance(pending, StaticPending):
            return dispatch_finish(pending)
        return self.dispatch_dynamic_finish(pending)

    def combine_start(self, y_local, handle, inflight):
        if isinstance(handle, StaticHandle):
            return combine_start(y_local, handle, inflight)  # [T, H] after the wait
        return self.combine_dynamic_start(y_local, handle, inflight)

    def combine_finish(self, pending):
        if isinstance(pending, torch.Tensor):
            return pending
        return self.combine_dynamic_finish(pending)

    # ---- the dynamic exchange: a subclass overrides one of the two forms ----------------
    def dispatch_dynamic(
        self, x: torch.Tensor, weights: torch.Tensor, expert_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The exchange sized from this call's routing (checked already)."""
        inflight = Inflight()
        pending = self.dispatch_dynamic_start(x, weights, expert_idx, inflight)
        inflight.wait()
        return self.dispatch_dynamic_finish(pending)

    def combine_dynamic(self, y_local: torch.Tensor, handle: Any) -> torch.Tensor:
        """Inverse of ``dispatch_dynamic``."""
        inflight = Inflight()
        pending = self.combine_dynamic_start(y_local, handle, inflight)
        inflight.wait()
        return self.combine_finish(pending)

    def dispatch_dynamic_start(self, x, weights, expert_idx, inflight: Inflight) -> Any:
        """Issue the dynamic dispatch (host syncs for its sizes included); default: the
        synchronous ``dispatch_dynamic``, nothing left in flight."""
        return self.dispatch_dynamic(x, weights, expert_idx)

    def dispatch_dynamic_start_parts(self, parts: list[tuple], inflights: list) -> list:
        """``dispatch_dynamic_start`` of several micro-batches (``dispatch_start_parts``);
        default: one after the other (a subclass learns all sizes in one sync)."""
        return [
            self.dispatch_dynamic_start(x, w, idx, inflight)
            for (x, w, idx), inflight in zip(parts, inflights)
        ]

    def dispatch_dynamic_finish(self, pending: Any):
        """``dispatch_dynamic``'s result from a ``dispatch_dynamic_start`` whose collectives
        completed."""
        return pending

    def combine_dynamic_start(self, y_local, handle, inflight: Inflight) -> Any:
        """Issue the dynamic combine; a tensor (valid after the wait) or a pending object
        for ``combine_dynamic_finish``. Default: the synchronous ``combine_dynamic``."""
        return self.combine_dynamic(y_local, handle)

    def combine_dynamic_finish(self, pending: Any) -> torch.Tensor:
        return pending

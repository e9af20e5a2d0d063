"""Differentiable collectives for the dispatchers and the TP token split (explicit autograd
Functions). Public: the native decoder, its layers and the Megatron layer use them too.

# R rows (dim 0), H trailing dims; G group size; T tokens, tp the TP group size

Each Function's backward is the adjoint exchange: all-to-all -> the reverse all-to-all,
all-gather -> reduce-scatter, reduce-scatter -> all-gather. ``torch.distributed.nn`` is not
used: it has no split-aware all-to-all on every backend and its all-reduce backward
all-reduces again, which is wrong for the replicated consumers here.

TP token split (``run_on_token_slice``): the ranks of a TP group hold identical
(replicated) tokens; each runs a function on its 1/tp slice and the results are
all-gathered. Gradients follow Megatron's convention for a TP-replicated activation: every
rank holds the full, identical gradient. So ``take_slice``'s backward all-gathers the
slices' gradients, and ``gather_slices``' backward keeps this rank's rows of the (already
full) gradient; x's gradient then equals a single-rank run's on every rank.

Every call runs on the caller's process group and is bounded by that group's timeout (set
when moe_ext.dist initialises torch.distributed): a stuck peer raises, it does not hang.
A group of None means a group of one: every function is then the identity.

Under ``torch.compile`` every function here runs eagerly (``torch.compiler.disable``): the
compiled decode step breaks its graph around each exchange instead of tracing c10d calls,
and the eager collective is still recorded by the enclosing CUDA-graph capture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

ProcessGroup = Optional[dist.ProcessGroup]

# torch 2.13 renamed the tensor-in/tensor-out collectives; older versions (the GPU box runs
# 2.11) only have the *_into_tensor / *_tensor names.
_all_gather_base = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_base = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: ProcessGroup) -> int:
    """Ranks in ``group``; None stands for a group of one."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup) -> int:
    """This rank's index in ``group``; 0 for None (a group of one)."""
    return 0 if group is None else dist.get_rank(group)


@torch.compiler.disable
def all_gather_raw(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """x: [R, ...] equal R on every rank. Returns [G*R, ...] (rank order); no autograd."""
    world = group_size(group)
    if world == 1:
        return x
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_base(out, x.contiguous(), group=group)
    return out


@torch.compiler.disable
def reduce_scatter_raw(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """x: [G*R, ...]. Returns this rank's [R, ...] block of the sum over ranks; no autograd.

    A real reduce-scatter on every backend that has one (gloo since recent torch: the CPU
    path then issues the collectives NCCL issues, which the collective counts rely on);
    gloo without one falls back to all-reduce + slice."""
    world = group_size(group)
    if world == 1:
        return x
    out, work = _reduce_scatter_start(x, group)
    if work is not None:
        with torch.no_grad():  # Inflight.wait says why
            work.wait()
    return out


_gloo_reduce_scatter = True  # False once gloo refused it (torch before it had one)


def _reduce_scatter_start(x: torch.Tensor, group: ProcessGroup):
    """x: [G*R, ...], G > 1. Returns (this rank's [R, ...] block of the sum, the async work
    or None when it is already complete). gloo without a reduce-scatter (older torch) runs
    an all-reduce and keeps this rank's rows, synchronously."""
    global _gloo_reduce_scatter
    rows = x.shape[0] // group_size(group)
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    gloo = dist.get_backend(group) == dist.Backend.GLOO
    if not gloo or _gloo_reduce_scatter:
        try:
            return out, _reduce_scatter_base(out, x.contiguous(), group=group, async_op=True)
        except RuntimeError:
            if not gloo:
                raise
            _gloo_reduce_scatter = False  # refused before anything was sent: same on all ranks
    return _rows_of_rank(_all_reduce_raw(x, group), group), None


@torch.compiler.disable
def all_to_all_raw(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: ProcessGroup
) -> torch.Tensor:
    """x: [sum(input_splits), ...]. Rows input_splits[r] go to rank r; returns
    [sum(output_splits), ...] with output_splits[r] rows from rank r; no autograd."""
    if group_size(group) == 1:
        return x
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


def _all_reduce_raw(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """x: [...] this rank's partial sums. Returns the sum over the group; no autograd."""
    if group_size(group) == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _same(x: torch.Tensor) -> torch.Tensor:
    return x.view_as(x)


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_op, backward_op):
        ctx.backward_op = backward_op
        return forward_op(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_op(grad), None, None


def adjoint(
    x: torch.Tensor,
    forward_op: Callable[[torch.Tensor], torch.Tensor],
    backward_op: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Differentiable ``forward_op(x)`` whose gradient goes back through
    ``backward_op(grad)``: an exchange and its adjoint, named side by side. Every
    differentiable collective here is one call (the NVSHMEM dispatcher's exchanges too)."""
    return _Adjoint.apply(x, forward_op, backward_op)


@torch.compiler.disable
def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: ProcessGroup
) -> torch.Tensor:
    """Differentiable variable-split all-to-all of rows; backward is the reverse exchange."""
    return adjoint(
        x,
        partial(
            all_to_all_raw, output_splits=output_splits, input_splits=input_splits, group=group
        ),
        partial(
            all_to_all_raw, output_splits=input_splits, input_splits=output_splits, group=group
        ),
    )


@torch.compiler.disable
def all_gather(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Differentiable all-gather along dim 0 (equal rows per rank); backward reduce-scatters."""
    return adjoint(
        x, partial(all_gather_raw, group=group), partial(reduce_scatter_raw, group=group)
    )


@torch.compiler.disable
def reduce_scatter(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Differentiable reduce-scatter along dim 0; backward all-gathers."""
    return adjoint(
        x, partial(reduce_scatter_raw, group=group), partial(all_gather_raw, group=group)
    )


@torch.compiler.disable
def reduce_partials(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum partial results over the group. Forward all-reduce; backward identity, because
    every rank of the group consumes the (replicated) sum in the same way, so each already
    holds the full gradient of the sum: all-reducing it again would multiply it by the
    group size."""
    return adjoint(x, partial(_all_reduce_raw, group=group), _same)


@torch.compiler.disable
def copy_to_partials(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Mark a replicated input feeding partial computations. Forward identity; backward
    all-reduce, because each rank used the input for only its share of the computation
    (its FFN shard), so the input's gradient is the sum of the per-rank partial ones."""
    return adjoint(x, _same, partial(_all_reduce_raw, group=group))


# ---------------------------------------------------------------------------------------
# Asynchronous exchanges (dual-batch overlap): issued now, their output valid only after
# the ``Inflight`` they were registered with is waited on. NCCL runs them on its own
# stream, gloo in its worker threads; every rank must issue them in the same order.
# Backward (the adjoint) runs synchronously.
# ---------------------------------------------------------------------------------------


class Inflight:
    """The async collectives of one exchange, issued and not yet waited on."""

    def __init__(self) -> None:
        self.works: list = []

    def add(self, work) -> None:
        if work is not None:
            self.works.append(work)

    def wait(self) -> None:
        """Block until every registered collective is done (on GPU: make the current stream
        wait for them), so their outputs may be read. Without autograd recording: a backend
        may copy results into the output on the wait (gloo's reduce-scatter does), which
        under autograd would cut the output off its differentiable collective."""
        with torch.no_grad():
            for work in self.works:
                work.wait()
        self.works.clear()


@torch.compiler.disable
def all_gather_start(x: torch.Tensor, group: ProcessGroup, inflight: Inflight) -> torch.Tensor:
    """``all_gather_raw`` issued asynchronously: [R, ...] -> [G*R, ...], valid after
    ``inflight.wait()``; no autograd."""
    world = group_size(group)
    if world == 1:
        return x
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    inflight.add(_all_gather_base(out, x.contiguous(), group=group, async_op=True))
    return out


@torch.compiler.disable
def reduce_scatter_start(x: torch.Tensor, group: ProcessGroup, inflight: Inflight) -> torch.Tensor:
    """``reduce_scatter_raw`` issued asynchronously: [G*R, ...] -> [R, ...], valid after
    ``inflight.wait()``; no autograd."""
    if group_size(group) == 1:
        return x
    out, work = _reduce_scatter_start(x, group)
    inflight.add(work)
    return out


@torch.compiler.disable
def all_to_all_start(
    x: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: ProcessGroup,
    inflight: Inflight,
) -> torch.Tensor:
    """``all_to_all_raw`` issued asynchronously, valid after ``inflight.wait()``."""
    if group_size(group) == 1:
        return x
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    inflight.add(
        dist.all_to_all_single(
            out, x.contiguous(), output_splits, input_splits, group=group, async_op=True
        )
    )
    return out


@torch.compiler.disable
def all_gather_async(x: torch.Tensor, group: ProcessGroup, inflight: Inflight) -> torch.Tensor:
    """Differentiable ``all_gather`` issued asynchronously (backward: reduce-scatter)."""
    return adjoint(
        x,
        partial(all_gather_start, group=group, inflight=inflight),
        partial(reduce_scatter_raw, group=group),
    )


@torch.compiler.disable
def reduce_scatter_async(x: torch.Tensor, group: ProcessGroup, inflight: Inflight) -> torch.Tensor:
    """Differentiable ``reduce_scatter`` issued asynchronously (backward: all-gather)."""
    return adjoint(
        x,
        partial(reduce_scatter_start, group=group, inflight=inflight),
        partial(all_gather_raw, group=group),
    )


@torch.compiler.disable
def all_to_all_async(
    x: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: ProcessGroup,
    inflight: Inflight,
) -> torch.Tensor:
    """Differentiable ``all_to_all`` issued asynchronously (backward: the reverse one)."""
    return adjoint(
        x,
        partial(
            all_to_all_start,
            output_splits=output_splits,
            input_splits=input_splits,
            group=group,
            inflight=inflight,
        ),
        partial(
            all_to_all_raw, output_splits=input_splits, input_splits=output_splits, group=group
        ),
    )


# ---------------------------------------------------------------------------------------
# TP token split (module docstring): identical tokens on the TP ranks, 1/tp of them each
# ---------------------------------------------------------------------------------------


def _rows_of_rank(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """x: [tp*n, ...]. Returns this rank's rows [n, ...] (contiguous)."""
    rows = x.shape[0] // group_size(group)
    start = group_rank(group) * rows
    return x[start : start + rows].contiguous()


def take_slice(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """x: [tp*n, ...] identical on every rank of ``group``. Returns this rank's [n, ...]
    rows; backward all-gathers the gradient (full gradient on every rank)."""
    if group_size(group) == 1:
        return x
    if x.shape[0] % group_size(group):
        raise ValueError(
            f"take_slice: {x.shape[0]} rows do not split over a group of "
            f"{group_size(group)}; pad them to a multiple first"
        )
    if torch.is_grad_enabled() and x.requires_grad:
        # backward: every rank gets the full gradient of the replicated input
        return adjoint(x, partial(_rows_of_rank, group=group), partial(all_gather_raw, group=group))
    return _rows_of_rank(x, group)


def gather_slices(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """x: [n, ...] this rank's slice. Returns [tp*n, ...] in rank order, identical on every
    rank; backward keeps this rank's rows of the (full, identical) gradient."""
    if group_size(group) == 1:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        # backward: the replicated result's gradient is full and identical; keep our rows
        return adjoint(x, partial(all_gather_raw, group=group), partial(_rows_of_rank, group=group))
    return all_gather_raw(x, group)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x: [T, ...] -> [rows, ...] with zero rows appended."""
    if rows == x.shape[0]:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]))


def run_on_token_slice(
    fn: Callable[..., torch.Tensor], rows: Sequence[torch.Tensor], group: ProcessGroup
) -> torch.Tensor:
    """Run ``fn`` on this rank's share of TP-replicated tokens and all-gather the result.

    rows: tensors [T, ...] identical on every rank of ``group`` (tokens and per-token data
    such as routing). Each is zero-padded to tp * ceil(T/tp) rows; ``fn`` gets this rank's
    ceil(T/tp) rows of each and returns [ceil(T/tp), ...]; the result is [T, ...], the
    gathered outputs without the padding rows. Differentiable (module docstring). T = 0:
    the whole group is idle together (identical tokens), so ``fn`` runs on the empty rows
    and nothing is gathered."""
    tp = group_size(group)
    num_tokens = rows[0].shape[0]
    if tp == 1 or num_tokens == 0:
        return fn(*rows)
    per_rank = -(-num_tokens // tp)
    mine = [take_slice(_pad_rows(r, per_rank * tp), group) for r in rows]  # [T/tp, ...]
    return gather_slices(fn(*mine), group)[:num_tokens]  # [T, ...]

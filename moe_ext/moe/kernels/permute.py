"""Stable sort of token-expert pairs by expert, with the per-expert counts, in one launch.

# N = T*k token-expert pairs, E experts, N_POW2 / BINS powers of two >= max(N, 32) /
# max(E + 2, 32)

``torch.sort(stable=True)`` plus a scatter-add count is several kernels (a radix sort's
passes, a fill, the count) for what at decode is a handful of pairs. This kernel runs as
one program: it packs each pair into the unique key ``expert * N_POW2 + pair_id``,
sorts the keys with Triton's bitonic sort in registers and reads the pair ids back from
the low bits, so pairs end up grouped by expert in pair-id (token) order, exactly the
stable sort's permutation; the counts come from a histogram of the same expert ids.
N_POW2 covers every thread of the program at least once: a tensor smaller than the
program's threads is replicated across them, which older Triton histograms count twice.
Lanes past N carry the bucket E+1 and sort behind every real pair; ids outside [0, E)
(a caller bug) are clamped to the bucket E, which keeps every store in bounds.

The op ``moe_ext::sort_pairs`` (functional; fake implementation for shapes) makes it one
opaque node under ``torch.compile``. No host sync, no autotuning: CUDA-graph capturable on
first use. On CPU it runs only under Triton's interpreter (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ext.moe.kernels import check_kernel_device

# One program sorts everything in registers: at most this many pairs (T*k), and
# at most this many experts (the histogram's bins).
MAX_PAIRS = 4096
MAX_EXPERTS = 1024


@triton.jit
def _sort_pairs_kernel(
    bucket_ptr, order_ptr, counts_ptr, N, E, N_POW2: tl.constexpr, BINS: tl.constexpr
):
    """bucket: [N] int64 expert ids; order: [N] int64 out; counts: [E] int64 out."""
    pair = tl.arange(0, N_POW2)
    valid = pair < N
    bucket = tl.load(bucket_ptr + pair, mask=valid, other=0)
    bucket = tl.minimum(tl.maximum(bucket, 0), E).to(tl.int32)  # out-of-range ids -> E
    bucket = tl.where(valid, bucket, E + 1)  # padding lanes sort last
    counts = tl.histogram(bucket, BINS)  # [BINS]
    bins = tl.arange(0, BINS)
    tl.store(counts_ptr + bins, counts.to(tl.int64), mask=bins < E)
    keys = tl.sort(bucket * N_POW2 + pair)  # [N_POW2] unique keys, ascending
    tl.store(order_ptr + pair, (keys % N_POW2).to(tl.int64), mask=valid)


INTERPRETED = not isinstance(_sort_pairs_kernel, triton.runtime.jit.JITFunction)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def check_operands(expert_ids: torch.Tensor, num_experts: int) -> None:
    """Raise a one-line ValueError when these operands cannot run on the sort kernel."""
    if expert_ids.dim() != 1 or expert_ids.dtype != torch.int64:
        raise ValueError(
            f"sort_pairs: expert_ids must be flat int64 [N], got "
            f"{expert_ids.dtype} {tuple(expert_ids.shape)}; pass "
            f"expert_idx.reshape(-1)"
        )
    if expert_ids.shape[0] > MAX_PAIRS or not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(
            f"sort_pairs: N={expert_ids.shape[0]} pairs, E={num_experts} outside "
            f"N <= {MAX_PAIRS}, 1 <= E <= {MAX_EXPERTS}; use "
            f"_permute.sort_by_bucket"
        )
    check_kernel_device("sort_pairs", expert_ids.device, INTERPRETED, "_permute.sort_by_bucket")


def sort_pairs(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs grouped by expert, in one launch of ``moe_ext::sort_pairs``.

    expert_ids: [N] int64 in [0, E), N <= MAX_PAIRS. Returns (order [N] int64: pair ids
    sorted by expert, token order kept within an expert, equal to
    ``torch.sort(expert_ids, stable=True).indices``; counts [E] int64)."""
    check_operands(expert_ids, num_experts)
    return torch.ops.moe_ext.sort_pairs(expert_ids, num_experts)


@torch.library.custom_op("moe_ext::sort_pairs", mutates_args=())
def _sort_pairs_op(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel launch; arguments as in :func:`sort_pairs`."""
    check_operands(expert_ids, num_experts)
    expert_ids = expert_ids.contiguous()
    num_pairs = expert_ids.shape[0]
    order = torch.empty_like(expert_ids)  # [N]
    counts = torch.empty(num_experts, dtype=torch.int64, device=expert_ids.device)  # [E]
    num_warps = 4 if num_pairs > 1024 else 1
    _sort_pairs_kernel[(1,)](
        expert_ids,
        order,
        counts,
        num_pairs,
        num_experts,
        N_POW2=max(_next_pow2(num_pairs), 32 * num_warps),
        BINS=max(_next_pow2(num_experts + 2), 32),
        num_warps=num_warps,
    )
    return order, counts


@_sort_pairs_op.register_fake
def _sort_pairs_fake(expert_ids, num_experts):
    check_operands(expert_ids, num_experts)
    return torch.empty_like(expert_ids), expert_ids.new_empty(num_experts)  # [N], [E]

"""Permutations between token order and expert-sorted row order, shared by all dispatchers.

# T tokens, k top-k, H hidden, E experts (or any number of buckets),
# N = T*k token-expert pairs, T' rows kept for local experts (T' <= N)

A token-expert *pair id* is ``t*k + j``: token ``t``, ``j``-th choice. Dispatchers sort pair
ids by expert (a stable sort, so rows of one expert stay in token order), gather the token
rows in that order, and on the way back either invert the permutation (every pair present)
or scatter-add the weighted rows (only some pairs present). Nothing here syncs with the host.
"""

from __future__ import annotations

import torch


def count_per_bucket(bucket: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """bucket: [N] int64 in [0, num_buckets). Returns counts [num_buckets] int64.

    A scatter-add into a fixed-size buffer: ``torch.bincount`` on CUDA reads the maximum
    back to the host to size its output, this does not."""
    counts = torch.zeros(num_buckets, dtype=torch.int64, device=bucket.device)
    return counts.scatter_add_(0, bucket, torch.ones_like(bucket))


def sort_by_bucket(bucket: torch.Tensor, num_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bucket: [N] int64 (flattened expert ids, or local ids with a sentinel bucket).

    Returns (order [N] int64 pair ids sorted by bucket, stable; counts [num_buckets] int64)."""
    order = torch.sort(bucket, stable=True).indices  # [N]
    return order, count_per_bucket(bucket, num_buckets)


def invert_permutation(order: torch.Tensor) -> torch.Tensor:
    """order: [N] a permutation of 0..N-1. Returns inverse [N] with inverse[order[i]] = i."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def gather_rows(x: torch.Tensor, pair_ids: torch.Tensor, top_k: int) -> torch.Tensor:
    """x: [T, H]; pair_ids: [T'] int64 pair ids. Returns the token rows [T', H] (a token
    chosen by several experts appears once per choice)."""
    return x.index_select(0, pair_ids // top_k)  # [T', H]


def weighted_sum(y_pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y_pairs: [T*k, H] expert outputs in pair order; weights: [T, k] (any float dtype).

    Returns [T, H] in y's dtype: sum_j weights[t, j] * y[t*k + j]. A batched matmul keeps
    the k-way sum accumulated in float32 for bf16 inputs and is deterministic."""
    num_tokens, top_k = weights.shape
    y3 = y_pairs.view(num_tokens, top_k, y_pairs.shape[-1])  # [T, k, H]
    return torch.bmm(weights.to(y_pairs.dtype).unsqueeze(1), y3).squeeze(1)  # [T, H]


def unpermute_weighted_sum(
    y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """y_sorted: [T*k, H] rows in ``order`` (every pair present); order: [T*k] int64;
    weights: [T, k]. Returns [T, H] in y's dtype."""
    y_pairs = y_sorted.index_select(0, invert_permutation(order))  # [T*k, H] pair order
    return weighted_sum(y_pairs, weights)


def scatter_weighted(
    y_rows: torch.Tensor, pair_ids: torch.Tensor, weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Partial combine: y_rows [T', H] for the pairs ``pair_ids`` [T'] int64 (a subset);
    weights: [T, k]. Returns [num_tokens, H] in y's dtype, zero for tokens with no row."""
    top_k = weights.shape[1]
    row_weights = weights.reshape(-1).index_select(0, pair_ids).to(y_rows.dtype)  # [T']
    out = y_rows.new_zeros(num_tokens, y_rows.shape[-1])  # [T, H]
    return out.index_add(0, pair_ids // top_k, y_rows * row_weights.unsqueeze(-1))


def check_routing(x: torch.Tensor, weights: torch.Tensor, expert_idx: torch.Tensor) -> None:
    """Shape/dtype checks shared by dispatchers (values are not checked: that would sync)."""
    if x.dim() != 2:
        raise ValueError(
            f"dispatch expects x of shape [T, H], got {tuple(x.shape)}; "
            f"flatten batch and sequence first"
        )
    if weights.shape != expert_idx.shape or weights.dim() != 2 or weights.shape[0] != x.shape[0]:
        raise ValueError(
            f"routing shapes disagree: x {tuple(x.shape)}, weights "
            f"{tuple(weights.shape)}, expert_idx {tuple(expert_idx.shape)}; "
            f"expected [T, H], [T, k], [T, k]"
        )
    if expert_idx.dtype != torch.int64:
        raise ValueError(
            f"expert_idx must be int64, got {expert_idx.dtype}; "
            f"pass the router's expert_idx unchanged"
        )

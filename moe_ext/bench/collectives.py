"""Count the collectives and point-to-point operations a callable issues, by kind.

# B batch, L prompt length, V vocab

Every torch.distributed call, on every backend (NCCL, gloo, ...), goes through a ``c10d::``
operator of the dispatcher (``c10d::allreduce_``, ``c10d::_allgather_base_``, ``c10d::send``
...), which torch.profiler records as a CPU event on the calling rank: counting those events
counts what the rank issued, whichever module issued it (the dispatchers' exchanges, the
attention all-reduce, pipeline send/recv, generate's broadcasts), async ones included.
A CUDA-graph replay issues nothing on the host and hides its collectives from any host-side
count, so count an eager call (``decode_step_collectives`` runs the decode step eagerly and
uncompiled).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Optional

import torch

KINDS = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "broadcast",
    "send",
    "recv",
    "barrier",
    "gather",
    "scatter",
    "reduce",
)

# c10d operator (after "c10d::") -> kind; coalesced forms count once per call
_C10D_KIND = {
    "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce",
    "allgather_": "all_gather",
    "_allgather_base_": "all_gather",
    "allgather_coalesced_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather",
    "reduce_scatter_": "reduce_scatter",
    "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "alltoall_": "all_to_all",
    "alltoall_base_": "all_to_all",
    "broadcast_": "broadcast",
    "send": "send",
    "recv_": "recv",
    "recv_any_source_": "recv",
    "barrier": "barrier",
    "gather_": "gather",
    "scatter_": "scatter",
    "reduce_": "reduce",
}


def kind_of(event_name: str) -> Optional[str]:
    """The kind of a profiler event name (``c10d::allreduce_`` -> ``all_reduce``), None for
    events that are not c10d communication (c10d's non-communicating ops, e.g. monitored
    barriers' helpers, map to None too)."""
    if not event_name.startswith("c10d::"):
        return None
    return _C10D_KIND.get(event_name[len("c10d::") :])


def count_collectives(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, dict[str, int]]:
    """Run ``fn(*args, **kwargs)`` under torch.profiler (CPU events only) and count the
    communication operations this rank issued. Returns (fn's result, {kind: count}) with
    only the kinds that occurred, in ``KINDS`` order. Not re-entrant: no profiler may be
    running already."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn(*args, **kwargs)
    counts: Counter = Counter()
    for event in prof.events():
        kind = kind_of(event.name)
        if kind is not None:
            counts[kind] += 1
    return result, {kind: counts[kind] for kind in KINDS if counts[kind]}


def total(counts: dict[str, int]) -> int:
    """All operations of a ``count_collectives`` dict."""
    return sum(counts.values())


@torch.inference_mode()
def decode_step_collectives(
    model, batch: int, prompt_len: int = 4, capacity: Optional[int] = None
) -> dict[str, int]:
    """The collectives and p2p operations of one decode step of ``model`` on this rank
    (every rank of the job must call it: the step's collectives are collective), by kind.

    Prefills ``batch`` sequences of ``prompt_len`` tokens (token ids 1) into fresh caches,
    then counts one eager, uncompiled decode step (``Transformer.forward`` with one slot,
    the caches' whole length, last-slot logits), as generate's decode step calls it;
    ``capacity``: the static expert-exchange capacity decode runs under (expert-parallel
    plans: generate sets the round's largest per-replica batch), None for the dynamic one.
    The caches are left at (batch, prompt_len + 2): the next generate sets up its own.
    Counts the model's step only, not generate's per-step bookkeeping around it (the
    pipeline's broadcast of the sampled ids, the lockstep replicas' occasional flag)."""
    device = model.device
    compiled, model.compiled_decode_block = model.compiled_decode_block, None
    try:
        model.setup_caches(batch, prompt_len + 2)
        tokens = torch.ones(batch, prompt_len, dtype=torch.long, device=device)  # [B, L]
        kv_start = torch.zeros(batch, dtype=torch.long, device=device)  # [B]
        model(tokens, None, kv_start, prompt_len, last_only=True, use_cache=True)
        model.set_moe_capacity(capacity)
        slot = torch.tensor([prompt_len], device=device)  # [1]
        _, counts = count_collectives(
            model, tokens[:, -1:], slot, kv_start, None, last_only=True, use_cache=True
        )
    finally:
        model.set_moe_capacity(None)
        model.compiled_decode_block = compiled
    return counts

"""Attention with sinks and per-layer sliding windows (gpt-oss), over a KV cache that
sliding layers keep as a ring buffer of ``sliding_window`` slots.

# B batch, S query length, S_k keys attended, H hidden, nH/nKV heads (local to this rank
# after TP), G = nH/nKV query heads per kv head, D head dim, W sliding window,
# R ring slots = min(W, S_max)

Sinks: one learned logit per head joins every softmax row as an extra column and is
dropped after it, so a head may put weight "nowhere" (transformers' eager gpt-oss
attention: scores, mask, the sink column, minus the row max, softmax, drop the column).

Sliding layers attend to keys with ``query_slot - key_slot < W`` (the current token and
the W - 1 before it). Their cache holds only the last R keys: slot s lives in ring entry
``s % R``. A decode step (S = 1) writes its key at ``slot % R`` first and attends over the
whole ring, where entry r holds slot ``q - ((q - r) mod R)``: one index per step, static
shapes (CUDA graphs). A longer call (prefill, a chunk) attends over the ring's entries
from before its first slot plus its own keys, then keeps its last R keys in the ring.
Ring entries that no earlier slot wrote map to negative slots and are masked. Full layers
keep the S_max-slot cache of ``moe_ext.model.layers.Attention``.

Per-row slots ([B, S], each row's own consecutive slots) and ``cache_rows`` work as in
``layers.Attention``: each row's ring maps its entries from that row's own slots, so the
ring slots of a call are [B, R] instead of [R].
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moe_ext.model.args import ModelArgs
from moe_ext.model.layers import (
    KVCache,
    apply_rope,
    attention_mask,
    output_projection,
    qkv_projections,
    tp_replicated,
)

SLIDING, FULL = "sliding_attention", "full_attention"
LAYER_TYPES = (FULL, SLIDING)
# Bound on the float32 scores [B, nH, rows, S_k] of one block of query rows (prefill).
SCORE_BYTES = 256 << 20


def layer_window(args: ModelArgs, layer_id: int) -> Optional[int]:
    """The sliding window of layer ``layer_id`` (None: full attention)."""
    if args.layer_types is not None and args.layer_types[layer_id] != SLIDING:
        return None
    return args.sliding_window


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    sinks: Optional[torch.Tensor],
    scale: float,
    window: Optional[int] = None,
    own_key_offset: Optional[int] = None,
) -> torch.Tensor:
    """Softmax attention with an optional sink logit per head, reading K and V once per
    kv head (the G query heads sharing one become rows of one matmul), in blocks of query
    rows whose scores stay under SCORE_BYTES.

    q: [B, nH, S, D]; k, v: [B, nKV, S_k, D]; mask: [B, 1, S, S_k] bool (True = attend);
    sinks: [nH] or None. ``own_key_offset``: when query i's own key is key
    ``own_key_offset + i`` (keys in query order after a prefix, e.g. a ring buffer's),
    a block of queries scores only the keys the mask can let it see: none after its last
    query's own key, none before its first query's ``window`` (the prefix whole while the
    window reaches into it). None: every key. Scores q·k in the input dtype, softmax in
    float32. Returns [B, nH, S, D] in v's dtype."""
    B, n_heads, S, D = q.shape
    n_kv, S_k = k.shape[1], k.shape[2]
    G = n_heads // n_kv
    rows = max(1, min(S, SCORE_BYTES // max(1, B * n_heads * S_k * 4)))
    out = []
    for s0 in range(0, S, rows):
        s = min(rows, S - s0)
        lo, hi = 0, S_k
        if own_key_offset is not None:
            hi = own_key_offset + s0 + s
            if window is not None and s0 >= window - 1:
                lo = own_key_offset + s0 - (window - 1)
        qc = q[:, :, s0 : s0 + s].reshape(B, n_kv, G * s, D)  # [B, nKV, G·s, D]
        kc, vc = k[:, :, lo:hi], v[:, :, lo:hi]  # [B, nKV, n, D]
        n = hi - lo
        scores = (torch.matmul(qc, kc.transpose(-1, -2)) * scale).view(B, n_kv, G, s, n)
        scores = scores.float().masked_fill(
            ~mask[:, :, None, s0 : s0 + s, lo:hi], float("-inf")
        )  # [B, nKV, G, s, n]
        if sinks is not None:
            sink = sinks.float().view(1, n_kv, G, 1, 1).expand(B, n_kv, G, s, 1)
            scores = torch.cat([scores, sink], dim=-1)  # [B, nKV, G, s, n + 1]
            scores = scores - scores.amax(dim=-1, keepdim=True)
            probs = torch.softmax(scores, dim=-1)[..., :-1]  # the sink's share dropped
        else:
            probs = torch.softmax(scores, dim=-1)
        probs = probs.to(v.dtype).reshape(B, n_kv, G * s, n)
        out.append(torch.matmul(probs, vc).view(B, n_heads, s, D))  # [B, nH, s, D]
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


class SinkAttention(nn.Module):
    """Grouped-query attention with q/k/v/o biases (``args.qkv_bias``/``o_bias``), optional
    sinks (parameter ``sinks`` [nH]) and this layer's sliding window. Tensor parallelism
    (set by ``parallelize``) shards q/k/v rows, o_proj columns and the sinks by heads;
    ``tp_group`` all-reduces o_proj's partial sums, its bias is added once after."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        H, D = args.hidden_size, args.head_dim
        self.head_dim = D
        n_heads, n_kv = args.num_attention_heads, args.num_key_value_heads
        self.n_kv_heads = n_kv  # of the whole model (TP may replicate them: qkv_projections)
        self.q_proj = nn.Linear(H, n_heads * D, bias=args.qkv_bias)
        self.k_proj = nn.Linear(H, n_kv * D, bias=args.qkv_bias)
        self.v_proj = nn.Linear(H, n_kv * D, bias=args.qkv_bias)
        self.o_proj = nn.Linear(n_heads * D, H, bias=args.o_bias)
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if args.attention_sinks else None
        self.window = layer_window(args, layer_id)
        self.scale = D**-0.5
        self.tp_group: Optional[dist.ProcessGroup] = None
        self.kv_cache: Optional[KVCache] = None

    def extra_repr(self) -> str:
        return f"window={self.window}, sinks={self.sinks is not None}"

    def cache_slots(self, max_slots: int) -> int:
        """Slots this layer's cache holds for sequences of up to ``max_slots`` slots."""
        return max_slots if self.window is None else min(self.window, max_slots)

    def setup_cache(self, batch: int, max_slots: int, dtype: torch.dtype, device) -> None:
        """Preallocate keys and values [batch, nKV_local, slots, D], slots = max_slots for
        full layers and min(window, max_slots) for sliding ones (kept when the current
        cache already has that shape, dtype and device)."""
        kv_heads = self.k_proj.weight.shape[0] // self.head_dim  # local heads after TP
        shape = (batch, kv_heads, self.cache_slots(max_slots), self.head_dim)
        cache = self.kv_cache
        if (
            cache is None
            or cache.k.shape != shape
            or cache.k.dtype != dtype
            or cache.k.device != torch.device(device)
        ):
            self.kv_cache = KVCache(batch, kv_heads, shape[2], self.head_dim, dtype, device)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        kv_start: torch.Tensor,
        kv_len: Optional[int] = None,
        use_cache: bool = False,
        cache_rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: [B, S, H]; cos/sin: [B, S, D]; slots: [S] int64 ascending consecutive cache
        slots of the queries (every row) or [B, S] int64 (each row's own); kv_start: [B]
        int64 first real slot per sequence (None: 0); use_cache: write k/v into the cache
        and attend over it (else over this call's keys only); kv_len: full layers attend to
        cache slots [0, kv_len) (None: all S_max slots, the static decode shape); sliding
        layers ignore it; cache_rows: [B] int64 cache row of each batch row (None: rows
        0..B-1). Returns [B, S, H]."""
        B, S, _ = x.shape
        D = self.head_dim
        x = tp_replicated(x, self.tp_group)  # feeds this rank's heads only
        q, k, v = qkv_projections(
            x, self.q_proj, self.k_proj, self.v_proj, self.tp_group, self.n_kv_heads
        )
        q = q.view(B, S, -1, D).transpose(1, 2)  # [B, nH, S, D]
        k = k.view(B, S, -1, D).transpose(1, 2)  # [B, nKV, S, D]
        v = v.view(B, S, -1, D).transpose(1, 2)  # [B, nKV, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        own_key_offset = 0  # without a cache the keys are this call's, in query order
        if not use_cache:
            key_slots = slots
        else:
            if self.kv_cache is None:
                raise RuntimeError(
                    "use_cache=True before setup_caches(); call "
                    "Transformer.setup_caches(batch, max_slots) first"
                )
            ring = k.shape[2] > 1 and self.window is not None  # the chunk path: ring + own
            own_key_offset = self.kv_cache.k.shape[2] if ring else None
            k, v, key_slots = self._cached_keys(slots, k, v, kv_len, cache_rows)  # [B,nKV,S_k,D]
        mask = attention_mask(slots, key_slots, kv_start, self.window)  # [B, 1, S, S_k]
        out = sink_attention(
            q, k, v, mask, self.sinks, self.scale, self.window, own_key_offset
        )  # [B, nH, S, D]
        out = out.transpose(1, 2).reshape(B, S, -1)  # [B, S, nH·D]
        return output_projection(out, self.o_proj, self.tp_group)

    def _cached_keys(
        self,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_len: Optional[int],
        cache_rows: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store this call's keys and return what the queries attend over: (keys, values,
        key_slots [S_k] int64, or [B, S_k] for per-row slots [B, S], negative for
        never-written ring entries)."""
        cache = self.kv_cache
        if self.window is None:
            k_all, v_all = cache.update(slots, k, v, cache_rows, kv_len)  # [B, nKV, S_k, D]
            return k_all, v_all, torch.arange(k_all.shape[2], device=k.device)
        B = k.shape[0]
        ring = cache.k.shape[2]
        entries = torch.arange(ring, device=k.device)  # [R]
        if k.shape[2] == 1:  # decode: write first, then the ring is the key set
            k_all, v_all = cache.update(slots % ring, k, v, cache_rows)  # [B, nKV, R, D]
            return k_all, v_all, slots - (slots - entries) % ring  # [R] or [B, R]
        last_before = slots[..., :1] - 1  # [1] or [B, 1]
        ring_slots = last_before - (last_before - entries) % ring  # [R] or [B, R]
        k_ring, v_ring = cache.read(B, cache_rows)  # [B, nKV, R, D] (read before the write)
        k_all = torch.cat([k_ring, k], dim=2)  # [B, nKV, R + S, D]
        v_all = torch.cat([v_ring, v], dim=2)
        kept = min(k.shape[2], ring)
        cache.write(
            slots[..., -kept:] % ring, k[:, :, -kept:], v[:, :, -kept:], cache_rows
        )  # the last R keys stay in the ring
        return k_all, v_all, torch.cat([ring_slots, slots], dim=-1)  # [(B,) R + S]

"""Decoder building blocks: RMSNorm, rotary embeddings (HF rope-scaling variants, whole or
partial head), GQA attention over a preallocated KV cache with optional q/k RMSNorm (per
head, or over the whole projection), dense SwiGLU MLP.

# B batch, S query length, S_max cache slots, H hidden, nH/nKV heads (local to this rank
# after tensor-parallel sharding), D head dim, Dr rotated dims (D, or D·partial_rotary_factor),
# F dense FFN size (local)

Attention uses *slots*: the cache index a token is written to. Prompts are left-padded, so
slot s of sequence b holds position ``s - kv_start[b]``; slots below ``kv_start[b]`` are
padding and never attended to. One slot index per step for the whole batch keeps decode
shapes static (CUDA graphs).

Per-row caches (serving): ``slots`` may instead be [B, S], each row's own consecutive
slots, and ``cache_rows`` [B] names the cache row each batch row reads and writes (None:
rows 0..B-1, a view of the cache's first B rows, so the decode step has static shapes).
A query at slot s of row b then sees that cache row's keys at slots kv_start[b]..s.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_ext.model.args import ModelArgs, ModelArgsError
from moe_ext.moe.dispatch.comm import (
    adjoint,
    all_gather_raw,
    copy_to_partials,
    group_rank,
    group_size,
    reduce_partials,
)
from moe_ext.quant.linear import project_many, project_without_bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, tp_group: Optional[dist.ProcessGroup] = None
    ) -> torch.Tensor:
        """x: [..., dim] any float dtype; normalised in fp32 like HF, scaled in x's dtype.

        ``tp_group``: the weight is TP-replicated but this rank normalises only its share
        of the heads (per-head q/k norms under TP), so its gradient is summed over the
        group (``tp_replicated``)."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return tp_replicated(self.weight, tp_group) * xf.to(x.dtype)


def tp_replicated(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """A TP-replicated tensor (activation or parameter) that this rank consumes for only its
    share of a head- or FFN-sharded computation: forward identity, backward all-reduces the
    gradient over ``group`` (``copy_to_partials``), so every rank holds the full gradient
    (Megatron's convention). The identity when ``group`` is None or nothing needs the
    gradient (inference adds no graph break to the compiled decode step)."""
    if group is None or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return copy_to_partials(x, group)


def qkv_projections(
    x: torch.Tensor,
    q_proj: nn.Module,
    k_proj: nn.Module,
    v_proj: nn.Module,
    group: Optional[dist.ProcessGroup],
    n_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q_proj(x), k_proj(x), v_proj(x): [B, S, nH_local·D], [B, S, nKV_local·D] twice, for x
    [B, S, H] already marked ``tp_replicated``. At decode sizes the three are one
    weight-streaming launch (``project_many``).

    When the kv heads are fewer than the TP ranks (``n_kv_heads`` < tp), rep = tp/nKV
    neighbouring ranks hold copies of one kv head, each used by only that rank's query
    heads: in training the copies' output gradients are summed over the replicas (all-gather
    over TP, sum of the head's ranks), so the copies' weights get the full, identical
    gradient, and the input's gradient through them is divided by rep, because the
    all-reduce of ``tp_replicated`` then adds rep identical terms. Inference (no grad) and
    nKV >= tp are the plain projections."""
    if group is None or not torch.is_grad_enabled() or n_kv_heads >= group_size(group):
        # (decode compiles this: no collective query first)
        q, k, v = project_many(x, (q_proj, k_proj, v_proj))
        return q, k, v
    rep = group_size(group) // n_kv_heads
    head = group_rank(group) // rep  # ranks [head·rep, (head+1)·rep) hold this kv head

    def sum_replicas(grad: torch.Tensor) -> torch.Tensor:
        gathered = all_gather_raw(grad.contiguous()[None], group)  # [tp, B, S, nKV_local·D]
        return gathered.view(n_kv_heads, rep, *grad.shape)[head].sum(0)

    x_kv = adjoint(x, _identity, lambda grad: grad / rep)
    k = adjoint(k_proj(x_kv), _identity, sum_replicas)
    v = adjoint(v_proj(x_kv), _identity, sum_replicas)
    return q_proj(x), k, v


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x.view_as(x)


# ---- rotary embeddings ---------------------------------------------------------------


def rotary_dim(args: ModelArgs) -> int:
    """Dr, the leading dims of each q/k head that RoPE rotates (transformers:
    ``int(head_dim * partial_rotary_factor)``); the rest pass through unrotated."""
    dim = int(args.head_dim * args.partial_rotary_factor)
    if dim < 2 or dim % 2 or dim > args.head_dim:
        raise ModelArgsError(
            f"partial_rotary_factor {args.partial_rotary_factor} of head_dim {args.head_dim} "
            f"rotates {dim} dims; it must be an even number in 2..{args.head_dim}"
        )
    return dim


def rope_inv_freq(args: ModelArgs, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [Dr/2] fp32 and the cos/sin scale, as transformers computes them
    for rope types default, linear, dynamic (at the original length), yarn and llama3, over
    the rotated dims only (a partial rotary's frequencies span Dr, not D)."""
    dim, base = rotary_dim(args), args.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base**exponents)  # [Dr/2]
    scaling = args.rope_scaling or {}
    rope_type = args.rope_type
    if rope_type in ("default", "dynamic"):
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen = old_len / scaling["low_freq_factor"]
        high_wavelen = old_len / scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - scaling["low_freq_factor"]) / (
            scaling["high_freq_factor"] - scaling["low_freq_factor"]
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: blend interpolated (long-wavelength) and extrapolated (short) frequencies
    orig_len = scaling["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = (
            (mscale(factor, m) / mscale(factor, m_all)) if (m and m_all) else mscale(factor)
        )
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = (
        (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)
    ).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; the ``dynamic`` type rescales the base once the
    longest position in the call passes ``max_position_embeddings`` (as transformers does,
    tensor-only so it stays inside CUDA graphs)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dynamic = args.rope_type == "dynamic"
        if self.dynamic:
            self.factor = float(args.rope_scaling["factor"])
            self.max_positions = args.max_position_embeddings
            self.base = args.rope_theta
            self.dim = rotary_dim(args)

    def _dynamic_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        seq_len = (positions.max() + 1).float().clamp(min=self.max_positions)  # no host sync
        base = self.base * ((self.factor * seq_len / self.max_positions) - (self.factor - 1)) ** (
            self.dim / (self.dim - 2)
        )
        exponents = torch.arange(0, self.dim, 2, device=positions.device).float() / self.dim
        return 1.0 / (base**exponents)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, S] int64 -> (cos, sin) each [B, S, Dr] in ``dtype``."""
        inv_freq = self._dynamic_inv_freq(positions) if self.dynamic else self.inv_freq
        freqs = positions[..., None].float() * inv_freq.float()  # [B, S, Dr/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, Dr]
        return (
            (emb.cos() * self.attention_scaling).to(dtype),
            (emb.sin() * self.attention_scaling).to(dtype),
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, D]; cos/sin: [B, S, Dr] with Dr <= D. Rotates the first Dr dims
    (halves of them paired, as transformers' rotate_half), passes the other D - Dr."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, Dr]
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# ---- attention -----------------------------------------------------------------------


class KVCache(nn.Module):
    """Preallocated keys/values [B_cache, nKV, S_max, D]; written in place by slot index,
    with one slot set for every row ([S] slots) or per row ([B, S] slots)."""

    def __init__(
        self, batch: int, kv_heads: int, max_slots: int, head_dim: int, dtype: torch.dtype, device
    ):
        super().__init__()
        shape = (batch, kv_heads, max_slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(
        self,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache_rows: Optional[torch.Tensor] = None,
    ) -> None:
        """slots: [S] int64 (the same slots in every row) or [B, S] int64 (each row's own);
        k, v: [B, nKV, S, D]; cache_rows: [B] int64 distinct cache rows (None: rows 0..B-1)."""
        B = k.shape[0]
        if slots.dim() == 1 and cache_rows is None:
            self.k[:B].index_copy_(2, slots, k)  # a view of the first B rows
            self.v[:B].index_copy_(2, slots, v)
            return
        rows = row_index(slots, cache_rows, B)[:, None, :]  # [B, 1, S]
        heads = torch.arange(k.shape[1], device=k.device)[None, :, None]  # [1, nKV, 1]
        index = (rows, heads, slots.expand(B, -1)[:, None, :])  # broadcast to [B, nKV, S]
        # index_put_ on the buffer itself, never on a (transposed) view of it: inductor
        # (torch 2.11, CUDA) compiled the view form into a copy of the whole buffer per write,
        # 2 x 125 us a layer at 64 rows x 4096 slots, 31 ms serving decode steps at batch 1
        # (docs/PERF.md "Serving"); this form it writes in place
        self.k.index_put_(index, k)
        self.v.index_put_(index, v)

    def read(
        self, batch: int, cache_rows: Optional[torch.Tensor] = None, kv_len: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [batch, nKV, S_k, D] of the batch's cache rows (``cache_rows``
        [batch] int64; None: a view of rows 0..batch-1), slots [0, kv_len) (None: all)."""
        k, v = self.k[:, :, :kv_len], self.v[:, :, :kv_len]
        if cache_rows is None:
            return k[:batch], v[:batch]
        return k.index_select(0, cache_rows), v.index_select(0, cache_rows)  # gathered copies

    def update(
        self,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache_rows: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``write`` then ``read``: slots [S] or [B, S] int64; k, v: [B, nKV, S, D]. Returns
        the batch's cache rows (k, v) [B, nKV, S_k, D], S_k = kv_len or S_max."""
        self.write(slots, k, v, cache_rows)
        return self.read(k.shape[0], cache_rows, kv_len)


def row_index(slots: torch.Tensor, cache_rows: Optional[torch.Tensor], batch: int) -> torch.Tensor:
    """The cache row of every (row, query) pair: [B, S] int64 for slots [S] or [B, S] and
    cache_rows [B] (None: 0..B-1)."""
    if cache_rows is None:
        cache_rows = torch.arange(batch, device=slots.device)  # [B]
    S = slots.shape[-1]
    return cache_rows[:, None].expand(batch, S)  # [B, S]


QK_NORM_TYPES = ("per_head", "per_layer")


@torch.compiler.disable
def projection_rms(
    q: torch.Tensor, k: torch.Tensor, group: Optional[dist.ProcessGroup]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squares of whole q and k projections whose heads are split over ``group`` (TP).

    q: [B, S, nH·D] and k: [B, S, nKV·D], this rank's heads. Returns ([B, S, 1], [B, S, 1])
    float32, the means over all ranks' heads: one all-reduce of both sums of squares. Each
    rank holds as many columns as the next (kv heads replicated tp/nKV times when nKV < tp,
    every head equally often), so the sum over ranks divided by tp·(local width) is the
    mean over the full width. Backward all-reduces too: every rank's heads consume the sum."""
    sums = torch.stack((q.float().pow(2).sum(-1), k.float().pow(2).sum(-1)), dim=-1)  # [B,S,2]
    sums = copy_to_partials(reduce_partials(sums, group), group)
    tp = dist.get_world_size(group)
    return sums[..., :1] / (tp * q.shape[-1]), sums[..., 1:] / (tp * k.shape[-1])


class Attention(nn.Module):
    """Grouped-query attention. Tensor parallelism (set by ``parallelize``) shards q/k/v rows
    and o_proj columns by heads; ``tp_group`` all-reduces o_proj's partial sums.

    q/k RMSNorm (``qk_norm``) comes in two kinds (``qk_norm_type``): "per_head" normalises
    each head's D values (Qwen3, GLM-4.5 ``use_qk_norm``), "per_layer" the whole projection
    before it is split into heads (MiniMax-M2); its weights [nH·D] / [nKV·D] are then
    sharded with the heads, and under TP the mean square is all-reduced (projection_rms)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        H, D = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=args.qkv_bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * D, bias=args.qkv_bias)
        self.v_proj = nn.Linear(H, self.n_kv_heads * D, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=args.o_bias)
        if args.qk_norm_type not in QK_NORM_TYPES:
            raise ModelArgsError(
                f"qk_norm_type {args.qk_norm_type!r} is not supported; use one of "
                f"{', '.join(QK_NORM_TYPES)}"
            )
        self.qk_norm_per_layer = args.qk_norm and args.qk_norm_type == "per_layer"
        if args.qk_norm:
            q_width, k_width = (
                (self.n_heads * D, self.n_kv_heads * D) if (self.qk_norm_per_layer) else (D, D)
            )
            self.q_norm = RMSNorm(q_width, args.rms_norm_eps)
            self.k_norm = RMSNorm(k_width, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.sliding_window = args.sliding_window
        self.scale = D**-0.5
        self.tp_group: Optional[dist.ProcessGroup] = None
        self.kv_cache: Optional[KVCache] = None

    def setup_cache(self, batch: int, max_slots: int, dtype: torch.dtype, device) -> None:
        """Preallocate keys and values [batch, nKV_local, max_slots, D] (kept when the
        current cache already has that shape, dtype and device)."""
        kv_heads = self.k_proj.weight.shape[0] // self.head_dim  # local heads after TP
        cache = self.kv_cache
        if (
            cache is None
            or cache.k.shape != (batch, kv_heads, max_slots, self.head_dim)
            or cache.k.dtype != dtype
            or cache.k.device != device
        ):
            self.kv_cache = KVCache(batch, kv_heads, max_slots, self.head_dim, dtype, device)

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
        """x: [B, S, H]; cos/sin: [B, S, D]; slots: [S] int64 cache slots of the queries
        (every row) or [B, S] int64 (each row's own, consecutive); kv_start: [B] int64 first
        real slot per sequence (None: 0, no padding); use_cache: write k/v into the
        preallocated cache and attend over it (else over this call's keys only); kv_len:
        attend to cache slots [0, kv_len) (None: all S_max slots, the static decode shape);
        cache_rows: [B] int64 cache row of each batch row (None: rows 0..B-1).
        Returns [B, S, H]."""
        B, S, _ = x.shape
        D = self.head_dim
        x = tp_replicated(x, self.tp_group)  # feeds this rank's heads only
        q, k, v = qkv_projections(  # [B, S, nH·D], [B, S, nKV·D] twice
            x, self.q_proj, self.k_proj, self.v_proj, self.tp_group, self.n_kv_heads
        )
        if self.qk_norm_per_layer:
            q, k = self.normalize_projections(q, k)
        q = q.view(B, S, -1, D)  # [B, S, nH, D]
        k = k.view(B, S, -1, D)  # [B, S, nKV, D]
        v = v.view(B, S, -1, D).transpose(1, 2)  # [B, nKV, S, D]
        if self.q_norm is not None and not self.qk_norm_per_layer:
            # one weight [D] for all heads, this rank's heads only: gradient summed over TP
            q, k = self.q_norm(q, self.tp_group), self.k_norm(k, self.tp_group)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, nH, S, D]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, nKV, S, D]
        if use_cache:
            if self.kv_cache is None:
                raise RuntimeError(
                    "use_cache=True before setup_caches(); call "
                    "Transformer.setup_caches(batch, max_slots) first"
                )
            k, v = self.kv_cache.update(slots, k, v, cache_rows, kv_len)  # [B, nKV, S_k, D]
            key_slots = torch.arange(k.shape[2], device=x.device)
        else:
            key_slots = slots
        gqa = k.shape[1] != q.shape[1]
        if plain_causal(kv_start, use_cache, self.sliding_window) and S > 1:
            out = F.scaled_dot_product_attention(  # [B, nH, S, D]
                q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa
            )
        elif S == 1:
            mask = attention_mask(slots, key_slots, kv_start, self.sliding_window)
            out = decode_attention(q, k, v, mask, self.scale)  # [B, nH, 1, D]
        else:
            mask = attention_mask(slots, key_slots, kv_start, self.sliding_window)  # [B,1,S,S_k]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa
            )
        out = out.transpose(1, 2).reshape(B, S, -1)  # [B, S, nH·D]
        return output_projection(out, self.o_proj, self.tp_group)

    def normalize_projections(
        self, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The "per_layer" q/k norm. q: [B, S, nH·D], k: [B, S, nKV·D] (local heads) ->
        same shapes, each normalised over the full (all ranks') projection width."""
        if self.tp_group is None:
            return self.q_norm(q), self.k_norm(k)
        q_ms, k_ms = projection_rms(q, k, self.tp_group)  # [B, S, 1] float32 each
        eps = self.q_norm.eps
        q = self.q_norm.weight * (q.float() * torch.rsqrt(q_ms + eps)).to(q.dtype)
        k = self.k_norm.weight * (k.float() * torch.rsqrt(k_ms + eps)).to(k.dtype)
        return q, k


def output_projection(
    heads: torch.Tensor, o_proj: nn.Module, tp_group: Optional[dist.ProcessGroup]
) -> torch.Tensor:
    """heads: [B, S, local heads · head dim] -> [B, S, H]: o_proj over this rank's heads,
    the TP partial sums reduced, then the bias added once (after the reduction)."""
    out = project_without_bias(o_proj, heads)  # [B, S, H], partial sum under TP
    if tp_group is not None:
        out = reduce_partials(out, tp_group)
    if o_proj.bias is not None:
        out = out + o_proj.bias
    return out


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per sequence over the cache, reading K and V once: the G = nH/nKV query
    heads sharing a KV head become the rows of one matmul, where SDPA's GQA fallback would
    first expand K and V G times (G·S_max·D per sequence and layer, per step).

    q: [B, nH, 1, D]; k, v: [B, nKV, S_k, D]; mask: [B, 1, 1, S_k] bool (True = attend).
    Scores and probabilities as transformers' eager attention: q·k in the input dtype,
    softmax in float32. Returns [B, nH, 1, D]."""
    B, n_heads, _, D = q.shape
    n_kv = k.shape[1]
    q = q.reshape(B, n_kv, n_heads // n_kv, D)  # [B, nKV, G, D]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, nKV, G, S_k]
    scores = scores.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, S_k] broadcasts
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, n_heads, 1, D)  # [B, nKV, G, D] -> [B, nH, 1, D]


def plain_causal(
    kv_start: Optional[torch.Tensor], use_cache: bool, sliding_window: Optional[int]
) -> bool:
    """Whether a call's attention is the plain causal triangle over its own keys: no cache,
    no left padding, no window. SDPA then runs ``is_causal`` (flash kernels), where an
    explicit mask falls back to slower ones (training and unpadded prefill)."""
    return kv_start is None and not use_cache and sliding_window is None


def attention_mask(
    query_slots: torch.Tensor,
    key_slots: torch.Tensor,
    kv_start: Optional[torch.Tensor],
    sliding_window: Optional[int] = None,
) -> torch.Tensor:
    """Boolean mask [B, 1, S, S_k] (True = attend): causal, no left padding, within the
    window. A padding query attends to itself only, so its row is never empty (no NaN).

    query_slots: [S] or [B, S] int64 (per row); key_slots: [S_k] or [B, S_k] int64;
    kv_start: [B] int64 or None (no padding). With no per-row input the mask is
    [1, 1, S, S_k], broadcast over the batch."""
    q = query_slots[..., :, None]  # [S, 1] or [B, S, 1]
    kk = key_slots[..., None, :]  # [1, S_k] or [B, 1, S_k]
    allowed = kk <= q  # [S, S_k] or [B, S, S_k]
    if kv_start is not None:
        allowed = allowed & (kk >= kv_start[:, None, None])  # [B, S, S_k]
    if sliding_window is not None:
        allowed = allowed & ((q - kk) < sliding_window)
    allowed = allowed | (kk == q)
    if allowed.dim() == 2:
        allowed = allowed[None]  # [1, S, S_k]
    return allowed[:, None]


# ---- dense MLP ------------------------------------------------------------------------


class DenseMLP(nn.Module):
    """SwiGLU MLP (qwen2_moe dense layers). Under TP gate/up rows and down columns are
    sharded; ``tp_group`` all-reduces down_proj's partial sums."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        self.tp_group: Optional[dist.ProcessGroup] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., H] -> [..., H]."""
        x = tp_replicated(x, self.tp_group)  # feeds this rank's FFN shard only
        gate, up = project_many(x, (self.gate_proj, self.up_proj))  # [..., F] each
        (out,) = project_many(F.silu(gate) * up, (self.down_proj,))  # [..., H]
        if self.tp_group is not None:
            out = reduce_partials(out, self.tp_group)
        return out

"""Multi-head Latent Attention (DeepSeek-V2/V3): keys and values are expanded per head from
one shared latent, and the cache holds only that latent.

# B batch, S query length, S_k key slots, S_max cache slots, H hidden, n heads (local to
# this rank after tensor-parallel sharding), Dn / Dr / Dv per-head no-position, rotated
# and value dims, C kv_lora_rank (latent width), Q q_lora_rank

Per token: ``kv_a_proj_with_mqa`` gives the latent [C] (then RMSNorm'd) and one rotated key
[Dr] shared by all heads; ``kv_b_proj`` [n·(Dn+Dv), C] expands the latent into each head's
key part W_UK [Dn, C] and value W_UV [Dv, C]. A head's score is q_nope·(W_UK c) +
q_rope·k_rope, so

- prefill (the naive form) expands keys and values for every cached slot;
- decode (the absorbed form) folds W_UK into the query, q_lat = q_nope W_UK [C], scores
  q_lat·c + q_rope·k_rope against the latent cache directly, and folds W_UV into the
  output: out = (probs · c) W_UV^T. Each step reads C + Dr values per cached token,
  shared by every head, instead of n·(Dn+Dv) for an expanded cache.

Cache: ``MLACache`` [B, S_max, C + Dr] (the latent, then the rotated shared key), written by
slot index like the GQA cache (layers.KVCache), so decode shapes stay static.

RoPE touches only the Dr dims. transformers' layouts, one per family: ``complex``
(deepseek_v2: adjacent pairs rotated as complex numbers, result kept interleaved),
``interleave`` (deepseek_v3 rope_interleave: adjacent pairs rotated, result as [rotated
evens, rotated odds]) and ``half`` (rotate_half pairs (i, i + Dr/2), as Llama). The cos/sin
tables are the decoder's ordinary ones for head_dim = Dr: [B, S, Dr] = cat(freqs, freqs).

Tensor parallelism splits heads: q_proj / q_b_proj rows, kv_b_proj rows and o_proj columns
by head; q_a_proj, kv_a_proj_with_mqa and their norms are replicated, so every TP rank
computes and caches the whole latent (the cache is not split by TP).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_ext.model.args import ModelArgs
from moe_ext.model.layers import (
    RMSNorm,
    apply_rope,
    attention_mask,
    output_projection,
    plain_causal,
    row_index,
    tp_replicated,
)
from moe_ext.quant.linear import linear_weight, project_many

ROPE_LAYOUTS = ("complex", "interleave", "half")
# transformers builds the q/kv LoRA norms with RMSNorm's default epsilon, not rms_norm_eps
LORA_NORM_EPS = 1e-6


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor for a context extended ``scale`` times."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(args: ModelArgs) -> float:
    """(Dn + Dr)^-0.5, times mscale(factor, mscale_all_dim)^2 under scaled RoPE with a
    ``mscale_all_dim`` (DeepSeek's YaRN: the cos/sin tables carry mscale / mscale_all_dim,
    the scores the rest), as transformers' deepseek_v2/v3 compute it."""
    scale = (args.qk_nope_head_dim + args.head_dim) ** -0.5
    scaling = args.rope_scaling or {}
    if scaling.get("mscale_all_dim"):
        m = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
        scale = scale * m * m
    return scale


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """RoPE on the rotated dims. x: [B, h, S, Dr]; cos/sin: [B, S, Dr] = cat(f, f) tables.
    Returns [B, h, S, Dr] in ``layout`` (module docstring)."""
    if layout == "half":
        return apply_rope(x, cos, sin)
    half = x.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]  # [B, 1, S, Dr/2]: one per pair
    even, odd = x[..., 0::2], x[..., 1::2]
    a, b = even * c - odd * s, odd * c + even * s  # [B, h, S, Dr/2] each
    if layout == "interleave":
        return torch.cat((a, b), dim=-1)
    return torch.stack((a, b), dim=-1).flatten(-2)  # complex: pairs stay adjacent


class MLACache(nn.Module):
    """Preallocated latent cache [B_cache, S_max, C + Dr] (latent, rotated shared key);
    written in place by slot index, the same slots in every row ([S]) or per row ([B, S])."""

    def __init__(self, batch: int, max_slots: int, width: int, dtype: torch.dtype, device: Any):
        super().__init__()
        self.register_buffer(
            "latent",
            torch.zeros(batch, max_slots, width, dtype=dtype, device=device),
            persistent=False,
        )

    def update(
        self,
        slots: torch.Tensor,
        latent: torch.Tensor,
        cache_rows: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
    ) -> torch.Tensor:
        """slots: [S] or [B, S] int64; latent: [B, S, C + Dr]; cache_rows: [B] int64 distinct
        cache rows (None: rows 0..B-1, a view). Returns the batch's cache rows
        [B, S_k, C + Dr], slots [0, kv_len) (None: all S_max)."""
        B = latent.shape[0]
        if slots.dim() == 1 and cache_rows is None:
            self.latent[:B].index_copy_(1, slots, latent)  # a view of the first B rows
        else:
            rows = row_index(slots, cache_rows, B)  # [B, S]
            self.latent.index_put_((rows, slots.expand_as(rows)), latent)  # [B, S, C + Dr]
        cached = self.latent[:, :kv_len]
        if cache_rows is None:
            return cached[:B]
        return cached.index_select(0, cache_rows)  # [B, S_k, C + Dr], a gathered copy


class MLAttention(nn.Module):
    """Multi-head Latent Attention with the interface of layers.Attention (forward,
    setup_cache, tp_group). ``absorb`` picks the form: None (default) absorbed for single-
    query steps and naive otherwise; True / False forces one (tests compare them)."""

    def __init__(self, args: ModelArgs, rope_layout: str):
        super().__init__()
        if rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"unknown MLA rope layout {rope_layout!r}; use one of {ROPE_LAYOUTS}")
        H, n = args.hidden_size, args.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = (
            args.qk_nope_head_dim,
            args.head_dim,
            args.v_head_dim,
        )
        self.kv_rank = args.kv_lora_rank
        qk = self.nope_dim + self.rope_dim
        # module order = transformers' = the checkpoint's tensor order
        if args.q_lora_rank is None:
            self.q_proj: Optional[nn.Linear] = nn.Linear(H, n * qk, bias=False)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(H, args.q_lora_rank, bias=args.qkv_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(args.q_lora_rank, n * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.kv_rank + self.rope_dim, bias=args.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_rank, n * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(n * self.v_dim, H, bias=args.o_bias)
        self.rope_layout = rope_layout
        self.scale = mla_softmax_scale(args)
        self.absorb: Optional[bool] = None
        self.tp_group: Optional[dist.ProcessGroup] = None
        self.kv_cache: Optional[MLACache] = None

    def setup_cache(self, batch: int, max_slots: int, dtype: torch.dtype, device: Any) -> None:
        """Preallocate the latent cache [batch, max_slots, C + Dr] (kept when the current
        one already has that shape, dtype and device). Whole on every TP rank."""
        shape = (batch, max_slots, self.kv_rank + self.rope_dim)
        cache = self.kv_cache
        if (
            cache is None
            or cache.latent.shape != shape
            or cache.latent.dtype != dtype
            or cache.latent.device != torch.device(device)
        ):
            self.kv_cache = MLACache(batch, max_slots, shape[-1], dtype, device)

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, S, H] -> (q [B, S, n·(Dn+Dr)], kv_a [B, S, C+Dr]). With a query LoRA,
        q_a_proj and kv_a_proj_with_mqa read the same x: one launch at decode sizes."""
        if self.q_proj is not None:
            (q,) = project_many(tp_replicated(x, self.tp_group), (self.q_proj,))
            (kv_a,) = project_many(x, (self.kv_a_proj_with_mqa,))
            return q, kv_a
        q_a, kv_a = project_many(x, (self.q_a_proj, self.kv_a_proj_with_mqa))  # TP-replicated
        latent = self.q_a_layernorm(q_a)  # [B, S, q_lora_rank]
        (q,) = project_many(tp_replicated(latent, self.tp_group), (self.q_b_proj,))
        return q, kv_a

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
        """x: [B, S, H]; cos/sin: [B, S, Dr]; slots: [S] int64 cache slots of the queries
        (every row) or [B, S] int64 (each row's own, consecutive); kv_start: [B] int64 first
        real slot per sequence (None: 0, no padding); use_cache: write the latent into the
        preallocated cache and attend over it (else over this call's tokens only); kv_len:
        attend to cache slots [0, kv_len) (None: all S_max slots, the static decode shape);
        cache_rows: [B] int64 cache row of each batch row (None: rows 0..B-1).
        Returns [B, S, H]."""
        B, S, _ = x.shape
        Dn, Dr = self.nope_dim, self.rope_dim
        q, kv_a = self._projections(x)
        q = q.view(B, S, -1, Dn + Dr).transpose(1, 2)  # [B, n, S, Dn+Dr]
        q_nope, q_rope = q.split([Dn, Dr], dim=-1)
        latent, k_rope = kv_a.split([self.kv_rank, Dr], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, S, C]
        q_rope = rotate(q_rope, cos, sin, self.rope_layout)  # [B, n, S, Dr]
        k_rope = rotate(k_rope[:, None], cos, sin, self.rope_layout)[:, 0]  # [B, S, Dr]
        kv = torch.cat((latent, k_rope), dim=-1)  # [B, S, C+Dr]
        kv = tp_replicated(kv, self.tp_group)  # every rank's heads read the whole latent
        if use_cache:
            if self.kv_cache is None:
                raise RuntimeError(
                    "use_cache=True before setup_caches(); call "
                    "Transformer.setup_caches(batch, max_slots) first"
                )
            kv = self.kv_cache.update(slots, kv, cache_rows, kv_len)  # [B, S_k, C+Dr]
            key_slots = torch.arange(kv.shape[1], device=x.device)
        else:
            key_slots = slots
        absorb = S == 1 if self.absorb is None else self.absorb
        if not absorb and plain_causal(kv_start, use_cache, None):
            out = self._naive(q_nope, q_rope, kv, None)  # [B, n, S, Dv]
        else:
            mask = attention_mask(slots, key_slots, kv_start)  # [B, 1, S, S_k]
            if absorb:
                out = self._absorbed(q_nope, q_rope, kv, mask)
            else:
                out = self._naive(q_nope, q_rope, kv, mask)  # [B, n, S, Dv]
        out = out.transpose(1, 2).reshape(B, S, -1)  # [B, S, n·Dv]
        return output_projection(out, self.o_proj, self.tp_group)

    def _naive(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        kv: torch.Tensor,
        mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Keys and values expanded per head from the latent of every key slot.
        q_nope: [B, n, S, Dn]; q_rope: [B, n, S, Dr]; kv: [B, S_k, C+Dr]; mask: [B, 1, S, S_k]
        bool, None: plain causal over this call's own keys. Returns [B, n, S, Dv]."""
        B, S_k, _ = kv.shape
        n = q_nope.shape[1]
        latent, k_rope = kv.split([self.kv_rank, self.rope_dim], dim=-1)
        expanded = self.kv_b_proj(latent).view(B, S_k, n, self.nope_dim + self.v_dim)
        k_nope, v = expanded.transpose(1, 2).split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope[:, None].expand(-1, n, -1, -1)), dim=-1)  # [B,n,S_k,Dn+Dr]
        q = torch.cat((q_nope, q_rope), dim=-1)  # [B, n, S, Dn+Dr]
        if mask is None:  # plain causal over this call's own keys
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """W_UK folded into the query, W_UV into the output: attention runs on the latent
        cache as one key/value "head" of width C + Dr (scores) and C (values) that every
        head shares. Shapes as ``_naive``. Every product is a plain bmm (heads as rows
        against the cache, batch as rows against a head's weights), so neither the cache
        nor W_UK / W_UV is ever copied per head or per sequence. Scores in the input dtype,
        softmax in float32 (transformers' eager attention)."""
        B, n, S, Dn = q_nope.shape
        C, Dv = self.kv_rank, self.v_dim
        w = linear_weight(self.kv_b_proj, q_nope.dtype).view(n, Dn + Dv, C)
        w_uk, w_uv = w.split([Dn, Dv], dim=1)  # [n, Dn, C], [n, Dv, C]
        q_latent = torch.bmm(q_nope.transpose(0, 1).reshape(n, B * S, Dn), w_uk)  # [n, B·S, C]
        q_latent = q_latent.view(n, B, S, C).transpose(0, 1)  # [B, n, S, C]
        q_full = torch.cat((q_latent, q_rope), dim=-1).reshape(B, n * S, C + self.rope_dim)
        scores = torch.bmm(q_full, kv.transpose(1, 2)).view(B, n, S, -1) * self.scale
        scores = scores.masked_fill(~mask, float("-inf"))  # [B, n, S, S_k]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(kv.dtype)
        out_latent = torch.bmm(probs.view(B, n * S, -1), kv[..., :C])  # [B, n·S, C]
        out_latent = out_latent.view(B, n, S, C).transpose(0, 1).reshape(n, B * S, C)
        out = torch.bmm(out_latent, w_uv.transpose(1, 2))  # [n, B·S, Dv]
        return out.view(n, B, S, Dv).transpose(0, 1)  # [B, n, S, Dv]

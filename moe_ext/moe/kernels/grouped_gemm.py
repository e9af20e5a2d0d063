"""Triton SwiGLU experts for few rows (decode): weight-streaming grouped GEMMs.

# T' rows (sorted by expert), H hidden, F FFN size, E experts,
# A active-expert slots (min(E, T'): a static bound on the experts that receive rows);
# quantized_linear: T rows, K in features, N out features; fp8 blocks (bo, bi)

At decode sizes the expert forward is a pure weight read: each expert that receives rows
must stream its ``gate_up_proj[e]`` [2F, H] and ``down_proj[e]`` [H, F] from HBM once, and
the rows themselves are a few kilobytes. torch's grouped GEMM tiles for large M and
reaches a fraction of HBM bandwidth here. These kernels instead give each program one
(active expert, N-tile) pair: it finds its expert on device from ``tokens_per_expert``
(no host sync, CUDA-graph capturable), keeps the weight tile's K-loop as the inner loop
and walks the expert's rows in BLOCK_M chunks, so every weight byte of a touched expert is
read from HBM once per chunk (once in total when the expert's rows fit one chunk) and the
weights of experts without rows are never read.

Two launches of one kernel: (1) ``h = silu(x @ W1[e, :F]^T) * (x @ W1[e, F:]^T)``, the
gate and up tiles of the same N columns read side by side so the SwiGLU epilogue needs no
round trip; (2) ``y = h @ W2[e]^T``. Accumulation in float32; h is stored in x's dtype,
as the grouped_mm path stores it.

gpt-oss experts use the same launches with epilogue options: biases (``b1[e]`` [2F], gate
then up, added to the two accumulators; ``b2[e]`` [H] added to y) and the clamped SwiGLU
``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``,
all in float32 before h is stored.

Quantized weights are read as stored and dequantized in registers (weight-only: x stays
in its dtype, so decode reads a half or a quarter of bf16's weight bytes):

- ``fp8`` (block-scaled, DeepSeek / Qwen3-FP8 layout): W float8_e4m3fn with a float32
  scale per (bo, bi) block. BLOCK_K divides bi, so a k-tile has one scale per W row: the
  fp8 tile converts exactly to x's dtype, and its float32 partial product is scaled per
  column before it is accumulated. (Gate and up rows have their own scale blocks: the up
  half of ``gate_up_proj`` starts at row F, a multiple of bo.)
- ``mxfp4`` (gpt-oss layout): W as bytes of two e2m1 values with an e8m0 exponent per 32
  values; a tile is decoded to float32 (exact), scaled, cast to x's dtype (exact for bf16)
  and fed to the dot. BLOCK_K is a multiple of 32.

:func:`quantized_linear` runs the same kernel as one expert holding every row (op
``moe_ext::quantized_linear``): dense fp8 / mxfp4 projections at decode sizes.

On CUDA the kernel is compiled and autotuned (keyed on the problem shape; the first call
of a shape benchmarks a few configs and must therefore run outside CUDA-graph capture).
On CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1 in the environment of the
process that imports triton), with a fixed config: slow, for tests only.

Both launches run inside the custom op ``moe_ext::swiglu_experts`` (functional, with a fake
implementation giving y's shape and dtype), so ``torch.compile(fullgraph=True)`` keeps the
experts forward as one opaque node and never traces Triton's launcher or autotuner.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ext.moe.kernels import check_kernel_inputs
from moe_ext.quant.config import QuantizationError

# Rows per tensor-core tile: tl.dot needs M >= 16. Larger chunks are picked when the
# balanced share of rows per expert is larger, so an expert's weights are streamed once.
BLOCK_M_CHOICES = (16, 32, 64)


DENSE, FP8, MXFP4 = 0, 1, 2  # W_FORMAT: how W is stored
WEIGHT_FORMATS = {"dense": DENSE, "fp8": FP8, "mxfp4": MXFP4}
# the same as constexpr globals (the only globals a jitted function may read)
_FP8 = tl.constexpr(FP8)
_MXFP4 = tl.constexpr(MXFP4)
MX_GROUP = 32  # MXFP4 values per e8m0 scale
_MX_GROUP = tl.constexpr(MX_GROUP)


@triton.jit
def _mxfp4_tile(w_tile, s_tile, k0, K, n_mask, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W[rows, k0 : k0 + BLOCK_K] dequantized from MXFP4, float32 [BLOCK_N, BLOCK_K] (exact).
    w_tile: [BLOCK_N, BLOCK_K/2] pointers to the rows' packed bytes at k-byte 0; s_tile:
    [BLOCK_N, BLOCK_K/32] pointers to the rows' e8m0 scales at group 0."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    b_mask = n_mask[:, None] & (offs_b < K // 2)[None, :]
    packed = tl.load(w_tile + k0 // 2, mask=b_mask, other=0)  # [BLOCK_N, BLOCK_K/2] uint8
    # element 2j is byte j's low nibble, 2j+1 its high one: join then merge the last dims
    codes = tl.join(packed & 0xF, packed >> 4)  # [BLOCK_N, BLOCK_K/2, 2]
    codes = tl.reshape(codes, (BLOCK_N, BLOCK_K)).to(tl.uint16)  # [BLOCK_N, BLOCK_K]
    # e2m1 (s, e1 e0, m) -> fp16 bits (s, exponent e1 e0, mantissa m): that fp16 number is
    # the e2m1 value * 2^-14 (e = 0 lands on fp16's subnormal 0.5 * 2^-14); the 2^14 goes
    # into the scale below.
    bits = ((codes & 8) << 12) | ((codes & 7) << 9)
    values = bits.to(tl.float16, bitcast=True).to(tl.float32)  # [BLOCK_N, BLOCK_K]
    offs_g = k0 // _MX_GROUP + tl.arange(0, BLOCK_K // _MX_GROUP)
    s_mask = n_mask[:, None] & (offs_g < K // _MX_GROUP)[None, :]
    exponent = tl.load(s_tile + k0 // _MX_GROUP, mask=s_mask, other=0).to(tl.int32)
    # 2^(e8m0 - 127) built from its float32 bits; e8m0 0 (2^-127, seen only on all-zero
    # groups) is read as 2^-126 so the product stays finite and zero.
    scale = (tl.maximum(exponent, 1) << 23).to(tl.float32, bitcast=True) * 16384.0
    values = tl.reshape(values, (BLOCK_N, BLOCK_K // _MX_GROUP, _MX_GROUP))
    values = values * scale[:, :, None]  # [BLOCK_N, BLOCK_K/32, 32]
    return tl.reshape(values, (BLOCK_N, BLOCK_K))


def _expert_gemm(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    tokens_per_expert_ptr,
    out_ptr,
    N,
    K,
    E,
    slots_bucket,
    stride_xm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_be,
    stride_om,
    block_out,
    block_in,
    alpha,
    limit,
    SWIGLU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CLAMPED: tl.constexpr,
    W_FORMAT: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[rows of e, n-tile] = x[rows of e] @ W[e, n-tile]^T for the expert behind this
    program's active slot; with SWIGLU, silu(gate) * up where gate uses W[e, n] and up
    W[e, N + n]. x: [T', K]; out: [T', N]. W by W_FORMAT:
    DENSE: W [E, N or 2N, K] in x's dtype (K contiguous);
    FP8: W float8_e4m3fn [E, N or 2N, K], scale float32 [E, ceil(rows/block_out),
    ceil(K/block_in)] (row stride stride_sn, column stride 1); BLOCK_K divides block_in,
    so one k-tile has one scale per row: the tile is multiplied by its row scales in
    float32 and rounded to x's dtype (the weights of the dequantized model) before the dot;
    MXFP4: W uint8 [E, N or 2N, K/2] (two e2m1 per byte), scale uint8 [E, N or 2N, K/32]
    (e8m0, row stride stride_sn); BLOCK_K is a multiple of 32; tiles are dequantized in
    float32 and cast to x's dtype (exact for bf16) before the dot.
    HAS_BIAS: bias [E, N or 2N] (row stride stride_be) added to the accumulators; CLAMPED
    (with SWIGLU): gpt-oss' clamped SwiGLU with ``alpha`` and ``limit``.
    slots_bucket (a power of two >= the active-expert bound) only keys the autotuner:
    the best tile width depends on how many experts share the GPU."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    slot = pid // n_tiles
    tile = pid % n_tiles

    # Which expert is the slot-th one with rows, where its rows start and how many:
    # recomputed per program from E counts (a few hundred bytes, L2-resident).
    experts = tl.arange(0, E_POW2)
    counts = tl.load(tokens_per_expert_ptr + experts, mask=experts < E, other=0).to(tl.int32)
    has_rows = (counts > 0).to(tl.int32)
    rank = tl.cumsum(has_rows, 0)  # [E_POW2] 1-based rank among experts with rows
    is_mine = (has_rows == 1) & (rank == slot + 1)
    expert = tl.sum(tl.where(is_mine, experts, 0), 0)
    rows = tl.sum(tl.where(is_mine, counts, 0), 0)  # 0 when fewer than slot+1 experts have rows
    start = tl.sum(tl.where(experts < expert, counts, 0), 0)

    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    s_expert = scale_ptr + expert.to(tl.int64) * stride_se  # unused for DENSE
    if W_FORMAT == _MXFP4:
        # [BLOCK_N, BLOCK_K/2] packed bytes and [BLOCK_N, BLOCK_K/32] scales of W[e, n-tile]
        w_expert = w_ptr + expert.to(tl.int64) * stride_we + tl.arange(0, BLOCK_K // 2)[None, :]
        w_tile = w_expert + offs_n.to(tl.int64)[:, None] * stride_wn
        w_up_tile = w_expert + (offs_n + N).to(tl.int64)[:, None] * stride_wn
        s_cols = s_expert + tl.arange(0, BLOCK_K // _MX_GROUP)[None, :]
        s_tile = s_cols + offs_n.to(tl.int64)[:, None] * stride_sn
        s_up_tile = s_cols + (offs_n + N).to(tl.int64)[:, None] * stride_sn
    else:
        # [BLOCK_K, BLOCK_N] views of W[e, n-tile]^T (and of the up half): K is contiguous.
        w_expert = w_ptr + expert.to(tl.int64) * stride_we + tl.arange(0, BLOCK_K)[:, None]
        w_tile = w_expert + offs_n.to(tl.int64)[None, :] * stride_wn
        w_up_tile = w_expert + (offs_n + N).to(tl.int64)[None, :] * stride_wn
        # FP8: [BLOCK_N] pointers to each row's scale-block row (gate and up rows apart)
        s_tile = s_expert + (offs_n // block_out).to(tl.int64) * stride_sn
        s_up_tile = s_expert + ((offs_n + N) // block_out).to(tl.int64) * stride_sn
    for m0 in range(0, rows, BLOCK_M):  # zero trips for an empty slot: no weight read
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < rows
        row_ptr = x_ptr + (start + offs_m).to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(
                row_ptr + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0
            )  # [BLOCK_M, BLOCK_K]
            w_mask = k_mask[:, None] & n_mask[None, :]
            if W_FORMAT == _MXFP4:
                w = _mxfp4_tile(w_tile, s_tile, k0, K, n_mask, BLOCK_K, BLOCK_N)
                acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)  # w^T: [BLOCK_K, BLOCK_N]
                if SWIGLU:
                    w_up = _mxfp4_tile(w_up_tile, s_up_tile, k0, K, n_mask, BLOCK_K, BLOCK_N)
                    acc_up = tl.dot(a, tl.trans(w_up.to(a.dtype)), acc_up)
            elif W_FORMAT == _FP8:
                # the tile dequantized in registers to x's dtype (the values of the
                # dequantized bf16 model), so the accumulator chains through the dots as in
                # the dense kernel instead of waiting on each k-tile's product to scale it
                scale = tl.load(s_tile + k0 // block_in, mask=n_mask, other=0.0)  # [BLOCK_N]
                w = tl.load(w_tile + k0, mask=w_mask, other=0.0).to(tl.float32)
                acc = tl.dot(a, (w * scale[None, :]).to(a.dtype), acc)  # w: [BLOCK_K, BLOCK_N]
                if SWIGLU:
                    scale_up = tl.load(s_up_tile + k0 // block_in, mask=n_mask, other=0.0)
                    w_up = tl.load(w_up_tile + k0, mask=w_mask, other=0.0).to(tl.float32)
                    acc_up = tl.dot(a, (w_up * scale_up[None, :]).to(a.dtype), acc_up)
            else:
                w = tl.load(w_tile + k0, mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
                acc = tl.dot(a, w, acc)
                if SWIGLU:
                    w_up = tl.load(w_up_tile + k0, mask=w_mask, other=0.0)
                    acc_up = tl.dot(a, w_up, acc_up)
        if HAS_BIAS:
            b_row = bias_ptr + expert.to(tl.int64) * stride_be
            acc += tl.load(b_row + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if SWIGLU:
                b_up = tl.load(b_row + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                acc_up += b_up[None, :]
        if SWIGLU:
            if CLAMPED:
                gate = tl.minimum(acc, limit)
                up = tl.minimum(tl.maximum(acc_up, -limit), limit)
                acc = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
            else:
                acc = acc * tl.sigmoid(acc) * acc_up
        out = out_ptr + (start + offs_m).to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# (BLOCK_N, BLOCK_K, num_warps, num_stages) per (format, SwiGLU launch)
_SHAPES = {
    # Few configs keep the one-off autotune cheap. Small N-tiles give enough programs to
    # fill 132 SMs when only one or two experts are active; deep pipelines keep enough
    # weight loads in flight per SM to approach HBM bandwidth.
    # SwiGLU: two weight tiles and two accumulators per step.
    (DENSE, True): [(16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 3)],
    (DENSE, False): [(16, 256, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (128, 64, 4, 4)],
    # FP8: a tile is half the bytes of bf16 and BLOCK_K is capped by the scale block (128
    # in every public checkpoint), so deeper pipelines and wider N-tiles keep as many
    # bytes in flight.
    (FP8, True): [
        (16, 128, 4, 4),
        (16, 128, 4, 6),
        (32, 128, 4, 4),
        (32, 128, 4, 6),
        (64, 128, 4, 4),
        (32, 256, 4, 4),
    ],
    (FP8, False): [
        (16, 128, 4, 6),
        (32, 128, 4, 4),
        (32, 128, 4, 6),
        (64, 128, 4, 4),
        (128, 128, 4, 3),
        (32, 256, 4, 4),
    ],
    # MXFP4: a quarter of bf16's bytes per tile; the in-register decode (float32, then the
    # tile goes through shared memory transposed) limits the tile, so wider K over wider N.
    (MXFP4, True): [
        (16, 256, 4, 4),
        (16, 512, 4, 3),
        (32, 128, 4, 4),
        (32, 256, 4, 3),
        (64, 128, 8, 3),
    ],
    (MXFP4, False): [
        (16, 256, 4, 4),
        (16, 512, 4, 3),
        (32, 256, 4, 4),
        (64, 128, 4, 4),
        (128, 64, 4, 4),
    ],
}


def _configs(swiglu: bool, w_format: int = DENSE, max_block_k: int = 1 << 30):
    """Autotune configs; BLOCK_K capped at ``max_block_k`` (FP8: a power of two dividing
    the scale block's columns, so a k-tile never straddles two scales)."""
    seen, configs = set(), []
    for bn, bk, w, s in _SHAPES[(w_format, swiglu)]:
        key = (bn, min(bk, max_block_k), w, s)
        if key not in seen:
            seen.add(key)
            configs.append(
                triton.Config({"BLOCK_N": key[0], "BLOCK_K": key[1]}, num_warps=w, num_stages=s)
            )
    return configs


_jit_kernel = triton.jit(_expert_gemm)
_TUNE_KEY = ["N", "K", "E", "slots_bucket", "BLOCK_M"]
# Triton decides at decoration time whether kernels compile or run in its CPU interpreter
# (TRITON_INTERPRET=1 in the environment of the process that imports triton).
INTERPRETED = not isinstance(_jit_kernel, triton.runtime.jit.JITFunction)
_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 32}
_tuned: dict[tuple, object] = {}  # (swiglu, W_FORMAT, max BLOCK_K) -> autotuned kernel


def _tuned_kernel(swiglu: bool, w_format: int, max_block_k: int):
    """The autotuned kernel of this launch kind, built on first use (one autotune cache
    per kind: configs differ by format and by the fp8 scale block)."""
    key = (swiglu, w_format, max_block_k)
    if key not in _tuned:
        _tuned[key] = triton.autotune(_configs(swiglu, w_format, max_block_k), key=_TUNE_KEY)(
            _jit_kernel
        )
    return _tuned[key]


def fp8_max_block_k(block_in: int) -> int:
    """Largest BLOCK_K for fp8 scale blocks of ``block_in`` columns: the largest power of
    two dividing it (a k-tile then lies in one scale block)."""
    return block_in & -block_in


def pick_block_m(rows: int, num_experts: int) -> int:
    """Row-chunk size from static sizes only (graph-safe): the smallest choice that holds
    twice the balanced share of rows per expert, so typical experts stream weights once."""
    share = 2 * -(-rows // max(num_experts, 1))  # plain ints: torch.compile traces this
    return next((m for m in BLOCK_M_CHOICES if m >= share), BLOCK_M_CHOICES[-1])


def _launch(x, w, scale, bias, tokens_per_expert, out, n, swiglu, block_m, *, clamp=None, **quant):
    """One kernel launch. x: [T', K]; w: [E, n or 2n, K] (dense, fp8) or [E, n or 2n, K/2]
    packed uint8 (mxfp4); scale: per format (None for dense); bias: [E, n or 2n]; out:
    [T', n]. clamp: (alpha, limit) of the clamped SwiGLU, None for plain. quant:
    w_format (DENSE/FP8/MXFP4) and fp8_block (bo, bi)."""
    w_format = quant.get("w_format", DENSE)
    block_out, block_in = quant.get("fp8_block", (1, 1))
    num_experts = w.shape[0]
    slots = min(num_experts, x.shape[0])  # at most one expert with rows per row
    alpha, limit = clamp if clamp is not None else (1.0, 0.0)
    args = (
        x,
        w,
        scale if scale is not None else w,  # never read for DENSE
        bias if bias is not None else w,  # never read without HAS_BIAS
        tokens_per_expert,
        out,
        n,
        x.shape[1],
        num_experts,
        triton.next_power_of_2(slots),
        x.stride(0),
        w.stride(0),
        w.stride(1),
        scale.stride(0) if scale is not None else 0,
        scale.stride(1) if scale is not None else 0,
        bias.stride(0) if bias is not None else 0,
        out.stride(0),
        int(block_out),
        int(block_in),
        float(alpha),
        float(limit),
    )
    meta = dict(
        SWIGLU=swiglu,
        HAS_BIAS=bias is not None,
        CLAMPED=clamp is not None,
        W_FORMAT=w_format,
        E_POW2=triton.next_power_of_2(num_experts),
        BLOCK_M=block_m,
    )
    max_block_k = fp8_max_block_k(int(block_in)) if w_format == FP8 else 1 << 30
    if x.device.type == "cpu":
        config = dict(_INTERPRETER_CONFIG)
        config["BLOCK_K"] = min(config["BLOCK_K"], max_block_k)
        grid = (slots * triton.cdiv(n, config["BLOCK_N"]),)
        _jit_kernel[grid](*args, **meta, **config)
        return
    kernel = _tuned_kernel(swiglu, w_format, max_block_k)
    kernel[lambda cfg: (slots * triton.cdiv(n, cfg["BLOCK_N"]),)](*args, **meta)


def _quantized_shape(name, weight, scale, weight_format, fp8_block):
    """Logical shape [..., R, C] of quantized ``weight`` after checking it and its scale
    (one-line QuantizationError naming the tensor)."""
    if weight_format == "fp8":
        if weight.dtype != torch.float8_e4m3fn or weight.dim() < 2:
            raise QuantizationError(
                f"triton experts: fp8 {name} {weight.dtype} {list(weight.shape)} must be "
                f"float8_e4m3fn [..., R, C]"
            )
        bo, bi = fp8_block
        want = (*weight.shape[:-2], -(-weight.shape[-2] // bo), -(-weight.shape[-1] // bi))
        want_dtype = torch.float32
        logical = tuple(weight.shape)
    else:
        if weight.dtype != torch.uint8 or weight.dim() < 3 or weight.shape[-1] != MX_GROUP // 2:
            raise QuantizationError(
                f"triton experts: mxfp4 {name} {weight.dtype} {list(weight.shape)} must be "
                f"uint8 [..., R, C/32, 16]"
            )
        want, want_dtype = tuple(weight.shape[:-1]), torch.uint8
        logical = (*weight.shape[:-2], weight.shape[-2] * MX_GROUP)
    if scale is None:
        raise QuantizationError(
            f"triton experts: {name} is {weight_format} but its scale is missing; pass "
            f"the {want_dtype} {list(want)} scale tensor"
        )
    if tuple(scale.shape) != want or scale.dtype != want_dtype:
        blocks = f" with blocks {list(fp8_block)}" if weight_format == "fp8" else ""
        raise QuantizationError(
            f"triton experts: scale of {name} is {scale.dtype} {list(scale.shape)}; "
            f"{weight_format} {name} {list(weight.shape)}{blocks} needs {want_dtype} {list(want)}"
        )
    return logical


def _check_format(weight_format, fp8_block, scales):
    """The format name, the fp8 block size, and no scales with dense weights."""
    if weight_format not in WEIGHT_FORMATS:
        raise QuantizationError(
            f"triton experts: weight_format {weight_format!r} unknown; use one of "
            f"{', '.join(WEIGHT_FORMATS)}"
        )
    if weight_format == "dense" and any(s is not None for s in scales):
        raise QuantizationError(
            "triton experts: scales given with dense weights; pass weight_format 'fp8' or 'mxfp4'"
        )
    if weight_format == "fp8":
        bo, bi = fp8_block
        if bo < 1 or fp8_max_block_k(bi) < 16:
            raise QuantizationError(
                f"triton experts: fp8 block {list(fp8_block)} unsupported: the kernel needs "
                f"block columns divisible by 16 (a k-tile of >= 16 within one scale block)"
            )


def check_operands(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    *,
    weight_format: str = "dense",
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    fp8_block: tuple[int, int] = (128, 128),
) -> None:
    """Raise a one-line ValueError (QuantizationError for quantized operands) when these
    operands cannot run on the Triton kernels. Metadata only: also the fake impl's check."""
    _check_format(weight_format, fp8_block, (gate_up_scale, down_scale))
    if weight_format == "dense":
        gate_up_shape, down_shape = tuple(gate_up_proj.shape), tuple(down_proj.shape)
        dtypes = {t.dtype for t in (x, gate_up_proj, down_proj)}
        if len(dtypes) != 1:
            raise ValueError(
                f"triton experts: x, gate_up_proj, down_proj in {dtypes}; use one dtype"
            )
    else:
        gate_up_shape = _quantized_shape(
            "gate_up_proj", gate_up_proj, gate_up_scale, weight_format, fp8_block
        )
        down_shape = _quantized_shape("down_proj", down_proj, down_scale, weight_format, fp8_block)
    if len(gate_up_shape) != 3:
        raise ValueError(
            f"triton experts: gate_up_proj {list(gate_up_proj.shape)} must be [E, 2F, H] "
            f"({weight_format})"
        )
    num_experts, two_f, hidden = gate_up_shape
    for name, bias, shape in (
        ("gate_up_bias", gate_up_bias, (num_experts, two_f)),
        ("down_bias", down_bias, (num_experts, hidden)),
    ):
        if bias is not None and (
            tuple(bias.shape) != shape or bias.dtype != x.dtype or bias.device != x.device
        ):
            raise ValueError(
                f"triton experts: {name} {bias.dtype} {tuple(bias.shape)} on {bias.device} "
                f"must be {x.dtype} {list(shape)} on {x.device}"
            )
    if x.dim() != 2 or x.shape[1] != hidden or two_f % 2:
        raise ValueError(
            f"triton experts: x {tuple(x.shape)} and gate_up_proj "
            f"{list(gate_up_shape)} must be [T', H] and [E, 2F, H]"
        )
    if down_shape != (num_experts, hidden, two_f // 2):
        raise ValueError(
            f"triton experts: down_proj {list(down_shape)} ({weight_format}) must be "
            f"[{num_experts}, {hidden}, {two_f // 2}]"
        )
    if tokens_per_expert.shape != (num_experts,) or tokens_per_expert.dtype != torch.int64:
        raise ValueError(
            f"triton experts: tokens_per_expert must be int64 [{num_experts}], "
            f"got {tokens_per_expert.dtype} {tuple(tokens_per_expert.shape)}"
        )
    operands = (x, gate_up_proj, down_proj, tokens_per_expert, gate_up_scale, down_scale)
    devices = {t.device for t in operands if t is not None}
    check_kernel_inputs("triton experts", x, devices, INTERPRETED, "backend 'grouped_mm'/'loop'")


def swiglu_experts_forward(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    block_m: int | None = None,
    *,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float = 1.702,
    weight_format: str = "dense",
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    fp8_block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """y = down(silu(gate(x)) * up(x)) per expert, without host sync, through the custom op
    ``moe_ext::swiglu_experts``.

    x: [T', H] rows sorted by expert (bf16/fp16 on CUDA; any float on CPU, under the
    interpreter); tokens_per_expert: [E] int64 on x's device, summing to T' (rows past the
    sum are left unwritten). Weights by ``weight_format``:

    - ``dense``: gate_up_proj [E, 2F, H] (gate rows, then up rows), down_proj [E, H, F],
      in x's dtype;
    - ``fp8``: gate_up_proj float8_e4m3fn [E, 2F, H] with gate_up_scale float32
      [E, ceil(2F/bo), ceil(H/bi)]; down_proj float8_e4m3fn [E, H, F] with down_scale
      float32 [E, ceil(H/bo), ceil(F/bi)]; ``fp8_block`` = (bo, bi), bi divisible by 16;
    - ``mxfp4``: gate_up_proj uint8 [E, 2F, H/32, 16] with gate_up_scale uint8
      [E, 2F, H/32]; down_proj uint8 [E, H, F/32, 16] with down_scale uint8 [E, H, F/32].

    block_m: rows per chunk (16/32/64), default from :func:`pick_block_m`. gpt-oss
    experts: gate_up_bias [E, 2F] (gate, then up), down_bias [E, H] in x's dtype, and
    ``swiglu_limit`` (with ``swiglu_alpha``) for the clamped SwiGLU. Returns y: [T', H] in
    x's dtype."""
    if block_m is not None and block_m not in BLOCK_M_CHOICES:
        raise ValueError(f"triton experts: block_m {block_m} not in {BLOCK_M_CHOICES}")
    quant = dict(
        weight_format=weight_format,
        gate_up_scale=gate_up_scale,
        down_scale=down_scale,
        fp8_block=tuple(fp8_block),
    )
    check_operands(x, gate_up_proj, down_proj, tokens_per_expert, gate_up_bias, down_bias, **quant)
    block_m = block_m or pick_block_m(x.shape[0], gate_up_proj.shape[0])
    return torch.ops.moe_ext.swiglu_experts(
        x,
        gate_up_proj,
        down_proj,
        tokens_per_expert,
        block_m,
        gate_up_bias,
        down_bias,
        swiglu_limit,
        float(swiglu_alpha),
        weight_format,
        gate_up_scale,
        down_scale,
        [int(b) for b in fp8_block],
    )


def _packed(weight, weight_format):
    """The kernel's view of a weight: mxfp4 [..., R, C/32, 16] -> [..., R, C/2] bytes."""
    weight = weight.contiguous()
    return weight.flatten(-2) if weight_format == "mxfp4" else weight


@torch.library.custom_op("moe_ext::swiglu_experts", mutates_args=())
def _swiglu_experts_op(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    block_m: int,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float = 1.702,
    weight_format: str = "dense",
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    fp8_block: list[int] | None = None,
) -> torch.Tensor:
    """The two kernel launches; arguments as in :func:`swiglu_experts_forward`."""
    fp8_block = tuple(fp8_block or (128, 128))
    quant = dict(weight_format=weight_format, fp8_block=fp8_block)
    check_operands(
        x,
        gate_up_proj,
        down_proj,
        tokens_per_expert,
        gate_up_bias,
        down_bias,
        gate_up_scale=gate_up_scale,
        down_scale=down_scale,
        **quant,
    )
    hidden, ffn = x.shape[1], gate_up_proj.shape[1] // 2
    x = x.contiguous()
    gate_up_proj, down_proj = (
        _packed(gate_up_proj, weight_format),
        _packed(down_proj, weight_format),
    )
    gate_up_scale = gate_up_scale.contiguous() if gate_up_scale is not None else None
    down_scale = down_scale.contiguous() if down_scale is not None else None
    gate_up_bias = gate_up_bias.contiguous() if gate_up_bias is not None else None
    down_bias = down_bias.contiguous() if down_bias is not None else None
    clamp = None if swiglu_limit is None else (swiglu_alpha, swiglu_limit)
    hidden_act = x.new_empty(x.shape[0], ffn)  # [T', F]
    y = x.new_empty(x.shape[0], hidden)  # [T', H]
    if x.shape[0] == 0 or ffn == 0:
        return y.zero_()
    launch = dict(w_format=WEIGHT_FORMATS[weight_format], fp8_block=fp8_block)
    _launch(
        x,
        gate_up_proj,
        gate_up_scale,
        gate_up_bias,
        tokens_per_expert,
        hidden_act,
        ffn,
        True,
        block_m,
        clamp=clamp,
        **launch,
    )
    _launch(
        hidden_act,
        down_proj,
        down_scale,
        down_bias,
        tokens_per_expert,
        y,
        hidden,
        False,
        block_m,
        **launch,
    )
    return y


@_swiglu_experts_op.register_fake
def _swiglu_experts_fake(
    x,
    gate_up_proj,
    down_proj,
    tokens_per_expert,
    block_m,
    gate_up_bias=None,
    down_bias=None,
    swiglu_limit=None,
    swiglu_alpha=1.702,
    weight_format="dense",
    gate_up_scale=None,
    down_scale=None,
    fp8_block=None,
):
    check_operands(
        x,
        gate_up_proj,
        down_proj,
        tokens_per_expert,
        gate_up_bias,
        down_bias,
        weight_format=weight_format,
        gate_up_scale=gate_up_scale,
        down_scale=down_scale,
        fp8_block=tuple(fp8_block or (128, 128)),
    )
    return x.new_empty(x.shape[0], x.shape[1])  # [T', H]


# ---- dense quantized projections: the same kernel as one expert ----------------------


def check_linear_operands(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    weight_format: str,
    fp8_block: tuple[int, int] = (128, 128),
    bias: torch.Tensor | None = None,
) -> None:
    """One-line errors when :func:`quantized_linear` cannot run these operands."""
    if weight_format == "dense":
        raise QuantizationError(
            "quantized_linear: weight_format 'dense' has no kernel here; use "
            "torch.nn.functional.linear, or 'fp8' / 'mxfp4' weights"
        )
    _check_format(weight_format, fp8_block, (scale,))
    out_features, in_features = _quantized_shape("weight", weight, scale, weight_format, fp8_block)[
        -2:
    ]
    if weight.dim() != (2 if weight_format == "fp8" else 3):
        raise QuantizationError(
            f"quantized_linear: weight {list(weight.shape)} must be one matrix [N, K] "
            f"({weight_format})"
        )
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(
            f"quantized_linear: x {list(x.shape)} must be [T, {in_features}] for weight "
            f"[{out_features}, {in_features}]"
        )
    if bias is not None and (
        tuple(bias.shape) != (out_features,) or bias.dtype != x.dtype or bias.device != x.device
    ):
        raise ValueError(
            f"quantized_linear: bias {bias.dtype} {list(bias.shape)} on {bias.device} must be "
            f"{x.dtype} [{out_features}] on {x.device}"
        )
    devices = {t.device for t in (x, weight, scale)}
    check_kernel_inputs(
        "quantized_linear", x, devices, INTERPRETED, "dequantize and use torch.nn.functional.linear"
    )


def quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    weight_format: str,
    fp8_block: tuple[int, int] = (128, 128),
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W^T (+ bias) reading quantized W directly, through the custom op
    ``moe_ext::quantized_linear`` (no host sync; CUDA-graph capturable).

    x: [T, K] (bf16/fp16 on CUDA; any float on CPU under the interpreter). ``fp8``: weight
    float8_e4m3fn [N, K], scale float32 [ceil(N/bo), ceil(K/bi)], fp8_block (bo, bi) with
    bi divisible by 16. ``mxfp4``: weight uint8 [N, K/32, 16], scale uint8 [N, K/32].
    bias: [N] in x's dtype. Returns [T, N] in x's dtype. For decode sizes (few rows): the
    kernel streams W once per 64 rows."""
    check_linear_operands(x, weight, scale, weight_format, tuple(fp8_block), bias)
    return torch.ops.moe_ext.quantized_linear(
        x, weight, scale, weight_format, [int(b) for b in fp8_block], bias
    )


@torch.library.custom_op("moe_ext::quantized_linear", mutates_args=())
def _quantized_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    weight_format: str,
    fp8_block: list[int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One non-SwiGLU launch with E = 1; arguments as in :func:`quantized_linear`."""
    fp8_block = tuple(fp8_block)
    check_linear_operands(x, weight, scale, weight_format, fp8_block, bias)
    rows, out_features = x.shape[0], weight.shape[0]
    y = x.new_empty(rows, out_features)  # [T, N]
    if rows == 0 or out_features == 0:
        return y
    # one expert holding all T rows, counted on device (a fixed-size fill, no host sync)
    tokens_per_expert = torch.full((1,), rows, dtype=torch.int64, device=x.device)
    _launch(
        x.contiguous(),
        _packed(weight, weight_format)[None],  # [1, N, K] or [1, N, K/2]
        scale.contiguous()[None],  # [1, ...]
        bias.contiguous()[None] if bias is not None else None,  # [1, N]
        tokens_per_expert,
        y,
        out_features,
        False,
        pick_block_m(rows, 1),
        w_format=WEIGHT_FORMATS[weight_format],
        fp8_block=fp8_block,
    )
    return y


@_quantized_linear_op.register_fake
def _quantized_linear_fake(x, weight, scale, weight_format, fp8_block, bias=None):
    check_linear_operands(x, weight, scale, weight_format, tuple(fp8_block), bias)
    return x.new_empty(x.shape[0], weight.shape[0])  # [T, N]

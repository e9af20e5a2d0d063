"""Triton SwiGLU experts for few rows (decode): weight-streaming grouped GEMMs.

# T' rows (sorted by expert), H hidden, F FFN size, E experts,
# A active-expert slots (min(E, T'): a static bound on the experts that receive rows)

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

from moe_ext.moe.kernels import check_kernel_device

# Rows per tensor-core tile: tl.dot needs M >= 16. Larger chunks are picked when the
# balanced share of rows per expert is larger, so an expert's weights are streamed once.
BLOCK_M_CHOICES = (16, 32, 64)


def _expert_gemm(
    x_ptr,
    w_ptr,
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
    stride_be,
    stride_om,
    alpha,
    limit,
    SWIGLU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CLAMPED: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[rows of e, n-tile] = x[rows of e] @ W[e, n-tile]^T for the expert behind this
    program's active slot; with SWIGLU, silu(gate) * up where gate uses W[e, n] and up
    W[e, N + n]. x: [T', K]; W: [E, N or 2N, K] (K contiguous); out: [T', N].
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
    # [BLOCK_K, BLOCK_N] views of W[e, n-tile]^T (and of the up half): K is contiguous.
    w_expert = w_ptr + expert.to(tl.int64) * stride_we + tl.arange(0, BLOCK_K)[:, None]
    w_tile = w_expert + offs_n.to(tl.int64)[None, :] * stride_wn
    w_up_tile = w_expert + (offs_n + N).to(tl.int64)[None, :] * stride_wn
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


def _configs(swiglu: bool):
    # Few configs keep the one-off autotune cheap. Small N-tiles give enough programs to
    # fill 132 SMs when only one or two experts are active; deep pipelines keep enough
    # weight loads in flight per SM to approach HBM bandwidth.
    # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    if swiglu:  # two weight tiles and two accumulators per step
        shapes = [(16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 3)]
    else:
        shapes = [(16, 256, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (128, 64, 4, 4)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in shapes
    ]


_jit_kernel = triton.jit(_expert_gemm)
_TUNE_KEY = ["N", "K", "E", "slots_bucket", "BLOCK_M"]
# Triton decides at decoration time whether kernels compile or run in its CPU interpreter
# (TRITON_INTERPRET=1 in the environment of the process that imports triton).
INTERPRETED = not isinstance(_jit_kernel, triton.runtime.jit.JITFunction)
_gate_up_kernel = triton.autotune(_configs(True), key=_TUNE_KEY)(_jit_kernel)
_down_kernel = triton.autotune(_configs(False), key=_TUNE_KEY)(_jit_kernel)
_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 32}


def pick_block_m(rows: int, num_experts: int) -> int:
    """Row-chunk size from static sizes only (graph-safe): the smallest choice that holds
    twice the balanced share of rows per expert, so typical experts stream weights once."""
    share = 2 * -(-rows // max(num_experts, 1))  # plain ints: torch.compile traces this
    return next((m for m in BLOCK_M_CHOICES if m >= share), BLOCK_M_CHOICES[-1])


def _launch(x, w, bias, tokens_per_expert, out, n, swiglu, block_m, clamp=None):
    """clamp: (alpha, limit) of the clamped SwiGLU, None for plain; bias: [E, n or 2n]."""
    num_experts = w.shape[0]
    slots = min(num_experts, x.shape[0])  # at most one expert with rows per row
    alpha, limit = clamp if clamp is not None else (1.0, 0.0)
    args = (
        x,
        w,
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
        bias.stride(0) if bias is not None else 0,
        out.stride(0),
        float(alpha),
        float(limit),
    )
    meta = dict(
        SWIGLU=swiglu,
        HAS_BIAS=bias is not None,
        CLAMPED=clamp is not None,
        E_POW2=triton.next_power_of_2(num_experts),
        BLOCK_M=block_m,
    )
    if x.device.type == "cpu":
        grid = (slots * triton.cdiv(n, _INTERPRETER_CONFIG["BLOCK_N"]),)
        _jit_kernel[grid](*args, **meta, **_INTERPRETER_CONFIG)
        return
    kernel = _gate_up_kernel if swiglu else _down_kernel
    kernel[lambda cfg: (slots * triton.cdiv(n, cfg["BLOCK_N"]),)](*args, **meta)


def check_operands(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> None:
    """Raise a one-line ValueError when these operands cannot run on the Triton kernels."""
    num_experts, two_f, hidden = gate_up_proj.shape
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
            f"{tuple(gate_up_proj.shape)} must be [T', H] and [E, 2F, H]"
        )
    if down_proj.shape != (num_experts, hidden, two_f // 2):
        raise ValueError(
            f"triton experts: down_proj {tuple(down_proj.shape)} must be "
            f"[{num_experts}, {hidden}, {two_f // 2}]"
        )
    if tokens_per_expert.shape != (num_experts,) or tokens_per_expert.dtype != torch.int64:
        raise ValueError(
            f"triton experts: tokens_per_expert must be int64 [{num_experts}], "
            f"got {tokens_per_expert.dtype} {tuple(tokens_per_expert.shape)}"
        )
    devices = {t.device for t in (x, gate_up_proj, down_proj, tokens_per_expert)}
    dtypes = {t.dtype for t in (x, gate_up_proj, down_proj)}
    if len(devices) != 1 or len(dtypes) != 1:
        raise ValueError(
            f"triton experts: operands on {devices} in {dtypes}; move them to "
            f"one device and one dtype"
        )
    if x.device.type == "cuda" and x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"triton experts: {x.dtype} on CUDA is not supported (tensor cores "
            f"would round float32 to tf32); use bf16/fp16 or backend 'grouped_mm'"
        )
    check_kernel_device("triton experts", x.device, INTERPRETED, "backend 'grouped_mm'/'loop'")


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
) -> torch.Tensor:
    """y = down(silu(gate(x)) * up(x)) per expert, without host sync, through the custom op
    ``moe_ext::swiglu_experts``.

    x: [T', H] rows sorted by expert; gate_up_proj: [E, 2F, H] (gate rows, then up rows);
    down_proj: [E, H, F], all of one dtype (bf16/fp16 on CUDA; any float on CPU, under the
    interpreter); tokens_per_expert: [E] int64 on x's device, summing to T' (rows past the
    sum are left unwritten). block_m: rows per chunk (16/32/64), default from
    :func:`pick_block_m`. gpt-oss experts: gate_up_bias [E, 2F] (gate, then up), down_bias
    [E, H] in x's dtype, and ``swiglu_limit`` (with ``swiglu_alpha``) for the clamped
    SwiGLU. Returns y: [T', H] in x's dtype."""
    if block_m is not None and block_m not in BLOCK_M_CHOICES:
        raise ValueError(f"triton experts: block_m {block_m} not in {BLOCK_M_CHOICES}")
    check_operands(x, gate_up_proj, down_proj, tokens_per_expert, gate_up_bias, down_bias)
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
    )


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
) -> torch.Tensor:
    """The two kernel launches; arguments as in :func:`swiglu_experts_forward`."""
    check_operands(x, gate_up_proj, down_proj, tokens_per_expert, gate_up_bias, down_bias)
    num_experts, two_f, hidden = gate_up_proj.shape
    ffn = two_f // 2
    x = x.contiguous()
    gate_up_proj, down_proj = gate_up_proj.contiguous(), down_proj.contiguous()
    gate_up_bias = gate_up_bias.contiguous() if gate_up_bias is not None else None
    down_bias = down_bias.contiguous() if down_bias is not None else None
    clamp = None if swiglu_limit is None else (swiglu_alpha, swiglu_limit)
    hidden_act = x.new_empty(x.shape[0], ffn)  # [T', F]
    y = x.new_empty(x.shape[0], hidden)  # [T', H]
    if x.shape[0] == 0 or ffn == 0:
        return y.zero_()
    _launch(x, gate_up_proj, gate_up_bias, tokens_per_expert, hidden_act, ffn, True, block_m, clamp)
    _launch(hidden_act, down_proj, down_bias, tokens_per_expert, y, hidden, False, block_m)
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
):
    check_operands(x, gate_up_proj, down_proj, tokens_per_expert, gate_up_bias, down_bias)
    return x.new_empty(x.shape[0], gate_up_proj.shape[2])  # [T', H]

"""Weight-streaming projections for few rows (decode): up to three dense weights in one launch.

# T rows, K in features, N_i out features of weight i, N = N_0 + N_1 + N_2

At decode sizes a projection is a read of its weight: attention's q/k/v/o and the LM head
move megabytes while the rows are a few kilobytes. cuBLAS picks GEMV-shaped kernels for
them that reached about 37% of HBM bandwidth on an H200 (docs/PERF.md, batch-1 profile),
and k/v's narrow weights (N = 512 for qwen3-30b-a3b) leave most SMs idle. This kernel
gives each program one BLOCK_N-row stripe of one weight, streams the stripe's K in BLOCK_K
tiles through a software pipeline, and multiplies the rows (padded to BLOCK_M >= 16 for
the tensor cores; the padding costs FLOPs, which are free here, not bytes). Several
weights sharing the input (q, k and v) are one launch over the concatenation of their
stripes, so the narrow ones ride along with the wide one, and the outputs land side by
side in one [T, N] tensor. Accumulation in float32, the output in x's dtype.

The op ``moe_ext::fused_gemv`` (functional; fake implementation for shapes) keeps the
kernel one opaque node under ``torch.compile``. No host sync (CUDA-graph capturable). On
CUDA it is autotuned per (N, K, BLOCK_M): the first call of a shape benchmarks the configs
and must run outside CUDA-graph capture (decode's warm-up step does). On CPU it runs only
under Triton's interpreter (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ext.moe.kernels import check_kernel_inputs

MAX_WEIGHTS = 3  # q, k and v
BLOCK_M_CHOICES = (16, 32, 64)  # tl.dot needs M >= 16; rows above the last are refused
MAX_ROWS = BLOCK_M_CHOICES[-1]


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _gemv_kernel(
    x_ptr,
    w0_ptr,
    w1_ptr,
    w2_ptr,
    out_ptr,
    T,
    N0,
    N1,
    N2,
    N,
    K,
    stride_x,
    stride_out,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # N (the sum) only keys the autotuner
    pid = tl.program_id(0)
    tiles0 = tl.cdiv(N0, BLOCK_N)
    tiles1 = tl.cdiv(N1, BLOCK_N)
    if pid < tiles0:  # this program's stripe: which weight, which rows, which output columns
        w_ptr = w0_ptr
        n_start = pid * BLOCK_N
        n_end = N0
        col0 = 0
    elif pid < tiles0 + tiles1:
        w_ptr = w1_ptr
        n_start = (pid - tiles0) * BLOCK_N
        n_end = N1
        col0 = N0
    else:
        w_ptr = w2_ptr
        n_start = (pid - tiles0 - tiles1) * BLOCK_N
        n_end = N2
        col0 = N0 + N1
    offs_n = n_start + tl.arange(0, BLOCK_N)  # [BLOCK_N] weight rows
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M] input rows
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < n_end
    m_mask = offs_m < T
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * K  # [BLOCK_N, 1]
    x_rows = x_ptr + offs_m[:, None] * stride_x  # [BLOCK_M, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0)  # [BN, BK]
            x = tl.load(x_rows + k[None, :], mask=m_mask[:, None], other=0.0)  # [BM, BK]
        else:
            k_mask = k < K
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))  # [BM, BN]
    out = out_ptr + offs_m[:, None] * stride_out + col0 + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# (BLOCK_N, BLOCK_K, num_warps, num_stages): narrow stripes so a 512-row weight still
# makes 16-32 programs and a 2048-row one fills the SMs; deep pipelines keep enough bytes
# in flight per SM for HBM.
_SHAPES = [
    (16, 256, 4, 4),
    (16, 512, 4, 3),
    (32, 128, 4, 4),
    (32, 256, 4, 4),
    (32, 512, 8, 3),
    (64, 128, 4, 4),
    (64, 256, 8, 3),
]
_tuned = triton.autotune(
    [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n, k, w, s in _SHAPES
    ],
    key=["N", "K", "BLOCK_M"],
)(_gemv_kernel)
INTERPRETED = not isinstance(_gemv_kernel.fn, triton.runtime.jit.JITFunction)
_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 32}


def block_m(rows: int) -> int:
    """The row tile for ``rows`` input rows (at most MAX_ROWS)."""
    return next(m for m in BLOCK_M_CHOICES if m >= rows)


def check_operands(x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    """One-line errors when :func:`fused_gemv` cannot run these operands."""
    if not 1 <= len(weights) <= MAX_WEIGHTS:
        raise ValueError(f"fused_gemv: {len(weights)} weights; pass 1 to {MAX_WEIGHTS}")
    if x.dim() != 2 or x.shape[0] > MAX_ROWS or x.stride(1) != 1:
        raise ValueError(
            f"fused_gemv: x {list(x.shape)} must be [T, K] with T <= {MAX_ROWS} and "
            f"contiguous rows; use torch.nn.functional.linear for more rows"
        )
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != x.shape[1] or not w.is_contiguous():
            raise ValueError(
                f"fused_gemv: weight {i} {list(w.shape)} must be a contiguous [N, {x.shape[1]}]"
            )
        if w.dtype != x.dtype:
            raise ValueError(
                f"fused_gemv: weight {i} is {w.dtype}, x is {x.dtype}; pass both in one dtype"
            )
    devices = {x.device, *(w.device for w in weights)}
    check_kernel_inputs("fused_gemv", x, devices, INTERPRETED, "torch.nn.functional.linear")


def fused_gemv(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """x @ concat(weights)^T without concatenating the weights, through the custom op
    ``moe_ext::fused_gemv``.

    x: [T, K], T <= MAX_ROWS, bf16/fp16 on CUDA (any float on CPU under the interpreter);
    weights: 1 to 3 contiguous [N_i, K] in x's dtype. Returns [T, N_0 + N_1 + N_2] in x's
    dtype: weight i's outputs in columns [N_0 + ... + N_{i-1}, ... + N_i)."""
    check_operands(x, weights)
    return torch.ops.moe_ext.fused_gemv(x, list(weights))


@torch.library.custom_op("moe_ext::fused_gemv", mutates_args=())
def _fused_gemv_op(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """Arguments as in :func:`fused_gemv`."""
    check_operands(x, weights)
    sizes = [w.shape[0] for w in weights]
    out = x.new_empty(x.shape[0], sum(sizes))  # [T, N]
    if out.numel() == 0:
        return out
    padded = list(weights) + [weights[0]] * (MAX_WEIGHTS - len(weights))  # N_i = 0: unread
    sizes = sizes + [0] * (MAX_WEIGHTS - len(sizes))
    args = (x, *padded, out, x.shape[0], *sizes, out.shape[1], x.shape[1])
    args += (x.stride(0), out.stride(0))
    bm = block_m(x.shape[0])

    def grid(cfg):
        return (sum(triton.cdiv(n, cfg["BLOCK_N"]) for n in sizes),)

    if x.device.type == "cpu":
        _gemv_kernel[grid(_INTERPRETER_CONFIG)](*args, BLOCK_M=bm, **_INTERPRETER_CONFIG)
    else:
        _tuned[grid](*args, BLOCK_M=bm)
    return out


@_fused_gemv_op.register_fake
def _fused_gemv_fake(x, weights):
    check_operands(x, weights)
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))  # [T, N]

"""Fused softmax top-k router: logits, softmax, top-k, renormalisation, scaling and the
expert-load counters in one Triton launch.

# T tokens, H hidden, E experts, k top-k, BLOCK_T tokens per program,
# E_POW2 = E rounded up to a power of two, S expert splits, E_CHUNK = E_POW2 / S

At decode sizes the unfused router is a chain of tiny kernels (casts, GEMM, softmax,
top-k, sum, divide, scatter-add), each dominated by launch latency, and the work is a read
of the [E, H] weight (512 KiB for qwen3-30b-a3b). One program cannot stream that at HBM
speed (a single SM keeps only tens of KiB in flight), so the grid is
(token blocks, S expert splits), S chosen so that about a hundred programs share the read:
1. program (b, s) accumulates the logits of its BLOCK_T tokens against experts
   [s*E_CHUNK, (s+1)*E_CHUNK), H in BLOCK_H chunks: tiles of x and of the weight are
   upcast to float32, multiplied elementwise and summed in float32 (no tensor cores, so no
   tf32 rounding of float32 inputs), and stored to a float32 scratch [T, E]. Past
   DOT_MIN_TOKENS tokens with x and the weight both bf16 (or both fp16) the tiles go to
   the tensor cores instead (``DOT``, 16-token blocks): a product of two bf16 values is
   exact in float32 and the accumulation is float32, so the logits are the same sums in
   another fixed order, and the programs are not bound by elementwise FMAs (the
   elementwise form took 37 us per layer at 64 tokens on an H200, 6 at one token);
2. it then counts itself in the token block's arrival counter (an atomic with
   acquire-release semantics after a CTA barrier, so its scratch stores are visible to
   whichever program comes last); the last of the S programs reads the block's full
   logits back and
3. adds the logit bias when there is one (gpt-oss), takes the softmax over E in float32
   and picks k experts by iterated max over the logits (the softmax is monotone in them),
   the lowest expert id on ties;
4. weighs each pick by its softmax probability, optionally renormalises the k weights to
   sum to one (equal, up to rounding, to a softmax over the k picked logits: gpt-oss'
   ``topk_softmax``) and multiplies by the routed scaling factor, stores weights and ids, adds 1
   per pick to ``expert_load`` with atomics, and resets the arrival counter to zero.
Selection on logits equals selection on probabilities except where distinct logits round
to one probability, which only an exact tie in probability could make observable. Each
logit is summed in one fixed order whatever the arrival order: results are deterministic.

The arrival counters are one zeroed int32 buffer per device, left zeroed by every launch.
The first call on a device allocates it and must run outside CUDA-graph capture (the
warm-up a compiled decode step runs anyway; a first call inside capture is refused, as an
allocation there would belong to the graph's memory pool). Launches that share a device
must therefore not overlap in time on different streams; on one stream they cannot.

The op ``moe_ext::softmax_topk_router`` (mutates ``expert_load``; fake implementation for
shapes) makes the kernel one opaque node under ``torch.compile``. No host sync, fixed
launch configuration (no autotuning). On CPU it runs only under Triton's interpreter
(tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ext.moe.kernels import check_kernel_device

MAX_EXPERTS = 512
MAX_TOP_K = 16
MAX_HIDDEN = 8192
# Elements of the [BLOCK_T, E_CHUNK, BLOCK_H] product tile per H step: keeps it in
# registers (4 warps, 64 per thread).
_TILE_ELEMENTS = 8192
_TARGET_PROGRAMS = 128  # enough programs to spread the weight read over most SMs
_MAX_SPLITS = 32  # arrivals per counter: bounds the atomics serialised on one address
DOT_MIN_TOKENS = 33  # from here bf16/fp16 operands take the tensor cores (docstring, 1.)
_DOT_BLOCK = 16  # tl.dot's smallest M and N: tokens per block, experts per split
_DOT_BLOCK_H = 128


@triton.jit
def _softmax_topk_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    load_ptr,
    weights_ptr,
    idx_ptr,
    logits_ptr,
    arrivals_ptr,
    T,
    H,
    E,
    scale,
    stride_xt,
    stride_we,
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    RENORM: tl.constexpr,
    SCALE: tl.constexpr,
    RECORD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    E_POW2: tl.constexpr,
    E_CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT: tl.constexpr,
):
    """x: [T, H] (row stride stride_xt); w: [E, H] (row stride stride_we), H contiguous in
    both; bias: [E] (read iff HAS_BIAS); load: [E] int64; weights: [T, TOP_K] float32;
    idx: [T, TOP_K] int64; logits: [T, E] float32 scratch; arrivals: [token blocks] int32,
    zero on entry and exit. Grid: (token blocks, E_POW2 // E_CHUNK)."""
    block = tl.program_id(0)
    split = tl.program_id(1)
    offs_t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T

    # 1. this program's [BLOCK_T, E_CHUNK] slice of the logits
    offs_c = split * E_CHUNK + tl.arange(0, E_CHUNK)
    c_mask = offs_c < E
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt  # [BLOCK_T, 1]
    w_rows = w_ptr + offs_c.to(tl.int64)[:, None] * stride_we  # [E_CHUNK, 1]
    acc = tl.zeros((BLOCK_T, E_CHUNK), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        xt = tl.load(
            x_rows + offs_h[None, :], mask=t_mask[:, None] & h_mask[None, :], other=0.0
        )  # [BLOCK_T, BLOCK_H]
        wt = tl.load(
            w_rows + offs_h[None, :], mask=c_mask[:, None] & h_mask[None, :], other=0.0
        )  # [E_CHUNK, BLOCK_H]
        if DOT:  # bf16 x bf16 (fp16 x fp16): exact products, float32 sums
            acc += tl.dot(xt, tl.trans(wt))  # [BLOCK_T, E_CHUNK]
        else:
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
            acc += tl.sum(xt[:, None, :] * wt[None, :, :], axis=2)  # [BLOCK_T, E_CHUNK]
    scratch_rows = logits_ptr + offs_t.to(tl.int64)[:, None] * E  # [BLOCK_T, 1]
    tl.store(scratch_rows + offs_c[None, :], acc, mask=t_mask[:, None] & c_mask[None, :])

    # 2. the last program of the token block to arrive finishes it
    tl.debug_barrier()  # every thread's scratch stores precede the release below
    arrived = tl.atomic_add(arrivals_ptr + block, 1, sem="acq_rel", scope="gpu")
    if arrived == E_POW2 // E_CHUNK - 1:
        tl.debug_barrier()  # the acquire above precedes every thread's scratch loads
        offs_e = tl.arange(0, E_POW2)
        e_mask = offs_e < E
        logits = tl.load(
            scratch_rows + offs_e[None, :],
            mask=t_mask[:, None] & e_mask[None, :],
            other=0.0,
            cache_modifier=".cg",
        )  # [BLOCK_T, E_POW2], L2 only
        if HAS_BIAS:
            logits += tl.load(bias_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)[None, :]
        logits = tl.where(e_mask[None, :], logits, float("-inf"))

        # 3. softmax statistics and top-k by iterated max
        row_max = tl.max(logits, axis=1)  # [BLOCK_T]
        denom = tl.sum(tl.exp(logits - row_max[:, None]), axis=1)  # [BLOCK_T]
        offs_k = tl.arange(0, K_POW2)
        top_w = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
        top_i = tl.zeros((BLOCK_T, K_POW2), dtype=tl.int32)
        remaining = logits
        for j in tl.static_range(TOP_K):
            best = tl.max(remaining, axis=1)  # [BLOCK_T]
            pick = tl.min(tl.where(remaining == best[:, None], offs_e[None, :], E_POW2), axis=1)
            # A NaN row matches nothing: keep the id in range so the counters stay in bounds.
            pick = tl.minimum(pick, E - 1)
            prob = tl.exp(best - row_max) / denom  # [BLOCK_T] softmax probability of the pick
            top_w = tl.where(offs_k[None, :] == j, prob[:, None], top_w)
            top_i = tl.where(offs_k[None, :] == j, pick[:, None], top_i)
            remaining = tl.where(offs_e[None, :] == pick[:, None], float("-inf"), remaining)

        # 4. weights, outputs, load counters; leave the arrival counter zeroed
        k_mask = offs_k < TOP_K
        if RENORM:
            top_w = top_w / tl.sum(top_w, axis=1)[:, None]  # columns past TOP_K hold 0
        if SCALE:
            top_w = top_w * scale
        out_mask = t_mask[:, None] & k_mask[None, :]
        out_offs = offs_t.to(tl.int64)[:, None] * TOP_K + offs_k[None, :]  # [BLOCK_T, K_POW2]
        tl.store(weights_ptr + out_offs, top_w, mask=out_mask)
        tl.store(idx_ptr + out_offs, top_i.to(tl.int64), mask=out_mask)
        if RECORD:
            ones = tl.full((BLOCK_T, K_POW2), 1, dtype=tl.int64)
            tl.atomic_add(load_ptr + top_i, ones, mask=out_mask, sem="relaxed")
        tl.atomic_xchg(arrivals_ptr + block, 0)


INTERPRETED = not isinstance(_softmax_topk_kernel, triton.runtime.jit.JITFunction)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _prev_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def launch_config(num_tokens: int, num_experts: int, hidden: int, dot: bool = False) -> dict:
    """Static launch parameters from the shapes. One token per program up to 32 tokens,
    four beyond while the tile allows (each program re-reads its weight rows from L2:
    fewer reads); the experts split S-ways so that about _TARGET_PROGRAMS programs read the
    weight. BLOCK_T * E_CHUNK * BLOCK_H <= _TILE_ELEMENTS (E <= 512, BLOCK_H >= 16).
    ``dot`` (x and weight both bf16 or both fp16): from DOT_MIN_TOKENS tokens, 16-token
    blocks on the tensor cores, at least 16 experts per split."""
    e_pow2 = max(_next_pow2(num_experts), 2)
    if dot and num_tokens >= DOT_MIN_TOKENS:
        e_pow2 = max(e_pow2, _DOT_BLOCK)
        blocks = -(-num_tokens // _DOT_BLOCK)
        splits = min(
            e_pow2 // _DOT_BLOCK, _MAX_SPLITS, _prev_pow2(max(_TARGET_PROGRAMS // blocks, 1))
        )
        return dict(
            BLOCK_T=_DOT_BLOCK,
            E_POW2=e_pow2,
            E_CHUNK=e_pow2 // splits,
            BLOCK_H=max(16, min(_next_pow2(hidden), _DOT_BLOCK_H)),
            DOT=True,
            num_warps=4,
        )
    for block_t in (4, 1) if num_tokens > 32 else (1,):
        blocks = -(-num_tokens // block_t)
        splits = min(e_pow2, _MAX_SPLITS, _prev_pow2(_TARGET_PROGRAMS // blocks))
        e_chunk = e_pow2 // splits
        if block_t * e_chunk * 16 <= _TILE_ELEMENTS:
            break
    block_h = max(16, min(_next_pow2(hidden), _TILE_ELEMENTS // (block_t * e_chunk)))
    return dict(
        BLOCK_T=block_t, E_POW2=e_pow2, E_CHUNK=e_chunk, BLOCK_H=block_h, DOT=False, num_warps=4
    )


_arrivals: dict[torch.device, torch.Tensor] = {}  # device -> zeroed int32 counters


def _arrival_counters(device: torch.device, blocks: int) -> torch.Tensor:
    """The zeroed counters of ``device``, at least ``blocks`` of them (allocated, or
    grown, on first need, which must not be inside CUDA-graph capture)."""
    counters = _arrivals.get(device)
    if counters is None or counters.numel() < blocks:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(
                f"fused router: first call with {blocks} token blocks on {device} "
                f"is inside CUDA-graph capture; run the step once before "
                f"capturing (warm-up)"
            )
        counters = torch.zeros(max(blocks, 1024), dtype=torch.int32, device=device)
        _arrivals[device] = counters
    return counters


def check_operands(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_load: torch.Tensor,
    top_k: int,
    bias: torch.Tensor | None = None,
) -> None:
    """Raise a one-line ValueError when these operands cannot run on the router kernel."""
    if bias is not None and (
        bias.shape != weight.shape[:1]
        or not bias.is_floating_point()
        or bias.device != weight.device
    ):
        raise ValueError(
            f"fused router: bias {bias.dtype} {tuple(bias.shape)} on {bias.device} must be "
            f"a float [{weight.shape[0]}] on {weight.device}"
        )
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fused router: x {tuple(x.shape)} and weight {tuple(weight.shape)} "
            f"must be [T, H] and [E, H]"
        )
    num_experts, hidden = weight.shape
    if not 1 <= num_experts <= MAX_EXPERTS or not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(
            f"fused router: E={num_experts}, H={hidden} outside E <= "
            f"{MAX_EXPERTS}, H <= {MAX_HIDDEN}; use the unfused router"
        )
    if not 1 <= top_k <= min(MAX_TOP_K, num_experts):
        raise ValueError(
            f"fused router: top_k={top_k} must be in [1, min({MAX_TOP_K}, "
            f"E={num_experts})]; use the unfused router"
        )
    if (
        expert_load.shape != (num_experts,)
        or expert_load.dtype != torch.int64
        or (num_experts > 1 and expert_load.stride(0) != 1)
    ):
        raise ValueError(
            f"fused router: expert_load must be contiguous int64 [{num_experts}], "
            f"got {expert_load.dtype} {tuple(expert_load.shape)}"
        )
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise ValueError(
            f"fused router: x and weight must be floating point, got {x.dtype} and {weight.dtype}"
        )
    if len({x.device, weight.device, expert_load.device}) != 1:
        raise ValueError(
            f"fused router: x on {x.device}, weight on {weight.device}, "
            f"expert_load on {expert_load.device}; move them to one device"
        )
    check_kernel_device("fused router", x.device, INTERPRETED, "the unfused router")


def softmax_topk_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_load: torch.Tensor,
    top_k: int,
    *,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    record_load: bool = True,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing in one launch of ``moe_ext::softmax_topk_router``.

    x: [T, H] any float dtype (bf16/fp16/fp32 on CUDA); weight: [E, H] any float dtype;
    expert_load: [E] int64, incremented by the picks when ``record_load``; bias: [E] any
    float dtype, added to the logits (None: no bias). E <= 512, H <= 8192,
    top_k <= min(16, E). Logits and everything after them in float32.
    Returns (weights [T, k] float32, expert_idx [T, k] int64, descending weight order)."""
    check_operands(x, weight, expert_load, top_k, bias)
    return torch.ops.moe_ext.softmax_topk_router(
        x,
        weight,
        expert_load,
        top_k,
        norm_topk_prob,
        float(routed_scaling_factor),
        record_load,
        bias,
    )


@torch.library.custom_op("moe_ext::softmax_topk_router", mutates_args=("expert_load",))
def _softmax_topk_router_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_load: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    record_load: bool,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel launch; arguments as in :func:`softmax_topk_router`."""
    check_operands(x, weight, expert_load, top_k, bias)
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=x.device)  # [T, k]
    expert_idx = torch.empty(num_tokens, top_k, dtype=torch.int64, device=x.device)  # [T, k]
    if num_tokens == 0:
        return weights, expert_idx
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    # (Triton's interpreter holds bf16 as uint16 and cannot dot it: its tests run fp16)
    dot = x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
    dot = dot and not (INTERPRETED and x.dtype == torch.bfloat16)
    config = launch_config(num_tokens, num_experts, hidden, dot)
    blocks = triton.cdiv(num_tokens, config["BLOCK_T"])
    grid = (blocks, config["E_POW2"] // config["E_CHUNK"])
    logits = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=x.device)
    _softmax_topk_kernel[grid](
        x,
        weight,
        bias.contiguous() if bias is not None else weight,  # never read without HAS_BIAS
        expert_load,
        weights,
        expert_idx,
        logits,
        _arrival_counters(x.device, blocks),
        num_tokens,
        hidden,
        num_experts,
        routed_scaling_factor,
        x.stride(0),
        weight.stride(0),
        TOP_K=top_k,
        K_POW2=_next_pow2(top_k),
        RENORM=norm_topk_prob,
        SCALE=routed_scaling_factor != 1.0,
        RECORD=record_load,
        HAS_BIAS=bias is not None,
        **config,
    )
    return weights, expert_idx


@_softmax_topk_router_op.register_fake
def _softmax_topk_router_fake(
    x, weight, expert_load, top_k, norm_topk_prob, routed_scaling_factor, record_load, bias=None
):
    check_operands(x, weight, expert_load, top_k, bias)
    weights = x.new_empty(x.shape[0], top_k, dtype=torch.float32)  # [T, k]
    return weights, x.new_empty(x.shape[0], top_k, dtype=torch.int64)

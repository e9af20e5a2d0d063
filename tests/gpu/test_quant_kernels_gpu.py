"""Quantized-weight Triton kernels on the GPU (compiled, autotuned): fp8 block-scaled and
MXFP4 experts (``swiglu_experts_forward``) and ``quantized_linear``, with bf16 rows at
realistic shapes, against the dequantized path; eager, CUDA-graph replay with new rows and
routing, and torch.compile(fullgraph=True, inductor) inside a CUDA graph.

# T' rows sorted by expert, H hidden, F FFN size, E experts; linear: T rows, K in, N out

Error bound, stated once: ||y - ref|| / ||ref|| < REL_TOL (Frobenius norms) where ref is
computed in float32 on the dequantized float32 weights from the same bf16 rows. The
kernels round h (the SwiGLU output, [T', F]) and y to bf16 and feed bf16 operands to the
tensor cores, so a few bf16 ulps (2^-8 relative each) separate them from ref: 2e-2 leaves
~5x margin. The dense bf16 kernel on bf16-dequantized weights (the path these kernels
replace) is held to the same bound, and the two paths to each other. (Feeding FP8 tensor
cores instead, with the rows quantized to e4m3 per k-tile, was measured at 4-5% relative
error and no faster: 2026-11-30, H200.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_ext.moe.experts import clamped_swiglu
from moe_ext.quant.formats import dequantize_fp8, dequantize_mxfp4, quantize_fp8, quantize_mxfp4
from tests.support import capture_compiled, needs_triton

pytestmark = [pytest.mark.gpu, needs_triton]

REL_TOL = {"fp8": 2e-2, "mxfp4": 2e-2}
BLOCK = (128, 128)  # fp8 weight_block_size of the public checkpoints
ALPHA, LIMIT = 1.702, 7.0  # gpt-oss' clamped SwiGLU
SHAPES = {  # name: (E, H, F, top_k)
    "qwen3_30b_a3b": (16, 2048, 768, 8),  # 16 of its 128 experts
    "gpt_oss": (16, 2880, 768, 4),  # H = 2880: partial 128-column fp8 blocks
}


def _kernels():
    from moe_ext.moe.kernels import grouped_gemm

    return grouped_gemm


def rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def quantize(weight, weight_format):
    """float32 weight [..., R, C] on the GPU -> (stored, scale, dequantized float32)."""
    if weight_format == "fp8":
        q, scale = quantize_fp8(weight, BLOCK)
        return q, scale, dequantize_fp8(q, scale, BLOCK)
    blocks, scales = quantize_mxfp4(weight)
    return blocks, scales, dequantize_mxfp4(blocks, scales)


def make_experts(shape, weight_format, gpt_oss=False, seed=0):
    num_experts, hidden, ffn, _ = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * ffn, hidden, device="cuda", generator=gen)
    down = torch.randn(num_experts, hidden, ffn, device="cuda", generator=gen)
    gate_up_q, gate_up_scale, gate_up_deq = quantize(gate_up * hidden**-0.5, weight_format)
    down_q, down_scale, down_deq = quantize(down * ffn**-0.5, weight_format)
    biases = (None, None)
    if gpt_oss:
        biases = tuple(
            0.1 * torch.randn(num_experts, n, device="cuda", generator=gen).bfloat16()
            for n in (2 * ffn, hidden)
        )
    return dict(
        stored=(gate_up_q, down_q),
        kwargs=dict(
            weight_format=weight_format,
            gate_up_scale=gate_up_scale,
            down_scale=down_scale,
            fp8_block=BLOCK,
            gate_up_bias=biases[0],
            down_bias=biases[1],
            swiglu_limit=LIMIT if gpt_oss else None,
            swiglu_alpha=ALPHA,
        ),
        dequantized=(gate_up_deq, down_deq),
    )


def reference(x, experts, counts):
    """float32 per-expert SwiGLU on the dequantized weights. x: [T', H] -> [T', H] fp32."""
    gate_up, down = experts["dequantized"]
    kw = experts["kwargs"]
    out, start = [], 0
    for expert, rows in enumerate(counts.tolist()):  # host sync: test reference only
        h = x[start : start + rows].float() @ gate_up[expert].T  # [rows, 2F]
        if kw["gate_up_bias"] is not None:
            h = h + kw["gate_up_bias"][expert].float()
        gate, up = h.chunk(2, dim=-1)
        if kw["swiglu_limit"] is None:
            act = F.silu(gate) * up
        else:
            act = clamped_swiglu(gate, up, ALPHA, kw["swiglu_limit"])
        y = act @ down[expert].T  # [rows, H]
        if kw["down_bias"] is not None:
            y = y + kw["down_bias"][expert].float()
        out.append(y)
        start += rows
    return torch.cat(out, dim=0)


def routed_counts(rows, num_experts, top_k, seed):
    """tokens_per_expert [E] int64 of rows // top_k tokens routed top-k, built on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tokens = max(rows // top_k, 1)
    scores = torch.rand(tokens, num_experts, device="cuda", generator=gen)
    idx = scores.topk(min(top_k, num_experts), dim=-1).indices.flatten()
    return torch.bincount(idx, minlength=num_experts).to(torch.int64)


def run_experts(x, experts, counts):
    return _kernels().swiglu_experts_forward(x, *experts["stored"], counts, **experts["kwargs"])


def dense_path(x, experts, counts):
    """The dense bf16 kernel on bf16-dequantized weights (what the quantized path replaces)."""
    kw = {k: v for k, v in experts["kwargs"].items() if "scale" not in k}
    kw.update(weight_format="dense", fp8_block=BLOCK)
    gate_up, down = (w.bfloat16() for w in experts["dequantized"])
    return _kernels().swiglu_experts_forward(x, gate_up, down, counts, **kw)


@pytest.mark.parametrize(
    "shape,weight_format,gpt_oss",
    [
        ("qwen3_30b_a3b", "fp8", False),
        ("qwen3_30b_a3b", "mxfp4", False),
        ("gpt_oss", "fp8", True),
        ("gpt_oss", "mxfp4", True),
    ],
)
def test_gpu_quantized_experts_match_dequantized(shape, weight_format, gpt_oss):
    num_experts, hidden, _, top_k = SHAPES[shape]
    experts = make_experts(shape, weight_format, gpt_oss)
    failures = []
    with torch.inference_mode():
        for rows in (1, 2, 8, 16, 64, 100, 256):
            counts = routed_counts(rows, num_experts, top_k, seed=rows)
            if rows == 100:  # skewed: every row to one expert, the others empty
                counts = torch.zeros_like(counts)
                counts[num_experts // 2] = rows
            x = torch.randn(int(counts.sum()), hidden, device="cuda", dtype=torch.bfloat16)
            y = run_experts(x, experts, counts)
            assert y.dtype == torch.bfloat16 and y.shape == x.shape
            ref = reference(x, experts, counts)
            errors = {
                "vs fp32 ref": rel_err(y, ref),
                "dense path vs fp32 ref": rel_err(dense_path(x, experts, counts), ref),
                "vs dense path": rel_err(y, dense_path(x, experts, counts)),
            }
            if not torch.isfinite(y).all() or max(errors.values()) >= REL_TOL[weight_format]:
                failures.append(f"T'={x.shape[0]}: {errors}")
    tol = REL_TOL[weight_format]
    assert not failures, f"{shape} {weight_format}: rel. errors >= {tol}: {failures}"


@pytest.mark.parametrize(
    "weight_format,out_features,in_features",
    [("fp8", 4096, 2048), ("fp8", 1000, 2880), ("mxfp4", 2880, 2880)],
)
def test_gpu_quantized_linear_matches_dequantized(weight_format, out_features, in_features):
    gen = torch.Generator(device="cuda").manual_seed(1)
    weight = torch.randn(out_features, in_features, device="cuda", generator=gen)
    stored, scale, dequantized = quantize(weight * in_features**-0.5, weight_format)
    bias = torch.randn(out_features, device="cuda", generator=gen).bfloat16()
    with torch.inference_mode():
        for rows in (1, 4, 16, 64, 200):
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
            for b in (None, bias):
                y = _kernels().quantized_linear(
                    x, stored, scale, weight_format=weight_format, fp8_block=BLOCK, bias=b
                )
                ref = x.float() @ dequantized.T + (0 if b is None else b.float())
                assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
                err = rel_err(y, ref)
                assert err < REL_TOL[weight_format], f"T={rows} bias={b is not None}: {err:.3g}"


def _layer(experts, linear):
    """experts then a dense quantized projection: the decode step's quantized ops."""
    stored, scale, weight_format = linear

    def forward(x, counts):
        h = run_experts(x, experts, counts)  # [T', H]
        return _kernels().quantized_linear(
            h, stored, scale, weight_format=weight_format, fp8_block=BLOCK
        )  # [T', N]

    return forward


def _layer_reference(x, experts, linear_deq, counts):
    return reference(x, experts, counts).bfloat16().float() @ linear_deq.T


def _check_replays(graph, forward_inputs, y, experts, linear_deq, num_experts, top_k, tol):
    x, counts = forward_inputs
    skewed = torch.zeros_like(counts)
    skewed[0] = x.shape[0]
    for i, new_counts in enumerate([routed_counts(x.shape[0], num_experts, top_k, 9), skewed]):
        x.copy_(torch.randn_like(x))  # new rows, same T'
        counts.copy_(new_counts)
        graph.replay()
        torch.cuda.synchronize()
        err = rel_err(y, _layer_reference(x, experts, linear_deq, counts))
        assert err < tol, f"replay {i}: rel. error {err:.3g}"


@pytest.mark.parametrize("weight_format", ["fp8", "mxfp4"])
def test_gpu_cuda_graph_replay_follows_new_rows_and_routing(weight_format):
    num_experts, hidden, _, top_k = SHAPES["qwen3_30b_a3b"]
    experts = make_experts("qwen3_30b_a3b", weight_format, seed=2)
    w = torch.randn(1024, hidden, device="cuda") * hidden**-0.5
    stored, scale, linear_deq = quantize(w, weight_format)
    forward = _layer(experts, (stored, scale, weight_format))
    rows = 64
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    counts = routed_counts(rows, num_experts, top_k, seed=3)
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: autotune and compile outside capture
            forward(x, counts)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = forward(x, counts)
        _check_replays(
            graph, (x, counts), y, experts, linear_deq, num_experts, top_k, REL_TOL[weight_format]
        )


@pytest.mark.parametrize("weight_format", ["fp8", "mxfp4"])
def test_gpu_inductor_fullgraph_inside_cuda_graph(weight_format):
    """The quantized ops under inductor (fullgraph, static shapes), captured in one CUDA
    graph: batch-1 decode (one token, top-8) follows new rows and routing on replay."""
    num_experts, hidden, _, top_k = SHAPES["qwen3_30b_a3b"]
    experts = make_experts("qwen3_30b_a3b", weight_format, seed=4)
    w = torch.randn(512, hidden, device="cuda") * hidden**-0.5
    stored, scale, linear_deq = quantize(w, weight_format)
    forward = _layer(experts, (stored, scale, weight_format))
    x = torch.randn(top_k, hidden, device="cuda", dtype=torch.bfloat16)
    counts = routed_counts(top_k, num_experts, top_k, seed=5)
    with torch.inference_mode():
        graph, y = capture_compiled(forward, x, counts)
        _check_replays(
            graph, (x, counts), y, experts, linear_deq, num_experts, top_k, REL_TOL[weight_format]
        )

"""Triton SwiGLU experts kernels (moe_ext.moe.kernels.grouped_gemm) and the 'triton'
experts backend.

# T' rows sorted by expert, H hidden, F FFN size, E experts

CPU: the kernels run under Triton's interpreter, which Triton switches on at import time
from TRITON_INTERPRET=1; so `test_kernels_under_interpreter` reruns this file's
`test_cpu_*` cases in a child pytest with that variable set (they skip in a process where
the kernels are compiled). Reference: float64 per-expert loop. The custom op
``moe_ext::swiglu_experts`` is checked with ``torch.library.opcheck`` and traced by
``torch.compile(fullgraph=True)`` as one opaque node. GPU (marked): the compiled kernels in
bf16 against GroupedExperts' grouped_mm backend, eager, CUDA-graph replay, and under
inductor inside a CUDA graph.
Everything Triton-specific skips when triton is not importable (CI installs only the
project's dependencies; CUDA torch brings triton).
"""

import pytest
import torch
import torch.nn.functional as F

from moe_ext.moe.experts import GroupedExperts
from tests.support import (
    capture_compiled,
    count_op_nodes,
    graph_recorder,
    needs_interpreter,
    needs_triton,
    run_cpu_cases_in_interpreter,
)


def _kernels():
    from moe_ext.moe.kernels import grouped_gemm

    return grouped_gemm


def reference(x, gate_up_proj, down_proj, tokens_per_expert):
    """float64 per-expert SwiGLU. x: [T', H]; returns [T', H] float64."""
    out, start = [], 0
    for expert, rows in enumerate(tokens_per_expert.tolist()):
        xe = x[start : start + rows].double()  # [rows, H]
        gate, up = (xe @ gate_up_proj[expert].double().T).chunk(2, dim=-1)  # [rows, F]
        out.append((F.silu(gate) * up) @ down_proj[expert].double().T)  # [rows, H]
        start += rows
    return torch.cat(out, dim=0)


def make_problem(counts, hidden, ffn, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens_per_expert = torch.tensor(counts, dtype=torch.int64)
    num_experts, rows = len(counts), int(tokens_per_expert.sum())
    x = torch.randn(rows, hidden, generator=gen)
    gate_up = torch.randn(num_experts, 2 * ffn, hidden, generator=gen) * hidden**-0.5
    down = torch.randn(num_experts, hidden, ffn, generator=gen) * ffn**-0.5
    return [t.to(device=device, dtype=dtype) for t in (x, gate_up, down)] + [
        tokens_per_expert.to(device)
    ]


# ---- CPU: interpreter (child process) --------------------------------------------------


@needs_triton
def test_kernels_under_interpreter():
    run_cpu_cases_in_interpreter(__file__)


CASES = {  # name: (tokens_per_expert, H, F, block_m)
    "one_row_one_expert": ([1], 32, 16, None),
    "zero_row_experts": ([0, 0, 5, 0], 33, 17, None),
    "all_rows_one_expert_chunks": ([0, 37, 0], 48, 24, 16),
    "uneven_non_pow2_experts": ([2, 3, 1, 0, 7], 40, 24, None),
    "block_m_32": ([9, 0, 33, 2], 32, 40, 32),
    "block_m_64": ([70, 1, 0], 24, 16, 64),
}


@needs_interpreter
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_matches_float64_reference(name):
    counts, hidden, ffn, block_m = CASES[name]
    x, gate_up, down, tokens_per_expert = make_problem(counts, hidden, ffn, torch.float32)
    y = _kernels().swiglu_experts_forward(x, gate_up, down, tokens_per_expert, block_m=block_m)
    want = reference(x, gate_up, down, tokens_per_expert)
    assert y.shape == (sum(counts), hidden) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_cpu_float16_rounds_like_reference():
    # (bf16 is checked on GPU: Triton 3.9's interpreter computes bf16 tl.dot wrongly.)
    x, gate_up, down, tokens_per_expert = make_problem([4, 0, 11], 64, 48, torch.float16)
    y = _kernels().swiglu_experts_forward(x, gate_up, down, tokens_per_expert)
    assert y.dtype == torch.float16
    torch.testing.assert_close(
        y.double(), reference(x, gate_up, down, tokens_per_expert), rtol=2e-2, atol=2e-3
    )


@needs_interpreter
def test_cpu_experts_backend_triton_equals_loop():
    torch.manual_seed(0)
    module = GroupedExperts(3, 32, 24, backend="triton")
    tokens_per_expert = torch.tensor([2, 0, 5])
    x = torch.randn(7, 32)
    with torch.no_grad():
        y = module(x, tokens_per_expert)
        module.backend = "loop"
        want = module(x, tokens_per_expert)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_cpu_swiglu_op_passes_opcheck():
    x, gate_up, down, tokens_per_expert = make_problem([3, 0, 2], 32, 16, torch.float32)
    torch.library.opcheck(
        torch.ops.moe_ext.swiglu_experts.default, (x, gate_up, down, tokens_per_expert, 16)
    )


@needs_interpreter
def test_cpu_swiglu_compiles_to_one_opaque_node():
    import torch._dynamo.testing

    x, gate_up, down, tokens_per_expert = make_problem([2, 5, 0, 1], 32, 24, torch.float32)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(_kernels().swiglu_experts_forward, backend=counter, fullgraph=True)
    y = compiled(x, gate_up, down, tokens_per_expert)
    assert counter.frame_count == 1
    torch.testing.assert_close(
        y.double(), reference(x, gate_up, down, tokens_per_expert), rtol=1e-5, atol=1e-5
    )
    graphs = []
    torch._dynamo.reset()
    torch.compile(
        _kernels().swiglu_experts_forward, backend=graph_recorder(graphs), fullgraph=True
    )(x, gate_up, down, tokens_per_expert)
    assert count_op_nodes(graphs, torch.ops.moe_ext.swiglu_experts) == 1


@needs_interpreter
def test_cpu_experts_module_compiles_fullgraph():
    import torch._dynamo.testing

    torch.manual_seed(1)
    module = GroupedExperts(4, 32, 16, backend="triton")
    tokens_per_expert = torch.tensor([3, 0, 1, 2])
    x = torch.randn(6, 32)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    with torch.no_grad():
        y = torch.compile(module, backend=counter, fullgraph=True)(x, tokens_per_expert)
        module.backend = "loop"
        want = module(x, tokens_per_expert)
    assert counter.frame_count == 1
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


# ---- CPU: selection and errors (no interpreter needed) ---------------------------------


def test_auto_never_picks_triton_on_cpu():
    module = GroupedExperts(2, 16, 8)
    with torch.no_grad():
        assert not module.uses_triton(torch.randn(3, 16), torch.tensor([1, 2]))


def test_triton_backend_refuses_gradients():
    module = GroupedExperts(2, 16, 8, backend="triton")
    with pytest.raises(ValueError, match="forward-only"):
        module(torch.randn(3, 16), torch.tensor([1, 2]))


def test_backend_questions_answer_instead_of_raising():
    """uses_triton / uses_grouped_mm say whether a path runs; only forward refuses a backend
    asked for by name that cannot run."""
    x, counts = torch.randn(3, 10), torch.tensor([1, 2])
    forced_triton = GroupedExperts(2, 10, 6, backend="triton")
    assert forced_triton.uses_triton(x, counts) is False  # gradient needed: forward-only
    assert forced_triton.uses_grouped_mm(x) is False
    forced_mm = GroupedExperts(2, 10, 6, backend="grouped_mm")  # 40-byte rows: not runnable
    assert forced_mm.uses_grouped_mm(x) is False and forced_mm.uses_triton(x, counts) is False
    with pytest.raises(ValueError, match="'grouped_mm' cannot run"):
        forced_mm(x, counts)
    loop = GroupedExperts(2, 16, 8, backend="loop")
    assert loop.uses_grouped_mm(torch.randn(3, 16)) is False  # qualifies, but not asked for
    assert GroupedExperts(2, 16, 8).uses_grouped_mm(torch.randn(3, 16)) is True


@needs_triton
def test_bad_operands_are_one_line_errors():
    kernels = _kernels()
    x, gate_up, down, tokens_per_expert = make_problem([1, 2], 16, 8, torch.float32)
    with pytest.raises(ValueError, match="int64"):
        kernels.check_operands(x, gate_up, down, tokens_per_expert.int())
    with pytest.raises(ValueError, match="down_proj"):
        kernels.check_operands(x, gate_up, down[:, :, :4], tokens_per_expert)
    with pytest.raises(ValueError, match="block_m"):
        kernels.swiglu_experts_forward(x, gate_up, down, tokens_per_expert, block_m=8)
    if not kernels.INTERPRETED:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            kernels.check_operands(x, gate_up, down, tokens_per_expert)


@needs_triton
def test_block_m_follows_balanced_share():
    pick = _kernels().pick_block_m
    assert pick(2, 8) == 16 and pick(256, 128) == 16
    assert pick(128, 8) == 32 and pick(256, 8) == 64 and pick(4096, 8) == 64


# ---- GPU -------------------------------------------------------------------------------

SHAPES = {"mixtral": (8, 4096, 14336), "qwen3_30b_a3b": (128, 2048, 768)}  # E, H, F


def _routed_counts(rows, num_experts, top_k, seed):
    """tokens_per_expert of rows//top_k tokens routed top-k (distinct experts per token),
    built on the GPU like a router's output."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tokens = max(rows // top_k, 1)
    scores = torch.rand(tokens, num_experts, device="cuda", generator=gen)
    idx = scores.topk(min(top_k, num_experts), dim=-1).indices.flatten()
    return torch.bincount(idx, minlength=num_experts).to(torch.int64)


def _gpu_module(name, seed=0):
    num_experts, hidden, ffn = SHAPES[name]
    torch.manual_seed(seed)
    return GroupedExperts(num_experts, hidden, ffn, dtype=torch.bfloat16, device="cuda")


def _close_to_grouped_mm(module, x, tokens_per_expert, label):
    with torch.inference_mode():
        module.backend = "triton"
        y = module(x, tokens_per_expert)
        module.backend = "grouped_mm"
        want = module(x, tokens_per_expert)
        module.backend = "auto"
    # bf16: h is rounded once after an fp32 SwiGLU here, after each of gate/up/product in
    # grouped_mm; the difference is a few bf16 ulps of the output scale.
    scale = want.float().abs().max().item()
    err = (y.float() - want.float()).abs().max().item()
    assert torch.isfinite(y).all(), f"{label}: non-finite output"
    assert err <= 2e-2 * scale, f"{label}: max |triton - grouped_mm| {err:.3g} vs scale {scale:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("name,top_k", [("mixtral", 2), ("qwen3_30b_a3b", 8)])
def test_gpu_triton_matches_grouped_mm(name, top_k):
    module = _gpu_module(name)
    num_experts = module.num_experts
    for rows in (1, 2, 16, 100, 256):
        counts = _routed_counts(rows, num_experts, top_k, seed=rows)
        if rows == 100:  # skewed: every row to one expert, the others empty
            counts = torch.zeros_like(counts)
            counts[num_experts // 2] = rows
        x = torch.randn(int(counts.sum()), module.hidden_size, device="cuda", dtype=torch.bfloat16)
        _close_to_grouped_mm(module, x, counts, f"{name} T'={x.shape[0]}")


@pytest.mark.gpu
def test_gpu_auto_selection():
    module = _gpu_module("qwen3_30b_a3b")
    counts = _routed_counts(16, module.num_experts, 8, seed=1)
    x = torch.randn(16, module.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        assert module.uses_triton(x, counts)
        big = torch.randn(
            module.triton_max_rows + 1, module.hidden_size, device="cuda", dtype=torch.bfloat16
        )
        assert not module.uses_triton(big, counts)
    assert not module.uses_triton(x, counts)  # grad enabled, weights require grad


def _check_replays(module, graph, x, counts, y, routings) -> None:
    """For each routing (counts [E]): new rows into the static x, the routing into the
    static counts, replay; the graph's output y must match the grouped_mm backend."""
    for i, new_counts in enumerate(routings):
        x.copy_(torch.randn_like(x))  # new rows, same T'
        counts.copy_(new_counts)
        graph.replay()
        torch.cuda.synchronize()
        module.backend = "grouped_mm"
        want = module(x, counts)
        module.backend = "triton"
        err = (y.float() - want.float()).abs().max().item()
        assert err <= 2e-2 * want.float().abs().max().item(), f"replay {i}: {err}"


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_follows_new_routing():
    module = _gpu_module("qwen3_30b_a3b")
    rows = 64
    x = torch.randn(rows, module.hidden_size, device="cuda", dtype=torch.bfloat16)
    counts = _routed_counts(rows, module.num_experts, 8, seed=2)
    with torch.inference_mode():
        module.backend = "triton"
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: autotune and compile outside capture
            module(x, counts)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = module(x, counts)
        all_to_expert_0 = torch.zeros_like(counts)
        all_to_expert_0[0] = rows
        _check_replays(
            module,
            graph,
            x,
            counts,
            y,
            [_routed_counts(rows, module.num_experts, 8, seed=3), all_to_expert_0],
        )


@pytest.mark.gpu
def test_gpu_experts_inductor_inside_cuda_graph():
    """GroupedExperts (triton backend) under inductor, fullgraph, static shapes, captured
    in one CUDA graph: replays follow new rows and a new routing."""
    module = _gpu_module("qwen3_30b_a3b")
    rows = 8  # batch-1 decode: one token, top-8
    x = torch.randn(rows, module.hidden_size, device="cuda", dtype=torch.bfloat16)
    counts = _routed_counts(rows, module.num_experts, 8, seed=5)
    module.backend = "triton"
    with torch.inference_mode():
        graph, y = capture_compiled(module, x, counts)
        _check_replays(
            module,
            graph,
            x,
            counts,
            y,
            [_routed_counts(rows, module.num_experts, 8, seed=seed) for seed in (6, 7)],
        )

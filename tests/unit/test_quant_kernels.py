"""Quantized weights in the Triton expert kernels (moe_ext.moe.kernels.grouped_gemm):
``swiglu_experts_forward(weight_format="fp8" | "mxfp4")`` and ``quantized_linear``.

# T' rows sorted by expert, H hidden, F FFN size, E experts; linear: T rows, K in, N out
# fp8 blocks (bo, bi); MXFP4 groups of 32 along the input dim

CPU: the kernels run under Triton's interpreter, switched on at import from
TRITON_INTERPRET=1, so `test_kernels_under_interpreter` reruns this file's `test_cpu_*`
cases in a child pytest with that variable set (they skip elsewhere). Shapes are tiny: the
interpreter runs every program in Python. Reference, independent of the kernels:
dequantize with moe_ext.quant.formats (exact in float32), then the SwiGLU (or gpt-oss'
clamped SwiGLU, moe_ext.moe.experts.clamped_swiglu) per expert in float64. Operand
errors need triton but no interpreter. The GPU checks (bf16, realistic shapes, CUDA graph,
torch.compile) are in tests/gpu/test_quant_kernels_gpu.py.
"""

import pytest
import torch
import torch.nn.functional as F

from moe_ext.moe.experts import clamped_swiglu
from moe_ext.quant.config import QuantizationError
from moe_ext.quant.formats import dequantize_fp8, dequantize_mxfp4, quantize_fp8, quantize_mxfp4
from tests.support import (
    count_op_nodes,
    graph_recorder,
    needs_interpreter,
    needs_triton,
    run_cpu_cases_in_interpreter,
)

ALPHA, LIMIT = 1.702, 7.0  # gpt-oss' clamped SwiGLU


def _kernels():
    from moe_ext.moe.kernels import grouped_gemm

    return grouped_gemm


def quantize(weight, weight_format, block):
    """weight [..., R, C] float32 -> (stored weight, scale, dequantized float32 weight)."""
    if weight_format == "fp8":
        q, scale = quantize_fp8(weight, block)
        return q, scale, dequantize_fp8(q, scale, block)
    blocks, scales = quantize_mxfp4(weight)
    return blocks, scales, dequantize_mxfp4(blocks, scales)


def reference(x, gate_up, down, counts, gate_up_bias=None, down_bias=None, limit=None):
    """Per-expert SwiGLU in float64 on dequantized weights. x: [T', H]; gate_up: [E, 2F, H];
    down: [E, H, F]; biases [E, 2F] / [E, H]. Returns [T', H] float64."""
    out, start = [], 0
    for expert, rows in enumerate(counts):
        xe = x[start : start + rows].double()  # [rows, H]
        h = xe @ gate_up[expert].double().T  # [rows, 2F]
        if gate_up_bias is not None:
            h = h + gate_up_bias[expert].double()
        gate, up = h.chunk(2, dim=-1)  # [rows, F]
        act = F.silu(gate) * up if limit is None else clamped_swiglu(gate, up, ALPHA, limit)
        y = act @ down[expert].double().T  # [rows, H]
        if down_bias is not None:
            y = y + down_bias[expert].double()
        out.append(y)
        start += rows
    return torch.cat(out, dim=0)


def make_problem(counts, hidden, ffn, weight_format, block=(16, 32), bias=False, seed=0):
    """Rows, quantized weights (and their dequantized copies) and optional biases."""
    gen = torch.Generator().manual_seed(seed)
    num_experts = len(counts)
    x = torch.randn(sum(counts), hidden, generator=gen)
    gate_up = torch.randn(num_experts, 2 * ffn, hidden, generator=gen) * hidden**-0.5
    down = torch.randn(num_experts, hidden, ffn, generator=gen) * ffn**-0.5
    gate_up_q, gate_up_scale, gate_up_deq = quantize(gate_up, weight_format, block)
    down_q, down_scale, down_deq = quantize(down, weight_format, block)
    biases = (
        (
            torch.randn(num_experts, 2 * ffn, generator=gen) * 0.5,
            torch.randn(num_experts, hidden, generator=gen) * 0.5,
        )
        if bias
        else (None, None)
    )
    return dict(
        x=x,
        tokens_per_expert=torch.tensor(counts, dtype=torch.int64),
        stored=(gate_up_q, down_q),
        kwargs=dict(
            weight_format=weight_format,
            gate_up_scale=gate_up_scale,
            down_scale=down_scale,
            fp8_block=block,
            gate_up_bias=biases[0],
            down_bias=biases[1],
        ),
        dequantized=(gate_up_deq, down_deq),
        biases=biases,
    )


def run_problem(problem, block_m=None, limit=None, dtype=torch.float32):
    """(kernel output, float64 reference) of a make_problem problem; x cast to ``dtype``."""
    x = problem["x"].to(dtype)
    kwargs = dict(problem["kwargs"])
    kwargs = {
        k: (v.to(dtype) if k.endswith("bias") and v is not None else v) for k, v in kwargs.items()
    }
    y = _kernels().swiglu_experts_forward(
        x,
        *problem["stored"],
        problem["tokens_per_expert"],
        block_m,
        swiglu_limit=limit,
        swiglu_alpha=ALPHA,
        **kwargs,
    )
    biases = [b.to(dtype) if b is not None else None for b in problem["biases"]]
    counts = problem["tokens_per_expert"].tolist()
    want = reference(x, *problem["dequantized"], counts, *biases, limit=limit)
    return y, want


# ---- CPU: interpreter (child process) --------------------------------------------------


@needs_triton
def test_kernels_under_interpreter():
    run_cpu_cases_in_interpreter(__file__)


# name: (format, tokens_per_expert, H, F, fp8 block, biases + clamped SwiGLU, block_m)
CASES = {
    # H = 48: the last fp8 column block is partial (bi = 32); empty experts in between
    "fp8_uneven_partial_block": ("fp8", [2, 0, 3, 1], 48, 32, (16, 32), False, None),
    # bi = 64 > BLOCK_K = 32: two k-tiles per scale block; H = 80: partial last block;
    # bo = 32 > F rows of the down projection's tile
    "fp8_ktiles_per_block": ("fp8", [0, 4, 0], 80, 32, (32, 64), False, None),
    # bi = 16: BLOCK_K shrinks to the block; gpt-oss options
    "fp8_bias_clamped_bi16": ("fp8", [3, 0, 2], 32, 16, (16, 16), True, None),
    "fp8_row_chunks": ("fp8", [0, 37], 32, 16, (16, 32), False, 16),
    "mxfp4_uneven": ("mxfp4", [1, 0, 4, 2], 64, 32, None, False, None),
    "mxfp4_bias_clamped": ("mxfp4", [3, 0, 2], 32, 64, None, True, None),
    "mxfp4_row_chunks": ("mxfp4", [0, 20, 0], 32, 32, None, False, 16),
}


@needs_interpreter
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_swiglu_matches_dequantized_reference(name):
    weight_format, counts, hidden, ffn, block, gpt_oss, block_m = CASES[name]
    problem = make_problem(counts, hidden, ffn, weight_format, block or (1, 32), bias=gpt_oss)
    # a small limit so the clamp bites on these unit-scale rows
    y, want = run_problem(problem, block_m=block_m, limit=0.5 if gpt_oss else None)
    assert y.shape == (sum(counts), hidden) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_cpu_clamp_changes_the_result():
    """The clamped case above is not vacuous: the plain SwiGLU gives another answer."""
    problem = make_problem([3, 0, 2], 32, 16, "fp8", (16, 16), bias=True)
    clamped, _ = run_problem(problem, limit=0.5)
    _, plain = run_problem(problem, limit=None)
    assert (clamped.double() - plain).abs().max() > 1e-2


@needs_interpreter
@pytest.mark.parametrize("weight_format", ["fp8", "mxfp4"])
def test_cpu_float16_rows_round_like_reference(weight_format):
    # (bf16 is checked on GPU: Triton 3.9's interpreter computes bf16 tl.dot wrongly.)
    problem = make_problem([4, 0, 5], 64, 32, weight_format, (16, 32))
    y, want = run_problem(problem, dtype=torch.float16)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=3e-3)


LINEAR_CASES = {  # name: (format, T, N, K, block, bias)
    "fp8_partial_blocks_bias": ("fp8", 5, 40, 48, (16, 32), True),  # N, K not block multiples
    "fp8_one_row": ("fp8", 1, 24, 64, (32, 64), False),
    "fp8_rows_past_a_chunk": ("fp8", 37, 16, 32, (16, 16), False),  # 37 rows: one 64-row chunk
    "mxfp4_bias": ("mxfp4", 3, 24, 64, None, True),
    "mxfp4_one_row": ("mxfp4", 1, 16, 96, None, False),
}


@needs_interpreter
@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_cpu_quantized_linear_matches_dequantized_reference(name):
    weight_format, rows, out_features, in_features, block, with_bias = LINEAR_CASES[name]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(rows, in_features, generator=gen)
    weight, scale, dequantized = quantize(
        torch.randn(out_features, in_features, generator=gen), weight_format, block
    )
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    y = _kernels().quantized_linear(
        x, weight, scale, weight_format=weight_format, fp8_block=block or (128, 128), bias=bias
    )
    want = x.double() @ dequantized.double().T  # [T, N]
    if bias is not None:
        want = want + bias.double()
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_cpu_quantized_linear_zero_rows():
    weight, scale, _ = quantize(torch.randn(16, 32), "fp8", (16, 16))
    y = _kernels().quantized_linear(
        torch.zeros(0, 32), weight, scale, weight_format="fp8", fp8_block=(16, 16)
    )
    assert y.shape == (0, 16)


@needs_interpreter
@pytest.mark.parametrize("weight_format", ["fp8", "mxfp4"])
def test_cpu_ops_pass_opcheck(weight_format):
    problem = make_problem([2, 0, 1], 32, 32, weight_format, (16, 16))
    kw = problem["kwargs"]
    # test_schema compares inputs before and after with allclose, which float8 lacks on CPU
    tests = ("test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration")
    if weight_format == "mxfp4":
        tests += ("test_schema",)
    torch.library.opcheck(
        torch.ops.moe_ext.swiglu_experts.default,
        (problem["x"], *problem["stored"], problem["tokens_per_expert"], 16),
        dict(
            weight_format=weight_format,
            gate_up_scale=kw["gate_up_scale"],
            down_scale=kw["down_scale"],
            fp8_block=[16, 16],
        ),
        test_utils=tests,
    )
    weight, scale, _ = quantize(torch.randn(16, 32), weight_format, (16, 16))
    torch.library.opcheck(
        torch.ops.moe_ext.quantized_linear.default,
        (torch.randn(3, 32), weight, scale, weight_format, [16, 16]),
        test_utils=tests,
    )


@needs_interpreter
def test_cpu_quantized_ops_compile_to_one_opaque_node_each():
    import torch._dynamo.testing

    problem = make_problem([2, 3, 0], 32, 16, "fp8", (16, 16))
    weight, scale, dequantized = quantize(torch.randn(24, 32), "mxfp4", None)
    kernels = _kernels()

    def forward(x, gate_up, down, tokens_per_expert, kwargs):
        h = kernels.swiglu_experts_forward(x, gate_up, down, tokens_per_expert, **kwargs)
        return kernels.quantized_linear(h, weight, scale, weight_format="mxfp4")  # [T', 24]

    args = (problem["x"], *problem["stored"], problem["tokens_per_expert"], problem["kwargs"])
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    y = torch.compile(forward, backend=counter, fullgraph=True)(*args)
    assert counter.frame_count == 1
    experts, _ = run_problem(problem)
    torch.testing.assert_close(y, experts @ dequantized.T, rtol=1e-5, atol=1e-5)
    graphs = []
    torch._dynamo.reset()
    torch.compile(forward, backend=graph_recorder(graphs), fullgraph=True)(*args)
    assert count_op_nodes(graphs, torch.ops.moe_ext.swiglu_experts) == 1
    assert count_op_nodes(graphs, torch.ops.moe_ext.quantized_linear) == 1


# ---- CPU: operand errors (no interpreter needed) ---------------------------------------


def _operands(weight_format):
    problem = make_problem([1, 2], 32, 32, weight_format, (16, 16))
    return problem["x"], *problem["stored"], problem["tokens_per_expert"], problem["kwargs"]


def _check(x, gate_up, down, counts, kwargs, **changes):
    kwargs = dict(kwargs, **changes)
    biases = kwargs.pop("gate_up_bias"), kwargs.pop("down_bias")
    _kernels().check_operands(x, gate_up, down, counts, *biases, **kwargs)


def _passes(check, *args, **kwargs):
    """Good operands pass; outside the interpreter, only the CPU-device check refuses them
    (it comes after every operand check)."""
    if _kernels().INTERPRETED:
        check(*args, **kwargs)
    else:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            check(*args, **kwargs)


@needs_triton
def test_bad_quantized_operands_are_one_line_errors():
    x, gate_up, down, counts, kw = _operands("fp8")
    _passes(_check, x, gate_up, down, counts, kw)
    cases = [  # (operands changed, message fragment)
        (dict(gate_up_scale=kw["gate_up_scale"][:, :1]), "scale of gate_up_proj"),
        (dict(down_scale=kw["down_scale"].double()), "scale of down_proj"),
        (dict(down_scale=None), "down_proj is fp8 but its scale is missing"),
        (dict(fp8_block=(16, 32)), "scale of gate_up_proj"),  # scales made for bi = 16
        (dict(weight_format="int4"), "weight_format 'int4' unknown"),
        (dict(weight_format="dense"), "scales given with dense weights"),
    ]
    for changes, message in cases:
        with pytest.raises(QuantizationError, match=message) as err:
            _check(x, gate_up, down, counts, kw, **changes)
        assert "\n" not in str(err.value)
    with pytest.raises(QuantizationError, match="fp8 gate_up_proj torch.bfloat16"):
        _check(x, gate_up.to(torch.bfloat16), down, counts, kw)
    with pytest.raises(QuantizationError, match="block columns divisible by 16"):
        q, s = quantize_fp8(torch.randn(2, 32, 32), (16, 8))
        _check(x, q, down, counts, kw, gate_up_scale=s, fp8_block=(16, 8))
    with pytest.raises(ValueError, match="down_proj"):  # another expert count
        _check(x, gate_up, down[:1], counts, kw, down_scale=kw["down_scale"][:1])
    with pytest.raises(ValueError, match=r"x \(3, 16\) and gate_up_proj \[2, 64, 32\]"):
        _check(x[:, :16], gate_up, down, counts, kw)

    x, gate_up, down, counts, kw = _operands("mxfp4")
    _passes(_check, x, gate_up, down, counts, kw)
    with pytest.raises(QuantizationError, match="scale of down_proj"):
        _check(x, gate_up, down, counts, kw, down_scale=kw["down_scale"][..., :0])
    with pytest.raises(
        QuantizationError, match=r"mxfp4 gate_up_proj .* uint8 \[\.\.\., R, C/32, 16\]"
    ):
        _check(x, gate_up[..., :8], down, counts, kw)
    with pytest.raises(QuantizationError, match="scale of gate_up_proj"):
        _check(x, gate_up, down, counts, kw, gate_up_scale=kw["gate_up_scale"].float())


@needs_triton
def test_bad_linear_operands_are_one_line_errors():
    check = _kernels().check_linear_operands
    weight, scale, _ = quantize(torch.randn(16, 32), "fp8", (16, 16))
    x = torch.randn(2, 32)
    _passes(check, x, weight, scale, "fp8", (16, 16), torch.zeros(16))
    with pytest.raises(QuantizationError, match="scale of weight"):
        check(x, weight, scale[:, :1], "fp8", (16, 16))
    with pytest.raises(QuantizationError, match="weight is fp8 but its scale is missing"):
        check(x, weight, None, "fp8", (16, 16))
    with pytest.raises(QuantizationError, match="'dense' has no kernel"):
        check(x, weight, scale, "dense", (16, 16))
    with pytest.raises(QuantizationError, match="one matrix"):
        check(x, weight[None], scale[None], "fp8", (16, 16))
    with pytest.raises(ValueError, match=r"x \[2, 16\] must be \[T, 32\]"):
        check(x[:, :16], weight, scale, "fp8", (16, 16))
    with pytest.raises(ValueError, match="bias"):
        check(x, weight, scale, "fp8", (16, 16), torch.zeros(8))
    blocks, scales, _ = quantize(torch.randn(16, 64), "mxfp4", None)
    with pytest.raises(QuantizationError, match="scale of weight"):
        check(torch.randn(2, 64), blocks, scales[:, :1], "mxfp4")

"""The decode projections' GEMV kernel (``moe_ext.moe.kernels.gemv``, op
``moe_ext::fused_gemv``) and the layer helpers that route to it
(``moe_ext.quant.linear.project_many`` / ``dense_linear``).

# T rows, K in features, N_i out features of weight i

CPU: the kernel runs under Triton's interpreter (TRITON_INTERPRET=1 at import), so
`test_kernels_under_interpreter` reruns this file's `test_cpu_*` cases in a child pytest
(they skip elsewhere). Reference: float64 ``x @ concat(W_i)^T``. The helpers' routing
decisions need no Triton. GPU checks (bf16, model shapes, CUDA graph, inductor, the
whole model's decode) are in tests/gpu/test_gemv_gpu.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_ext.quant import linear as linear_mod
from tests.support import (
    count_op_nodes,
    graph_recorder,
    needs_interpreter,
    needs_triton,
    run_cpu_cases_in_interpreter,
)


def _kernels():
    from moe_ext.moe.kernels import gemv

    return gemv


@needs_triton
def test_kernels_under_interpreter():
    run_cpu_cases_in_interpreter(__file__)


# (T, K, [N_i]): ragged stripes (N not a multiple of the 16-row tile), K not a multiple of
# the k-tile, one weight and three, rows past one 16-row tile
CASES = [(1, 64, [48, 16, 16]), (3, 96, [32]), (17, 40, [16, 40]), (33, 128, [33, 7, 64])]


@needs_interpreter
@pytest.mark.parametrize("rows,in_features,outs", CASES)
def test_cpu_fused_gemv_matches_float64_reference(rows, in_features, outs):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen)
    weights = [torch.randn(n, in_features, generator=gen) for n in outs]
    y = _kernels().fused_gemv(x, weights)  # [T, sum N]
    want = x.double() @ torch.cat(weights).double().T
    assert y.shape == (rows, sum(outs)) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)


@needs_interpreter
def test_cpu_project_many_splits_columns_and_adds_biases(monkeypatch):
    """project_many through the kernel (its CUDA gate opened for CPU) equals the modules
    called one by one: each output its own columns, biases added, shapes [B, S, N_i], the
    widths those of the weights (a TP slice's, not out_features)."""
    monkeypatch.setattr(
        linear_mod, "_gemv_kernels", lambda x, weights: _kernels()
    )  # the interpreter stands in for CUDA
    torch.manual_seed(0)
    linears = [nn.Linear(32, 48, bias=True), nn.Linear(32, 16), nn.Linear(32, 16, bias=True)]
    with torch.no_grad():  # a TP rank's q: its rows of the weight, out_features left as is
        linears[0].weight = nn.Parameter(linears[0].weight[:24].clone())
        linears[0].bias = nn.Parameter(linears[0].bias[:24].clone())
    x = torch.randn(2, 1, 32)  # [B, S, K]
    with torch.no_grad():
        got = linear_mod.project_many(x, linears)
        want = [m(x) for m in linears]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_cpu_fused_gemv_compiles_to_one_opaque_node():
    import torch._dynamo.testing

    x = torch.randn(2, 32)
    weights = [torch.randn(24, 32), torch.randn(8, 32)]

    def forward(x, weights):
        return _kernels().fused_gemv(x, weights).relu()

    graphs = []
    torch._dynamo.reset()
    y = torch.compile(forward, backend=graph_recorder(graphs), fullgraph=True)(x, weights)
    assert count_op_nodes(graphs, torch.ops.moe_ext.fused_gemv) == 1
    torch.testing.assert_close(y, (x @ torch.cat(weights).T).relu(), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(
        torch.ops.moe_ext.fused_gemv.default,
        (x, weights),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@needs_triton
def test_bad_gemv_operands_are_one_line_errors():
    kernels = _kernels()
    x, w = torch.randn(2, 32), torch.randn(16, 32)
    cases = [
        ((x, []), "1 to 3"),
        ((x, [w] * 4), "1 to 3"),
        ((torch.randn(65, 32), [w]), "T <= 64"),
        ((x, [torch.randn(16, 31)]), "contiguous \\[N, 32\\]"),
        ((x, [torch.randn(32, 16).T]), "contiguous"),
        ((x, [w.double()]), "one dtype"),
    ]
    for args, fragment in cases:
        with pytest.raises(ValueError, match=fragment) as info:
            kernels.check_operands(*args)
        assert "\n" not in str(info.value)


# ---- CPU, no Triton: when the layers route to the kernel -------------------------------


def test_projections_stay_on_torch_on_cpu_and_with_gradients():
    """On CPU (or with a gradient wanted, or past GEMV_MAX_ROWS rows) the helpers are the
    modules themselves: training and prefill never meet the forward-only kernel."""
    torch.manual_seed(0)
    linears = [nn.Linear(8, 6), nn.Linear(8, 4, bias=False)]
    x = torch.randn(1, 1, 8, requires_grad=True)
    outputs = linear_mod.project_many(x, linears)
    sum(o.sum() for o in outputs).backward()
    assert x.grad is not None and linears[0].weight.grad is not None
    torch.testing.assert_close(
        linear_mod.dense_linear(x, linears[0].weight), F.linear(x, linears[0].weight)
    )
    assert linear_mod._gemv_kernels(x.detach(), [m.weight for m in linears]) is None

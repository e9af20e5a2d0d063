"""The Triton fast paths with gpt-oss' terms: the SwiGLU experts kernels with expert biases
and the clamped SwiGLU, the fused router with a logit bias (topk_softmax), against the
torch paths and transformers' modules.

CPU: the kernels run under Triton's interpreter (TRITON_INTERPRET=1 at import), so
``test_kernels_under_interpreter`` reruns this file's ``test_cpu_*`` cases in a child
pytest (they skip elsewhere); everything skips when triton is not importable. GPU (marked):
the compiled kernels in bf16 against the grouped_mm backend.
"""

from __future__ import annotations

import pytest
import torch

from moe_ext.moe.experts import ExpertOptions, GroupedExperts
from moe_ext.moe.router import TopKRouter
from tests.support import needs_interpreter, needs_triton, run_cpu_cases_in_interpreter


def _experts(backend: str, dtype=torch.float32, device="cpu", **options) -> GroupedExperts:
    torch.manual_seed(0)
    module = GroupedExperts(
        4,
        32,
        24,
        options=ExpertOptions(bias=True, swiglu_limit=1.0, **options),
        backend=backend,
        dtype=dtype,
        device=device,
    )
    with torch.no_grad():
        module.gate_up_proj.mul_(3.0)  # pre-activations past the clamp
        module.gate_up_proj_bias.normal_(0.0, 0.5)
        module.down_proj_bias.normal_(0.0, 0.5)
    return module


@needs_triton
def test_kernels_under_interpreter():
    run_cpu_cases_in_interpreter(__file__)


@needs_interpreter
@pytest.mark.parametrize("add_down_bias", [True, False])
@torch.no_grad()
def test_cpu_triton_experts_with_biases_and_clamp_equal_loop(add_down_bias):
    module = _experts("triton", add_down_bias=add_down_bias)
    tokens_per_expert = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 32)
    pre = x[:3] @ module.gate_up_proj[0].T + module.gate_up_proj_bias[0]
    assert (pre[:, :24] > 1.0).any() and (pre[:, 24:].abs() > 1.0).any()  # clamps act
    y = module(x, tokens_per_expert)
    module.backend = "loop"
    torch.testing.assert_close(y, module(x, tokens_per_expert), rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_cpu_biased_op_passes_opcheck():
    module = _experts("triton")
    x, counts = torch.randn(5, 32), torch.tensor([2, 0, 3, 0])
    args = (x, module.gate_up_proj.detach(), module.down_proj.detach(), counts, 16)
    extra = (module.gate_up_proj_bias.detach(), module.down_proj_bias.detach(), 1.0, 1.702)
    torch.library.opcheck(torch.ops.moe_ext.swiglu_experts.default, args + extra)


@needs_interpreter
@torch.no_grad()
def test_cpu_fused_router_with_bias_equals_transformers():
    transformers = pytest.importorskip("transformers")
    config = transformers.GptOssConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=3)
    torch.manual_seed(2)
    hf = transformers.models.gpt_oss.modeling_gpt_oss.GptOssTopKRouter(config)
    hf.weight.normal_(0.0, 0.5)
    hf.bias.normal_(0.0, 1.0)
    router = TopKRouter(32, 8, 3, score_func="topk_softmax", bias=True).eval()
    router.weight.copy_(hf.weight)
    router.bias.copy_(hf.bias)
    x = torch.randn(20, 32)
    assert router.fused_kernels(x) is not None  # the kernel path, not the torch one
    routing = router(x)
    _, scores, idx = hf(x)
    assert routing.logits is None and torch.equal(routing.expert_idx, idx)
    torch.testing.assert_close(routing.weights, scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(router.expert_load, torch.bincount(idx.flatten(), minlength=8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")
@torch.no_grad()
def test_gpu_triton_experts_with_biases_match_grouped_mm():
    module = _experts("triton", dtype=torch.bfloat16, device="cuda")
    counts = torch.tensor([7, 0, 20, 3], device="cuda")
    x = torch.randn(30, 32, device="cuda", dtype=torch.bfloat16)
    y = module(x, counts)
    module.backend = "grouped_mm"
    torch.testing.assert_close(y, module(x, counts), rtol=2e-2, atol=2e-2)

"""Fused routing kernels: the softmax top-k router (moe_ext.moe.kernels.routing, op
``moe_ext::softmax_topk_router``) and the pair sort (moe_ext.moe.kernels.permute, op
``moe_ext::sort_pairs``), their fast paths in TopKRouter and the local dispatcher, and the
MoE layer with them.

# T tokens, H hidden, E experts, k top-k, N = T*k token-expert pairs

CPU: as in test_moe_kernels, `test_kernels_under_interpreter` reruns this file's
`test_cpu_*` cases in a child pytest with TRITON_INTERPRET=1. References: the float64
dense router of tests/support.py, the torch path of TopKRouter (fast path off),
torch.sort(stable=True) and bincount, the float64 MoE layer. GPU (marked): bf16 kernels
against the torch paths, and the MoE layer under inductor inside a CUDA graph.
"""

import pytest
import torch

from moe_ext.moe.dispatch.local import permute_local
from moe_ext.moe.layer import build_moe_layer
from moe_ext.moe.router import FUSED_MAX_TOKENS, TopKRouter
from tests.support import (
    HAS_TRITON,
    RoutingSpec,
    capture_compiled,
    count_op_nodes,
    graph_recorder,
    interpreted,
    needs_interpreter,
    needs_triton,
    reference_gates,
    reference_moe,
    run_cpu_cases_in_interpreter,
)


def _routing():
    from moe_ext.moe.kernels import routing

    return routing


def _permute():
    from moe_ext.moe.kernels import permute

    return permute


@needs_triton
def test_kernels_under_interpreter():
    run_cpu_cases_in_interpreter(__file__)


def dense_gates(weights: torch.Tensor, expert_idx: torch.Tensor, num_experts: int):
    """weights, expert_idx: [T, k]. Returns [T, E] float64 (zero where not picked)."""
    gates = torch.zeros(weights.shape[0], num_experts, dtype=torch.float64)
    return gates.scatter_(1, expert_idx, weights.double())


def router_problem(tokens, hidden, num_experts, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weight = (torch.randn(num_experts, hidden, generator=gen) * hidden**-0.5).to(dtype)
    return x, weight


# ---- CPU, interpreter: router kernel ---------------------------------------------------

ROUTER_CASES = {  # name: (T, H, E, k, norm_topk_prob, routed_scaling_factor)
    "decode_mixtral": (1, 48, 8, 2, True, 1.0),
    "top1": (3, 40, 8, 1, False, 1.0),
    "qwen2_no_renorm": (7, 72, 60, 8, False, 1.0),
    "scaled_renorm": (5, 33, 60, 2, True, 2.5),
    "qwen3_block_of_4": (37, 64, 128, 8, True, 1.0),  # T > 32: four tokens per program
    "qwen3_scaled_no_renorm": (2, 130, 128, 8, False, 16.0),
    "unsplit_many_tokens": (300, 16, 8, 2, True, 1.0),  # 75 blocks: experts not split
}


def test_router_launch_config_splits_the_weight_read():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    config = _routing().launch_config
    decode = config(1, 128, 2048)  # qwen3-30b-a3b, batch 1: 32 programs of 4 experts
    assert (decode["BLOCK_T"], decode["E_CHUNK"], decode["BLOCK_H"]) == (1, 4, 2048)
    assert config(1, 8, 4096)["E_CHUNK"] == 1  # mixtral: one expert row per program
    assert config(37, 128, 64)["E_CHUNK"] == 16  # 10 blocks of 4 tokens, 8 splits
    assert config(300, 8, 16)["E_CHUNK"] == 8  # 75 blocks: no split
    for tokens, experts, hidden in [(1, 512, 8192), (256, 512, 8192), (3, 60, 130)]:
        c = config(tokens, experts, hidden)
        assert c["BLOCK_T"] * c["E_CHUNK"] * c["BLOCK_H"] <= 8192
    # bf16 operands past 32 tokens: 16-token tensor-core blocks, >= 16 experts per split
    batch64 = config(64, 128, 2048, dot=True)  # qwen3-30b-a3b: 4 blocks x 8 splits
    assert (batch64["DOT"], batch64["BLOCK_T"], batch64["E_CHUNK"]) == (True, 16, 16)
    assert config(40, 8, 4096, dot=True)["E_CHUNK"] == 16  # mixtral: 8 experts padded to 16
    assert not config(32, 128, 2048, dot=True)["DOT"]  # decode sizes keep float32 FMAs


@needs_interpreter
@pytest.mark.parametrize("name", list(ROUTER_CASES))
def test_cpu_router_kernel_matches_float64_reference(name):
    tokens, hidden, num_experts, top_k, renorm, scale = ROUTER_CASES[name]
    x, weight = router_problem(tokens, hidden, num_experts, seed=len(name))
    load = torch.zeros(num_experts, dtype=torch.int64)
    weights, expert_idx = _routing().softmax_topk_router(
        x, weight, load, top_k, norm_topk_prob=renorm, routed_scaling_factor=scale
    )
    assert weights.shape == expert_idx.shape == (tokens, top_k)
    assert weights.dtype == torch.float32 and expert_idx.dtype == torch.int64
    spec = RoutingSpec(top_k, norm_topk_prob=renorm, routed_scaling_factor=scale)
    want = reference_gates(x, weight, spec)  # [T, E] float64
    want_idx = want.topk(top_k, dim=-1).indices  # picks by descending weight
    assert torch.equal(expert_idx, want_idx)
    torch.testing.assert_close(
        dense_gates(weights, expert_idx, num_experts), want, rtol=1e-5, atol=1e-7
    )
    assert torch.equal(load, torch.bincount(want_idx.flatten(), minlength=num_experts))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpu_router_kernel_upcasts_inputs(dtype):
    x, weight = router_problem(4, 64, 60, dtype=dtype, seed=3)
    load = torch.zeros(60, dtype=torch.int64)
    weights, expert_idx = _routing().softmax_topk_router(x, weight, load, 4)
    want = reference_gates(x.double(), weight.double(), RoutingSpec(4))
    assert torch.equal(expert_idx, want.topk(4, dim=-1).indices)
    torch.testing.assert_close(dense_gates(weights, expert_idx, 60), want, rtol=1e-5, atol=1e-7)


@needs_interpreter
@pytest.mark.parametrize("num_experts", [60, 8])
def test_cpu_router_kernel_tensor_core_blocks_match_float64(num_experts):
    """Past 32 tokens, fp16 logits come from tl.dot: the same picks and weights as the
    float64 reference (ragged last block, experts not a multiple of the 16-expert split).
    bf16 takes the same path on the GPU (test_gpu_router_bf16_matches_torch_path at 33,
    64 and 256 tokens); the interpreter cannot dot bf16."""
    x, weight = router_problem(40, 96, num_experts, dtype=torch.float16, seed=5)
    load = torch.zeros(num_experts, dtype=torch.int64)
    assert _routing().launch_config(40, num_experts, 96, dot=True)["DOT"]
    weights, expert_idx = _routing().softmax_topk_router(x, weight, load, 2)
    want = reference_gates(x.double(), weight.double(), RoutingSpec(2))
    assert torch.equal(expert_idx, want.topk(2, dim=-1).indices)
    torch.testing.assert_close(
        dense_gates(weights, expert_idx, num_experts), want, rtol=1e-5, atol=1e-7
    )
    assert torch.equal(load, torch.bincount(expert_idx.flatten(), minlength=num_experts))


@needs_interpreter
def test_cpu_router_kernel_picks_lowest_id_on_ties():
    x = torch.ones(2, 16)
    weight = torch.zeros(8, 16)
    weight[5] = 1.0  # expert 5 wins, the other seven tie
    load = torch.zeros(8, dtype=torch.int64)
    weights, expert_idx = _routing().softmax_topk_router(x, weight, load, 3, norm_topk_prob=False)
    assert expert_idx.tolist() == [[5, 0, 1], [5, 0, 1]]
    assert torch.equal(weights[:, 1], weights[:, 2])


@needs_interpreter
def test_cpu_router_kernel_load_counts_and_no_record():
    x, weight = router_problem(6, 32, 8, seed=4)
    routing = _routing()
    load = torch.full((8,), 5, dtype=torch.int64)
    _, expert_idx = routing.softmax_topk_router(x, weight, load, 2)
    routing.softmax_topk_router(x, weight, load, 2)
    assert torch.equal(load, 5 + 2 * torch.bincount(expert_idx.flatten(), minlength=8))
    before = load.clone()
    routing.softmax_topk_router(x, weight, load, 2, record_load=False)
    assert torch.equal(load, before)
    weights, expert_idx = routing.softmax_topk_router(x[:0], weight, load, 2)
    assert weights.shape == expert_idx.shape == (0, 2) and torch.equal(load, before)
    assert all(int(counters.abs().sum()) == 0 for counters in routing._arrivals.values())


# ---- CPU, interpreter: TopKRouter fast path --------------------------------------------


@needs_interpreter
@pytest.mark.parametrize(
    "num_experts,top_k,renorm,scale", [(8, 2, True, 1.0), (60, 4, False, 1.0), (128, 8, True, 2.5)]
)
def test_cpu_router_fast_path_equals_torch_path(num_experts, top_k, renorm, scale):
    torch.manual_seed(num_experts)
    router = TopKRouter(
        48, num_experts, top_k, norm_topk_prob=renorm, routed_scaling_factor=scale
    ).eval()
    x = torch.randn(9, 48)
    with torch.no_grad():
        fast = router(x)
        assert fast.logits is None  # the fused path ran
        router.fused = False
        slow = router(x)
    assert slow.logits is not None
    assert torch.equal(fast.expert_idx, slow.expert_idx)
    torch.testing.assert_close(fast.weights, slow.weights, rtol=1e-6, atol=1e-7)
    assert fast.aux_loss.item() == 0 and fast.z_loss.item() == 0
    assert torch.equal(
        router.read_expert_load(),
        2 * torch.bincount(slow.expert_idx.flatten(), minlength=num_experts),
    )


@needs_interpreter
def test_cpu_router_fast_path_only_where_eligible():
    x = torch.randn(3, 16)

    def fused(router, inputs=x, grad=False):
        with torch.set_grad_enabled(grad):
            return router.fused_kernels(inputs) is not None

    router = TopKRouter(16, 8, 2).eval()
    assert not fused(router, grad=True)  # the weight needs a gradient
    assert fused(router)
    assert not fused(router, torch.randn(FUSED_MAX_TOKENS + 1, 16))
    assert not fused(router.train())
    router.eval().fused = False
    assert not fused(router)
    assert not fused(TopKRouter(16, 8, 2, score_func="sigmoid").eval())
    assert not fused(TopKRouter(16, 8, 2, n_group=2, topk_group=1).eval())
    assert not fused(TopKRouter(16, 32, 17).eval())  # k above the kernel's 16
    with torch.no_grad():  # the training path keeps its logits and losses
        out = TopKRouter(16, 8, 2).train()(x)
    assert out.logits is not None


# ---- CPU, interpreter: pair sort -------------------------------------------------------

SORT_CASES = {  # name: (expert ids builder, E)
    "random": (lambda g: torch.randint(0, 8, (24,), generator=g), 8),
    "empty_experts": (lambda g: torch.tensor([3, 1, 3, 7, 1, 3]), 9),
    "one_pair": (lambda g: torch.tensor([4]), 5),
    "no_pairs": (lambda g: torch.zeros(0, dtype=torch.int64), 4),
    "all_in_one_expert": (lambda g: torch.full((64,), 59), 60),
    "qwen3_prefill": (lambda g: torch.randint(0, 128, (200,), generator=g), 128),
    "over_1024_pairs": (lambda g: torch.randint(0, 60, (1500,), generator=g), 60),
    "many_experts": (lambda g: torch.randint(0, 512, (96,), generator=g), 512),
}


@needs_interpreter
@pytest.mark.parametrize("name", list(SORT_CASES))
def test_cpu_sort_pairs_matches_stable_sort(name):
    build, num_experts = SORT_CASES[name]
    expert_ids = build(torch.Generator().manual_seed(len(name))).to(torch.int64)
    order, counts = _permute().sort_pairs(expert_ids, num_experts)
    assert order.dtype == counts.dtype == torch.int64
    assert torch.equal(order, torch.sort(expert_ids, stable=True).indices)
    assert torch.equal(counts, torch.bincount(expert_ids, minlength=num_experts))


@needs_interpreter
def test_cpu_permute_local_fast_equals_torch_sort():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(12, 16, generator=gen)
    expert_idx = torch.rand(12, 60, generator=gen).topk(4, dim=-1).indices  # [T, k]
    fast = permute_local(x, expert_idx, 60)
    slow = permute_local(x, expert_idx, 60, fused=False)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


# ---- CPU, interpreter: MoE layer -------------------------------------------------------


def _layer(num_experts, top_k, renorm, backend="loop", seed=0):
    torch.manual_seed(seed)
    return build_moe_layer(
        32,
        16,
        num_experts,
        top_k,
        norm_topk_prob=renorm,
        dispatcher="local",
        experts_backend=backend,
    ).eval()


def _fast_paths(layer, on):
    layer.router.fused = on
    layer.dispatcher.fused = on


@needs_interpreter
@pytest.mark.parametrize("num_experts,top_k,renorm", [(8, 2, True), (60, 4, False)])
def test_cpu_moe_layer_fast_paths_equal_torch_paths(num_experts, top_k, renorm):
    layer = _layer(num_experts, top_k, renorm)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        fast = layer(x)
        _fast_paths(layer, False)
        slow = layer(x)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    experts = layer.experts
    want = reference_moe(
        x.reshape(-1, 32),
        layer.router.weight,
        experts.gate_up_proj,
        experts.down_proj,
        RoutingSpec(top_k, norm_topk_prob=renorm),
    )
    torch.testing.assert_close(fast.reshape(-1, 32).double(), want, rtol=1e-5, atol=1e-6)


# ---- CPU, interpreter: custom ops under torch.compile ---------------------------------


@needs_interpreter
def test_cpu_ops_pass_opcheck():
    x, weight = router_problem(3, 32, 8, seed=5)
    load = torch.zeros(8, dtype=torch.int64)
    torch.library.opcheck(
        torch.ops.moe_ext.softmax_topk_router.default, (x, weight, load, 2, True, 1.0, True)
    )
    torch.library.opcheck(
        torch.ops.moe_ext.sort_pairs.default, (torch.tensor([2, 0, 2, 1, 0, 2]), 4)
    )


@needs_interpreter
def test_cpu_router_and_sort_compile_as_one_frame_each():
    import torch._dynamo.testing

    router = TopKRouter(32, 8, 2).eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        want = router(x)
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounter()
        got = torch.compile(router, backend=counter, fullgraph=True)(x)
    assert counter.frame_count == 1 and got.logits is None
    assert torch.equal(got.expert_idx, want.expert_idx)
    torch.testing.assert_close(got.weights, want.weights, rtol=0, atol=0)

    expert_ids = want.expert_idx.reshape(-1)  # [N]
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    order, counts = torch.compile(_permute().sort_pairs, backend=counter, fullgraph=True)(
        expert_ids, 8
    )
    assert counter.frame_count == 1
    assert torch.equal(order, torch.sort(expert_ids, stable=True).indices)
    assert torch.equal(counts, torch.bincount(expert_ids, minlength=8))


@needs_interpreter
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_cpu_moe_layer_compiles_fullgraph_with_three_ops(backend):
    """Router, sort and experts kernels are single opaque nodes of one graph; under AOT
    (functionalisation) the router's expert_load update still lands in the buffer."""
    layer = _layer(8, 2, True, backend="triton", seed=1)
    x = torch.randn(6, 32)
    with torch.no_grad():
        want = layer(x)
        layer.router.reset_expert_load()
        graphs = []
        torch._dynamo.reset()
        got = torch.compile(
            layer, backend=graph_recorder(graphs) if backend == "eager" else backend, fullgraph=True
        )(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert int(layer.router.read_expert_load().sum()) == 6 * 2
    if backend == "eager":
        assert len(graphs) == 1
        for packet in (
            torch.ops.moe_ext.softmax_topk_router,
            torch.ops.moe_ext.sort_pairs,
            torch.ops.moe_ext.swiglu_experts,
        ):
            assert count_op_nodes(graphs, packet) == 1, packet


# ---- CPU: no interpreter --------------------------------------------------------------


def test_plain_cpu_keeps_torch_paths():
    if interpreted():
        pytest.skip("checks the process without the interpreter")
    router = TopKRouter(16, 8, 2).eval()
    with torch.no_grad():
        out = router(torch.randn(3, 16))
    assert out.logits is not None  # the torch path ran


@needs_triton
def test_bad_operands_are_one_line_errors():
    routing, permute = _routing(), _permute()
    x, weight = router_problem(2, 16, 8)
    load = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError, match="top_k"):
        routing.check_operands(x, weight, load, 9)
    with pytest.raises(ValueError, match="expert_load"):
        routing.check_operands(x, weight, load.int(), 2)
    with pytest.raises(ValueError, match="contiguous"):
        routing.check_operands(x, weight, torch.zeros(16, dtype=torch.int64)[::2], 2)
    with pytest.raises(ValueError, match=r"\[T, H\]"):
        routing.check_operands(x[:, :8], weight, load, 2)
    with pytest.raises(ValueError, match="flat int64"):
        permute.check_operands(torch.zeros(2, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="sort_by_bucket"):
        permute.check_operands(torch.zeros(permute.MAX_PAIRS + 1, dtype=torch.int64), 4)
    if not routing.INTERPRETED:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            routing.check_operands(x, weight, load, 2)
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            permute.check_operands(torch.zeros(3, dtype=torch.int64), 4)


# ---- GPU -------------------------------------------------------------------------------

QWEN3 = dict(hidden=2048, ffn=768, experts=128, top_k=8)  # qwen3-30b-a3b


def _assert_same_picks_up_to_near_ties(fast_idx, slow_idx, x, weight):
    """Exact equality, except where the float64 logits of the two picks differ by less
    than float32 rounding of a GEMM over H (the two paths sum in different orders)."""
    if torch.equal(fast_idx, slow_idx):
        return
    logits = x.double() @ weight.double().t()  # [T, E]
    gap = (logits.gather(1, fast_idx) - logits.gather(1, slow_idx)).abs()
    assert gap.max().item() < 1e-4, f"picks differ beyond near-ties: {gap.max().item()}"


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 4, 33, 64, FUSED_MAX_TOKENS])
def test_gpu_router_bf16_matches_torch_path(tokens):
    torch.manual_seed(tokens)
    router = TopKRouter(
        QWEN3["hidden"], QWEN3["experts"], QWEN3["top_k"], dtype=torch.bfloat16, device="cuda"
    ).eval()
    x = torch.randn(tokens, QWEN3["hidden"], device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        fast = router(x)
        assert fast.logits is None
        fast_load = router.read_expert_load(reset=True)
        router.fused = False
        slow = router(x)
    _assert_same_picks_up_to_near_ties(fast.expert_idx, slow.expert_idx, x, router.weight)
    if torch.equal(fast.expert_idx, slow.expert_idx):
        torch.testing.assert_close(fast.weights, slow.weights, rtol=1e-5, atol=1e-6)
        assert torch.equal(fast_load, router.read_expert_load())


@pytest.mark.gpu
@pytest.mark.parametrize(
    "pairs,num_experts",
    [(1, 128), (8, 128), (64, 128), (1000, 60), (2048, 128), (4096, 512), (4096, 1)],
)
def test_gpu_sort_pairs_matches_stable_sort(pairs, num_experts):
    gen = torch.Generator(device="cuda").manual_seed(pairs)
    expert_ids = torch.randint(0, num_experts, (pairs,), device="cuda", generator=gen)
    order, counts = _permute().sort_pairs(expert_ids, num_experts)
    assert torch.equal(order, torch.sort(expert_ids, stable=True).indices)
    assert torch.equal(counts, torch.bincount(expert_ids, minlength=num_experts))


@pytest.mark.gpu
def test_gpu_moe_layer_inductor_inside_cuda_graph():
    """The qwen3-30b-a3b MoE layer at batch-1 decode: inductor, fullgraph, static shapes,
    fused router + fused sort + Triton experts captured in one CUDA graph. Replays follow
    new inputs, match the layer with every fast path off, and count the expert load."""
    torch.manual_seed(0)
    layer = build_moe_layer(
        QWEN3["hidden"],
        QWEN3["ffn"],
        QWEN3["experts"],
        QWEN3["top_k"],
        dispatcher="local",
        dtype=torch.bfloat16,
        device="cuda",
    ).eval()
    x = torch.randn(1, 1, QWEN3["hidden"], device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        graph, y = capture_compiled(layer, x)
        layer.router.reset_expert_load()
        for step in range(3):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            got = y.clone()
            _fast_paths(layer, False)
            layer.experts.backend = "grouped_mm"
            want = layer(x)
            _fast_paths(layer, True)
            layer.experts.backend = "auto"
            err = (got.float() - want.float()).abs().max().item()
            assert err <= 2e-2 * want.float().abs().max().item(), f"step {step}: {err}"
        # three replays and three eager torch-path calls, top-8 each
        assert int(layer.router.read_expert_load().sum()) == 6 * QWEN3["top_k"]

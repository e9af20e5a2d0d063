"""Static-capacity expert exchange: equals the dynamic exchange and the float64 reference
(outputs and gradients), makes no host sync, refuses T > capacity; experts accept
trailing padding rows.

# T tokens on a rank, C capacity, H hidden, E experts, k top-k, G ep size

The EP dispatchers that can run it on CPU (allgather_rs = ep_allgather, nccl_a2a = ep_nccl;
nvshmem needs GPUs and uses the same module) run every routing case of
tests/test_moe_dispatch.py at capacities C = max T (one rank full, others below, some
empty) and C = max T + 2, on gloo at world 2 and 4 (there also in two groups of two);
the same runs check that dispatch + combine read nothing back to the host. On 2 GPUs
(gpu mark) the same checks run in bf16 over NCCL, nvshmem included, where the experts
take the Triton/grouped_mm paths that leave padding rows unwritten, and CUDA's sync debug
mode proves dispatch + experts + combine sync-free.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_ext.moe.dispatch import DispatchGroups
from moe_ext.moe.dispatch.allgather_rs import AllGatherDispatcher
from moe_ext.moe.dispatch.nccl_a2a import AllToAllDispatcher
from moe_ext.moe.experts import GroupedExperts
from tests.multirank import run_ranks
from tests.test_moe_dispatch import CASES, E, H, _build, _case_tensors, _close, check_strategy

STATIC = {"allgather_rs": AllGatherDispatcher, "nccl_a2a": AllToAllDispatcher}


def _static(name: str, groups: DispatchGroups, capacity: int):
    from moe_ext.moe.dispatch import dispatcher_class

    dispatcher = dispatcher_class(name)(E, groups)
    dispatcher.set_capacity(capacity)
    return dispatcher


def _run(layer, x, grad):
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * grad).sum().backward()
    return y.detach(), x.grad, layer.experts.gate_up_proj.grad, layer.router.weight.grad


def check_static_equals_dynamic(name, groups, seed, cases, extra, dtype=torch.float32,
                                device=torch.device("cpu"), tol=None):
    """Per case, capacity = max T over the group + ``extra``: the static layer's output and
    gradients equal the dynamic layer's (same weights, same tokens), with and without
    autograd (the no-grad path gathers one packed byte buffer), and match the float64
    reference (check_strategy). ``tol`` None: float32 to 1e-6 (CPU; the same arithmetic);
    else test_moe_dispatch's scale-relative bound (bf16 kernels may tile differently for
    the static row count)."""
    ep_size, ep_rank = groups.ep_size, groups.ep_rank

    def same(got, want, what):
        if tol is None:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{what}: {m}")
        else:
            _close(got, want, what, tol)

    for case_idx, (case_name, spec, counts, opts) in enumerate(cases):
        tokens = [counts[r % len(counts)] for r in range(ep_size)]
        capacity = max(max(tokens), 1) + extra
        what = f"{name} ep={ep_size} case={case_name} T={tokens[ep_rank]} C={capacity}"
        t = _case_tensors(seed + case_idx, spec, tokens, opts, dtype, device)
        lo = sum(tokens[:ep_rank])
        x, grad = t["x"][lo:lo + tokens[ep_rank]], t["grad"][lo:lo + tokens[ep_rank]]
        dynamic = _build(name, spec, opts, groups, t, dtype, device)
        static = _build(_static(name, groups, capacity), spec, opts, groups, t, dtype, device)
        for got, want, part in zip(_run(static, x, grad), _run(dynamic, x, grad),
                                   ("output", "input grad", "gate_up grad", "router grad")):
            same(got, want, f"{what}: {part}")
        with torch.no_grad():
            same(static(x), dynamic(x), f"{what}: no-grad output")
        check_strategy(_static(name, groups, capacity), groups, seed + case_idx, dtype, device,
                       tol or "fp32", cases=[cases[case_idx]])


def _equivalence_body(rank, world, seed):
    _no_sync_body(rank, world)
    for name in STATIC:
        for extra in (0, 2):
            check_static_equals_dynamic(name, DispatchGroups(ep=dist.group.WORLD), seed, CASES,
                                        extra)
    if world == 4:
        # two groups of two: group ranks differ from global ranks
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        for name in STATIC:
            check_static_equals_dynamic(name, DispatchGroups(ep=pairs[rank // 2]), seed + 50,
                                        CASES[:2] + CASES[4:5], 0)


def test_static_world_size_1():
    for name in STATIC:
        check_static_equals_dynamic(name, DispatchGroups(), 3, CASES, 1)


@pytest.mark.multirank
@pytest.mark.parametrize("world", [2, 4])
def test_static_matches_dynamic_and_reference_gloo(world):
    run_ranks(_equivalence_body, world, args=(world * 10 + 1,))


def _gpu_body(rank, world):
    from moe_ext.moe.dispatch.nvshmem import nvshmem_available

    device = torch.device("cuda", rank)
    groups = DispatchGroups(ep=dist.group.WORLD)
    names = list(STATIC) + (["nvshmem"] if nvshmem_available() else [])
    for name in names:
        check_static_equals_dynamic(name, groups, 70, CASES, 0, torch.bfloat16, device, 3e-2)
        # decode shape: inference, bf16, few rows -> the Triton experts; no sync anywhere
        layer = _build(_static(name, groups, 4), CASES[0][1], {}, groups,
                       _case_tensors(5, CASES[0][1], [3] * world, {}, torch.bfloat16, device),
                       torch.bfloat16, device)
        x = torch.randn(3 if rank else 4, H, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            routing = layer.router(x)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                x_local, counts, handle = layer.dispatcher.dispatch(x, routing.weights,
                                                                    routing.expert_idx)
                y = layer.dispatcher.combine(layer.experts(x_local, counts), handle)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.isfinite(y).all(), name


@pytest.mark.gpu
@pytest.mark.multirank
def test_gpu_static_matches_dynamic_nccl_bf16():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_ranks(_gpu_body, 2, backend="nccl")


# ---- no host sync -----------------------------------------------------------------------

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__")


class _NoHostReads:
    """Make every way of reading a tensor value on the host raise (and restore after)."""

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

        def refuse(name):
            def method(*args, **kwargs):
                raise AssertionError(f"host sync: Tensor.{name} called")
            return method

        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        return self

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)
        return False


def _no_sync_body(rank, world):
    groups = DispatchGroups(ep=dist.group.WORLD if world > 1 else None)
    gen = torch.Generator().manual_seed(rank)
    capacity, top_k = 5, 2
    x, weights = torch.randn(3, H, generator=gen), torch.rand(3, top_k, generator=gen)
    expert_idx = torch.randint(0, E, (3, top_k), generator=gen)
    with pytest.raises(AssertionError, match="host sync"), _NoHostReads():
        # the guard catches a real sync: the dynamic exchange reads its sizes on the host
        STATIC["allgather_rs"](E, groups).dispatch(x, weights, expert_idx)
    for name in STATIC:
        for num_tokens in (0, 3, capacity):
            dispatcher = _static(name, groups, capacity)
            x = torch.randn(num_tokens, H, generator=gen)
            weights = torch.rand(num_tokens, top_k, generator=gen)
            expert_idx = torch.randint(0, E, (num_tokens, top_k), generator=gen)
            for grad in (False, True):
                xg = x.clone().requires_grad_(grad)
                with torch.set_grad_enabled(grad), _NoHostReads():
                    x_local, counts, handle = dispatcher.dispatch(xg, weights, expert_idx)
                    y = dispatcher.combine(x_local * 2.0, handle)
                    if grad:
                        y.sum().backward()
                assert x_local.shape == (groups.ep_size * capacity * top_k, H)
                assert counts.shape == (dispatcher.num_local_experts,)
                assert y.shape == (num_tokens, H)
                # experts that double their input: y = 2 * x * (sum of the token's weights)
                torch.testing.assert_close(y.detach(), 2 * x * weights.sum(1, keepdim=True))
                if grad:
                    torch.testing.assert_close(xg.grad, 2 * weights.sum(1, keepdim=True)
                                               .expand(-1, H))


def test_static_dispatch_makes_no_host_sync_world_1():
    _no_sync_body(0, 1)  # world 2 and 4: inside test_static_matches_dynamic_and_reference_gloo


# ---- errors and padding rows ------------------------------------------------------------

def test_capacity_errors():
    dispatcher = _static("allgather_rs", DispatchGroups(), 3)
    x, w, idx = torch.randn(4, H), torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="4 tokens on this rank exceed .* capacity "
                                         "max_tokens_per_rank=3; raise it") as err:
        dispatcher.dispatch(x, w, idx)
    assert "\n" not in str(err.value)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive int or None"):
            dispatcher.set_capacity(bad)
    dispatcher.set_capacity(None)
    assert dispatcher.dispatch(x, w, idx)[0].shape == (8, H)  # dynamic again: T*k rows


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_experts_accept_trailing_padding_rows(backend):
    torch.manual_seed(0)
    experts = GroupedExperts(4, H, 32, backend=backend)
    counts = torch.tensor([2, 0, 3, 1])  # 6 real rows
    x = torch.randn(10, H)
    x[6:] = float("nan")  # padding rows may hold anything
    y = experts(x, counts)
    assert y.shape == (10, H)
    torch.testing.assert_close(y[:6], experts(x[:6].clone(), counts))
    if backend == "loop":
        assert torch.equal(y[6:], torch.zeros(4, H))

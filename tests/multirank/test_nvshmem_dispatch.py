"""NvshmemDispatcher on ranks: the refusal of a gloo group, layout logic against an emulated
transport on CPU, and the real NVSHMEM exchange on 2 GPUs. The refusals without CUDA or
NVSHMEM and the slot count: tests/unit/test_nvshmem_dispatch.py.

# T tokens, H hidden, E experts, k top-k, W ranks

CPU tests emulate ``all_to_all_vdev_2d`` / ``all_to_all_vdev_2d_offset`` with gloo,
following torch's kernel semantics (slot-major receive order, an empty slot padded to one
row, device-returned offsets), so the dispatcher's own logic (slots, regrouping, padding,
buffer growth, autograd) is checked against the float64 dense reference and against the
NCCL all-to-all dispatcher without a GPU. The GPU tests run the same checks over NVSHMEM.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from moe_ext.moe.dispatch import DispatchGroups, nvshmem
from moe_ext.moe.dispatch.nccl_a2a import AllToAllDispatcher
from tests.support import CASES, E, assert_nvshmem_refusal, check_strategy, run_ranks

# ---------------------------------------------------------------- refusals (gloo)


def _gloo_refusal_body(rank, world):
    nvshmem.cuda_available = lambda: True
    nvshmem.nvshmem_available = lambda: True
    try:
        nvshmem.NvshmemDispatcher(E, DispatchGroups(ep=dist.group.WORLD))
    except nvshmem.NvshmemUnavailableError as err:
        assert_nvshmem_refusal(err, "gloo")
    else:
        raise AssertionError("NvshmemDispatcher accepted a gloo process group")


def test_refuses_non_nccl_group():
    run_ranks(_gloo_refusal_body, 2)


# ---------------------------------------------------------------- emulated transport (CPU)


def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def _emulated_vdev_2d(input, out, in_splits, out_splits_offsets, group_name):
    """torch's allToAllV_2d with major_align=1: receive chunks (slot, source) in slot-major
    order, each slot's chunks contiguous, an empty slot still taking one row."""
    world, me = dist.get_world_size(), dist.get_rank()
    splits = _gather(in_splits)  # [W] x [W*X]
    inputs = _gather(input)
    slots = in_splits.numel() // world
    start, recv_splits, recv_offsets = 0, [], []
    for slot in range(slots):
        pos = start
        for src in range(world):
            n = int(splits[src][me * slots + slot])
            src_off = int(splits[src][: me * slots + slot].sum())
            out[pos : pos + n] = inputs[src][src_off : src_off + n]
            recv_splits.append(n)
            recv_offsets.append(pos)
            pos += n
        start += max(pos - start, 1)
    out_splits_offsets[0].copy_(torch.tensor(recv_splits))
    out_splits_offsets[1].copy_(torch.tensor(recv_offsets))


def _emulated_vdev_2d_offset(input, out, in_splits_offsets, out_splits_offsets, group_name):
    """torch's reverse exchange: chunks (slot, peer) at given offsets -> dense rank-major."""
    world, me = dist.get_world_size(), dist.get_rank()
    sos = _gather(in_splits_offsets)  # [W] x [2, X*W]
    inputs = _gather(input)
    slots = in_splits_offsets.shape[1] // world
    pos = 0
    for src in range(world):
        for slot in range(slots):
            n, off = int(sos[src][0, slot * world + me]), int(sos[src][1, slot * world + me])
            out[pos : pos + n] = inputs[src][off : off + n]
            out_splits_offsets[0, src * slots + slot] = n
            out_splits_offsets[1, src * slots + slot] = pos
            pos += n


def _install_emulated_transport():
    """In a spawned rank: route the dispatcher's NVSHMEM calls to the gloo emulation."""
    nvshmem._check_environment = lambda groups: None
    nvshmem._select_nvshmem_backend = lambda device: None
    nvshmem._register_group = lambda group_name: None
    nvshmem._check_device_pinning = lambda group, device: None
    nvshmem._current_device = lambda: torch.device("cpu")
    nvshmem._Workspace._alloc = lambda self, shape, dtype: torch.full(
        shape, -7, dtype=dtype, device=self.device
    )  # garbage-filled like fresh memory
    nvshmem.all_to_all_vdev_2d = _emulated_vdev_2d
    nvshmem.all_to_all_vdev_2d_offset = _emulated_vdev_2d_offset


def _routing(seed, tokens, hidden, num_experts, top_k, device, dtype, avoid_expert=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    scores = torch.rand(tokens, num_experts, generator=gen)
    if avoid_expert is not None:
        scores[:, avoid_expert] = -1.0
    expert_idx = scores.topk(top_k, dim=-1).indices.to(device)
    weights = torch.rand(tokens, top_k, generator=gen).to(device)
    return x, weights, expert_idx


def compare_with_nccl_a2a(nv, a2a, seed, tokens, hidden, top_k, device, dtype, avoid_expert=None):
    """Dispatch/combine forward and backward of ``nv`` equal those of ``a2a`` (same rows in
    the same order: forward exact, gradients to rounding of the accumulations)."""
    x, weights, expert_idx = _routing(
        seed, tokens, hidden, nv.num_experts, top_k, device, dtype, avoid_expert
    )
    results = []
    for dispatcher in (nv, a2a):
        xr = x.clone().requires_grad_()
        wr = weights.clone().requires_grad_()
        x_local, per_expert, handle = dispatcher.dispatch(xr, wr, expert_idx)
        scale = torch.arange(1, x_local.shape[0] + 1, device=device, dtype=dtype)[:, None]
        y_local = x_local * scale / max(x_local.shape[0], 1)  # row-dependent "expert"
        y = dispatcher.combine(y_local, handle)
        gen = torch.Generator().manual_seed(seed + 1)
        grad = torch.randn(y.shape, generator=gen).to(device=device, dtype=dtype)
        (y * grad).sum().backward()
        results.append((x_local.detach(), per_expert, y.detach(), xr.grad, wr.grad))
    (xl, pe, y, gx, gw), (xl_ref, pe_ref, y_ref, gx_ref, gw_ref) = results
    assert torch.equal(pe, pe_ref), (pe, pe_ref)
    assert torch.equal(xl, xl_ref), "dispatched rows differ from the NCCL all-to-all"
    assert torch.equal(y, y_ref), "combined output differs from the NCCL all-to-all"
    # bf16 input gradients sum k rows in a different order (seen on 2xH200: up to 4 ulps,
    # 0.0625 at |g|~8 with k=8); the fp32 run pins the same sums to 1e-5.
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 4e-2, "atol": 8e-2}
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gw, gw_ref, **tol)
    if (
        avoid_expert is not None
        and nv.local_expert_start <= avoid_expert < nv.local_expert_start + nv.num_local_experts
    ):
        assert int(pe[avoid_expert - nv.local_expert_start]) == 0


def _emulated_body(rank, world):
    _install_emulated_transport()
    cpu = torch.device("cpu")
    groups = DispatchGroups(ep=dist.group.WORLD)
    a2a = AllToAllDispatcher(E, groups)
    # Every slot layout: one expert per slot, two per slot, all local experts in one slot.
    for slots in (E // world, 2, 1):
        nv = nvshmem.NvshmemDispatcher(E, groups, max_tokens=1, max_exchange_slots=slots)
        assert nv.num_slots == slots
        check_strategy(nv, groups, 40 + slots, torch.float32, cpu, "fp32")
        compare_with_nccl_a2a(
            nv, a2a, 5 + slots, [9, 0][rank], 8, 2, cpu, torch.float32, avoid_expert=1
        )
        compare_with_nccl_a2a(nv, a2a, 6 + slots, 33, 8, 3, cpu, torch.float32)  # grows
    wide = nvshmem.NvshmemDispatcher(64, groups, max_tokens=4)  # 32 local: 16 slots of 2
    assert wide.num_slots == 16
    compare_with_nccl_a2a(
        wide, AllToAllDispatcher(64, groups), 11, 20, 8, 8, cpu, torch.float32, avoid_expert=37
    )


def test_emulated_transport_matches_reference_and_nccl_a2a():
    run_ranks(_emulated_body, 2)


# ---------------------------------------------------------------- NVSHMEM on 2 GPUs


def _gpu_body(rank, world):
    # NVSHMEM binds to the current device on first use: pin it before anything else.
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    groups = DispatchGroups(ep=dist.group.WORLD)
    a2a = AllToAllDispatcher(E, groups)
    nv = nvshmem.NvshmemDispatcher(E, groups, max_tokens=1)  # grows during the cases
    grouped = nvshmem.NvshmemDispatcher(E, groups, max_tokens=1, max_exchange_slots=2)
    for dtype, tol in ((torch.float32, "fp32"), (torch.bfloat16, 3e-2)):
        check_strategy(nv, groups, 70, dtype, device, tol)
        check_strategy(grouped, groups, 80, dtype, device, tol, cases=CASES[:2] + CASES[4:5])
        for i, dispatcher in enumerate((nv, grouped)):
            compare_with_nccl_a2a(
                dispatcher, a2a, 90 + i, [13, 0][rank], 64, 2, device, dtype, avoid_expert=2
            )
            compare_with_nccl_a2a(dispatcher, a2a, 95 + i, 300, 64, 2, device, dtype)
    wide = nvshmem.NvshmemDispatcher(128, groups, max_tokens=16)  # Qwen3 layout: 16 slots of 4
    compare_with_nccl_a2a(
        wide,
        AllToAllDispatcher(128, groups),
        99,
        257,
        256,
        8,
        device,
        torch.bfloat16,
        avoid_expert=70,
    )
    torch.cuda.synchronize()
    dist.barrier()
    # Every check passed. NVSHMEM's finalizer can crash at interpreter exit on some
    # torch/NVSHMEM builds (after all work is done); leave without running it so the exit
    # code reports the test, not the teardown.
    os._exit(0)


@pytest.mark.gpu
def test_nvshmem_matches_reference_and_nccl_a2a_on_2_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    if not nvshmem.nvshmem_available():
        pytest.fail(
            "NVSHMEM is not available on this GPU machine "
            "(torch.distributed._symmetric_memory.is_nvshmem_available() is False)"
        )
    run_ranks(_gpu_body, 2, backend="nccl")

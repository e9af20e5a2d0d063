"""Dual-batch overlap in the eager EP layer (``Dispatcher.set_overlap``,
moe.layer.overlapped_routed_output) on 2 gloo ranks: ep_nccl (nccl_a2a) and ep_allgather
(allgather_rs), dynamic and static capacity, equal to the dense float64 reference in
output and gradients (tests.support.check_strategy: input, experts, router, shared expert)
and to the same layer without overlap; it makes one exchange per micro-batch. GPU (NCCL,
bf16): tests/gpu/test_moe_overlap_gpu.py.

# T tokens, H hidden, k top-k, C static capacity, L = 1 layer
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.support import (
    CASES,
    STATIC,
    build_case_layer,
    case_tensors,
    check_close,
    check_strategy,
    run_ranks,
)


def _overlapped(name, groups, capacity=None, microbatches=2):
    from moe_ext.moe.dispatch import dispatcher_class

    dispatcher = dispatcher_class(name)(8, groups)
    dispatcher.set_capacity(capacity)
    dispatcher.set_overlap(microbatches)
    return dispatcher


def _same_as_unsplit(name, groups, capacity, seed, dtype, device, tol):
    """Overlapped and plain layers on the same weights and tokens: equal outputs and input
    gradients (up to summation order), and twice the exchanges."""
    from moe_ext.bench.collectives import count_collectives
    from moe_ext.moe.dispatch import dispatcher_class

    case_name, spec, counts, opts = CASES[0]
    ep_rank = groups.ep_rank
    tokens = [counts[r % len(counts)] for r in range(groups.ep_size)]
    t = case_tensors(seed, spec, tokens, opts, dtype, device)
    lo = sum(tokens[:ep_rank])
    x = t["x"][lo : lo + tokens[ep_rank]]
    plain_dispatcher = dispatcher_class(name)(8, groups)
    plain_dispatcher.set_capacity(capacity)
    layers = [
        build_case_layer(d, spec, opts, groups, t, dtype, device)
        for d in (plain_dispatcher, _overlapped(name, groups, capacity))
    ]
    outs, grads, ops = [], [], []
    for layer in layers:
        xg = x.clone().requires_grad_()
        y, n = count_collectives(layer, xg)
        (y * t["grad"][lo : lo + tokens[ep_rank]]).sum().backward()
        outs.append(y.detach())
        grads.append(xg.grad)
        ops.append(n)
    what = f"{name} C={capacity}"
    if tol == "fp32":
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6, msg=what)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6, msg=what)
    else:
        check_close(outs[1], outs[0], f"{what}: output", tol)
        check_close(grads[1], grads[0], f"{what}: input grad", tol)
    # one exchange per micro-batch: every kind of the plain layer's forward twice, but the
    # dynamic exchange's sizes (counts all-to-all, largest-T all-gather) once for both
    want = {kind: 2 * n for kind, n in ops[0].items()}
    if capacity is None:
        want["all_to_all" if name == "nccl_a2a" else "all_gather"] -= 1
    assert ops[1] == want, (what, ops)


def overlap_body(rank, world, device_kind="cpu", dtype_name="float32", tol="fp32"):
    """Every check of this file on this rank; the GPU test runs it over NCCL in bf16."""
    from moe_ext.moe.dispatch import DispatchGroups

    dtype = getattr(torch, dtype_name)
    device = torch.device("cpu")
    if device_kind == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    groups = DispatchGroups(ep=dist.group.WORLD)
    for name in STATIC:  # allgather_rs (ep_allgather), nccl_a2a (ep_nccl)
        check_strategy(_overlapped(name, groups), groups, 31, dtype, device, tol)
        _same_as_unsplit(name, groups, None, 5, dtype, device, tol)
        for case_idx, case in enumerate(CASES):
            capacity = max(case[2][:world]) + 1
            check_strategy(
                _overlapped(name, groups, capacity),
                groups,
                40 + case_idx,
                dtype,
                device,
                tol,
                cases=[case],
            )
        _same_as_unsplit(name, groups, 8, 6, dtype, device, tol)
        # three micro-batches (a part may be empty on a rank) still equal the reference
        check_strategy(
            _overlapped(name, groups, None, microbatches=3),
            groups,
            50,
            dtype,
            device,
            tol,
            cases=CASES[-2:],
        )


@pytest.mark.timeout(180)
def test_overlap_matches_reference_world2():
    run_ranks(overlap_body, world_size=2)


def _min_tokens_body(rank, world):
    """Under a static capacity, overlap splits only when each part gets min_tokens rows:
    a decode-sized capacity keeps one exchange (every rank decides alike, from C)."""
    from moe_ext.moe.dispatch import DispatchGroups, dispatcher_class

    groups = DispatchGroups(ep=dist.group.WORLD)
    dispatcher = dispatcher_class("nccl_a2a")(8, groups)
    dispatcher.set_overlap(2, min_tokens=4)
    assert dispatcher.microbatches() == 2  # dynamic: always
    dispatcher.set_capacity(7)  # ceil(7/2) = 4 rows per part
    assert dispatcher.microbatches() == 2
    dispatcher.set_capacity(6)  # 3 rows per part < 4
    assert dispatcher.microbatches() == 1


@pytest.mark.timeout(60)
def test_overlap_min_tokens_world2():
    run_ranks(_min_tokens_body, world_size=2)


def test_microbatch_sizes_and_refusals():
    """Always n parts (ranks with few tokens still make every exchange); a dispatcher
    without an asynchronous exchange refuses overlap in one line."""
    from moe_ext.moe.dispatch import DispatchGroups, dispatcher_class
    from moe_ext.moe.layer import microbatch_sizes

    assert microbatch_sizes(5, 2) == [3, 2]
    assert microbatch_sizes(1, 2) == [1, 0]
    assert microbatch_sizes(0, 3) == [0, 0, 0]
    assert microbatch_sizes(7, 3) == [3, 3, 1]
    for name in ("local", "tp_sharded"):
        dispatcher = dispatcher_class(name)(8, DispatchGroups())
        dispatcher.set_overlap(1)
        with pytest.raises(ValueError, match="no asynchronous exchange") as err:
            dispatcher.set_overlap(2)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="positive int"):
        dispatcher_class("nccl_a2a")(8, DispatchGroups()).set_overlap(0)


def _model_body(rank, world):
    """Transformer.set_moe_overlap on an ep dp 2 model: each rank's prefill logits equal
    the single-rank model's on its own tokens, dynamic and under a static capacity."""
    from datetime import timedelta

    from moe_ext.groups import ProcessGroups
    from moe_ext.model import Transformer
    from moe_ext.model.parallelize import parallelize
    from moe_ext.model.weights import init_random_full
    from tests.support import plan_of, tiny_args

    args = tiny_args()
    ref = Transformer(args)
    ref.load_state_dict(init_random_full(args))
    tokens = torch.tensor([[256, 72, 101, 108], [256, 9, 200, 3 + rank]])  # [2, 4] per rank
    with torch.no_grad():
        want = ref(tokens)
    for strategy in ("ep_nccl", "ep_allgather"):
        plan = plan_of(strategy, dp=2, ep=2)
        model = Transformer(args)
        model.load_state_dict(init_random_full(args))
        parallelize(model, plan, ProcessGroups.build(plan, "gloo", timedelta(seconds=60)))
        model.set_moe_overlap(2, min_tokens=1)
        for capacity in (None, 8):
            model.set_moe_capacity(capacity)
            with torch.no_grad():
                got = model(tokens)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=strategy)


@pytest.mark.timeout(60)
def test_model_overlap_matches_single_rank_world2():
    run_ranks(_model_body, world_size=2)

"""Every dispatcher at every world size computes the dense reference's outputs and gradients.

# T tokens, H hidden, E experts, k top-k, F expert FFN size

One spawned run per world size does all strategies and routing cases (spawning ranks is
the expensive part). EP strategies give each rank its own tokens (a slice of the global
batch); the TP-sharded strategy gives every rank the whole batch. Gradients checked: input,
expert shards (sliced from the full reference gradient), router weight and shared expert
(summed over the EP group, whose ranks each saw part of the batch).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_ext.moe.dispatch import DispatchGroups
from moe_ext.moe.layer import build_moe_layer, expert_shard, load_full_expert_weights
from tests.moe_reference import RoutingSpec, reference_moe
from tests.multirank import run_ranks

H, F, E, FS = 16, 32, 8, 16

# name, routing, per-rank token counts (indexed by EP rank, cycled), options
CASES = [
    ("softmax_renorm", RoutingSpec(top_k=2), [7, 5, 3, 6], {}),
    ("softmax_plain_shared_gate", RoutingSpec(top_k=2, norm_topk_prob=False), [4, 6, 5, 2],
     {"shared": True}),
    ("sigmoid_group_bias_scale", RoutingSpec(top_k=3, score_func="sigmoid", n_group=4,
                                             topk_group=2, routed_scaling_factor=2.5),
     [6, 3, 5, 4], {"bias": "random"}),
    ("all_to_one_expert_k1", RoutingSpec(top_k=1, score_func="sigmoid"), [5, 4, 3, 6],
     {"bias": "expert3"}),
    ("rank_with_zero_tokens", RoutingSpec(top_k=2), [6, 0, 4, 0], {}),
    ("one_token_k_all", RoutingSpec(top_k=E), [1, 1, 1, 1], {}),
]
STRATEGIES = ("local", "tp_sharded", "allgather_rs", "nccl_a2a")


def _case_tensors(seed, spec, tokens, opts, dtype, device):
    """Full (unsharded) weights, the global batch and the output gradient, identical on
    every rank; rounded to ``dtype`` so the float64 reference sees the same values."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    t = {"router": rand(E, H, scale=0.5), "gate_up": rand(E, 2 * F, H, scale=H ** -0.5),
         "down": rand(E, H, F, scale=F ** -0.5), "x": rand(sum(tokens), H),
         "grad": rand(sum(tokens), H), "bias": None, "shared": None, "shared_gate": None}
    if opts.get("bias") == "random":
        t["bias"] = torch.randn(E, generator=gen).mul(0.1).to(device)
    elif opts.get("bias") == "expert3":
        t["bias"] = torch.zeros(E, device=device)
        t["bias"][3] = 100.0  # every token picks expert 3 (selection only)
    if opts.get("shared"):
        t["shared"] = (rand(FS, H, scale=H ** -0.5), rand(FS, H, scale=H ** -0.5),
                       rand(H, FS, scale=FS ** -0.5))
        t["shared_gate"] = rand(1, H, scale=H ** -0.5)
    return t


def _build(strategy, spec, opts, groups, t, dtype, device):
    layer = build_moe_layer(
        H, F, E, spec.top_k, score_func=spec.score_func, norm_topk_prob=spec.norm_topk_prob,
        n_group=spec.n_group, topk_group=spec.topk_group,
        routed_scaling_factor=spec.routed_scaling_factor, correction_bias=t["bias"] is not None,
        shared_expert_size=FS if opts.get("shared") else None,
        shared_expert_gate=bool(opts.get("shared")), dispatcher=strategy, groups=groups,
        dtype=dtype, device=device)
    with torch.no_grad():
        layer.router.weight.copy_(t["router"])
        if t["bias"] is not None:
            layer.router.e_score_correction_bias.copy_(t["bias"])
        if t["shared"] is not None:
            for lin, w in zip((layer.shared_expert.gate_proj, layer.shared_expert.up_proj,
                               layer.shared_expert.down_proj), t["shared"]):
                lin.weight.copy_(w)
            layer.shared_expert_gate.weight.copy_(t["shared_gate"])
    load_full_expert_weights(layer, t["gate_up"], t["down"])
    return layer


def _reference(spec, t):
    leaves = {name: t[name].double().clone().requires_grad_()
              for name in ("x", "router", "gate_up", "down")}
    shared = None if t["shared"] is None else tuple(
        w.double().clone().requires_grad_() for w in t["shared"])
    shared_gate = None if t["shared_gate"] is None else \
        t["shared_gate"].double().clone().requires_grad_()
    y = reference_moe(leaves["x"], leaves["router"], leaves["gate_up"], leaves["down"], spec,
                      t["bias"], shared, shared_gate)
    (y * t["grad"].double()).sum().backward()
    grads = {name: leaf.grad for name, leaf in leaves.items()}
    grads["shared"] = None if shared is None else [w.grad for w in shared]
    grads["shared_gate"] = None if shared_gate is None else shared_gate.grad
    return y.detach(), grads


def _close(actual, expected, what, tol):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    if expected.numel() == 0:
        return
    if tol == "fp32":
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5,
                                   msg=lambda m: f"{what}: {m}")
    else:  # bf16: error relative to the tensor's scale
        err = (actual - expected).abs().max().item()
        scale = max(expected.abs().max().item(), 1e-3)
        assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x scale {scale:.3g}"


def _sum_over(tensor, group):
    if group is not None:
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
    return tensor


def check_strategy(strategy, groups, seed, dtype, device, tol, cases=CASES):
    """Run every case through ``strategy`` on this rank and compare with the reference."""
    ep_size, ep_rank = groups.ep_size, groups.ep_rank
    for case_idx, (name, spec, counts, opts) in enumerate(cases):
        what = f"{strategy} ep={ep_size} etp={groups.etp_size} case={name}"
        tokens = [counts[r % len(counts)] for r in range(ep_size)]
        t = _case_tensors(seed + case_idx, spec, tokens, opts, dtype, device)
        y_ref, g_ref = _reference(spec, t)
        lo = sum(tokens[:ep_rank])
        rows = slice(lo, lo + tokens[ep_rank])  # this rank's tokens (all of them for etp)
        layer = _build(strategy, spec, opts, groups, t, dtype, device)
        layer.train()
        x = t["x"][rows].clone().requires_grad_()
        y = layer(x)
        assert y.dtype == dtype and y.shape == x.shape, what
        (y * t["grad"][rows]).sum().backward()
        _close(y, y_ref[rows], f"{what}: output", tol)
        _close(x.grad, g_ref["x"][rows], f"{what}: input grad", tol)
        gate_up_ref, down_ref = expert_shard(g_ref["gate_up"], g_ref["down"], layer.dispatcher)
        _close(layer.experts.gate_up_proj.grad, gate_up_ref, f"{what}: gate_up grad", tol)
        _close(layer.experts.down_proj.grad, down_ref, f"{what}: down grad", tol)
        _close(_sum_over(layer.router.weight.grad, groups.ep), g_ref["router"],
               f"{what}: router grad", tol)
        if g_ref["shared"] is not None:
            mods = (layer.shared_expert.gate_proj, layer.shared_expert.up_proj,
                    layer.shared_expert.down_proj, layer.shared_expert_gate)
            for mod, ref in zip(mods, list(g_ref["shared"]) + [g_ref["shared_gate"]]):
                _close(_sum_over(mod.weight.grad, groups.ep), ref, f"{what}: shared grad", tol)
        load = layer.router.read_expert_load()
        assert int(load.sum()) == tokens[ep_rank] * spec.top_k, what
        if opts.get("bias") == "expert3":
            assert int(load[3]) == tokens[ep_rank], f"{what}: bias did not force expert 3"


def _world_groups(strategy, world):
    group = None if world == 1 else dist.group.WORLD
    if strategy == "tp_sharded":
        return DispatchGroups(etp=group)
    if strategy == "local":
        return DispatchGroups()
    return DispatchGroups(ep=group)


def _equivalence_body(rank, world, seed, device_kind, dtype_name, tol):
    dtype = getattr(torch, dtype_name)
    device = torch.device("cpu")
    if device_kind == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    for strategy in STRATEGIES[1:]:
        check_strategy(strategy, _world_groups(strategy, world), seed, dtype, device, tol)
    if world == 4:
        # Two independent groups of two: group ranks differ from global ranks.
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        mine = pairs[rank // 2]
        for strategy in STRATEGIES[1:]:
            sharded = strategy == "tp_sharded"
            groups = DispatchGroups(etp=mine) if sharded else DispatchGroups(ep=mine)
            check_strategy(strategy, groups, seed + 100, dtype, device, tol, cases=CASES[:3])


def test_all_strategies_world_size_1():
    for strategy in STRATEGIES:
        check_strategy(strategy, DispatchGroups(), 0, torch.float32, torch.device("cpu"), "fp32")


@pytest.mark.multirank
@pytest.mark.parametrize("world", [2, 4])
def test_strategies_match_reference_gloo(world):
    run_ranks(_equivalence_body, world, args=(world * 10, "cpu", "float32", "fp32"))


@pytest.mark.gpu
@pytest.mark.multirank
def test_strategies_match_reference_nccl_bf16():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_ranks(_equivalence_body, 2, args=(7, "cuda", "bfloat16", 3e-2), backend="nccl")


def test_dispatcher_errors():
    from moe_ext.moe.dispatch import build_dispatcher
    with pytest.raises(ValueError, match="unknown dispatcher"):
        build_dispatcher("carrier_pigeon", E)
    d = build_dispatcher("local", E)
    with pytest.raises(ValueError, match="int64"):
        d.dispatch(torch.randn(3, H), torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="shapes disagree"):
        d.dispatch(torch.randn(3, H), torch.rand(3, 2), torch.zeros(4, 2, dtype=torch.int64))

"""Rank layout (pure, checked against Megatron-core's RankGenerator) and ProcessGroups of a
single process; moe_ext.dist's environment parsing. Groups on several ranks:
tests/multirank/test_groups.py."""

from __future__ import annotations

import warnings
from datetime import timedelta

import pytest

from moe_ext.groups import PARTIAL_FAMILIES, ProcessGroups, rank_layout
from tests.support import layout_plan

# every (strategy, world, tp, pp, ep) with world in 1, 2, 4, 8
PLANS = [
    layout_plan(s, w, tp, pp, ep)
    for w in (1, 2, 4, 8)
    for s in ("replicate", "tp_experts", "ep_nccl")
    for tp in (1, 2, 4, 8)
    for pp in (1, 2, 4, 8)
    if w % (tp * pp) == 0
    for ep in (
        (None,)
        if s != "ep_nccl"
        else sorted({d for d in range(1, w // pp + 1) if (w // pp) % d == 0})
    )
]


def _megatron_generators(plan):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.parallel_state import RankGenerator
    order = "tp-cp-ep-dp-pp"  # megatron-core's default
    attn = RankGenerator(tp=plan.tp, ep=1, dp=plan.dp, pp=plan.pp, cp=1, order=order)
    expert = RankGenerator(tp=plan.etp, ep=plan.ep, dp=plan.edp, pp=plan.pp, cp=1, order=order)
    return attn, expert


@pytest.mark.parametrize(
    "plan", PLANS, ids=lambda p: f"{p.strategy}-w{p.world_size}-tp{p.tp}-pp{p.pp}-ep{p.ep}"
)
def test_layout_matches_megatron_and_partitions(plan):
    layout = rank_layout(plan)
    world = list(range(plan.world_size))
    for name, groups in layout.items():
        if name in PARTIAL_FAMILIES:
            continue
        flat = sorted(r for g in groups for r in g)
        assert flat == world, f"{name} does not partition the ranks: {groups}"
        assert all(g == sorted(g) for g in groups)

    attn, expert = _megatron_generators(plan)
    for ours, theirs in [
        ("tp", "tp"),
        ("dp", "dp"),
        ("pp", "pp"),
        ("mp", "tp-pp"),
        ("tp_dp", "tp-dp"),
        ("dp_cp", "dp-cp"),
        ("cp", "cp"),
    ]:
        assert layout[ours] == attn.get_ranks(theirs), ours
    for ours, theirs in [
        ("etp", "tp"),
        ("ep", "ep"),
        ("edp", "dp"),
        ("tp_ep", "tp-ep"),
        ("tp_ep_pp", "tp-ep-pp"),
    ]:
        assert layout[ours] == expert.get_ranks(theirs), ours

    sizes = {
        "tp": plan.tp,
        "dp": plan.dp,
        "pp": plan.pp,
        "ep": plan.ep,
        "etp": plan.etp,
        "edp": plan.edp,
        "mp": plan.tp * plan.pp,
        "tp_ep_pp": plan.etp * plan.ep * plan.pp,
    }
    for name, size in sizes.items():
        assert all(len(g) == size for g in layout[name]), name


@pytest.mark.parametrize(
    "plan", PLANS, ids=lambda p: f"{p.strategy}-w{p.world_size}-tp{p.tp}-pp{p.pp}-ep{p.ep}"
)
def test_attention_and_expert_layouts_agree(plan):
    layout = rank_layout(plan)
    # tp groups are adjacent ranks
    for g in layout["tp"]:
        assert g == list(range(g[0], g[0] + plan.tp))
    stage_of = {r: i for i, g in enumerate(layout["tp_dp"]) for r in g}
    # expert groups never cross a pipeline stage: experts of a stage's layers stay there
    for name in ("ep", "etp", "edp", "tp_ep"):
        for g in layout[name]:
            assert len({stage_of[r] for r in g}) == 1, (name, g)
    if plan.strategy == "tp_experts":
        assert layout["etp"] == layout["tp"]  # experts sharded exactly like attention
        assert layout["edp"] == layout["dp"]
    if plan.strategy == "replicate":
        assert layout["edp"] == layout["tp_dp"]  # every rank of a stage holds all experts
    if plan.is_expert_parallel and plan.ep % plan.tp == 0:
        # the tokens a TP group splits before dispatch go to one EP group
        ep_of = {r: i for i, g in enumerate(layout["ep"]) for r in g}
        for g in layout["tp"]:
            assert len({ep_of[r] for r in g}) == 1
    # embeddings: first and last stage of each pipeline
    for pp_group, embd, pos in zip(layout["pp"], layout["embd"], layout["pos_embd"]):
        assert embd == sorted({pp_group[0], pp_group[-1]}) and pos == [pp_group[0]]


def test_worked_example_of_the_docstring():
    layout = rank_layout(layout_plan("ep_nccl", 8, tp=2, pp=2))
    assert layout["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout["mp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert layout["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout["edp"] == [[r] for r in range(8)]
    assert layout["embd"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_build_refuses_a_plan_for_another_world_size():
    from moe_ext.dist import DistEnv, destroy, init_distributed

    init_distributed(DistEnv(), "cpu", 30)
    try:
        with pytest.raises(ValueError, match="world_size=1"):
            ProcessGroups.build(layout_plan("ep_nccl", 2), "gloo", timedelta(seconds=10))
        pgs = ProcessGroups.build(layout_plan("replicate", 1), "gloo", timedelta(seconds=10))
        assert pgs.dispatch_groups().ep is None and pgs.pp_prev_rank is None
        assert pgs.is_first_stage and pgs.is_last_stage
    finally:
        destroy()


# ---------------------------------------------------------------------------- moe_ext.dist


def test_dist_env_from_environ():
    from moe_ext.dist import DistEnv, DistEnvError

    assert DistEnv.from_environ({}) == DistEnv(0, 1, 0, 1, "127.0.0.1", 29500)
    env = DistEnv.from_environ(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node0",
            "MASTER_PORT": "1234",
        }
    )
    assert env == DistEnv(3, 4, 1, 2, "node0", 1234) and env.is_distributed
    for bad, fix in [
        ({"WORLD_SIZE": "two"}, "not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "torchrun --nproc-per-node"),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "launch with torchrun"),
    ]:
        with pytest.raises(DistEnvError, match=fix):
            DistEnv.from_environ(bad)

"""Rank layout (pure, checked against Megatron-core's RankGenerator) and ProcessGroups on
gloo ranks: membership by all_gather, Megatron ProcessGroupCollection, DeepSpeed groups."""
from __future__ import annotations

import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moe_ext.groups import PARTIAL_FAMILIES, ProcessGroups, rank_layout
from moe_ext.plan import ParallelPlan
from tests.multirank import run_ranks


def _plan(strategy, world, tp=1, pp=1, ep=None):
    dp = world // (tp * pp)
    if strategy == "replicate":
        ep_, etp, edp = 1, 1, tp * dp
    elif strategy == "tp_experts":
        ep_, etp, edp = 1, tp, dp
    else:
        ep_ = ep or tp * dp
        etp, edp = 1, tp * dp // ep_
    return ParallelPlan(strategy, world, tp, pp, dp, ep_, etp, edp, "d", "test")


# every (strategy, world, tp, pp, ep) with world in 1, 2, 4, 8
PLANS = [
    _plan(s, w, tp, pp, ep)
    for w in (1, 2, 4, 8)
    for s in ("replicate", "tp_experts", "ep_nccl")
    for tp in (1, 2, 4, 8) for pp in (1, 2, 4, 8)
    if w % (tp * pp) == 0
    for ep in ((None,) if s != "ep_nccl" else
               sorted({d for d in range(1, w // pp + 1) if (w // pp) % d == 0}))
]


def _megatron_generators(plan):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.parallel_state import RankGenerator
    order = "tp-cp-ep-dp-pp"  # megatron-core's default
    attn = RankGenerator(tp=plan.tp, ep=1, dp=plan.dp, pp=plan.pp, cp=1, order=order)
    expert = RankGenerator(tp=plan.etp, ep=plan.ep, dp=plan.edp, pp=plan.pp, cp=1, order=order)
    return attn, expert


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.strategy}-w{p.world_size}-tp{p.tp}"
                         f"-pp{p.pp}-ep{p.ep}")
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
    for ours, theirs in [("tp", "tp"), ("dp", "dp"), ("pp", "pp"), ("mp", "tp-pp"),
                         ("tp_dp", "tp-dp"), ("dp_cp", "dp-cp"), ("cp", "cp")]:
        assert layout[ours] == attn.get_ranks(theirs), ours
    for ours, theirs in [("etp", "tp"), ("ep", "ep"), ("edp", "dp"), ("tp_ep", "tp-ep"),
                         ("tp_ep_pp", "tp-ep-pp")]:
        assert layout[ours] == expert.get_ranks(theirs), ours

    sizes = {"tp": plan.tp, "dp": plan.dp, "pp": plan.pp, "ep": plan.ep, "etp": plan.etp,
             "edp": plan.edp, "mp": plan.tp * plan.pp, "tp_ep_pp": plan.etp * plan.ep * plan.pp}
    for name, size in sizes.items():
        assert all(len(g) == size for g in layout[name]), name


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.strategy}-w{p.world_size}-tp{p.tp}"
                         f"-pp{p.pp}-ep{p.ep}")
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
    layout = rank_layout(_plan("ep_nccl", 8, tp=2, pp=2))
    assert layout["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout["mp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert layout["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout["edp"] == [[r] for r in range(8)]
    assert layout["embd"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


# ---------------------------------------------------------------------------- multi-rank

def _check_membership(pgs: ProcessGroups, rank: int, device: str = "cpu"):
    """all_gather global ranks inside each family's group: the members must be exactly the
    layout's list, in group-rank order."""
    for name in sorted(pgs.layout):
        group = pgs.group(name)
        expected = pgs.ranks_of(name)
        if group is None:
            assert name in PARTIAL_FAMILIES and not any(rank in g for g in pgs.layout[name])
            continue
        out = [torch.zeros(1, dtype=torch.int64, device=device) for _ in expected]
        dist.all_gather(out, torch.tensor([rank], device=device), group=group)
        assert [int(t) for t in out] == expected, (name, expected, out)


def _groups_body(rank, world, plan):
    pgs = ProcessGroups.build(plan, "gloo", timedelta(seconds=60))
    _check_membership(pgs, rank)
    attn_coords = (rank % plan.tp, (rank // plan.tp) % plan.dp, rank // (plan.tp * plan.dp))
    assert (pgs.tp_rank, pgs.dp_rank, pgs.pp_rank) == attn_coords
    assert pgs.ep_rank == (rank // plan.etp) % plan.ep
    stride = plan.tp * plan.dp
    assert pgs.pp_prev_rank == (rank - stride if pgs.pp_rank > 0 else None)
    assert pgs.pp_next_rank == (rank + stride if pgs.pp_rank < plan.pp - 1 else None)
    dg = pgs.dispatch_groups()
    assert dg.ep_size == plan.ep and dg.etp_size == plan.etp
    assert (dg.ep is None) == (plan.ep == 1) and (dg.etp is None) == (plan.etp == 1)
    assert dg.ep_rank == pgs.ep_rank
    # an identical rank list is one communicator, not two
    assert pgs.group("dp_cp") is pgs.dp and pgs.group("tp_cp") is pgs.tp


def _megatron_body(rank, world, plan):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.process_groups_config import ProcessGroupCollection
    import dataclasses
    pgs = ProcessGroups.build(plan, "gloo", timedelta(seconds=60))
    coll = pgs.to_megatron_pg_collection()
    assert isinstance(coll, ProcessGroupCollection)
    declared = {f.name for f in dataclasses.fields(ProcessGroupCollection)}
    assert declared <= set(vars(coll))  # every field of the installed version is set
    size = lambda g: dist.get_world_size(g)  # noqa: E731
    assert size(coll.tp) == plan.tp and size(coll.pp) == plan.pp and size(coll.dp) == plan.dp
    assert size(coll.ep) == plan.ep and size(coll.expt_tp) == plan.etp
    assert size(coll.expt_dp) == plan.edp and size(coll.cp) == 1
    assert size(coll.mp) == plan.tp * plan.pp
    assert size(coll.tp_ep_pp) == plan.etp * plan.ep * plan.pp
    # Megatron reads ranks through torch.distributed on these groups
    assert dist.get_process_group_ranks(coll.ep) == pgs.ranks_of("ep")
    assert dist.get_process_group_ranks(coll.embd) == pgs.ranks_of("embd")
    t = torch.ones(1)
    dist.all_reduce(t, group=coll.tp_ep)
    assert t.item() == plan.etp * plan.ep


def _deepspeed_body(rank, world, plan):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from deepspeed.utils import groups as ds
    pgs = ProcessGroups.build(plan, "gloo", timedelta(seconds=60))
    name = pgs.register_deepspeed_groups()
    assert name == f"ep_size_{plan.ep}"
    assert ds._get_expert_parallel_group(name) is pgs.ep
    assert ds._get_expert_data_parallel_group(name) is pgs.edp
    assert ds._get_expert_parallel_world_size(name) == plan.ep
    assert ds._get_expert_data_parallel_world_size(name) == plan.edp
    assert ds._get_expert_parallel_rank(name) == pgs.ep_rank
    assert list(ds._get_expert_parallel_group_ranks(name)) == pgs.ranks_of("ep")
    assert list(ds._get_expert_data_parallel_group_ranks(name)) == pgs.ranks_of("edp")
    # DeepSpeed's own arithmetic for the EP source rank must agree with our layout
    assert ds._get_expert_parallel_src_rank(name) == pgs.ranks_of("ep")[0]
    assert ds._get_expert_broadcast_src_rank(name) == pgs.ranks_of("edp")[0]
    assert ds._get_max_expert_size() == plan.ep
    # a DeepSpeed MoE layer finds our group instead of creating its own
    assert name in ds._get_expert_parallel_group_dict()
    mpu = pgs.deepspeed_mpu()
    assert mpu.get_data_parallel_world_size() == plan.dp
    assert mpu.get_tensor_model_parallel_world_size() == plan.tp
    assert mpu.get_data_parallel_group_ranks() == pgs.ranks_of("dp")
    assert mpu.get_model_parallel_rank() == pgs.ranks_of("mp").index(rank)
    pgs.register_deepspeed_groups()  # idempotent


def _all_body(rank, world, plans):
    """Several plans on one set of ranks (spawning ranks costs more than building groups)."""
    from deepspeed.utils import groups as ds
    for plan in plans:
        _groups_body(rank, world, plan)
        _megatron_body(rank, world, plan)
        # each plan registers its own groups under DeepSpeed's name; forget the last plan's
        for d in (ds._EXPERT_PARALLEL_GROUP, ds._EXPERT_PARALLEL_GROUP_RANKS,
                  ds._EXPERT_DATA_PARALLEL_GROUP, ds._EXPERT_DATA_PARALLEL_GROUP_RANKS):
            d.clear()
        _deepspeed_body(rank, world, plan)
        dist.barrier()


MULTIRANK_PLANS = {
    2: [_plan("ep_nccl", 2),                   # ep 2
        _plan("tp_experts", 2, tp=2)],         # etp = tp = 2
    4: [_plan("ep_allgather", 4, tp=2),        # tp 2, dp 2, ep 4
        _plan("ep_nccl", 4, tp=2, ep=2),       # ep 2 x edp 2
        _plan("ep_nccl", 4, pp=2, ep=1),       # pp 2, dp 2, ep 1, edp 2
        _plan("tp_experts", 4, tp=2, pp=2),    # etp 2, pp 2
        _plan("replicate", 4, tp=2)],          # edp 4
}


@pytest.mark.multirank
@pytest.mark.parametrize("world", [2, 4])
def test_process_groups_megatron_deepspeed(world):
    """Membership by all_gather, rank helpers, Megatron ProcessGroupCollection and DeepSpeed
    registration for every plan of this world size."""
    run_ranks(_all_body, world, (MULTIRANK_PLANS[world],))


def _nccl_body(rank, world, plans):
    import dataclasses
    import warnings as w
    torch.cuda.set_device(rank)
    from megatron.core.process_groups_config import ProcessGroupCollection
    for plan in plans:
        pgs = ProcessGroups.build(plan, "nccl", timedelta(seconds=120))
        _check_membership(pgs, rank, device=f"cuda:{rank}")
        with w.catch_warnings():
            w.simplefilter("error")  # every field of the installed megatron-core is mapped
            coll = pgs.to_megatron_pg_collection()
        declared = {f.name for f in dataclasses.fields(ProcessGroupCollection)}
        assert declared <= set(vars(coll))
        assert dist.get_process_group_ranks(coll.ep) == pgs.ranks_of("ep")
        t = torch.ones(4, device=f"cuda:{rank}")
        dist.all_reduce(t, group=pgs.dispatch_groups().ep or pgs.tp)
        dist.barrier()


@pytest.mark.gpu
@pytest.mark.multirank
def test_process_groups_on_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_ranks(_nccl_body, 2, ([_plan("ep_nccl", 2), _plan("tp_experts", 2, tp=2),
                               _plan("replicate", 2)],), backend="nccl")


def test_build_refuses_a_plan_for_another_world_size():
    from moe_ext.dist import DistEnv, destroy, init_distributed
    init_distributed(DistEnv(), "cpu", 30)
    try:
        with pytest.raises(ValueError, match="world_size=1"):
            ProcessGroups.build(_plan("ep_nccl", 2), "gloo", timedelta(seconds=10))
        pgs = ProcessGroups.build(_plan("replicate", 1), "gloo", timedelta(seconds=10))
        assert pgs.dispatch_groups().ep is None and pgs.pp_prev_rank is None
        assert pgs.is_first_stage and pgs.is_last_stage
    finally:
        destroy()


# ---------------------------------------------------------------------------- moe_ext.dist

def test_dist_env_from_environ():
    from moe_ext.dist import DistEnv, DistEnvError
    assert DistEnv.from_environ({}) == DistEnv(0, 1, 0, 1, "127.0.0.1", 29500)
    env = DistEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0",
                                "MASTER_PORT": "1234"})
    assert env == DistEnv(3, 4, 1, 2, "node0", 1234) and env.is_distributed
    for bad, fix in [({"WORLD_SIZE": "two"}, "not an integer"),
                     ({"RANK": "2", "WORLD_SIZE": "2"}, "torchrun --nproc-per-node"),
                     ({"WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
                      "launch with torchrun")]:
        with pytest.raises(DistEnvError, match=fix):
            DistEnv.from_environ(bad)


def _init_distributed_entry(rank, port, queue):
    from moe_ext.dist import DistEnv, destroy, init_distributed
    env = DistEnv.from_environ({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_PORT": str(port)})
    device = init_distributed(env, "cpu", timeout_s=60)
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    queue.put((rank, str(device), dist.get_backend(), t.item()))
    destroy()


def test_init_distributed_two_ranks():
    import torch.multiprocessing as mp

    from tests.multirank import _free_port
    ctx = mp.get_context("spawn")
    queue, port = ctx.SimpleQueue(), _free_port()
    procs = [ctx.Process(target=_init_distributed_entry, args=(r, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = sorted(queue.get() for _ in procs)
    assert results == [(0, "cpu", "gloo", 3.0), (1, "cpu", "gloo", 3.0)]

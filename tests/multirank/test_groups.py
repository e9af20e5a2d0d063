"""ProcessGroups on gloo ranks: membership by all_gather, Megatron ProcessGroupCollection,
DeepSpeed groups; moe_ext.dist.init_distributed on two ranks. The rank layout itself (pure)
is in tests/unit/test_groups.py."""

from __future__ import annotations

import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moe_ext.groups import PARTIAL_FAMILIES, ProcessGroups
from tests.support import free_port, layout_plan, run_ranks


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
        for d in (
            ds._EXPERT_PARALLEL_GROUP,
            ds._EXPERT_PARALLEL_GROUP_RANKS,
            ds._EXPERT_DATA_PARALLEL_GROUP,
            ds._EXPERT_DATA_PARALLEL_GROUP_RANKS,
        ):
            d.clear()
        _deepspeed_body(rank, world, plan)
        dist.barrier()


MULTIRANK_PLANS = {
    2: [
        layout_plan("ep_nccl", 2),  # ep 2
        layout_plan("tp_experts", 2, tp=2),
    ],  # etp = tp = 2
    4: [
        layout_plan("ep_allgather", 4, tp=2),  # tp 2, dp 2, ep 4
        layout_plan("ep_nccl", 4, tp=2, ep=2),  # ep 2 x edp 2
        layout_plan("ep_nccl", 4, pp=2, ep=1),  # pp 2, dp 2, ep 1, edp 2
        layout_plan("tp_experts", 4, tp=2, pp=2),  # etp 2, pp 2
        layout_plan("replicate", 4, tp=2),
    ],  # edp 4
}


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
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
def test_process_groups_on_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_ranks(
        _nccl_body,
        2,
        (
            [
                layout_plan("ep_nccl", 2),
                layout_plan("tp_experts", 2, tp=2),
                layout_plan("replicate", 2),
            ],
        ),
        backend="nccl",
    )


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

    ctx = mp.get_context("spawn")
    queue, port = ctx.SimpleQueue(), free_port()
    procs = [ctx.Process(target=_init_distributed_entry, args=(r, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = sorted(queue.get() for _ in procs)
    assert results == [(0, "cpu", "gloo", 3.0), (1, "cpu", "gloo", 3.0)]

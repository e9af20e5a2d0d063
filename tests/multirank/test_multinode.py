"""Node-aware rank layout (moe_ext.groups.node_layout): TP and EP groups inside a node,
pipeline stages and data-parallel replicas across nodes, refused plans naming the fix; and a
real two-node launch on this machine: ``torchrun --nnodes 2`` started twice (two agents, a
c10d rendezvous on 127.0.0.1), each worker building ProcessGroups for several plans on gloo.

The pure tests check node membership against ``rank // ranks_per_node`` computed here, the
launch checks it against the agent that really started each rank (an environment tag per
agent), and group membership against one-hot sums all-reduced over each group.

Run as a script, this file is the worker torchrun starts (``_worker``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_ext.groups import NODE_LOCAL_FAMILIES, PARTIAL_FAMILIES, NodeLayoutError, node_layout
from tests.support import REPO, free_port, layout_plan, require_multirank

# (strategy, world, tp, pp, ep) -> accepted on nodes of G ranks; the comment says what
# crosses the nodes
FITTING = {
    2: [
        ("tp_experts", 4, 2, 1, None),  # tp = etp inside, dp across
        ("tp_experts", 4, 2, 2, None),  # tp inside, pp across
        ("ep_nccl", 4, 1, 2, None),  # ep = 2 inside (one stage a node), pp across
        ("ep_nccl", 4, 2, 2, None),  # tp = ep = 2 inside, pp across
        ("ep_nccl", 4, 1, 1, 2),  # ep inside, edp (expert replicas) across
        ("ep_nccl", 4, 2, 1, 2),  # tp = ep inside, dp / edp across
        ("replicate", 4, 1, 1, None),  # pure dp
        ("replicate", 4, 2, 1, None),
        ("replicate", 4, 1, 4, None),  # pp 4 over two nodes: one hop crosses
    ],
    4: [
        ("tp_experts", 8, 4, 1, None),
        ("tp_experts", 8, 4, 2, None),
        ("tp_experts", 8, 2, 2, None),  # tp inside, dp inside, pp across
        ("ep_nccl", 8, 1, 2, None),  # ep = 4: one stage per node
        ("ep_nccl", 8, 2, 2, None),
        ("ep_nccl", 8, 1, 1, 4),  # ep inside, edp across
        ("ep_nccl", 8, 2, 1, 2),
        ("ep_nccl", 8, 1, 4, None),  # ep = 2, two stages per node, one hop crosses
        ("replicate", 8, 2, 4, None),
        ("replicate", 8, 1, 1, None),
    ],
}
# (strategy, world, tp, pp, ep, G) -> refused; (what the message names, the fix it offers)
REFUSED = [
    ("tp_experts", 4, 4, 1, None, 2, "tp=4", "parallel.tp=2 parallel.pp=2"),
    ("replicate", 4, 4, 1, None, 2, "tp=4", "parallel.tp=2 parallel.pp=2"),
    ("ep_nccl", 4, 1, 1, None, 2, "ep=4", "parallel.ep to 2"),
    ("ep_nccl", 4, 2, 1, None, 2, "ep=4", "parallel.pp=2"),
    ("tp_experts", 8, 8, 1, None, 4, "tp=8", "parallel.tp=4 parallel.pp=2"),
    ("ep_nccl", 8, 1, 1, 8, 4, "ep=8", "parallel.ep to 4"),
    ("ep_nccl", 8, 2, 1, None, 4, "ep=8", "parallel.pp=2"),
]


def _plan_id(spec) -> str:
    s, w, tp, pp, ep = spec[:5]
    return f"{s}-w{w}-tp{tp}-pp{pp}" + (f"-ep{ep}" if ep else "")


def _node(rank: int, per_node: int) -> int:
    return rank // per_node  # torchrun numbers ranks node by node


def _check_on_nodes(plan, per_node: int, node_of) -> None:
    """The layout on nodes whose membership ``node_of(rank)`` gives: partitions, TP / EP /
    expert groups inside a node, stages and replicas where they must cross."""
    layout = node_layout(plan, plan.world_size, per_node)
    world = list(range(plan.world_size))
    for name, groups in layout.groups.items():
        if name not in PARTIAL_FAMILIES:
            assert sorted(r for g in groups for r in g) == world, f"{name} is no partition"
        spans = max(len({node_of(r) for r in g}) for g in groups)
        assert layout.nodes_spanned(name) == spans, name
        if name in NODE_LOCAL_FAMILIES:
            assert spans == 1, f"{name} groups {groups} cross nodes"
    # sizes from the plan, so a group that a node could not hold would have shown above
    assert [len(g) for g in layout.groups["tp"]] == [plan.tp] * (plan.world_size // plan.tp)
    assert all(len(g) == plan.ep for g in layout.groups["ep"])
    nodes = plan.world_size // per_node
    assert layout.num_nodes == nodes and layout.inter_node("world")
    # what does not fit one node goes across: stages first (pp slowest), then replicas
    stage = plan.world_size // plan.pp  # ranks per pipeline stage
    if stage >= per_node:  # a stage fills whole nodes: every hop crosses
        assert layout.pp_inter_node_hops == plan.pp - 1
        assert layout.inter_node("dp") == (stage > per_node)
    else:  # several stages per node: pipelines cross nodes as few times as possible
        assert layout.pp_inter_node_hops == nodes - 1
        assert not layout.inter_node("dp") and not layout.inter_node("edp")
    hops = [sum(node_of(a) != node_of(b) for a, b in zip(g, g[1:])) for g in layout.groups["pp"]]
    assert hops == [layout.pp_inter_node_hops] * len(hops)


@pytest.mark.parametrize(
    "per_node,spec",
    [(g, spec) for g, specs in FITTING.items() for spec in specs],
    ids=lambda v: _plan_id(v) if isinstance(v, tuple) else f"G{v}",
)
def test_layout_keeps_tp_and_ep_inside_a_node(per_node, spec):
    plan = layout_plan(*spec)
    _check_on_nodes(plan, per_node, lambda r: _node(r, per_node))


@pytest.mark.parametrize("spec", REFUSED, ids=_plan_id)
def test_layout_refuses_groups_across_nodes(spec):
    *plan_spec, per_node, what, fix = spec
    plan = layout_plan(*plan_spec)
    with pytest.raises(NodeLayoutError) as err:
        node_layout(plan, plan.world_size, per_node)
    message = str(err.value)
    assert "\n" not in message and what in message and fix in message, message
    # the fix is real: the suggested degrees fit
    if "parallel.tp=" in fix:
        tp, pp = (int(part.split("=")[1]) for part in fix.split())
        node_layout(layout_plan(plan.strategy, plan.world_size, tp, pp), plan.world_size, per_node)
    elif "parallel.ep to" in fix:
        ep = int(fix.split()[-1])
        fitting = layout_plan("ep_nccl", plan.world_size, plan.tp, plan.pp, ep)
        node_layout(fitting, plan.world_size, per_node)
    else:
        pp = int(fix.split("=")[1])
        fitting = layout_plan("ep_nccl", plan.world_size, plan.tp, pp)
        node_layout(fitting, plan.world_size, per_node)


def test_one_node_accepts_every_plan_as_before():
    for spec in FITTING[4] + [r[:5] for r in REFUSED]:
        plan = layout_plan(*spec)
        layout = node_layout(plan, plan.world_size, plan.world_size)
        assert layout.num_nodes == 1 and layout.inter_node_families == []


def test_uneven_nodes_and_a_wrong_world_are_refused():
    plan = layout_plan("replicate", 6)
    with pytest.raises(NodeLayoutError, match="same --nproc-per-node on every node"):
        node_layout(plan, 6, 4)
    with pytest.raises(ValueError, match="world_size=4"):
        node_layout(plan, 4, 2)


# ==== two agents on this machine ==========================================================

ENV_AGENT = "MOE_EXT_TEST_AGENT"  # which agent (simulated node) started a worker
# plans each launch builds; the last of each list is refused on every rank before any group
LAUNCH_PLANS = {
    (2, 2): [
        ("ep_nccl", 4, 1, 2, None),
        ("tp_experts", 4, 2, 1, None),
        ("ep_nccl", 4, 2, 1, 2),
        ("replicate", 4, 1, 4, None),
        ("ep_nccl", 4, 1, 1, None),
    ],
    (2, 4): [
        ("ep_nccl", 8, 2, 2, None),
        ("tp_experts", 8, 4, 1, None),
        ("ep_nccl", 8, 1, 1, 4),
        ("ep_nccl", 8, 1, 4, None),
        ("tp_experts", 8, 8, 1, None),
    ],
}
WORKER_LIMIT_S = 150  # a worker exits by itself after this long (faulthandler), whatever hangs


def _worker(out_dir: str, plans_json: str) -> None:
    """One rank: build ProcessGroups for each plan and record, per family, the ranks a
    one-hot all_reduce over this rank's group finds; refused plans record their message."""
    import faulthandler
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from moe_ext.dist import DistEnv, destroy, init_distributed
    from moe_ext.groups import ProcessGroups

    faulthandler.dump_traceback_later(WORKER_LIMIT_S, exit=True)
    env = DistEnv.from_environ(os.environ)  # this script is the launcher here
    init_distributed(env, "cpu", 60)
    agents = [None] * env.world_size
    dist.all_gather_object(agents, os.environ[ENV_AGENT])
    record = {
        "rank": env.rank,
        "local_world_size": env.local_world_size,
        "group_rank": int(os.environ["GROUP_RANK"]),
        "agents": agents,
        "plans": [],
    }
    for spec in json.loads(plans_json):
        plan = layout_plan(*spec)
        try:
            pgs = ProcessGroups.build(
                plan, "gloo", timedelta(seconds=60), local_world_size=env.local_world_size
            )
        except NodeLayoutError as err:
            record["plans"].append({"refused": str(err)})
            continue
        seen = {}
        for name in sorted(pgs.layout):
            group = pgs.group(name)
            if group is None:
                seen[name] = None
                continue
            onehot = torch.zeros(env.world_size, dtype=torch.int64)
            onehot[env.rank] = 1
            dist.all_reduce(onehot, group=group)
            seen[name] = [r for r in range(env.world_size) if int(onehot[r]) == 1]
            assert int(onehot.sum()) == len(seen[name])
        record["plans"].append({"groups": seen})
    dist.barrier()
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(record))
    destroy()


def _stop(agents: list[subprocess.Popen]) -> None:
    """SIGTERM each agent's session (an agent ends its workers on SIGTERM), then SIGKILL
    what is left; workers also end themselves after WORKER_LIMIT_S."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        for agent in agents:
            if agent.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(agent.pid, sig)
        deadline = time.monotonic() + wait_s
        for agent in agents:
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(max(0.1, deadline - time.monotonic()))


def _launch_two_nodes(per_node: int, plans, tmp_path: Path, limit_s: float) -> list[dict]:
    """``torchrun --nnodes 2 --nproc-per-node per_node`` twice (agents "a" and "b"), one
    rendezvous on a free localhost port; the workers' records, by rank."""
    require_multirank(f"torchrun --nnodes 2 --nproc-per-node={per_node}")
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MOE_EXT_DEBUG")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    agents, logs = [], []
    try:
        for node_rank, tag in enumerate("ab"):
            log = tmp_path / f"agent_{tag}.log"
            logs.append(log)
            with open(log, "wb") as sink:
                agents.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "torch.distributed.run",
                            "--nnodes=2",
                            f"--nproc-per-node={per_node}",
                            f"--node-rank={node_rank}",  # c10d ranks nodes as agents join
                            "--rdzv-backend=c10d",
                            f"--rdzv-endpoint=127.0.0.1:{port}",
                            f"--rdzv-id=multinode-{port}",
                            "--local-addr=127.0.0.1",
                            "--max-restarts=0",
                            __file__,
                            str(tmp_path),
                            json.dumps(plans),
                        ],
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                        cwd=REPO,
                        env={**env, ENV_AGENT: tag},
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + limit_s
        for agent in agents:
            try:
                code = agent.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
            text = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
            assert code is not None, f"the two-node launch ran past {limit_s} s:\n{text}"
            assert code == 0, f"an agent exited {code}:\n{text}"
    finally:
        _stop(agents)
    world = 2 * per_node
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _check_launch(per_node: int, plans, records: list[dict]) -> None:
    world = 2 * per_node
    agents = records[0]["agents"]
    assert all(r["agents"] == agents for r in records)
    # the layout's node of a rank (rank // G) is the agent that started it
    assert sorted(set(agents)) == ["a", "b"]
    for rec in records:
        assert rec["local_world_size"] == per_node
        assert rec["group_rank"] == _node(rec["rank"], per_node)
        assert agents[rec["rank"]] == agents[_node(rec["rank"], per_node) * per_node]
    for i, spec in enumerate(plans):
        plan = layout_plan(*spec)
        results = [rec["plans"][i] for rec in records]
        try:
            expected = node_layout(plan, world, per_node)
        except NodeLayoutError as err:
            assert all(r == {"refused": str(err)} for r in results), (spec, results)
            continue
        for name, groups in expected.groups.items():
            for rec, result in zip(records, results):
                mine = next((g for g in groups if rec["rank"] in g), None)
                assert result["groups"][name] == mine, (spec, name, rec["rank"])
        # against the real nodes: node-local families on one agent, the rest as computed
        _check_on_nodes(plan, per_node, lambda r: agents[r])


def test_two_nodes_of_two_ranks(tmp_path):
    plans = LAUNCH_PLANS[(2, 2)]
    records = _launch_two_nodes(2, plans, tmp_path, limit_s=90)
    _check_launch(2, plans, records)


@pytest.mark.slow
def test_two_nodes_of_four_ranks(tmp_path):
    plans = LAUNCH_PLANS[(2, 4)]
    records = _launch_two_nodes(4, plans, tmp_path, limit_s=180)
    _check_launch(4, plans, records)


if __name__ == "__main__":
    _worker(*sys.argv[1:])

"""moe_ext.preflight on two gloo ranks (one spawn for the three cases, each on freshly built
groups): a healthy plan passes with every distinct group checked once; a perturbed result
is a one-line PreflightError naming corruption; a peer that never joins is a one-line
PreflightError on the waiting rank within the deadline, never a hang. And the launcher runs
it with ``preflight=true`` on CPU (it is off there by default)."""

from __future__ import annotations

import os
import time

import pytest

from tests.support import REPO, layout_plan, run_launcher, run_ranks

DEADLINE_S = 2.0


def _groups(plan):
    from datetime import timedelta

    from moe_ext.groups import ProcessGroups

    return ProcessGroups.build(plan, backend="gloo", timeout=timedelta(seconds=60))


def _corrupt(name, tensor):
    tensor[3] += 1.0


def _stall(name, rank):
    """Rank 1 does not join for longer than the deadline, then never joins."""
    if rank == 1:
        time.sleep(DEADLINE_S + 1.5)
        return False
    return True


def _cases(rank, world_size, plan):
    import torch

    from moe_ext import preflight
    from moe_ext.groups import rank_layout

    cpu = torch.device("cpu")
    # healthy: every distinct rank list of size > 1 holding this rank (independent of
    # preflight.plan_groups), checked once; CPU: no peer copy
    report = preflight.check(_groups(plan), cpu, world_size, timeout_s=30)
    layout = rank_layout(plan)
    expected = sorted({tuple(g) for gs in layout.values() for g in gs if rank in g and len(g) > 1})
    assert expected == [(0, 1)]
    assert report.groups == ["dp [0, 1]"] and report.peer_copies == [], report

    # corruption: rank 0's result perturbed after the all-reduce
    hooks = preflight.PreflightHooks(perturb=_corrupt if rank == 0 else None)
    groups = _groups(plan)
    if rank == 1:
        preflight.check(groups, cpu, world_size, 30, hooks=hooks)
    else:
        with pytest.raises(preflight.PreflightError) as caught:
            preflight.check(groups, cpu, world_size, 30, hooks=hooks)
        msg = str(caught.value)
        assert "\n" not in msg and "wrong data (1 of 1024 values; corruption" in msg, msg
        assert "group dp [0, 1]" in msg and "NCCL_P2P_DISABLE=1" in msg, msg

    # stall: rank 1 never joins; rank 0 gives up after the deadline with the diagnosis
    groups = _groups(plan)
    hooks = preflight.PreflightHooks(before=_stall)
    start = time.monotonic()
    if rank == 1:
        preflight.check(groups, cpu, world_size, DEADLINE_S, hooks=hooks)
        return
    with pytest.raises(preflight.PreflightError) as caught:
        preflight.check(groups, cpu, world_size, DEADLINE_S, hooks=hooks)
    waited = time.monotonic() - start
    assert DEADLINE_S <= waited < DEADLINE_S + 1.5, waited
    msg = str(caught.value)
    assert "\n" not in msg, msg
    assert "all-reduce of 4096 bytes over group dp [0, 1] did not finish in 2 s" in msg, msg
    assert "relaunch with NCCL_P2P_DISABLE=1, or with +topology=pcie" in msg, msg


def test_healthy_corrupted_and_stalled_links():
    run_ranks(_cases, 2, (layout_plan("ep_nccl", 2),))


@pytest.mark.slow  # 7 s; the checks themselves run by default
def test_launcher_runs_preflight_when_forced_on_cpu():
    """launch/infer.py with preflight=true on CPU ranks logs the check before loading; with
    +topology=pcie it also says it set NCCL_P2P_DISABLE=1 (unless the environment
    already sets it)."""
    out = run_launcher(
        REPO / "launch" / "infer.py",
        ["preflight=true", "+topology=pcie", "generate.max_new_tokens=2", "strategy=ep_nccl"],
        nproc=2,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    logged = out.stdout + out.stderr
    assert "preflight: all-reduce checked on 1 group(s) (dp [0, 1])" in logged, logged
    if "NCCL_P2P_DISABLE" not in os.environ:  # a value already set is kept, silently
        assert "NCCL_P2P_DISABLE=1 (set by the forced topology, kind pcie" in logged, logged
    assert logged.index("preflight:") < logged.index("prefill:"), logged

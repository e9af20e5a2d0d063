"""moe_ext.preflight without ranks: when it runs (on GPU by default, off on CPU unless
forced), which forced topologies set NCCL_P2P_DISABLE, the groups it checks and their one
global order (ranks sharing groups meet in the same order: no cross-wait), and the deadline
of a collective that never completes or fails (fake Work objects). The collectives on real
ranks are in tests/multirank/test_preflight.py."""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import pytest

from moe_ext import preflight
from moe_ext.config import InferConf, TopologyConf
from moe_ext.groups import rank_layout
from moe_ext.train.config import TrainConf
from tests.support import layout_plan


def test_enabled_on_gpu_by_default_and_forced_either_way():
    assert InferConf.preflight is None and TrainConf.preflight is None
    assert preflight.enabled(None, "cuda") and not preflight.enabled(None, "cpu")
    assert preflight.enabled(True, "cpu") and not preflight.enabled(False, "cuda")


@pytest.mark.parametrize(
    "conf,environ,expected",
    [
        (TopologyConf(kind="pcie", p2p=False), {}, "1"),  # +topology=pcie
        (TopologyConf(kind="pcie"), {}, "1"),
        (TopologyConf(kind="pcie", p2p=True), {}, None),  # a PCIe box with P2P: left alone
        (TopologyConf(kind="nvlink", p2p=True), {}, None),
        (TopologyConf(kind="nvlink", p2p=False), {}, "1"),
        (TopologyConf(kind="auto"), {}, None),  # the probe: NCCL finds out itself
        (TopologyConf(kind="pcie", p2p=False), {"NCCL_P2P_DISABLE": "0"}, "0"),  # user's wins
        (None, {}, None),
    ],
)
def test_link_environment(conf, environ, expected):
    line = preflight.link_environment(conf, environ)
    assert environ.get("NCCL_P2P_DISABLE") == expected
    assert (line is not None) == (expected == "1")  # a line only when it set the variable


def _fake_groups(plan, rank):
    layout = rank_layout(plan)
    member = {name: next((g for g in gs if rank in g), None) for name, gs in layout.items()}
    return SimpleNamespace(
        rank=rank,
        handles={name: f"h{name}" for name in layout},
        member_ranks=member,
    )


@pytest.mark.parametrize(
    "strategy,world,tp,pp",
    [("ep_nccl", 8, 2, 2), ("tp_experts", 8, 4, 2), ("replicate", 4, 1, 2), ("ep_nccl", 2, 1, 1)],
)
def test_groups_checked_once_each_in_one_global_order(strategy, world, tp, pp):
    plan = layout_plan(strategy, world, tp=tp, pp=pp)
    order = {
        r: [tuple(ranks) for _, ranks, _ in preflight.plan_groups(_fake_groups(plan, r))]
        for r in range(world)
    }
    layout = rank_layout(plan)
    for r in range(world):
        expected = {tuple(g) for gs in layout.values() for g in gs if r in g and len(g) > 1}
        assert sorted(order[r]) == sorted(expected) and len(order[r]) == len(expected)
    # any two ranks meet in their shared groups in the same order
    for a, b in itertools.combinations(range(world), 2):
        shared_a = [g for g in order[a] if b in g]
        shared_b = [g for g in order[b] if a in g]
        assert shared_a == shared_b, (a, b, shared_a, shared_b)


class _NeverDone:
    def is_completed(self):
        return False


class _Fails:
    def is_completed(self):
        return True

    def wait(self):
        raise RuntimeError("NCCL error: unhandled system error\nlong detail")


def _pending(work):
    p = preflight._Pending()
    p.work = work
    p.issued.set()
    return p


def test_a_collective_that_never_completes_is_one_line_after_the_deadline():
    start = time.monotonic()
    with pytest.raises(preflight.PreflightError) as caught:
        preflight._wait(
            _pending(_NeverDone()), 0.3, "ep [0, 1]", "all-reduce of 4096 bytes", [0, 1]
        )
    assert 0.3 <= time.monotonic() - start < 1.5
    msg = str(caught.value)
    assert "\n" not in msg and "group ep [0, 1] did not finish in 0.3 s" in msg
    assert msg.endswith("relaunch with NCCL_P2P_DISABLE=1, or with +topology=pcie, which sets it")


def test_a_call_that_blocks_before_returning_its_work_is_one_line_after_the_deadline():
    """NCCL can block inside the call while it builds a communicator with a missing peer."""
    start = time.monotonic()
    pending = preflight._issue(lambda: time.sleep(5), SimpleNamespace(type="cpu"))
    with pytest.raises(preflight.PreflightError, match="did not finish in 0.3 s"):
        preflight._wait(pending, 0.3, "tp [0, 1]", "all-reduce of 4096 bytes", [0, 1])
    assert time.monotonic() - start < 1.5


def test_a_backend_error_is_one_line_with_the_fix():
    with pytest.raises(preflight.PreflightError) as caught:
        preflight._wait(_pending(_Fails()), 1.0, "tp [0, 1]", "all-reduce of 4096 bytes", [0, 1])
    msg = str(caught.value)
    assert "\n" not in msg and "failed: NCCL error: unhandled system error; relaunch" in msg


def test_report_line():
    report = preflight.PreflightReport(["ep [0, 1]", "pp [0, 2]"], ["cuda:0 -> cuda:1"], 0.5)
    assert report.describe() == (
        "preflight: all-reduce checked on 2 group(s) (ep [0, 1]; pp [0, 2]), peer copies "
        "cuda:0 -> cuda:1 ok in 0.50 s"
    )

"""Each dispatcher states what it needs in ``Dispatcher.check_plan``, and ``build_plan`` calls
it: a plan the dispatcher would refuse at construction fails at plan time, in one line,
before any process group exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from moe_ext.config import ParallelConf, StrategyConf, TopologyConf
from moe_ext.model.args import ModelArgs
from moe_ext.moe.dispatch import DISPATCHERS, DispatcherConfigError, dispatcher_class
from moe_ext.moe.dispatch.nvshmem import MAX_RANKS, NvshmemDispatcher
from moe_ext.plan import STRATEGIES, PlanError, build_plan, plan_with_degrees
from moe_ext.topology import Topology, parse_record, resolve_topology

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "topology"
GIB = 2**30
# 16 heads / 4 kv heads / 32 experts / F 64: divisible by every degree used here
MODEL = ModelArgs(
    model_type="qwen3_moe",
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=64,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=16,
    num_experts=32,
    num_experts_per_tok=2,
)


def recorded(name: str) -> Topology:
    """A topology parsed from a recorded NVML/CUDA probe (tests/fixtures/topology)."""
    return parse_record(json.loads((FIXTURES / f"{name}.json").read_text()))


NVSWITCH = recorded("8xh100_sxm_nvswitch")  # all pairs NVLink with P2P atomics
NO_P2P = recorded("4xrtx_4090_no_p2p")  # PCIe, no P2P


def forced(kind: str, n: int) -> Topology:
    conf = TopologyConf(kind=kind, num_gpus=n, gpu_memory_gib=80.0)
    if kind == "nvlink":
        conf.p2p, conf.p2p_atomics = True, True
    host = Topology(kind="cpu", host_memory_bytes=64 * GIB, cpu_count=2)
    return resolve_topology(conf, n, probe=lambda: host)


def plan(strategy: str, world: int, topology: Topology, dispatcher=None, **degrees):
    return build_plan(
        StrategyConf(name=strategy, dispatcher=dispatcher),
        ParallelConf(**degrees),
        world,
        topology,
        MODEL,
    )


def refused(strategy: str, world: int, topology: Topology, *words: str, **kw) -> str:
    with pytest.raises(PlanError) as err:
        plan(strategy, world, topology, **kw)
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    assert isinstance(err.value.__cause__, DispatcherConfigError)  # raised by the hook
    return message


def test_nvshmem_ep2_on_4_ranks_fails_at_plan_time():
    assert NVSWITCH.all_pairs_nvlink and NVSWITCH.all_pairs_p2p_atomics  # the link is fine
    refused("ep_nvshmem", 4, NVSWITCH, "ep=2", "parallel.ep=4", "strategy=ep_nccl", ep=2)
    assert not dist.is_initialized()  # nothing distributed was started to find out
    # the same degrees are fine for the NCCL all-to-all, and EP over all ranks for NVSHMEM
    assert plan("ep_nccl", 4, NVSWITCH, ep=2).ep == 2
    assert plan("ep_nvshmem", 4, NVSWITCH, ep=4).ep == 4


@pytest.mark.parametrize(
    "degrees, words",
    [
        (dict(pp=2), ("pp=2", "parallel.pp=1")),  # EP can only span one stage
        (dict(tp=2, ep=2), ("ep=2", "parallel.ep=4")),
    ],
)
def test_nvshmem_needs_ep_over_the_world(degrees, words):
    refused("ep_nvshmem", 4, forced("nvlink", 4), *words, **degrees)


def test_nvshmem_limits_of_the_link_and_the_kernels():
    refused("ep_nvshmem", 4, NO_P2P, "all-pairs NVLink with P2P atomics", "strategy=ep_nccl")
    refused(
        "ep_nvshmem",
        2,
        Topology(kind="cpu", host_memory_bytes=GIB, cpu_count=2),
        "on CPU use strategy=ep_nccl",
    )
    refused("ep_nvshmem", 1, forced("nvlink", 1), "ep=1", "strategy=replicate")
    world = 2 * MAX_RANKS
    wide = ModelArgs(**{**vars(MODEL), "num_experts": world})
    with pytest.raises(PlanError, match=f"at most {MAX_RANKS} ranks"):
        build_plan(
            StrategyConf(name="ep_nvshmem"), ParallelConf(), world, forced("nvlink", world), wide
        )


@pytest.mark.parametrize(
    "strategy, dispatcher, degrees, words",
    [
        # experts sharded on F over TP, but an EP dispatcher that runs whole experts
        ("tp_experts", "allgather_rs", dict(tp=2), ("etp=2", "strategy=tp_experts")),
        ("tp_experts", "nccl_a2a", dict(tp=2), ("etp=2",)),
        # experts split over EP, but dispatchers that keep every expert on every rank
        ("ep_nccl", "local", {}, ("ep=2", "nccl_a2a")),
        ("ep_allgather", "tp_sharded", {}, ("ep=2", "allgather_rs")),
        ("tp_experts", "local", dict(tp=2), ("etp=2", "tp_sharded")),
    ],
)
def test_dispatcher_override_checked_at_plan_time(strategy, dispatcher, degrees, words):
    refused(strategy, 2, forced("pcie", 2), *words, dispatcher=dispatcher, **degrees)


def test_unknown_dispatcher_fails_at_plan_time():
    with pytest.raises(PlanError, match="unknown dispatcher 'my.pkg.Fast'") as err:
        plan("ep_nccl", 2, forced("pcie", 2), dispatcher={"_target_": "my.pkg.Fast"})
    assert "\n" not in str(err.value)
    with pytest.raises(DispatcherConfigError, match="unknown dispatcher"):
        dispatcher_class("moe_ext.moe.dispatch.local.NoSuchDispatcher")


def test_auto_falls_back_to_nccl_where_nvshmem_cannot_run():
    p = plan("auto", 4, NVSWITCH, ep=2)
    assert p.strategy == "ep_nccl" and p.ep == 2 and p.dispatcher == DISPATCHERS["nccl_a2a"]
    assert "not ep_nvshmem" in p.reason and "\n" not in p.reason
    assert plan("auto", 4, NVSWITCH, ep=4).strategy == "ep_nvshmem"


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_default_plan_passes_its_dispatchers_hook(strategy, world):
    """The hooks agree with the degrees the planner derives for the default dispatcher."""
    p = plan_with_degrees(strategy, world)
    link = NVSWITCH if strategy == "ep_nvshmem" else None
    dispatcher_class(p.dispatcher).check_plan(p, link)


def test_hook_is_a_classmethod_and_needs_no_gpu():
    """build_plan imports the dispatcher class on any machine: importing nvshmem.py must not
    need CUDA or NVSHMEM (those are checked at construction, on the GPU box)."""
    assert NvshmemDispatcher.check_plan.__self__ is NvshmemDispatcher
    code = (
        "import torch; from moe_ext.moe.dispatch import dispatcher_class; "
        "c = dispatcher_class('nvshmem'); assert not torch.cuda.is_initialized(); "
        "print(c.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "NvshmemDispatcher", out.stderr

"""Topology: parsing of recorded NVML/CUDA answers, the probe's own calls (replayed
through fake NVML/CUDA libraries), forced kinds, JSON, the probe tool, and (GPU) the real
probe against torch's view of peer access."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_ext import topology as topo_mod
from moe_ext.config import TopologyConf
from moe_ext.topology import (
    GPU,
    Link,
    Topology,
    TopologyError,
    parse_record,
    probe,
    probe_record,
    resolve_topology,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "topology"
MIB, GIB = 1 << 20, 1 << 30
# Independent bandwidth references, GB/s per direction: NVLink4 25 per link; PCIe lane
# Gen4 1.969, Gen5 3.938; P2P reaches 0.8 of raw, host-staged copies 0.4.
NV18_GBPS = 18 * 25.0
GEN5_X16_P2P_GBPS = 3.938 * 16 * 0.8
GEN4_X16_STAGED_GBPS = 1.969 * 16 * 0.4


def load(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def pairs(n):
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


# --------------------------------------------------------------------------- fixtures
def test_8xh100_sxm_nvswitch():
    t = parse_record(load("8xh100_sxm_nvswitch"))
    assert t.kind == "nvlink" and t.num_gpus == 8 and t.source == "nvml+cuda"
    assert {g.name for g in t.gpus} == {"NVIDIA H100 80GB HBM3"}
    assert t.gpus[3].pci_bus_id == "0000:5d:00.0" and t.gpus[3].compute_capability == (9, 0)
    for l in t.links:
        assert (l.nvlink_count, l.nvlink_gen, l.via_nvswitch, l.label) == (18, 4, True, "NV18")
        assert l.p2p and l.p2p_atomics and l.p2p_status == "OK"
        # GPUs 0-3 hang off socket 0, 4-7 off socket 1
        assert l.ancestor == ("NODE" if l.a // 4 == l.b // 4 else "SYSTEM")
    assert t.all_pairs_nvlink and t.all_pairs_p2p and t.all_pairs_p2p_atomics
    assert t.min_gpu_memory_bytes == 81559 * MIB
    assert t.min_pair_bandwidth_gbps == pytest.approx(NV18_GBPS)
    assert t.host_memory_bytes == 2164142112768 and t.cpu_count == 224


def test_2xh200_nv18():
    t = parse_record(load("2xh200_nv18"))
    assert t.kind == "nvlink" and t.num_gpus == 2 and t.driver_version == "580.95.05"
    (l,) = t.links
    assert (l.a, l.b, l.nvlink_count, l.via_nvswitch, l.ancestor) == (0, 1, 18, True, "NODE")
    assert l.p2p and l.p2p_atomics
    assert t.min_gpu_memory_bytes == 143771 * MIB
    assert t.pair_bandwidth_gbps(1, 0) == pytest.approx(NV18_GBPS)


def test_4xrtx_pro_6000_pcie5_p2p():
    t = parse_record(load("4xrtx_pro_6000_pcie5_p2p"))
    assert t.kind == "pcie" and t.num_gpus == 4
    assert all(l.nvlink_count == 0 and not l.via_nvswitch for l in t.links)
    assert all(l.p2p and not l.p2p_atomics and l.p2p_status == "OK" for l in t.links)
    # two GPUs per root complex: PHB inside, NODE across
    assert {(l.a, l.b): l.label for l in t.links} == {
        (0, 1): "PHB",
        (2, 3): "PHB",
        (0, 2): "NODE",
        (0, 3): "NODE",
        (1, 2): "NODE",
        (1, 3): "NODE",
    }
    assert t.all_pairs_p2p and not t.all_pairs_p2p_atomics and not t.all_pairs_nvlink
    # idle GPUs trained down to Gen1: the estimate must use the link's maximum (Gen5 x16)
    assert (t.gpus[1].pcie_gen, t.gpus[1].pcie_max_gen) == (1, 5)
    for a, b in pairs(4):
        assert t.pair_bandwidth_gbps(a, b) == pytest.approx(GEN5_X16_P2P_GBPS, rel=1e-3)
    assert t.min_gpu_memory_bytes == 97887 * MIB


def test_4xrtx_4090_no_p2p():
    t = parse_record(load("4xrtx_4090_no_p2p"))
    assert t.kind == "pcie" and t.num_gpus == 4
    assert not any(l.p2p or l.p2p_atomics or l.nvlink for l in t.links)
    assert {l.p2p_status for l in t.links} == {"GPU_NOT_SUPPORTED"}
    assert {(l.a, l.b): l.ancestor for l in t.links} == {
        (0, 1): "NODE",
        (2, 3): "NODE",
        (0, 2): "SYSTEM",
        (0, 3): "SYSTEM",
        (1, 2): "SYSTEM",
        (1, 3): "SYSTEM",
    }
    assert [g.numa_node for g in t.gpus] == [0, 0, 1, 1]
    assert not (t.all_pairs_p2p or t.all_pairs_p2p_atomics or t.all_pairs_nvlink)
    assert t.min_pair_bandwidth_gbps == pytest.approx(GEN4_X16_STAGED_GBPS, rel=1e-3)
    assert t.min_gpu_memory_bytes == 24564 * MIB


FIXTURE_NAMES = [
    "8xh100_sxm_nvswitch",
    "2xh200_nv18",
    "4xrtx_pro_6000_pcie5_p2p",
    "4xrtx_4090_no_p2p",
]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_nvml_alone_agrees_with_cuda_attributes(name):
    """Without the CUDA driver, P2P and atomics come from NVML's P2P status; the records'
    two sources must give the same answer."""
    rec = load(name)
    both = parse_record(rec)
    rec["cuda"] = {"error": "libcuda.so.1 not loadable"}
    nvml_only = parse_record(rec)
    assert nvml_only.source == "nvml"
    assert [(l.p2p, l.p2p_atomics) for l in nvml_only.links] == [
        (l.p2p, l.p2p_atomics) for l in both.links
    ]
    assert nvml_only.kind == both.kind


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_link_lookup_and_matrix(name):
    t = parse_record(load(name))
    for a, b in pairs(t.num_gpus):
        assert (t.link(a, b).a, t.link(a, b).b) == (a, b) == (t.link(b, a).a, t.link(b, a).b)
    m = t.pair_matrix()
    assert len(m) == t.num_gpus + 1 and all(len(r) == t.num_gpus + 1 for r in m)
    assert m[1][1] == "X" and m[1][2] == m[2][1] == f"{t.link(0, 1).label} " + (
        ("p" if t.link(0, 1).p2p else "-") + ("a" if t.link(0, 1).p2p_atomics else "-")
    )
    with pytest.raises(TopologyError):
        t.link(0, 0)


def test_cuda_visibility_and_order_follow_cuda_ordinals():
    """CUDA_VISIBLE_DEVICES=5,2 on the H100 box: NVML still lists 8 GPUs, CUDA two, in
    that order; the topology is CUDA's, joined to NVML by bus id."""
    rec = load("8xh100_sxm_nvswitch")
    nv = rec["nvml"]["devices"]
    rec["cuda"]["devices"] = [
        {**rec["cuda"]["devices"][5], "ordinal": 0},
        {**rec["cuda"]["devices"][2], "ordinal": 1},
    ]
    rec["cuda"]["p2p"] = [e for e in rec["cuda"]["p2p"] if e["src"] < 2 and e["dst"] < 2]
    t = parse_record(rec)
    assert t.num_gpus == 2
    assert [g.pci_bus_id for g in t.gpus] == ["0000:ab:00.0", "0000:3a:00.0"]
    assert [g.numa_node for g in t.gpus] == [nv[5]["numa_node"], nv[2]["numa_node"]] == [1, 0]
    assert t.link(0, 1).ancestor == "SYSTEM" and t.link(0, 1).nvlink_count == 18


def _direct_bridge(rec: dict, remote_type) -> dict:
    """Rewire the 2xH200 record as an NVLink bridge: all 18 links point at the peer GPU."""
    devs = rec["nvml"]["devices"]
    for d, peer in ((devs[0], devs[1]), (devs[1], devs[0])):
        for link in d["nvlinks"]:
            link["remote_device_type"] = remote_type
            link["remote_pci_bus_id"] = peer["pci_bus_id"]
    return rec


@pytest.mark.parametrize("remote_type", [0, None], ids=["gpu-type", "old-driver-no-type"])
def test_point_to_point_nvlink_bridge(remote_type):
    t = parse_record(_direct_bridge(load("2xh200_nv18"), remote_type))
    l = t.link(0, 1)
    assert (t.kind, l.nvlink_count, l.via_nvswitch, l.nvlink_gen) == ("nvlink", 18, False, 4)


def test_partial_bridge_is_pcie_kind():
    """Three GPUs, only 0-1 bridged: not every pair has NVLink -> pcie kind."""
    rec = load("4xrtx_pro_6000_pcie5_p2p")
    devs = rec["nvml"]["devices"]
    for d, peer in ((devs[0], devs[1]), (devs[1], devs[0])):
        d["nvlinks"] = [
            {
                "link": k,
                "active": True,
                "version": 4,
                "remote_device_type": 0,
                "remote_pci_bus_id": peer["pci_bus_id"],
            }
            for k in range(4)
        ]
        d["nvlinks"].append({"link": 4, "active": False})
    t = parse_record(rec)
    assert t.kind == "pcie" and not t.all_pairs_nvlink
    assert t.link(0, 1).label == "NV4" and t.link(0, 1).nvlink_gen == 3
    assert t.pair_bandwidth_gbps(0, 1) == pytest.approx(4 * 25.0)
    assert t.link(0, 2).label == "NODE"


def test_cuda_without_nvml_still_finds_gpus():
    rec = load("2xh200_nv18")
    rec["nvml"] = {"error": "nvmlInit failed: NVML Shared Library Not Found"}
    t = parse_record(rec)
    assert t.source == "cuda" and t.num_gpus == 2 and t.gpus[0].name == "NVIDIA H200"
    assert t.kind == "pcie"  # NVLink is unknown without NVML: plan conservatively
    assert t.link(0, 1).p2p and t.link(0, 1).p2p_atomics and t.link(0, 1).ancestor == "UNKNOWN"
    assert any("NVML" in n for n in t.notes)


def test_no_gpu_answers_is_cpu():
    rec = load("4xrtx_4090_no_p2p")
    rec["nvml"] = {"error": "nvmlInit failed: Driver Not Loaded"}
    rec["cuda"] = {"error": "libcuda.so.1 not loadable"}
    t = parse_record(rec)
    assert t.kind == "cpu" and t.num_gpus == 0 and t.min_gpu_memory_bytes == 0
    assert t.host_memory_bytes == rec["host"]["memory_bytes"] and t.cpu_count == 112
    assert not (t.all_pairs_p2p or t.all_pairs_p2p_atomics or t.all_pairs_nvlink)


def test_no_gpu_visible_to_cuda_is_cpu():
    """CUDA_VISIBLE_DEVICES="" on the H100 box: NVML lists 8 GPUs, this process may use none."""
    rec = load("8xh100_sxm_nvswitch")
    rec["cuda"].update(devices=[], p2p=[])
    t = parse_record(rec)
    assert t.kind == "cpu" and t.num_gpus == 0
    assert any("none is visible to CUDA" in n for n in t.notes)


@pytest.mark.parametrize("remote_type", [None, 0xFF], ids=["no-type", "unknown-type"])
def test_nvswitch_links_without_remote_type(remote_type):
    rec = load("8xh100_sxm_nvswitch")
    for d in rec["nvml"]["devices"]:
        for link in d["nvlinks"]:
            link["remote_device_type"] = remote_type
    t = parse_record(rec)
    assert t.kind == "nvlink"
    assert {(l.nvlink_count, l.via_nvswitch) for l in t.links} == {(18, True)}


def test_record_format_is_checked():
    t = parse_record(load("2xh200_nv18"))
    with pytest.raises(TopologyError, match="Topology.from_json"):
        parse_record(t.to_dict())
    with pytest.raises(TopologyError, match="parse_record"):
        Topology.from_json(json.dumps(load("2xh200_nv18")))


# --------------------------------------------------------------------------- JSON, validation
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_json_round_trip(name):
    t = parse_record(load(name))
    back = Topology.from_json(t.to_json())
    assert back == t and back.gpus[0].compute_capability == t.gpus[0].compute_capability
    assert back.min_pair_bandwidth_gbps == t.min_pair_bandwidth_gbps


def test_json_round_trip_cpu_and_forced():
    cpu = parse_record(
        {
            "format": topo_mod.RECORD_FORMAT,
            "host": {"cpu_count": 2, "memory_bytes": 8 * GIB},
            "nvml": {"error": "x"},
            "cuda": {"error": "y"},
            "errors": [],
        }
    )
    forced = resolve_topology(TopologyConf(kind="pcie", num_gpus=3), 3, probe=lambda: cpu)
    for t in (cpu, forced):
        assert Topology.from_json(t.to_json(indent=None)) == t


def test_malformed_json_is_one_line_error():
    d = parse_record(load("2xh200_nv18")).to_dict()
    d["gpus"][0]["colour"] = "green"
    with pytest.raises(TopologyError, match="malformed"):
        Topology.from_dict(d)


def test_validation():
    g = [GPU(index=i, name="g", memory_bytes=GIB) for i in range(2)]
    with pytest.raises(TopologyError, match="disagrees"):
        Topology(kind="nvlink", gpus=tuple(g), links=(Link(0, 1),))
    with pytest.raises(TopologyError, match="atomics without P2P"):
        Topology(kind="pcie", gpus=tuple(g), links=(Link(0, 1, p2p_atomics=True),))
    with pytest.raises(TopologyError, match="every GPU pair"):
        Topology(kind="pcie", gpus=tuple(g), links=())
    with pytest.raises(TopologyError, match="only kind cpu"):
        Topology(kind="cpu", gpus=tuple(g), links=(Link(0, 1),))
    with pytest.raises(TopologyError, match="not one of"):
        Topology(kind="infiniband")


def test_subset():
    h100 = parse_record(load("8xh100_sxm_nvswitch"))
    two = h100.subset(2)
    assert two.kind == "nvlink" and two.num_gpus == 2 and two.links == (h100.link(0, 1),)
    pro = parse_record(load("4xrtx_pro_6000_pcie5_p2p"))
    assert pro.subset(1).kind == "pcie" and pro.subset(1).min_pair_bandwidth_gbps == float("inf")
    with pytest.raises(TopologyError, match="1..4"):
        pro.subset(5)


def test_summary_rows():
    rows = dict(parse_record(load("4xrtx_pro_6000_pcie5_p2p")).summary_rows())
    assert rows["kind"] == "pcie" and rows["all pairs P2P"] == "yes"
    assert rows["all pairs P2P atomics"] == "no"
    assert rows["gpus"].startswith("4 x NVIDIA RTX PRO 6000")
    assert rows["min GPU memory"] == "95.6 GiB"


# --------------------------------------------------------------------------- forced kinds
def _yaml_conf(name: str):
    """conf/topology/<name>.yaml merged into the schema, as Hydra's `+topology=<name>` does."""
    data = OmegaConf.load(ROOT / "conf" / "topology" / f"{name}.yaml")
    data.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(TopologyConf), data)


def _fixed(t: Topology):
    return lambda: t


def test_forced_pcie_on_nvlink_box():
    h100 = parse_record(load("8xh100_sxm_nvswitch"))
    t = resolve_topology(_yaml_conf("pcie"), 8, probe=_fixed(h100))
    assert t.kind == "pcie" and t.num_gpus == 8 and t.source == "forced:pcie"
    assert not (t.all_pairs_nvlink or t.all_pairs_p2p or t.all_pairs_p2p_atomics)
    assert all(l.nvlink_count == 0 for l in t.links)
    assert [g.name for g in t.gpus] == [g.name for g in h100.gpus]
    assert t.min_gpu_memory_bytes == h100.min_gpu_memory_bytes  # memory stays the probe's
    assert t.link(0, 7).ancestor == "SYSTEM"  # the PCIe tree stays the probe's
    # yaml: Gen4 x16
    assert t.min_pair_bandwidth_gbps == pytest.approx(GEN4_X16_STAGED_GBPS, rel=1e-3)
    # the same from a plain dataclass, and P2P without atomics when asked
    t2 = resolve_topology(TopologyConf(kind="pcie", p2p=True), 8, probe=_fixed(h100))
    assert t2.all_pairs_p2p and not t2.all_pairs_p2p_atomics


def test_forced_nvlink_on_pcie_box():
    g4090 = parse_record(load("4xrtx_4090_no_p2p"))
    t = resolve_topology(_yaml_conf("nvlink"), 4, probe=_fixed(g4090))
    assert t.kind == "nvlink" and t.all_pairs_nvlink and t.all_pairs_p2p and t.all_pairs_p2p_atomics
    assert t.min_gpu_memory_bytes == 24564 * MIB
    assert t.min_pair_bandwidth_gbps == pytest.approx(NV18_GBPS)


def test_forced_cpu():
    h200 = parse_record(load("2xh200_nv18"))
    t = resolve_topology(_yaml_conf("cpu"), 2, probe=_fixed(h200))
    assert t.kind == "cpu" and t.num_gpus == 0 and t.host_memory_bytes == h200.host_memory_bytes


def test_auto_and_none_probe():
    h200 = parse_record(load("2xh200_nv18"))
    assert resolve_topology(None, 2, probe=_fixed(h200)) is h200
    assert resolve_topology(_yaml_conf("auto"), 2, probe=_fixed(h200)) is h200


def test_forced_counts_and_memory():
    cpu = parse_record(
        {
            "format": topo_mod.RECORD_FORMAT,
            "host": {"cpu_count": 2, "memory_bytes": 8 * GIB},
            "nvml": {"error": "x"},
            "cuda": {"error": "y"},
            "errors": [],
        }
    )
    # no probed GPUs: the launch's local GPU count and the documented default memory
    t = resolve_topology(TopologyConf(kind="pcie"), 4, probe=_fixed(cpu))
    assert t.num_gpus == 4 and t.min_gpu_memory_bytes == 24 * GIB
    t = resolve_topology(
        TopologyConf(kind="pcie", num_gpus=2, gpu_memory_gib=48.0), 4, probe=_fixed(cpu)
    )
    assert t.num_gpus == 2 and t.min_gpu_memory_bytes == 48 * GIB
    # more GPUs than probed: the extra ones take the probe's memory
    h200 = parse_record(load("2xh200_nv18"))
    t = resolve_topology(
        TopologyConf(kind="nvlink", num_gpus=4, nvlink_count=6), 4, probe=_fixed(h200)
    )
    assert t.num_gpus == 4 and {g.memory_bytes for g in t.gpus} == {143771 * MIB}
    assert t.link(2, 3).nvlink_count == 6 and t.gpus[3].name == "forced nvlink GPU"
    # a DictConfig from Hydra works as well as the dataclass
    t = resolve_topology(
        OmegaConf.structured(TopologyConf(kind="pcie", num_gpus=2)), 1, probe=_fixed(cpu)
    )
    assert t.num_gpus == 2


@pytest.mark.parametrize(
    "conf, match",
    [
        (
            TopologyConf(kind="pci"),
            r"valid kinds: auto, nvlink, pcie, cpu \(Hydra: \+topology=pcie",
        ),
        (TopologyConf(kind="auto", p2p=False), "only apply to a forced kind"),
        (TopologyConf(kind="pcie", nvlink_count=4), "pcie has no NVLink"),
        (TopologyConf(kind="nvlink", nvlink_count=0), "nvlink_count >= 1"),
        (TopologyConf(kind="pcie", p2p=False, p2p_atomics=True), "p2p_atomics=true needs"),
        (TopologyConf(kind="pcie", pcie_gen=7), "pcie_gen=7"),
        (TopologyConf(kind="pcie", pcie_width=12), "pcie_width=12"),
        (TopologyConf(kind="pcie", gpu_memory_gib=-1.0), "must be positive"),
        (TopologyConf(kind="cpu", num_gpus=2), "cpu has no GPUs"),
    ],
)
def test_bad_conf_is_one_line_error(conf, match):
    h200 = parse_record(load("2xh200_nv18"))
    with pytest.raises(TopologyError, match=match) as err:
        resolve_topology(conf, 2, probe=_fixed(h200))
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_forced_needs_some_gpu_count():
    cpu = Topology(kind="cpu", host_memory_bytes=GIB, cpu_count=2)
    with pytest.raises(TopologyError, match="num_gpus"):
        resolve_topology(TopologyConf(kind="pcie"), 0, probe=_fixed(cpu))


# --------------------------------------------------------------------------- the probe itself
class _FakeNvml:
    """pynvml that answers from a record's nvml section (handles are NVML indices)."""

    def __init__(self, nvml: dict):
        import pynvml

        self._err, self._nvml = pynvml, nvml
        self.NVML_NVLINK_MAX_LINKS = pynvml.NVML_NVLINK_MAX_LINKS
        self.shut_down = False

    def _dev(self, h):
        return self._nvml["devices"][h]

    def _pair(self, a, b):
        return next(p for p in self._nvml["pairs"] if {p["a"], p["b"]} == {a, b})

    def _links(self, h, link):
        links = self._dev(h)["nvlinks"]
        if not links:
            raise self._err.NVMLError(self._err.NVML_ERROR_NOT_SUPPORTED)
        if link >= len(links):
            raise self._err.NVMLError(self._err.NVML_ERROR_INVALID_ARGUMENT)
        return links[link]

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlSystemGetDriverVersion(self):
        return self._nvml["driver_version"]

    def nvmlSystemGetCudaDriverVersion(self):
        return self._nvml["cuda_driver_version"]

    def nvmlDeviceGetCount(self):
        return len(self._nvml["devices"])

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self._dev(h)["name"]

    def nvmlDeviceGetPciInfo(self, h):
        return type("Pci", (), {"busId": self._dev(h)["pci_bus_id"].encode()})

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("Mem", (), {"total": self._dev(h)["memory_total_bytes"]})

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return tuple(self._dev(h)["cuda_compute_capability"])

    def nvmlDeviceGetNumaNodeId(self, h):
        return self._dev(h)["numa_node"]

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h):
        return self._dev(h)["pcie"]["curr_gen"]

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h):
        return self._dev(h)["pcie"]["max_gen"]

    def nvmlDeviceGetCurrPcieLinkWidth(self, h):
        return self._dev(h)["pcie"]["curr_width"]

    def nvmlDeviceGetMaxPcieLinkWidth(self, h):
        return self._dev(h)["pcie"]["max_width"]

    def nvmlDeviceGetNvLinkState(self, h, link):
        return int(self._links(h, link)["active"])

    def nvmlDeviceGetNvLinkVersion(self, h, link):
        return self._links(h, link)["version"]

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h, link):
        return self._links(h, link)["remote_device_type"]

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        return type("Pci", (), {"busId": self._links(h, link)["remote_pci_bus_id"].encode()})

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b):
        return self._pair(a, b)["common_ancestor"]

    def nvmlDeviceGetP2PStatus(self, a, b, index):
        cap = {v: k for k, v in topo_mod.P2P_CAPS.items()}[index]
        return self._pair(a, b)["p2p_status"][cap]


class _FakeCuda:
    """libcuda that answers from a record's cuda section through ctypes out-arguments."""

    def __init__(self, cuda: dict):
        self._cuda = cuda
        self._attrs = {v: k for k, v in topo_mod.CUDA_P2P_ATTRS.items()}

    def cuInit(self, flags):
        return 0

    def cuGetErrorName(self, rc, out):
        return 0

    def cuDeviceGetCount(self, out):
        out._obj.value = len(self._cuda["devices"])
        return 0

    def cuDeviceGet(self, out, ordinal):
        out._obj.value = ordinal
        return 0

    def _dev(self, dev):
        return self._cuda["devices"][dev.value if isinstance(dev, ctypes.c_int) else dev]

    def cuDeviceGetPCIBusId(self, buf, size, dev):
        buf.value = self._dev(dev)["pci_bus_id"].encode()
        return 0

    def cuDeviceGetName(self, buf, size, dev):
        buf.value = self._dev(dev)["name"].encode()
        return 0

    def cuDeviceTotalMem_v2(self, out, dev):
        out._obj.value = self._dev(dev)["total_memory_bytes"]
        return 0

    def cuDeviceGetAttribute(self, out, attr, dev):
        out._obj.value = self._dev(dev)["compute_capability"][{75: 0, 76: 1}[attr]]
        return 0

    def cuDeviceGetP2PAttribute(self, out, attr, src, dst):
        entry = next(e for e in self._cuda["p2p"] if (e["src"], e["dst"]) == (src, dst))
        out._obj.value = entry[self._attrs[attr]]
        return 0


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_probe_asks_nvml_and_cuda_as_recorded(name, monkeypatch):
    """Replaying a record through fake libraries, the probe must record exactly the
    answers it was given, and probe() must equal parsing the record."""
    rec = load(name)
    fake_nvml = _FakeNvml(rec["nvml"])
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    monkeypatch.setattr(topo_mod, "_load_libcuda", lambda: _FakeCuda(rec["cuda"]))
    got = probe_record()
    assert got["nvml"] == rec["nvml"] and got["cuda"] == rec["cuda"]
    assert got["errors"] == [] and fake_nvml.shut_down
    t = probe()
    assert t == parse_record({**rec, "host": got["host"]})


def test_cuda_no_device_answer(monkeypatch):
    rec = load("2xh200_nv18")
    fake = _FakeCuda(rec["cuda"])
    fake.cuInit = lambda flags: 100  # CUDA_ERROR_NO_DEVICE
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(rec["nvml"]))
    monkeypatch.setattr(topo_mod, "_load_libcuda", lambda: fake)
    got = probe_record()
    assert got["cuda"]["error"] is None and got["cuda"]["devices"] == []
    assert parse_record(got).kind == "cpu"


def test_cpu_fallback_when_nvml_init_fails(monkeypatch):
    import pynvml

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)

    def no_libcuda():
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(topo_mod, "_load_libcuda", no_libcuda)
    t = probe()
    assert t.kind == "cpu" and t.source == "none" and t.num_gpus == 0
    assert t.host_memory_bytes > 0 and t.cpu_count >= 1
    assert any("nvmlInit failed" in n and "Driver Not Loaded" in n for n in t.notes)


def test_cpu_fallback_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    t = probe(cuda=False)
    assert t.kind == "cpu" and any("nvidia-ml-py" in n for n in t.notes)


def test_query_failures_are_recorded_not_raised(monkeypatch):
    rec = load("4xrtx_pro_6000_pcie5_p2p")
    fake = _FakeNvml(rec["nvml"])

    def unsupported(h):
        raise fake._err.NVMLError(fake._err.NVML_ERROR_NOT_SUPPORTED)

    fake.nvmlDeviceGetMaxPcieLinkGeneration = unsupported
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    got = probe_record(cuda=False)
    assert got["nvml"]["devices"][0]["pcie"]["max_gen"] is None
    assert len([e for e in got["errors"] if "pcie max gen" in e]) == 4
    t = parse_record(got)  # falls back to the current generation for the estimate
    assert t.pair_bandwidth_gbps(0, 1) == pytest.approx(1 * 0.25 * 16 * 0.8)  # GPU1 idles at Gen1


# --------------------------------------------------------------------------- the tool
def _tool(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "probe_topology.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def test_tool_json_from_record():
    path = FIXTURES / "8xh100_sxm_nvswitch.json"
    out = _tool("--json", "--from-record", str(path))
    assert out.returncode == 0, out.stderr
    assert Topology.from_json(out.stdout) == parse_record(json.loads(path.read_text()))


def test_tool_table_from_record():
    out = _tool("--from-record", str(FIXTURES / "4xrtx_pro_6000_pcie5_p2p.json"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    gpu0 = next(l for l in lines if l.startswith("GPU0 "))
    assert gpu0.split()[1:] == ["X", "PHB", "p-", "NODE", "p-", "NODE", "p-"]
    assert any(l.split()[:2] == ["kind", "pcie"] for l in lines)


def test_tool_probe_and_record(tmp_path):
    path = tmp_path / "record.json"
    out = _tool("--json", "--record", str(path))
    assert out.returncode == 0, out.stderr
    record = json.loads(path.read_text())
    assert Topology.from_json(out.stdout) == parse_record(record)
    bad = _tool("--from-record", str(tmp_path / "missing.json"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "cannot read record" in bad.stderr


# --------------------------------------------------------------------------- real GPUs
@pytest.mark.gpu
def test_probe_matches_torch_peer_access():
    import torch

    record = probe_record()
    t = parse_record(record)
    n = torch.cuda.device_count()
    assert t.num_gpus == n and t.kind in ("nvlink", "pcie") and t.source == "nvml+cuda", t.notes
    for g in t.gpus:
        props = torch.cuda.get_device_properties(g.index)
        assert g.name == props.name
        if hasattr(props, "pci_domain_id"):  # the NVML device joined to this ordinal is this GPU
            assert g.pci_bus_id == (
                f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            )
        # NVML's total counts memory the driver reserves; CUDA's is a little smaller
        assert 0.9 * g.memory_bytes <= props.total_memory <= g.memory_bytes * 1.01
    for l in t.links:
        assert l.p2p == (
            torch.cuda.can_device_access_peer(l.a, l.b)
            and torch.cuda.can_device_access_peer(l.b, l.a)
        )
        if t.kind == "nvlink":
            assert l.nvlink_count > 0 and l.p2p
    # NVML's P2P status alone must tell the same story as the CUDA attributes
    nvml_only = parse_record({**record, "cuda": {"error": "dropped by the test"}})
    assert [(l.p2p, l.p2p_atomics) for l in nvml_only.links] == [
        (l.p2p, l.p2p_atomics) for l in t.links
    ]
    assert Topology.from_json(t.to_json()) == t

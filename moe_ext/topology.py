"""GPU and link topology of this machine: what the expert-parallel planner needs to know.

Two steps, so that the interpretation is testable without the hardware:

1. ``probe_record()`` asks NVML (``pynvml`` from nvidia-ml-py) and the CUDA driver (through
   ctypes) and returns a plain JSON-able *raw record* of their answers, unparsed.
2. ``parse_record(record)`` turns a record into a frozen ``Topology``; it is pure.

``probe()`` is both steps. It never raises for a missing driver, library or GPU: without
any GPU answer the result is a ``cpu`` topology (host memory and CPU count only).
``resolve_topology(conf, ...)`` applies a forced kind from Hydra (``+topology=pcie``) on
top of the probe, so an NVLink box can be made to plan like a PCIe box.

The CUDA part uses the driver API (``cuDeviceGetP2PAttribute`` in libcuda.so.1), the call
behind the runtime's ``cudaDeviceGetP2PAttribute``: libcudart only forwards to libcuda,
and pip wheels keep libcudart outside the loader path. These are device queries only (no
context, no allocation), but like any CUDA call they initialise the driver in this
process: probe before forking workers that use CUDA, or inside each worker.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from moe_ext.errors import MoeExtError

RECORD_FORMAT = "moe_ext.topology.record/1"
TOPOLOGY_FORMAT = "moe_ext.topology/1"

KINDS = ("nvlink", "pcie", "cpu")  # a Topology's kind
CONF_KINDS = ("auto",) + KINDS  # what TopologyConf.kind accepts

# nvmlDeviceGetTopologyCommonAncestor levels, nearest first, and nvidia-smi topo -m labels.
ANCESTORS = {
    0: "INTERNAL",
    10: "SINGLE",
    20: "MULTIPLE",
    30: "HOSTBRIDGE",
    40: "NODE",
    50: "SYSTEM",
}
ANCESTOR_LABELS = {
    "INTERNAL": "PIX",  # same board (dual-GPU cards): nvidia-smi has no own label for it
    "SINGLE": "PIX",  # at most one PCIe switch between the two
    "MULTIPLE": "PXB",  # several PCIe switches, no host bridge
    "HOSTBRIDGE": "PHB",  # through the CPU's host bridge
    "NODE": "NODE",  # across host bridges of one NUMA node
    "SYSTEM": "SYS",  # across sockets (QPI/UPI/xGMI)
    "UNKNOWN": "?",
}

# nvmlDeviceGetP2PStatus capability indices. pynvml 13 spells NVML_P2P_CAPS_INDEX_READ
# with a trailing comma (a tuple), so the numbers are kept here.
P2P_CAPS = {"read": 0, "write": 1, "nvlink": 2, "atomics": 3}
P2P_STATUS = {
    0: "OK",
    1: "CHIPSET_NOT_SUPPORTED",
    2: "GPU_NOT_SUPPORTED",
    3: "IOH_TOPOLOGY_NOT_SUPPORTED",
    4: "DISABLED_BY_REGKEY",
    5: "NOT_SUPPORTED",
    6: "UNKNOWN",
}
# nvmlDeviceGetNvLinkRemoteDeviceType answers
NVLINK_DEVICE_GPU, NVLINK_DEVICE_IBMNPU, NVLINK_DEVICE_SWITCH = 0, 1, 2
# nvmlDeviceGetNvLinkVersion answers an nvmlNvlinkVersion_t enum, not the generation
# (an A100 answers 5 = NVLink 3.1): enum -> NVLink generation.
NVLINK_ENUM_TO_GENERATION = {1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 4, 7: 5, 8: 6}
# CUdevice_P2PAttribute (equal to the runtime's cudaDeviceP2PAttr numbers).
CUDA_ERROR_NO_DEVICE = 100
CUDA_P2P_ATTRS = {
    "performance_rank": 1,
    "access_supported": 2,
    "native_atomic_supported": 3,
    "cuda_array_access_supported": 4,
}

# Bandwidth model, GB/s per direction. NVLink 2-4 carry 25 GB/s per link and direction
# (V100 6 links = 150, A100 12 = 300, H100 18 = 450), NVLink 5 50 (B200 18 links = 900).
# NVLink 6 is assumed to keep NVLink 5's per-link rate.
NVLINK_GBPS_PER_LINK = {1: 20.0, 2: 25.0, 3: 25.0, 4: 25.0, 5: 50.0, 6: 50.0}
DEFAULT_NVLINK_GENERATION = 4
# PCIe raw rate per lane and direction after line encoding (Gen3+ 128b/130b): Gen4 x16
# = 31.5, Gen5 x16 = 63.
PCIE_GBPS_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
DEFAULT_PCIE_GEN, DEFAULT_PCIE_WIDTH = 4, 16  # when a GPU's link is unknown
# Share of the raw PCIe rate a copy reaches: peer-to-peer DMA loses ~20% to packet
# headers; without P2P every byte is staged through host memory (device -> host ->
# device), measured at 24 GB/s all_to_all bus bandwidth on a Gen5 x16 H200 with
# NCCL_P2P_DISABLE=1 (docs/PERF.md, "Link floors"), about 0.4 of raw.
PCIE_P2P_EFFICIENCY = 0.8
PCIE_HOST_STAGED_EFFICIENCY = 0.4
# CPU ranks exchange through gloo over loopback TCP.
GLOO_LOOPBACK_GBPS = 5.0

# Forced topologies: per-kind defaults for the TopologyConf fields left at None.
FORCED_DEFAULTS = {
    "pcie": {
        "p2p": False,
        "p2p_atomics": False,
        "pcie_gen": 4,
        "pcie_width": 16,
        "nvlink_count": 0,
    },
    "nvlink": {
        "p2p": True,
        "p2p_atomics": True,
        "pcie_gen": 5,
        "pcie_width": 16,
        "nvlink_count": 18,
    },
}
# Per-GPU memory of a forced topology when neither the probe nor the conf gives one:
# a GeForce-class 24 GiB card for pcie, an 80 GiB H100 for nvlink.
DEFAULT_GPU_MEMORY_GIB = {"pcie": 24.0, "nvlink": 80.0}
GIB = 1 << 30


class TopologyError(MoeExtError):
    """A topology, record or topology config that cannot be used (message says the fix)."""


# --------------------------------------------------------------------------- dataclasses
@dataclass(frozen=True)
class GPU:
    """One GPU as the ranks see it: ``index`` is the CUDA device ordinal (``cuda:index``)
    when the CUDA driver answered, else NVML's index."""

    index: int
    name: str
    memory_bytes: int
    pci_bus_id: Optional[str] = None  # "0000:18:00.0", lower case, 4-digit domain
    pcie_gen: Optional[int] = None  # current; idle GPUs train down (Gen1) to save power
    pcie_max_gen: Optional[int] = None  # best the GPU and its slot can do
    pcie_width: Optional[int] = None  # current lanes
    pcie_max_width: Optional[int] = None
    numa_node: Optional[int] = None
    compute_capability: Optional[tuple[int, int]] = None

    @property
    def pcie_gbps(self) -> float:
        """Raw PCIe rate per direction at the link's best generation and width."""
        gen = self.pcie_max_gen or self.pcie_gen or DEFAULT_PCIE_GEN
        width = self.pcie_max_width or self.pcie_width or DEFAULT_PCIE_WIDTH
        return PCIE_GBPS_PER_LANE.get(gen, PCIE_GBPS_PER_LANE[max(PCIE_GBPS_PER_LANE)]) * width


@dataclass(frozen=True)
class Link:
    """What connects GPUs ``a < b``."""

    a: int
    b: int
    nvlink_count: int = 0  # NVLink links usable between the two (NV18 -> 18); 0: none
    nvlink_gen: Optional[int] = None  # NVLink generation (4 on Hopper)
    via_nvswitch: bool = False  # the NVLinks go through NVSwitches, not point to point
    ancestor: str = "UNKNOWN"  # PCIe common ancestor: a value of ANCESTORS or UNKNOWN
    p2p: bool = False  # peer access in both directions
    p2p_atomics: bool = False  # native atomics over the peer link in both directions
    # NVML's reason for the read capability (OK, GPU_NOT_SUPPORTED, ...)
    p2p_status: str = "unknown"

    @property
    def nvlink(self) -> bool:
        return self.nvlink_count > 0

    @property
    def label(self) -> str:
        """nvidia-smi topo -m style: NV18, PIX, PXB, PHB, NODE, SYS."""
        return f"NV{self.nvlink_count}" if self.nvlink else ANCESTOR_LABELS.get(self.ancestor, "?")


@dataclass(frozen=True)
class Topology:
    """GPUs of this machine and the link between every pair of them.

    ``kind``: ``nvlink`` when every GPU pair has NVLink (a single GPU: when it has active
    NVLinks), ``pcie`` otherwise, ``cpu`` without GPUs. ``links`` holds one Link per pair
    ``a < b``, sorted. ``source`` says where it came from (``nvml+cuda``, ``nvml``,
    ``cuda``, ``none``, ``forced:pcie``, ...); ``notes`` carries what the probe could not
    answer, for explanations.
    """

    kind: str
    gpus: tuple[GPU, ...] = ()
    links: tuple[Link, ...] = ()
    host_memory_bytes: Optional[int] = None
    cpu_count: Optional[int] = None
    source: str = "none"
    driver_version: Optional[str] = None
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TopologyError(f"topology kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if (self.kind == "cpu") != (not self.gpus):
            raise TopologyError(
                f"a {self.kind} topology with {len(self.gpus)} GPUs: only kind cpu has none"
            )
        if [g.index for g in self.gpus] != list(range(len(self.gpus))):
            raise TopologyError("GPU indices must be 0..n-1 in order")
        n = len(self.gpus)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        if [(l.a, l.b) for l in self.links] != pairs:
            raise TopologyError(
                f"links must list every GPU pair a < b once, in order; expected {len(pairs)}"
            )
        for l in self.links:
            if l.p2p_atomics and not l.p2p:
                raise TopologyError(f"GPUs {l.a},{l.b}: P2P atomics without P2P access")
            if l.ancestor not in ANCESTOR_LABELS:
                raise TopologyError(f"GPUs {l.a},{l.b}: unknown PCIe ancestor {l.ancestor!r}")
        if n >= 2 and (self.kind == "nvlink") != all(l.nvlink for l in self.links):
            raise TopologyError(
                f"kind {self.kind} disagrees with the links: nvlink means every pair has NVLink"
            )

    # ---- what the planner reads
    @property
    def num_gpus(self) -> int:
        return len(self.gpus)

    def link(self, a: int, b: int) -> Link:
        if a == b or not (0 <= a < self.num_gpus and 0 <= b < self.num_gpus):
            raise TopologyError(
                f"no link between GPUs {a} and {b} in a {self.num_gpus}-GPU topology"
            )
        a, b = min(a, b), max(a, b)
        n = self.num_gpus
        return self.links[a * n - a * (a + 1) // 2 + (b - a - 1)]  # row-major upper triangle

    @property
    def all_pairs_nvlink(self) -> bool:
        return self.kind == "nvlink"

    @property
    def all_pairs_p2p(self) -> bool:
        """Every pair has peer access (vacuously true for one GPU, false without GPUs)."""
        return self.kind != "cpu" and all(l.p2p for l in self.links)

    @property
    def all_pairs_p2p_atomics(self) -> bool:
        return self.kind != "cpu" and all(l.p2p_atomics for l in self.links)

    @property
    def min_gpu_memory_bytes(self) -> int:
        """Smallest GPU's memory; 0 without GPUs (see host_memory_bytes)."""
        return min((g.memory_bytes for g in self.gpus), default=0)

    def pair_bandwidth_gbps(self, a: int, b: int) -> float:
        """Estimated copy bandwidth between GPUs a and b, GB/s per direction: NVLink links
        times the per-link rate of their generation, else the slower GPU's PCIe link at
        the P2P or host-staged efficiency."""
        l = self.link(a, b)
        if l.nvlink:
            return l.nvlink_count * NVLINK_GBPS_PER_LINK[l.nvlink_gen or DEFAULT_NVLINK_GENERATION]
        raw = min(self.gpus[a].pcie_gbps, self.gpus[b].pcie_gbps)
        return raw * (PCIE_P2P_EFFICIENCY if l.p2p else PCIE_HOST_STAGED_EFFICIENCY)

    @property
    def min_pair_bandwidth_gbps(self) -> float:
        """Worst pair's estimate: what a collective over all GPUs is bound by. CPU ranks:
        gloo over loopback; one GPU: inf (nothing crosses a link)."""
        if self.kind == "cpu":
            return GLOO_LOOPBACK_GBPS
        return min((self.pair_bandwidth_gbps(l.a, l.b) for l in self.links), default=math.inf)

    def subset(self, count: int) -> "Topology":
        """The first ``count`` GPUs (the devices ranks 0..count-1 of a local launch use)."""
        if not 1 <= count <= self.num_gpus:
            raise TopologyError(
                f"cannot take {count} of {self.num_gpus} GPUs; use 1..{self.num_gpus}"
            )
        links = tuple(l for l in self.links if l.b < count)
        kind = self.kind if count == 1 else ("nvlink" if all(l.nvlink for l in links) else "pcie")
        return replace(self, kind=kind, gpus=self.gpus[:count], links=links)

    # ---- JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format": TOPOLOGY_FORMAT, **asdict(self)}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Topology":
        if data.get("format") != TOPOLOGY_FORMAT:
            hint = (
                " (a raw probe record: use parse_record / --from-record)"
                if data.get("format") == RECORD_FORMAT
                else ""
            )
            raise TopologyError(
                f"not a {TOPOLOGY_FORMAT} document: format={data.get('format')!r}{hint}"
            )
        fields = {k: v for k, v in data.items() if k != "format"}
        try:
            gpus = tuple(
                GPU(
                    **{
                        **g,
                        "compute_capability": tuple(g["compute_capability"])
                        if g.get("compute_capability")
                        else None,
                    }
                )
                for g in fields.pop("gpus", ())
            )
            links = tuple(Link(**l) for l in fields.pop("links", ()))
            return cls(gpus=gpus, links=links, notes=tuple(fields.pop("notes", ())), **fields)
        except TypeError as e:  # unknown or missing keys
            raise TopologyError(f"malformed topology JSON: {e}") from e

    @classmethod
    def from_json(cls, text: str) -> "Topology":
        return cls.from_dict(json.loads(text))

    # ---- display
    def summary_rows(self) -> list[tuple[str, str]]:
        """(field, value) rows describing the topology, for a two-column table."""
        yes = lambda b: "yes" if b else "no"  # noqa: E731
        rows = [("kind", self.kind), ("source", self.source)]
        if self.driver_version:
            rows.append(("driver", self.driver_version))
        host_mem = f"{self.host_memory_bytes / GIB:.1f} GiB" if self.host_memory_bytes else "?"
        rows.append(("host", f"{self.cpu_count or '?'} CPUs, {host_mem} memory"))
        names = sorted({g.name for g in self.gpus})
        rows.append(("gpus", f"{self.num_gpus}" + (f" x {' / '.join(names)}" if names else "")))
        if self.gpus:
            rows.append(("min GPU memory", f"{self.min_gpu_memory_bytes / GIB:.1f} GiB"))
        if self.links:
            labels = sorted(
                {link.label + (" via NVSwitch" if link.via_nvswitch else "") for link in self.links}
            )
            rows.append(("pair links", ", ".join(labels)))
        rows += [
            ("all pairs NVLink", yes(self.all_pairs_nvlink)),
            ("all pairs P2P", yes(self.all_pairs_p2p)),
            ("all pairs P2P atomics", yes(self.all_pairs_p2p_atomics)),
            (
                "min pair bandwidth",
                f"{self.min_pair_bandwidth_gbps:.1f} GB/s (estimate, per direction)",
            ),
        ]
        rows += [("note", n) for n in self.notes]
        return rows

    def describe(self) -> str:
        """One line for logs: kind, GPUs, links, peer access and atomics."""
        wanted = (
            "kind",
            "source",
            "gpus",
            "pair links",
            "all pairs P2P",
            "all pairs P2P atomics",
            "min pair bandwidth",
        )
        return "; ".join(f"{k} {v}" for k, v in self.summary_rows() if k in wanted)

    def pair_matrix(self) -> list[list[str]]:
        """nvidia-smi topo -m style matrix (header row first): link label plus flags,
        ``p`` peer access, ``a`` P2P native atomics, ``-`` missing."""
        header = [""] + [f"GPU{g.index}" for g in self.gpus]
        rows = [header]
        for i in range(self.num_gpus):
            row = [f"GPU{i}"]
            for j in range(self.num_gpus):
                if i == j:
                    row.append("X")
                    continue
                l = self.link(i, j)
                row.append(f"{l.label} {'p' if l.p2p else '-'}{'a' if l.p2p_atomics else '-'}")
            rows.append(row)
        return rows


# --------------------------------------------------------------------------- probing
def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def normalize_bus_id(bus_id: Optional[str]) -> Optional[str]:
    """NVML says 00000000:18:00.0, CUDA 0000:18:00.0: both become 0000:18:00.0."""
    if not bus_id:
        return None
    try:
        domain, rest = bus_id.strip().lower().split(":", 1)
        return f"{int(domain, 16):04x}:{rest}"
    except ValueError:
        return bus_id.strip().lower()


def _host_record() -> dict[str, Any]:
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use (cgroups, taskset)
    except (AttributeError, OSError):
        cpus = os.cpu_count()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        memory = None
    return {"cpu_count": cpus, "memory_bytes": memory}


def _nvml_record(errors: list[str]) -> dict[str, Any]:
    """NVML's answers, or {"error": ...} when NVML cannot be used at all."""
    try:
        import pynvml
    except ImportError as e:
        return {"error": f"pynvml not importable ({e}); pip install nvidia-ml-py"}
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError (library or driver missing), OSError
        return {"error": f"nvmlInit failed: {e}"}
    try:
        return _nvml_answers(pynvml, errors)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - nothing useful to do about a failed shutdown
            pass


def _nvml_answers(nv, errors: list[str]) -> dict[str, Any]:
    def ask(what: str, fn: Callable, *args, quiet: bool = False):
        try:
            return fn(*args)
        except Exception as e:  # NOT_SUPPORTED and friends: record and go on
            if not quiet:
                errors.append(f"{what}: {e}")
            return None

    rec: dict[str, Any] = {
        "error": None,
        "driver_version": ask("driver version", lambda: _text(nv.nvmlSystemGetDriverVersion())),
        "cuda_driver_version": ask("cuda driver version", nv.nvmlSystemGetCudaDriverVersion),
        "devices": [],
        "pairs": [],
    }
    count = ask("nvmlDeviceGetCount", nv.nvmlDeviceGetCount) or 0
    handles = []
    for i in range(count):
        h = ask(f"handle {i}", nv.nvmlDeviceGetHandleByIndex, i)
        if h is None:
            continue
        handles.append((i, h))
        pci = ask(f"GPU{i} pci info", nv.nvmlDeviceGetPciInfo, h)
        mem = ask(f"GPU{i} memory", nv.nvmlDeviceGetMemoryInfo, h)
        cc = ask(f"GPU{i} compute capability", nv.nvmlDeviceGetCudaComputeCapability, h)
        dev = {
            "index": i,
            "name": ask(f"GPU{i} name", lambda handle: _text(nv.nvmlDeviceGetName(handle)), h),
            "pci_bus_id": _text(pci.busId) if pci is not None else None,
            "memory_total_bytes": int(mem.total) if mem is not None else None,
            "cuda_compute_capability": list(cc) if cc is not None else None,
            "numa_node": ask(f"GPU{i} numa node", nv.nvmlDeviceGetNumaNodeId, h, quiet=True),
            "pcie": {
                "curr_gen": ask(f"GPU{i} pcie gen", nv.nvmlDeviceGetCurrPcieLinkGeneration, h),
                "max_gen": ask(f"GPU{i} pcie max gen", nv.nvmlDeviceGetMaxPcieLinkGeneration, h),
                "curr_width": ask(f"GPU{i} pcie width", nv.nvmlDeviceGetCurrPcieLinkWidth, h),
                "max_width": ask(f"GPU{i} pcie max width", nv.nvmlDeviceGetMaxPcieLinkWidth, h),
            },
            "nvlinks": [],
            "nvlink_error": None,
        }
        for link in range(nv.NVML_NVLINK_MAX_LINKS):
            try:
                active = nv.nvmlDeviceGetNvLinkState(h, link)
            except Exception as e:
                # link 0 NOT_SUPPORTED: no NVLink; later: absent or past the last
                if link == 0:
                    dev["nvlink_error"] = str(e)
                    break
                continue
            entry = {"link": link, "active": bool(active)}
            if active:
                remote = ask(
                    f"GPU{i} nvlink {link} remote pci", nv.nvmlDeviceGetNvLinkRemotePciInfo, h, link
                )
                entry.update(
                    version=ask(
                        f"GPU{i} nvlink {link} version", nv.nvmlDeviceGetNvLinkVersion, h, link
                    ),
                    remote_device_type=ask(
                        f"GPU{i} nvlink {link} remote type",
                        nv.nvmlDeviceGetNvLinkRemoteDeviceType,
                        h,
                        link,
                    ),
                    remote_pci_bus_id=_text(remote.busId) if remote is not None else None,
                )
            dev["nvlinks"].append(entry)
        rec["devices"].append(dev)
    for x, (i, hi) in enumerate(handles):
        for j, hj in handles[x + 1 :]:
            status = {
                cap: ask(f"p2p status {i},{j} {cap}", nv.nvmlDeviceGetP2PStatus, hi, hj, idx)
                for cap, idx in P2P_CAPS.items()
            }
            rec["pairs"].append(
                {
                    "a": i,
                    "b": j,
                    "common_ancestor": ask(
                        f"common ancestor {i},{j}", nv.nvmlDeviceGetTopologyCommonAncestor, hi, hj
                    ),
                    "p2p_status": status,
                }
            )
    return rec


def _load_libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _cuda_record(errors: list[str]) -> dict[str, Any]:
    """CUDA driver answers: visible devices in ordinal order and P2P attributes per
    ordered pair; {"error": ...} when the driver is missing or has no devices."""
    try:
        cu = _load_libcuda()
    except OSError as e:
        return {"error": f"libcuda.so.1 not loadable ({e})"}

    def check(rc: int, what: str) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            cu.cuGetErrorName(rc, ctypes.byref(name))
            raise RuntimeError(f"{what} -> {name.value.decode() if name.value else rc}")

    try:
        rc = cu.cuInit(0)
        if rc == CUDA_ERROR_NO_DEVICE:  # a valid answer: nothing visible (CUDA_VISIBLE_DEVICES="")
            return {"error": None, "library": "libcuda.so.1", "devices": [], "p2p": []}
        check(rc, "cuInit")
        count = ctypes.c_int()
        check(cu.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        devices, p2p = [], []
        for ordinal in range(count.value):
            dev = ctypes.c_int()
            check(cu.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
            bus, name = ctypes.create_string_buffer(64), ctypes.create_string_buffer(256)
            check(cu.cuDeviceGetPCIBusId(bus, 64, dev), "cuDeviceGetPCIBusId")
            check(cu.cuDeviceGetName(name, 256, dev), "cuDeviceGetName")
            mem = ctypes.c_size_t()
            check(cu.cuDeviceTotalMem_v2(ctypes.byref(mem), dev), "cuDeviceTotalMem")
            major, minor = ctypes.c_int(), ctypes.c_int()
            check(cu.cuDeviceGetAttribute(ctypes.byref(major), 75, dev), "compute capability major")
            check(cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev), "compute capability minor")
            devices.append(
                {
                    "ordinal": ordinal,
                    "pci_bus_id": bus.value.decode(),
                    "name": name.value.decode(),
                    "total_memory_bytes": mem.value,
                    "compute_capability": [major.value, minor.value],
                }
            )
        for src in range(count.value):
            for dst in range(count.value):
                if src == dst:
                    continue
                entry: dict[str, Any] = {"src": src, "dst": dst}
                for attr, number in CUDA_P2P_ATTRS.items():
                    value = ctypes.c_int()
                    check(
                        cu.cuDeviceGetP2PAttribute(ctypes.byref(value), number, src, dst),
                        f"P2P {attr}",
                    )
                    entry[attr] = value.value
                p2p.append(entry)
        return {"error": None, "library": "libcuda.so.1", "devices": devices, "p2p": p2p}
    except (RuntimeError, AttributeError, OSError) as e:
        return {"error": f"CUDA driver query failed: {e}"}


def probe_record(cuda: bool = True) -> dict[str, Any]:
    """Ask NVML and (``cuda=True``) the CUDA driver about GPUs and links; the answers, raw
    and JSON-able. Never raises for missing libraries, drivers or GPUs."""
    errors: list[str] = []
    record = {
        "format": RECORD_FORMAT,
        "host": _host_record(),
        "nvml": _nvml_record(errors),
        "cuda": _cuda_record(errors) if cuda else {"error": "not asked (cuda=False)"},
        "errors": errors,
    }
    return record


def probe(cuda: bool = True) -> Topology:
    """This machine's topology (``parse_record(probe_record())``); ``cpu`` without GPUs."""
    return parse_record(probe_record(cuda=cuda))


# --------------------------------------------------------------------------- parsing
def _nvlink_counts(devices: list[dict]) -> tuple[dict, dict, dict]:
    """Per NVML device: direct links per peer bus id, links into NVSwitches, generations."""
    gpu_bus_ids = {normalize_bus_id(d.get("pci_bus_id")) for d in devices}
    direct: dict[int, dict[str, int]] = {}
    switch: dict[int, int] = {}
    gens: dict[int, set[int]] = {}
    for d in devices:
        i = d["index"]
        direct[i], switch[i], gens[i] = {}, 0, set()
        for link in d.get("nvlinks") or ():
            if not link.get("active"):
                continue
            remote = normalize_bus_id(link.get("remote_pci_bus_id"))
            rtype = link.get("remote_device_type")
            if rtype not in (NVLINK_DEVICE_GPU, NVLINK_DEVICE_SWITCH, NVLINK_DEVICE_IBMNPU):
                # Old drivers cannot name the remote end (None, UNKNOWN): a GPU's bus id
                # means a point-to-point bridge, anything else on x86 is an NVSwitch.
                if remote is None:
                    continue
                rtype = NVLINK_DEVICE_GPU if remote in gpu_bus_ids else NVLINK_DEVICE_SWITCH
            if rtype == NVLINK_DEVICE_GPU and remote is not None:
                direct[i][remote] = direct[i].get(remote, 0) + 1
            elif rtype == NVLINK_DEVICE_SWITCH:
                switch[i] += 1
            if link.get("version") in NVLINK_ENUM_TO_GENERATION:
                gens[i].add(NVLINK_ENUM_TO_GENERATION[link["version"]])
    return direct, switch, gens


def parse_record(record: dict[str, Any]) -> Topology:
    """A raw probe record (``probe_record()``, a ``--record`` file) -> Topology. Pure.

    GPUs are CUDA's visible devices in ordinal order when the CUDA driver answered (joined
    to NVML's devices by PCI bus id), else NVML's devices. Per pair: NVLink count = direct
    links + min(links into NVSwitches of either GPU) (every switch port reaches every GPU,
    as nvidia-smi counts NV18 on HGX boards); P2P and atomics from CUDA's P2P attributes
    in both directions, else from NVML's P2P status (read and write OK / atomics OK).
    """
    _check_record_format(record)
    host = record.get("host") or {}
    nvml = record.get("nvml") or {}
    cuda = record.get("cuda") or {}
    nvml_ok = nvml.get("error") is None and bool(nvml.get("devices"))
    # CUDA answering "no device" is an answer: this process may use no GPU, whatever NVML sees.
    cuda_ok = cuda.get("error") is None and cuda.get("devices") is not None
    notes = [
        f"{name}: {part['error']}"
        for name, part in (("NVML", nvml), ("CUDA", cuda))
        if part.get("error")
    ]
    base = dict(
        host_memory_bytes=host.get("memory_bytes"),
        cpu_count=host.get("cpu_count"),
        driver_version=nvml.get("driver_version") if nvml_ok else None,
    )
    if cuda_ok and not cuda["devices"]:
        if nvml_ok:
            notes.append(
                f"NVML sees {len(nvml['devices'])} GPU(s) but none is visible to CUDA "
                "(CUDA_VISIBLE_DEVICES?)"
            )
        return Topology(kind="cpu", source="cuda", notes=tuple(notes), **base)
    if not nvml_ok and not cuda_ok:
        return Topology(kind="cpu", source="none", notes=tuple(notes), **base)

    nvml_devices = (nvml.get("devices") or []) if nvml_ok else []
    order = _gpu_order(nvml_devices, cuda["devices"] if cuda_ok else None, notes)
    gpus = tuple(_parsed_gpu(idx, nd, cd) for idx, (nd, cd) in enumerate(order))
    nvlinks = _nvlink_counts(nvml_devices)
    nvml_pairs = {}
    for p in (nvml.get("pairs") or ()) if nvml_ok else ():
        nvml_pairs[(p["a"], p["b"])] = nvml_pairs[(p["b"], p["a"])] = p
    cuda_p2p = {(e["src"], e["dst"]): e for e in cuda.get("p2p") or ()} if cuda_ok else {}
    links = tuple(
        _parsed_link(i, j, order, nvlinks, nvml_pairs, cuda_p2p, notes)
        for i in range(len(order))
        for j in range(i + 1, len(order))
    )
    source = "+".join(s for s, ok in (("nvml", nvml_ok), ("cuda", cuda_ok)) if ok)
    return Topology(
        kind=_parsed_kind(order, links, nvlinks),
        gpus=gpus,
        links=links,
        source=source,
        notes=tuple(notes),
        **base,
    )


def _check_record_format(record: dict[str, Any]) -> None:
    if record.get("format") != RECORD_FORMAT:
        hint = (
            " (a parsed topology: use Topology.from_json)"
            if record.get("format") == TOPOLOGY_FORMAT
            else ""
        )
        raise TopologyError(f"not a {RECORD_FORMAT} record: format={record.get('format')!r}{hint}")


def _gpu_order(
    nvml_devices: list[dict], cuda_devices: Optional[list[dict]], notes: list[str]
) -> list[tuple[Optional[dict], Optional[dict]]]:
    """(NVML device or None, CUDA device or None) per GPU, in the order ranks see them:
    CUDA's ordinals joined to NVML by bus id, else NVML's order (``cuda_devices`` None)."""
    if cuda_devices is None:
        return [(d, None) for d in nvml_devices]
    by_bus = {normalize_bus_id(d.get("pci_bus_id")): d for d in nvml_devices}
    order = [(by_bus.get(normalize_bus_id(c["pci_bus_id"])), c) for c in cuda_devices]
    missing = [c["ordinal"] for nd, c in order if nd is None and nvml_devices]
    if missing:
        notes.append(f"CUDA devices {missing} not found in NVML; their links are unknown")
    return order


def _parsed_gpu(idx: int, nd: Optional[dict], cd: Optional[dict]) -> GPU:
    """GPU ``idx`` from its NVML record (preferred) and its CUDA record."""
    nd, cd = nd or {}, cd or {}
    pcie = nd.get("pcie") or {}
    cc = nd.get("cuda_compute_capability") or cd.get("compute_capability")
    return GPU(
        index=idx,
        name=nd.get("name") or cd.get("name") or "unknown GPU",
        memory_bytes=int(nd.get("memory_total_bytes") or cd.get("total_memory_bytes") or 0),
        pci_bus_id=normalize_bus_id(nd.get("pci_bus_id") or cd.get("pci_bus_id")),
        pcie_gen=pcie.get("curr_gen"),
        pcie_max_gen=pcie.get("max_gen"),
        pcie_width=pcie.get("curr_width"),
        pcie_max_width=pcie.get("max_width"),
        numa_node=nd.get("numa_node"),
        compute_capability=tuple(cc) if cc else None,
    )


def _parsed_link(
    i: int,
    j: int,
    order: list[tuple[Optional[dict], Optional[dict]]],
    nvlinks: tuple[dict, dict, dict],
    nvml_pairs: dict,
    cuda_p2p: dict,
    notes: list[str],
) -> Link:
    """The link between GPUs i < j: NVLink and PCIe facts from NVML where both GPUs are
    known to it, P2P from CUDA (both directions) else from NVML's P2P status."""
    ni, nj = order[i][0], order[j][0]
    count, gen, via_switch, ancestor, status_name = 0, None, False, "UNKNOWN", "unknown"
    nv_status: dict[str, Any] = {}
    if ni is not None and nj is not None:
        count, gen, via_switch = _nvlink_between(ni, nj, *nvlinks)
        pair = nvml_pairs.get((ni["index"], nj["index"])) or {}
        ancestor = ANCESTORS.get(pair.get("common_ancestor"), "UNKNOWN")
        nv_status = pair.get("p2p_status") or {}
        if nv_status.get("read") is not None:
            status_name = P2P_STATUS.get(nv_status["read"], "UNKNOWN")
        if count == 0 and nv_status.get("nvlink") == 0:
            notes.append(f"GPUs {i},{j}: NVML reports P2P over NVLink but no NVLink link answered")
    fwd, bwd = cuda_p2p.get((i, j)), cuda_p2p.get((j, i))
    if fwd is not None and bwd is not None:
        p2p = bool(fwd["access_supported"] and bwd["access_supported"])
        atomics = p2p and bool(fwd["native_atomic_supported"] and bwd["native_atomic_supported"])
    else:
        p2p = nv_status.get("read") == 0 and nv_status.get("write") == 0
        atomics = p2p and nv_status.get("atomics") == 0
    return Link(
        a=i,
        b=j,
        nvlink_count=count,
        nvlink_gen=gen,
        via_nvswitch=via_switch,
        ancestor=ancestor,
        p2p=p2p,
        p2p_atomics=atomics,
        p2p_status=status_name,
    )


def _nvlink_between(
    ni: dict, nj: dict, direct: dict, switch: dict, gens: dict
) -> tuple[int, Optional[int], bool]:
    """(links, NVLink generation or None, via an NVSwitch) between two NVML devices."""
    a, b = ni["index"], nj["index"]
    bus_a, bus_b = normalize_bus_id(ni.get("pci_bus_id")), normalize_bus_id(nj.get("pci_bus_id"))
    point = min(direct[a].get(bus_b, 0), direct[b].get(bus_a, 0)) or max(
        direct[a].get(bus_b, 0), direct[b].get(bus_a, 0)
    )  # one side may not report
    switched = min(switch[a], switch[b])
    count = point + switched
    common = gens[a] & gens[b] if gens[a] and gens[b] else gens[a] | gens[b]
    return count, (min(common) if count and common else None), switched > 0


def _parsed_kind(
    order: list[tuple[Optional[dict], Optional[dict]]],
    links: tuple[Link, ...],
    nvlinks: tuple[dict, dict, dict],
) -> str:
    if len(order) >= 2:
        return "nvlink" if all(link.nvlink for link in links) else "pcie"
    # one GPU: it is an NVLink part when it has active NVLinks (a slice of an HGX board)
    nd = order[0][0]
    direct, switch, _ = nvlinks
    return "nvlink" if nd is not None and (switch[nd["index"]] or direct[nd["index"]]) else "pcie"


# --------------------------------------------------------------------------- forcing
def _conf_get(conf: Any, name: str) -> Any:
    return getattr(conf, name, None)


def resolve_topology(
    conf: Any, num_local_gpus: int, probe: Callable[[], Topology] = probe
) -> Topology:
    """The topology to plan for.

    ``conf`` is a TopologyConf (or its DictConfig). None or kind ``auto``: the probe.
    ``pcie`` / ``nvlink``: a synthetic topology of that kind over ``conf.num_gpus`` GPUs,
    else the probe's GPU count, else ``num_local_gpus``; GPU names, bus ids and memory are
    the probe's where it has GPUs; the conf's fields (p2p, p2p_atomics, nvlink_count,
    pcie_gen, pcie_width, gpu_memory_gib) override, and FORCED_DEFAULTS /
    DEFAULT_GPU_MEMORY_GIB fill what neither gives. ``cpu``: no GPUs, the probe's host.
    Needs no CUDA.
    """
    kind = "auto" if conf is None else str(_conf_get(conf, "kind"))
    if kind not in CONF_KINDS:
        raise TopologyError(
            f"unknown topology kind {kind!r}; valid kinds: {', '.join(CONF_KINDS)} "
            "(Hydra: +topology=pcie, or topology.kind=pcie)"
        )
    overrides = {
        name: _conf_get(conf, name)
        for name in (
            "num_gpus",
            "p2p",
            "p2p_atomics",
            "nvlink_count",
            "pcie_gen",
            "pcie_width",
            "gpu_memory_gib",
        )
        if conf is not None and _conf_get(conf, name) is not None
    }
    if kind == "auto":
        if overrides:
            raise TopologyError(
                f"topology fields {sorted(overrides)} only apply to a forced kind; "
                "add +topology=pcie|nvlink|cpu or drop them"
            )
        return probe()
    probed = probe()
    if kind == "cpu":
        if overrides.get("num_gpus", 0) or set(overrides) - {"num_gpus"}:
            raise TopologyError(f"topology kind cpu has no GPUs; drop {sorted(overrides)}")
        return Topology(
            kind="cpu",
            host_memory_bytes=probed.host_memory_bytes,
            cpu_count=probed.cpu_count,
            source="forced:cpu",
            driver_version=probed.driver_version,
            notes=(f"forced by +topology=cpu; the probe found {probed.num_gpus} GPU(s)",),
        )
    opts = {**FORCED_DEFAULTS[kind], **overrides}
    n = overrides.get("num_gpus") or probed.num_gpus or num_local_gpus
    _check_forced(kind, opts, n)
    note = (
        f"forced by +topology={kind}; the probe found {probed.num_gpus} GPU(s), kind {probed.kind}"
    )
    return Topology(
        kind=kind,
        gpus=_forced_gpus(kind, opts, n, probed),
        links=_forced_links(kind, opts, n, probed),
        host_memory_bytes=probed.host_memory_bytes,
        cpu_count=probed.cpu_count,
        source=f"forced:{kind}",
        driver_version=probed.driver_version,
        notes=(note,),
    )


def _check_forced(kind: str, opts: dict[str, Any], n: int) -> None:
    """The fields of a forced ``pcie``/``nvlink`` topology over ``n`` GPUs make sense."""
    if n < 1:
        raise TopologyError(
            f"topology kind {kind} needs GPUs: set topology.num_gpus=N or launch N local ranks"
        )
    if kind == "pcie" and opts["nvlink_count"]:
        raise TopologyError(
            "topology kind pcie has no NVLink; drop topology.nvlink_count or use +topology=nvlink"
        )
    if kind == "nvlink" and int(opts["nvlink_count"]) < 1:
        raise TopologyError(
            "topology kind nvlink needs topology.nvlink_count >= 1 (NV18 on H100/H200)"
        )
    if opts["p2p_atomics"] and not opts["p2p"]:
        raise TopologyError("topology.p2p_atomics=true needs topology.p2p=true")
    if int(opts["pcie_gen"]) not in PCIE_GBPS_PER_LANE:
        raise TopologyError(f"topology.pcie_gen={opts['pcie_gen']} is not a PCIe generation (1..6)")
    if int(opts["pcie_width"]) not in (1, 2, 4, 8, 16, 32):
        raise TopologyError(
            f"topology.pcie_width={opts['pcie_width']} is not a PCIe width (1, 2, 4, 8, 16, 32)"
        )
    if "gpu_memory_gib" in opts and int(float(opts["gpu_memory_gib"]) * GIB) <= 0:
        raise TopologyError(f"topology.gpu_memory_gib={opts['gpu_memory_gib']} must be positive")


def _forced_gpus(kind: str, opts: dict[str, Any], n: int, probed: Topology) -> tuple[GPU, ...]:
    """``n`` GPUs at the forced PCIe link; names, bus ids and memory are the probe's where
    it has the GPU, and ``gpu_memory_gib`` overrides the memory of all."""
    if "gpu_memory_gib" in opts:
        memory = int(float(opts["gpu_memory_gib"]) * GIB)
    else:
        memory = None  # each GPU keeps the probe's memory
    fallback_memory = probed.min_gpu_memory_bytes or int(DEFAULT_GPU_MEMORY_GIB[kind] * GIB)
    gen, width = int(opts["pcie_gen"]), int(opts["pcie_width"])
    gpus = []
    for i in range(n):
        real = probed.gpus[i] if i < probed.num_gpus else None
        gpus.append(
            GPU(
                index=i,
                name=real.name if real else f"forced {kind} GPU",
                memory_bytes=memory or (real.memory_bytes if real else fallback_memory),
                pci_bus_id=real.pci_bus_id if real else None,
                pcie_gen=gen,
                pcie_max_gen=gen,
                pcie_width=width,
                pcie_max_width=width,
                numa_node=real.numa_node if real else None,
                compute_capability=real.compute_capability if real else None,
            )
        )
    return tuple(gpus)


def _forced_links(kind: str, opts: dict[str, Any], n: int, probed: Topology) -> tuple[Link, ...]:
    """Every pair of ``n`` GPUs with the forced link; the NVLink generation, NVSwitch and
    PCIe ancestor are the probe's where it has the pair."""
    nvlink = kind == "nvlink"
    links = []
    for i in range(n):
        for j in range(i + 1, n):
            real = probed.link(i, j) if j < probed.num_gpus else None
            gen = real.nvlink_gen if real and real.nvlink_gen else DEFAULT_NVLINK_GENERATION
            links.append(
                Link(
                    a=i,
                    b=j,
                    nvlink_count=int(opts["nvlink_count"]) if nvlink else 0,
                    nvlink_gen=gen if nvlink else None,
                    via_nvswitch=bool(nvlink and real and real.via_nvswitch),
                    ancestor=real.ancestor if real and real.ancestor != "UNKNOWN" else "NODE",
                    p2p=bool(opts["p2p"]),
                    p2p_atomics=bool(opts["p2p_atomics"]),
                    p2p_status="forced",
                )
            )
    return tuple(links)

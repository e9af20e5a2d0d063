"""MachineProfile: what one machine's GPUs and links cost, measured (tools/calibrate.py) or
estimated from public specs, as the planner's cost model (moe_ext.cost) reads it.

A profile is JSON. Collective costs are sampled over message sizes for each group size the
world allows, and read back by linear interpolation in (log bytes) between samples, linear
extrapolation past the largest (bandwidth-bound) and the smallest sample's time below it
(latency-bound):

    {"name": "h200x2_p2p_off", "source": "measured" | "estimate", "date": "2026-11-30",
     "device": "NVIDIA H200", "gpus": 2, "link": "pcie" | "nvlink" | "cpu", "p2p": false,
     "hbm_gbps": 4300.0,           # achieved copy bandwidth (read + write bytes / s / 1e9)
     "matmul_tflops": 790.0,       # dense bf16 at large shapes
     "gemv_efficiency": 0.4,       # achieved / hbm for M=1 projections
     "grouped_efficiency": 0.9,    # achieved / hbm for decode-size grouped experts
     "kernel_overhead_us": 4.0,    # per launched kernel outside CUDA graphs
     "graph_kernel_us": 2.0,       # optional: per kernel replayed inside a CUDA graph (its
                                   # minimum GPU time and the gap to the next; absent: 0)
     "collectives": {"all_reduce": {"2": [[bytes, seconds], ...]}, "all_to_all": {...},
                     "all_gather": {...}, "reduce_scatter": {...}, "send_recv": {...}},
     "graph_collectives": {"all_reduce": {"2": [[bytes, seconds], ...]}, ...},
                                   # optional: per call replayed inside a CUDA graph, at
                                   # decode sizes (absent: the eager time less the host
                                   # dispatch, as moe_ext.cost falls back to)
     "notes": ["how it was measured or where the estimate comes from"]}

Sizes are bytes per rank (the tensor each rank passes in).
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

from moe_ext.errors import MoeExtError

COLLECTIVES = ("all_reduce", "all_to_all", "all_gather", "reduce_scatter", "send_recv")
SHIPPED = Path(__file__).resolve().parents[1] / "conf" / "profiles"


class ProfileError(MoeExtError):
    """A machine profile that cannot be read (one line: the file, the field, the fix)."""


@dataclass(frozen=True)
class MachineProfile:
    name: str
    source: str  # measured | estimate
    date: str
    device: str
    gpus: int
    link: str  # pcie | nvlink | cpu
    p2p: bool
    hbm_gbps: float
    matmul_tflops: float
    gemv_efficiency: float
    grouped_efficiency: float
    kernel_overhead_us: float
    # op -> group size (str, as JSON keys are) -> [[bytes per rank, seconds], ...] ascending
    collectives: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    # per kernel replayed inside a CUDA graph (minimum kernel time + gap); None: not measured
    graph_kernel_us: Optional[float] = None
    # the same layout as collectives, per call inside a CUDA graph; empty: not measured
    graph_collectives: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)

    def seconds(self, op: str, group: int, nbytes: float, in_graph: bool = False) -> float:
        """Time of collective ``op`` over ``group`` ranks moving ``nbytes`` per rank; with
        ``in_graph``, replayed inside a CUDA graph (``has_graph_samples`` must hold)."""
        if group <= 1 or nbytes <= 0:
            return 0.0
        table = self.graph_collectives if in_graph else self.collectives
        samples = self._samples(op, group, table)
        sizes = [s for s, _ in samples]
        if nbytes <= sizes[0]:
            return samples[0][1]
        i = bisect.bisect_left(sizes, nbytes)
        if i == len(sizes):  # past the largest sample: its bandwidth
            (s0, t0), (s1, t1) = samples[-2] if len(samples) > 1 else samples[-1], samples[-1]
            slope = (t1 - t0) / (s1 - s0) if s1 > s0 else t1 / s1
            return t1 + (nbytes - s1) * slope
        (s0, t0), (s1, t1) = samples[i - 1], samples[i]
        w = (math.log(nbytes) - math.log(s0)) / (math.log(s1) - math.log(s0))
        return t0 + w * (t1 - t0)

    def has_graph_samples(self, op: str) -> bool:
        """Whether ``op`` was timed inside CUDA graphs (``graph_collectives``)."""
        return bool(self.graph_collectives.get(op))

    def _samples(self, op: str, group: int, table: dict) -> list[list[float]]:
        by_group = table.get(op)
        if not by_group:
            raise ProfileError(f"profile {self.name}: no {op!r} samples; re-run tools/calibrate.py")
        if str(group) in by_group:
            return by_group[str(group)]
        # the nearest measured group size, scaled by the ring's (g-1)/g traffic ratio
        nearest = min(by_group, key=lambda g: abs(int(g) - group))
        ratio = ((group - 1) / group) / ((int(nearest) - 1) / int(nearest))
        return [[s, t * ratio] for s, t in by_group[nearest]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "MachineProfile":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProfileError(
                f"machine profile {path} does not exist; give plan.profile= a file written by "
                f"tools/calibrate.py, or one of {', '.join(shipped_profiles())}"
            ) from None
        except (OSError, ValueError) as err:
            raise ProfileError(f"machine profile {path} is not readable JSON: {err}") from err
        try:
            data["notes"] = tuple(data.get("notes", ()))
            profile = cls(**data)
        except TypeError as err:
            raise ProfileError(f"machine profile {path}: {err}; re-run tools/calibrate.py") from err
        for table in ("collectives", "graph_collectives"):
            for op, by_group in getattr(profile, table).items():
                for group, samples in by_group.items():
                    if not samples or any(len(s) != 2 or s[0] <= 0 or s[1] < 0 for s in samples):
                        raise ProfileError(
                            f"machine profile {path}: {table}.{op}.{group} must be a list of "
                            f"[bytes > 0, seconds >= 0] pairs"
                        )
        return profile


def shipped_profiles() -> dict[str, Path]:
    """name -> path of the profiles shipped in conf/profiles."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.json"))}

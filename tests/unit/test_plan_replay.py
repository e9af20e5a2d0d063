"""The cost model (moe_ext.cost.predict) replayed offline against measured decode steps.

Cells: every compiled, CUDA-graph row of docs/data/bench_infer_*.json (tools/bench_infer.py
on H200s: model, strategy, degrees, world, batch, prompt_len, ms_per_step,
nccl_p2p_disable), plus the 2-GPU cells quoted in the text of issues 18 (P2P off, prompt
512) and 19 (NVLink, prompt 512, mixtral_8x7b tp_experts vs ep_nvshmem), which exist
only as decode tok/s there (ms per step = batch / tok/s). Each cell is predicted with the
profile of its link: the shipped conf/profiles/h200x2_nvlink.json / h200x2_p2p_off.json
when present, else a profile built here from docs/PERF.md's measured floors (HBM 4.3 TB/s,
790 TFLOP/s; all-to-all busbw 24 GB/s and ~41 us with P2P off, 283 GB/s and ~37 us over
NVLink) and the kernel efficiencies PERF.md measured (GEMV 37% of HBM at batch 1, the
grouped expert kernel 66% at 8 rows, ~2 us per graph-launched kernel).

Checked:
- prediction error per cell, |predicted / measured - 1|;
- ranking: in every group of cells that measured several plans for one (model, world,
  link, batch, prompt), the measured time of the plan the model ranks first, against the
  group's measured best ("pick regret"); a plan measured on several days counts with its
  latest measurement.

The issue's targets are 25% (prediction) and 5% (pick). The bounds asserted are what the
model reaches today, stated in ACHIEVED below and printed with the gap to the targets by
``python -m tests.unit.test_plan_replay`` (which also prints the markdown table for
docs/PERF.md). Tighten them when the model improves; never loosen them to hide a miss.

Times in milliseconds per decode step (one token for each of the batch's sequences).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "docs" / "data"
TARGET_ERROR = 0.25  # issue 19: predictions within 25% of measured
TARGET_REGRET = 0.05  # issue 19: auto's pick within 5% of the best measured plan

# What the model reaches on these cells today (python -m tests.unit.test_plan_replay),
# rounded up a little: the asserts below. Constructed profiles, 2026-11-30, moe_ext.cost as
# of ddd002b: 67 cells, median |error| 26%, max 56% (qwen2_57b_a14b EP at batch 2 and 16:
# +56%; one-GPU gpt_oss_120b_mxfp4 batch 16: -56%), 46% of cells within 25%; 17 ranked
# groups, 15 picks within 5% of the measured best; the two misses are qwen3_30b_a3b on
# 4 GPUs at batch 64 (the model ranks tp_experts first, measured last: regret 15% over
# NVLink, 47% with P2P off; it predicts tp4 at 13.6 ms against 19.0 measured).
ACHIEVED = {
    # 2026-11-30, with the pipelined pp decode in the model (min(pp, B) micro-batches in
    # flight, each reading its weights again) and decode collectives without the host
    # dispatch (replayed in the step's CUDA graph): median 25%, max 56%, 14 of 17 picks
    # within 5%. The pp rows moved from +100% (the model still ran the stages in turn) to
    # +14..39%; the quoted issue-18 pp cells were the old one-at-a-time path and left the
    # set. New miss, a near tie: mixtral_8x7b P2P off batch 2 picks pp 2 (11.5 ms predicted,
    # 8.74 measured) over tp_experts (11.9 predicted, 8.05 measured): 8.6% regret; the
    # model over-predicts tp_experts at batch 1-2 by ~45% (its expert reads at few rows).
    # 2026-12-01: 14 cells joined (qwen3_30b_a3b on one GPU, mixtral_8x7b over NVLink and
    # tp_experts with P2P off, measured with the GEMV kernel, the wider Triton experts and
    # the tensor-core router); the constructed profile keeps 2026-11-30's kernel
    # efficiencies and over-predicts them by 22-58%: median 28%, max 58%; a plan measured on
    # several days now ranks with its latest cell: 14 of 18 picks within 5%.
    "constructed": {
        "max_error": 0.59,
        "median_error": 0.29,
        "max_regret": 0.50,
        "picks_within_target": 14 / 18,
    },
    # conf/profiles/h200x2_{nvlink,p2p_off}.json re-measured 2026-12-01 with
    # graph_collectives (decode's all-reduce / all-gather / reduce-scatter timed inside a
    # CUDA graph: 15 us at 4 KiB with P2P off, where the eager call took 73 us). On the 94
    # cells of 2026-12-01, against the 2026-11-30 profiles (eager timings only): median 18%
    # (21%), max 64% (119%: tp_experts tp4 over NVLink, now -18% / -44%), 74% of cells
    # within 25% (54%); 13 of 18 picks within 5% (14), max regret 22.8% (13.3%). Fixed:
    # mixtral_8x7b P2P off batch 2 picks tp_experts (pp 2 before, 13.3%) and NVLink batch 2
    # and 16 too (10.0%, 5.1% before). New misses, all qwen3_30b_a3b where replicate
    # measured fastest and cheaper collectives now rank an exchange plan first: 2 GPUs P2P
    # off batch 16 (15.8%), 4 GPUs NVLink 16 and 64 (10.1%, 14.9%) and P2P off 64 (22.8%);
    # and mixtral_8x7b P2P off batch 16 (5.5%). The 4-GPU cells read the 2-GPU samples
    # scaled (no group-4 samples), and the model counts one kernel budget per layer
    # whatever the plan (an EP layer launches more).
    "shipped": {
        "max_error": 0.65,
        "median_error": 0.19,
        "max_regret": 0.23,
        "picks_within_target": 13 / 18,
    },
}

# (model, world, link, strategy, tp, pp, ep, batch, decode tok/s): issue 18 (2x H200,
# NCCL_P2P_DISABLE=1, prompt 512, 64 new tokens, bf16, 2026-11-30) and issue 19 (NVLink,
# mixtral_8x7b, same settings). Whole-job tok/s; for these plans ms/step = batch / tok/s.
QUOTED = [
    ("mixtral_8x7b", 2, "p2p_off", "ep_allgather", 1, 1, 2, 2, 179.7),
    ("mixtral_8x7b", 2, "p2p_off", "ep_allgather", 1, 1, 2, 16, 1005.7),
    ("mixtral_8x7b", 2, "p2p_off", "tp_experts", 2, 1, 1, 1, 164.0),
    ("mixtral_8x7b", 2, "p2p_off", "tp_experts", 2, 1, 1, 2, 244.4),
    ("mixtral_8x7b", 2, "p2p_off", "tp_experts", 2, 1, 1, 16, 1072.5),
    ("qwen2_57b_a14b", 2, "p2p_off", "ep_allgather", 1, 1, 2, 2, 180.1),
    ("qwen2_57b_a14b", 2, "p2p_off", "ep_nccl", 1, 1, 2, 16, 866.4),
    ("qwen2_57b_a14b", 2, "p2p_off", "ep_allgather", 1, 1, 2, 64, 2230.2),
    ("qwen2_57b_a14b", 2, "p2p_off", "tp_experts", 2, 1, 1, 1, 117.9),
    ("qwen2_57b_a14b", 2, "p2p_off", "tp_experts", 2, 1, 1, 2, 203.2),
    ("qwen2_57b_a14b", 2, "p2p_off", "tp_experts", 2, 1, 1, 16, 890.0),
    ("qwen2_57b_a14b", 2, "p2p_off", "tp_experts", 2, 1, 1, 64, 2269.0),
    ("mixtral_8x7b", 2, "nvlink", "tp_experts", 2, 1, 1, 2, 254.8),
    ("mixtral_8x7b", 2, "nvlink", "ep_nvshmem", 1, 1, 2, 2, 197.6),
    ("mixtral_8x7b", 2, "nvlink", "tp_experts", 2, 1, 1, 16, 1151.8),
    ("mixtral_8x7b", 2, "nvlink", "ep_nvshmem", 1, 1, 2, 16, 1095.7),
]


@dataclass(frozen=True)
class Cell:
    model: str
    world: int
    link: str  # "nvlink", "p2p_off" or "one_gpu"
    strategy: str
    tp: int
    pp: int
    ep: int
    batch: int
    prompt_len: int
    measured_ms: float
    source: str
    date: str  # when it was measured (the quoted issue cells: 2026-11-30)

    @property
    def group(self) -> tuple:
        return (self.model, self.world, self.link, self.batch, self.prompt_len)

    @property
    def label(self) -> str:
        ep = f" ep{self.ep}" if self.strategy.startswith("ep_") else ""
        pp = f" pp{self.pp}" if self.pp > 1 else ""
        return f"{self.strategy} tp{self.tp}{pp}{ep}"


def _degrees(row: dict) -> tuple[int, int, int]:
    """tp, pp, ep of a bench row: its ``degrees`` ('tp1 dp2 ep2 pp2'), else its plan line
    ('ep_nccl: world=2 tp=1 pp=1 dp=2 | ep=2 ...')."""
    text = row.get("degrees") or row["plan"].replace("=", "")
    found = {}
    for word in text.replace("|", " ").split():
        for key in ("tp", "pp", "ep"):
            if word.startswith(key) and word[len(key) :].isdigit():
                found.setdefault(key, int(word[len(key) :]))
    return found.get("tp", 1), found.get("pp", 1), found.get("ep", 1)


def recorded_cells() -> list[Cell]:
    """Every compiled CUDA-graph decode row of docs/data/bench_infer_*.json."""
    cells = []
    for path in sorted(DATA.glob("bench_infer_*.json")):
        for row in json.loads(path.read_text())["rows"]:
            if row["strategy"] == "hf_generate" or not (row.get("compiled") and row["cuda_graphs"]):
                continue
            world = row["world"]
            link = (
                "one_gpu"
                if world == 1
                else "p2p_off"
                if row["nccl_p2p_disable"] == "1"
                else "nvlink"
            )
            tp, pp, ep = _degrees(row)
            cells.append(
                Cell(
                    row["model"],
                    world,
                    link,
                    row["strategy"],
                    tp,
                    pp,
                    ep,
                    row["batch"],
                    row["prompt_len"],
                    row["ms_per_step"],
                    path.name,
                    row.get("date", ""),
                )
            )
    return cells


def quoted_cells() -> list[Cell]:
    return [
        Cell(
            m,
            w,
            link,
            s,
            tp,
            pp,
            ep,
            b,
            512,
            1000.0 * b / tok_s,
            "issue 18" if link == "p2p_off" else "issue 19",
            "2026-11-30",
        )
        for m, w, link, s, tp, pp, ep, b, tok_s in QUOTED
    ]


def all_cells() -> list[Cell]:
    return recorded_cells() + quoted_cells()


# ---- profiles ---------------------------------------------------------------------------

_BUS_FACTOR = {  # bytes each rank passes in -> bytes on the bus (nccl-tests' busbw)
    "all_reduce": lambda g: 2 * (g - 1) / g,
    "all_to_all": lambda g: (g - 1) / g,
    "reduce_scatter": lambda g: (g - 1) / g,
    "all_gather": lambda g: g - 1,
    "send_recv": lambda g: 1.0,
}


def perf_floor_profile(link: str):
    """A MachineProfile from docs/PERF.md's measured floors ("Floors", "Link floors") and
    measured kernel efficiencies: alpha-beta collectives t = alpha + factor * S / busbw."""
    from moe_ext.profile import MachineProfile

    nvlink = link == "nvlink"
    alpha, busbw = (37e-6, 283e9) if nvlink else (41e-6, 24e9)
    sizes = [2.0**p for p in range(10, 31, 2)]
    collectives = {
        op: {str(g): [[s, alpha + factor(g) * s / busbw] for s in sizes] for g in (2, 4, 8)}
        for op, factor in _BUS_FACTOR.items()
    }
    return MachineProfile(
        name=f"perf_floors_{'nvlink' if nvlink else 'p2p_off'}",
        source="estimate",
        date="2026-11-30",
        device="NVIDIA H200",
        gpus=2,
        link="nvlink" if nvlink else "pcie",
        p2p=nvlink,
        hbm_gbps=4300.0,
        matmul_tflops=790.0,
        gemv_efficiency=0.37,
        grouped_efficiency=0.66,
        kernel_overhead_us=5.0,
        collectives=collectives,
        graph_kernel_us=2.0,
        notes=("built in tests/unit/test_plan_replay.py from docs/PERF.md's floors",),
    )


SHIPPED_NAMES = {"nvlink": "h200x2_nvlink", "p2p_off": "h200x2_p2p_off", "one_gpu": "h200x2_nvlink"}


@cache
def profile_for(link: str, kind: str):
    """kind "shipped": conf/profiles/<h200x2_*>.json (None when not shipped yet);
    "constructed": perf_floor_profile. One GPU uses the NVLink profile (no collective)."""
    if kind == "constructed":
        return perf_floor_profile("nvlink" if link == "one_gpu" else link)
    from moe_ext.profile import MachineProfile, shipped_profiles

    path = shipped_profiles().get(SHIPPED_NAMES[link])
    return MachineProfile.load(path) if path else None


def shipped_available() -> bool:
    return all(profile_for(link, "shipped") is not None for link in ("nvlink", "p2p_off"))


# ---- replay -----------------------------------------------------------------------------


@cache
def model_args(name: str):
    from omegaconf import OmegaConf

    from moe_ext.model import ModelArgs

    return ModelArgs.from_model_conf(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))


@dataclass(frozen=True)
class Replayed:
    cell: Cell
    predicted_ms: float

    @property
    def error(self) -> float:
        return self.predicted_ms / self.cell.measured_ms - 1.0


def replay(kind: str = "constructed") -> list[Replayed]:
    from moe_ext.cost import predict
    from moe_ext.plan import plan_with_degrees

    out = []
    for cell in all_cells():
        args = model_args(cell.model)
        plan = plan_with_degrees(cell.strategy, cell.world, cell.tp, cell.pp, cell.ep, model=args)
        assert (plan.tp, plan.pp, plan.ep if plan.is_expert_parallel else 1) == (
            cell.tp,
            cell.pp,
            cell.ep if cell.strategy.startswith("ep_") else 1,
        ), (cell, plan)
        pred = predict(
            plan, args, profile_for(cell.link, kind), cell.batch, cell.prompt_len, dtype_bytes=2
        )
        out.append(Replayed(cell, pred.decode_ms))
    return out


@dataclass(frozen=True)
class GroupRanking:
    group: tuple
    measured_order: list[str]  # labels, fastest measured first
    predicted_order: list[str]  # labels, fastest predicted first
    regret: float  # measured time of the predicted pick / measured best - 1


def latest_per_plan(rs: list[Replayed]) -> list[Replayed]:
    """One cell per plan label: the latest measurement (by date; on a tie a recorded row
    over a quoted one, which the issues measured earlier the same day). A plan measured
    again after a code change would otherwise compete with its own older self."""
    latest: dict[str, Replayed] = {}
    for r in sorted(rs, key=lambda r: (r.cell.date, r.cell.source.endswith(".json"))):
        latest[r.cell.label] = r
    return list(latest.values())


def rankings(replayed: list[Replayed]) -> list[GroupRanking]:
    groups: dict[tuple, list[Replayed]] = defaultdict(list)
    for r in replayed:
        groups[r.cell.group].append(r)
    out = []
    for key, rs in sorted(groups.items()):
        rs = latest_per_plan(rs)
        if len({r.cell.label for r in rs}) < 2:
            continue
        measured = sorted(rs, key=lambda r: r.cell.measured_ms)
        predicted = sorted(rs, key=lambda r: r.predicted_ms)
        regret = predicted[0].cell.measured_ms / measured[0].cell.measured_ms - 1.0
        out.append(
            GroupRanking(
                key, [r.cell.label for r in measured], [r.cell.label for r in predicted], regret
            )
        )
    return out


def summary(replayed: list[Replayed]) -> dict[str, float]:
    errors = sorted(abs(r.error) for r in replayed)
    ranks = rankings(replayed)
    return {
        "cells": len(replayed),
        "max_error": errors[-1],
        "median_error": errors[len(errors) // 2],
        "within_target": sum(e <= TARGET_ERROR for e in errors) / len(errors),
        "groups": len(ranks),
        "max_regret": max(g.regret for g in ranks),
        "picks_within_target": sum(g.regret <= TARGET_REGRET for g in ranks) / len(ranks),
    }


def markdown(kind: str = "constructed") -> str:
    """The per-cell table and the ranking table, for docs/PERF.md."""
    replayed = replay(kind)
    s = summary(replayed)
    profiles = ", ".join(sorted({profile_for(link, kind).name for link in ("nvlink", "p2p_off")}))
    lines = [
        f"Cost model replay ({kind} profiles: {profiles}); "
        "`python -m tests.unit.test_plan_replay`.",
        "",
        "| model | GPUs | link | plan | batch | prompt | measured ms/step | predicted | error "
        "| source |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in replayed:
        c = r.cell
        lines.append(
            f"| {c.model} | {c.world} | {c.link.replace('_', ' ')} | {c.label} | {c.batch} | "
            f"{c.prompt_len} | {c.measured_ms:.2f} | {r.predicted_ms:.2f} | "
            f"{100 * r.error:+.0f}% | "
            f"{c.source} |"
        )
    lines += [
        "",
        "| model | GPUs | link | batch | measured order (fastest first) | predicted order "
        "| pick regret |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in rankings(replayed):
        model, world, link, batch, _ = g.group
        lines.append(
            f"| {model} | {world} | {link.replace('_', ' ')} | {batch} | "
            f"{' < '.join(g.measured_order)} | "
            f"{' < '.join(g.predicted_order)} | {100 * g.regret:.1f}% |"
        )
    lines += [
        "",
        f"{s['cells']} cells: median |error| {100 * s['median_error']:.0f}%, max "
        f"{100 * s['max_error']:.0f}%, {100 * s['within_target']:.0f}% within the "
        f"{100 * TARGET_ERROR:.0f}% target; {s['groups']} ranked groups: max pick regret "
        f"{100 * s['max_regret']:.1f}%, {100 * s['picks_within_target']:.0f}% within the "
        f"{100 * TARGET_REGRET:.0f}% target.",
    ]
    return "\n".join(lines)


# ---- tests ------------------------------------------------------------------------------


def test_cells_are_read_and_derived_independently():
    """The recorded rows are there and their degrees parse; quoted ms = batch / tok/s."""
    rec = recorded_cells()
    assert len(rec) >= 40
    assert {c.link for c in rec} == {"one_gpu", "p2p_off", "nvlink"}
    assert all(c.world == c.tp * c.pp * (c.world // (c.tp * c.pp)) for c in rec)
    q = {(c.model, c.link, c.label, c.batch): c.measured_ms for c in quoted_cells()}
    assert q[("mixtral_8x7b", "p2p_off", "tp_experts tp2", 2)] == pytest.approx(2000 / 244.4)


@pytest.mark.parametrize("kind", ["constructed", "shipped"])
def test_replay_within_the_bounds_the_model_reaches(kind):
    if kind == "shipped" and not shipped_available():
        pytest.skip("conf/profiles/h200x2_nvlink.json and h200x2_p2p_off.json not shipped yet")
    s = summary(replay(kind))
    bounds = ACHIEVED[kind]
    print(markdown(kind))
    if bounds["max_error"] is None:
        pytest.skip(f"no bounds recorded for {kind} profiles yet: {s}")
    assert s["max_error"] <= bounds["max_error"], s
    assert s["median_error"] <= bounds["median_error"], s
    assert s["max_regret"] <= bounds["max_regret"], s
    assert s["picks_within_target"] >= bounds["picks_within_target"] - 1e-9, s


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    kinds = argv or (["constructed", "shipped"] if shipped_available() else ["constructed"])
    for kind in kinds:
        print(markdown(kind))
        s = summary(replay(kind))
        print(
            f"\ngap to the targets: max error {100 * (s['max_error'] - TARGET_ERROR):+.0f} "
            f"points over {100 * TARGET_ERROR:.0f}%, max pick regret "
            f"{100 * (s['max_regret'] - TARGET_REGRET):+.1f} points over "
            f"{100 * TARGET_REGRET:.0f}%\n"
        )


if __name__ == "__main__":
    main()


# ---- tools/bench_infer.py: the rows that feed this replay --------------------------------


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_infer", REPO / "tools" / "bench_infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_rows_are_the_whole_job():
    """One process (no collective): tokens of all replicas over the slowest time; a TP pair
    (dp 1 of world 2 would count its tokens twice) divides by the replica's ranks."""
    from types import SimpleNamespace

    import torch

    bench = _bench()
    result = SimpleNamespace(
        prefill_tokens=512, decode_tokens=64, prefill_s=0.5, decode_s=0.32, decode_steps=32
    )
    rows = bench.whole_job(result, SimpleNamespace(dp=1), 1, torch.device("cpu"))
    assert rows["decode_tok_s"] == pytest.approx(200.0) and rows["step_s"] == pytest.approx(0.01)
    assert rows["prefill_tok_s"] == pytest.approx(1024.0)
    halved = bench.whole_job(result, SimpleNamespace(dp=1), 2, torch.device("cpu"))
    assert halved["decode_tok_s"] == pytest.approx(100.0)  # 2 ranks of one replica, one rank's sum


def test_bench_plan_specs_put_auto_first_then_the_ranked_fitting_plans():
    from types import SimpleNamespace

    import torch

    from moe_ext.cost import rank_plans

    bench = _bench()
    args = model_args("mixtral_8x7b")
    profile = profile_for("p2p_off", "constructed")
    gib96 = 96 * 2**30
    auto = SimpleNamespace(strategy="ep_allgather", tp=1, pp=1, ep=2, is_expert_parallel=True)
    job = SimpleNamespace(
        plan=auto,
        source=SimpleNamespace(args=args),
        dtype=torch.bfloat16,
        topology=SimpleNamespace(
            kind="pcie",
            all_pairs_nvlink=False,
            all_pairs_p2p_atomics=False,
            gpus=[SimpleNamespace(memory_bytes=gib96)] * 2,
        ),
    )
    ranked = [
        r
        for r in rank_plans(args, profile, 2, 16, 512, 2, gib96, topology=job.topology)
        if r.prediction.fits
    ]
    specs = bench.plan_specs("auto,all", job, profile, 16, 512, 2)
    assert specs[0] == []  # auto's own job
    first = ranked[0].plan
    assert specs[1][:3] == [
        f"strategy={first.strategy}",
        f"parallel.tp={first.tp}",
        "parallel.pp=1",
    ]
    assert len(specs) == len(ranked) + (
        0
        if any(
            (r.plan.strategy, r.plan.tp, r.plan.pp, r.plan.ep) == ("ep_allgather", 1, 1, 2)
            for r in ranked
        )
        else 1
    )
    assert bench.plan_specs("top1", job, profile, 16, 512, 2) == [specs[1]]


def test_bench_auto_plans_each_batch_as_the_launcher_would():
    """strategy=auto in bench_infer: batch 1 below the 2 EP replicas runs attention tp2 x ep2,
    batches 2 and 4 the data-parallel ep plan; each pick once, with its batches."""
    from moe_ext.dist import DistEnv

    bench = _bench()
    overrides = [
        "model=tiny",
        "strategy=auto",
        "device=cpu",
        "generate.max_batch_size=4",
        "parallel.ep=2",
    ]
    runs = bench.auto_runs(overrides, DistEnv(rank=0, world_size=2), 8, [1, 2, 4])
    picks = [((job.plan.strategy, job.plan.tp, job.plan.dp, job.plan.ep), b) for _, job, b in runs]
    assert [(degrees[1:], batches) for degrees, batches in picks] == [
        ((2, 1, 2), [1]),
        ((1, 2, 2), [2, 4]),
    ], picks

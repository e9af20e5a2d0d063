"""MoE-layer forward latency per strategy, world size and token count, against its floors.

    torchrun --nproc-per-node 2 tools/bench_moe.py --shape mixtral --tokens 1,16,256,4096 \\
        --strategies replicate,tp_experts,ep_allgather,ep_nccl,ep_nvshmem --json out.json
    torchrun --nproc-per-node 2 tools/bench_moe.py --strategies ep_nccl,ep_nccl+overlap,\\
        ep_nccl+static,ep_nccl+static+overlap --peers megatron,deepspeed   # overlap vs peers
    python tools/bench_moe.py --shape qwen3 --uniform-routing             # one process
    python tools/bench_moe.py --report out.json --png out.png              # table + chart only
    torchrun --nproc-per-node 2 tools/bench_moe.py --peers megatron,deepspeed  # + peers
    torchrun --nproc-per-node 4 tools/bench_moe.py --group-size 2   # EP 2 x 2 copies

# T tokens per rank, H hidden, F expert FFN size, E experts, k top-k, W world size,
# G expert group size (the EP degree, or the expert-TP degree of tp_experts; 1 for replicate)

Each rank builds only its own expert shard (random weights generated on its device) and
feeds T tokens of its own (``tp_experts``: the same T tokens on every rank, as that
strategy requires). Timing: ``--warmup`` untimed forwards, then ``--iters`` forwards each
timed with CUDA events (CPU: ``time.perf_counter``, labelled in the output); per rank the
median and p10/p90, and the row reports the slowest rank (a layer is done when every rank
is). ``--group-size G`` below the world size splits the ranks into W/G expert groups that
run the same layer side by side (EP G x data parallel W/G), as a 4-GPU box serving two
EP-2 replicas would: their exchanges share the links. Floors, per rank, the slowest rank
again:
- memory: bytes of the expert weights this rank reads (only experts that receive at least
  one row: k experts at one token, all local experts at many) / ``--peak-tbs`` TB/s;
- compute: 2 * 3 * H * F_local * rows computed here / ``--peak-tflops`` TFLOP/s (equals
  2*3*H*F*k*T for balanced EP and replicate);
and ``achieved`` = the larger floor / median. ``--json`` merges rows into a file shared by
several runs (world sizes, link settings); ``--report`` prints it and draws
latency-vs-tokens per strategy, one panel per (shape, world size, link).

Strategies are entries of ``BUILDERS`` (name -> function building one layer for this
rank). ``+overlap``: dual-batch overlap (two micro-batches, one's exchange in flight
while the other's experts run; ``Dispatcher.set_overlap``); ``+static``: the sync-free
static exchange with its capacity set to each token count. Other implementations plug
in as further entries: ``--peers megatron,deepspeed``
adds Megatron-core's own MoELayer (local spec; ``mcore_a2a`` / ``mcore_ag`` dispatchers) and
DeepSpeed's MoE (``deepspeed``), both at EP = world size only, on our groups
(moe_ext.bench.peers). Every row records the library versions.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from moe_ext.bench.cli import positive_int_list  # noqa: E402
from moe_ext.bench.peers import (  # noqa: E402
    PEER_STRATEGIES,
    PeerUnavailable,
    build_peer,
    library_versions,
    peer_strategies,
)
from moe_ext.dist import DistEnv, destroy, init_distributed  # noqa: E402
from moe_ext.groups import ProcessGroups  # noqa: E402
from moe_ext.moe.dispatch import DispatchGroups  # noqa: E402
from moe_ext.moe.layer import MoELayer, build_moe_layer  # noqa: E402
from moe_ext.moe.router import RouterOutput  # noqa: E402
from moe_ext.plan import plan_with_degrees  # noqa: E402

SHAPES = {  # name: (H, F, E, k)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3": (2048, 768, 128, 8),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ALL_STRATEGIES = (
    "replicate",
    "tp_experts",
    "ep_allgather",
    "ep_nccl",
    "ep_nccl+overlap",
    "ep_nvshmem",
)


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    ffn: int
    experts: int
    top_k: int


@dataclass
class Row:
    shape: str
    strategy: str
    world: int
    group: int  # G: ranks sharing one layer's experts (EP or expert-TP degree; 1: replicate)
    link: str  # "nvlink"/"default", "p2p_off" (NCCL_P2P_DISABLE=1), "cpu"
    tokens: int  # per rank
    dtype: str
    routing: str  # random | uniform
    timer: str  # cuda_event | perf_counter (CPU)
    status: str  # ok | skipped: ... | error: ...
    median_us: Optional[float] = None
    p10_us: Optional[float] = None
    p90_us: Optional[float] = None
    mem_floor_us: Optional[float] = None
    compute_floor_us: Optional[float] = None
    achieved: Optional[float] = None  # max(floors) / median
    experts_read: Optional[int] = None  # local experts with rows, slowest-floor rank
    hidden: int = 0
    ffn: int = 0
    experts: int = 0
    top_k: int = 0
    warmup: int = 0
    iters: int = 0
    host: str = ""
    torch: str = ""
    versions: dict = field(default_factory=dict)  # torch, megatron-core, deepspeed, transformers


# ---------------------------------------------------------------- strategies


def group_size_of(strategy: str, world: int, requested: Optional[int]) -> int:
    """G of ``strategy`` on ``world`` ranks: 1 for replicate, else ``requested`` or W."""
    return 1 if strategy == "replicate" else requested or world


@functools.cache
def expert_groups(
    expert_tp: bool, world: int, group_size: int, timeout_s: float
) -> Optional[ProcessGroups]:
    """Our groups for W/G expert groups of G ranks: expert TP (tp_experts) or EP (ep_*);
    None when G is 1. Collective on first call, cached after: every strategy of one kind
    shares the communicators."""
    if group_size == 1:
        return None
    plan = (
        plan_with_degrees("tp_experts", world, tp=group_size)
        if expert_tp
        else plan_with_degrees("ep_nccl", world, ep=group_size)
    )
    return ProcessGroups.build(plan, dist.get_backend(), timedelta(seconds=timeout_s))


def _build_native(
    dispatcher_name: str, overlap: int = 1, static: bool = False
) -> Callable[..., MoELayer]:
    """A builder of our layer over ``dispatcher_name``; ``overlap`` > 1: dual-batch overlap
    with that many micro-batches (``Dispatcher.set_overlap``); ``static``: the static
    exchange, its capacity set to each timed token count (``static_capacity`` on the
    layer tells the timing loop)."""

    def build(
        shape: Shape,
        groups: DispatchGroups,
        dtype: torch.dtype,
        device: torch.device,
        max_tokens: int,
    ) -> MoELayer:
        dispatcher = dispatcher_name
        if dispatcher_name == "nvshmem":
            from moe_ext.moe.dispatch.nvshmem import NvshmemDispatcher

            # Size the symmetric buffers for the largest batch up front: no growth
            # (a collective re-allocation) inside the timed loop.
            dispatcher = NvshmemDispatcher(shape.experts, groups, max_tokens=max_tokens)
        layer = build_moe_layer(
            shape.hidden,
            shape.ffn,
            shape.experts,
            shape.top_k,
            dispatcher=dispatcher,
            groups=groups,
            dtype=dtype,
            device=device,
        )
        layer.dispatcher.set_overlap(overlap)
        layer.static_capacity = static
        return layer

    return build


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "replicate": _build_native("local"),
    "tp_experts": _build_native("tp_sharded"),
    "ep_allgather": _build_native("allgather_rs"),
    "ep_nccl": _build_native("nccl_a2a"),
    "ep_nvshmem": _build_native("nvshmem"),
    # dual-batch overlap: two micro-batches, one's exchange under the other's experts
    "ep_nccl+overlap": _build_native("nccl_a2a", overlap=2),
    "ep_allgather+overlap": _build_native("allgather_rs", overlap=2),
    # the sync-free static exchange (capacity = the token count), plain and overlapped
    "ep_nccl+static": _build_native("nccl_a2a", static=True),
    "ep_nccl+static+overlap": _build_native("nccl_a2a", overlap=2, static=True),
    **{name: build_peer(name) for name in PEER_STRATEGIES},  # other libraries, G = W
}


# ---------------------------------------------------------------- routing


def balanced_expert_idx(
    tokens: int,
    top_k: int,
    num_experts: int,
    group_size: int,
    group_rank: int,
    device: torch.device,
) -> torch.Tensor:
    """[T, k] int64: pair p (global over the G ranks of the expert group) goes to expert
    (p mod G) * E/G + (p div G) mod E/G, so consecutive pairs cycle over the expert-parallel
    ranks first and every expert gets the same number of rows (+-1); a token's k experts
    are distinct."""
    per_rank_experts = num_experts // group_size
    pairs = torch.arange(tokens * top_k, device=device) + group_rank * tokens * top_k  # [T*k]
    expert = (pairs % group_size) * per_rank_experts + (pairs // group_size) % per_rank_experts
    return expert.view(tokens, top_k)


class UniformRouting(nn.Module):
    """Runs the real router (its cost stays in the timing) but replaces the choice of
    experts with a balanced one, so strategies and runs see the same load."""

    def __init__(self, router: nn.Module, expert_idx: torch.Tensor):
        super().__init__()
        self.router = router
        self.expert_idx = expert_idx  # [T, k] int64

    def forward(self, x: torch.Tensor) -> RouterOutput:
        out = self.router(x)
        return RouterOutput(out.weights, self.expert_idx, out.aux_loss, out.z_loss)


# ---------------------------------------------------------------- measurement


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_forward(layer: nn.Module, x: torch.Tensor, warmup: int, iters: int) -> list[float]:
    """Microseconds of each of ``iters`` forwards after ``warmup`` untimed ones."""
    for _ in range(warmup):
        layer(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(iters)
        ]
        for start, end in events:
            start.record()
            layer(x)
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) * 1e3 for start, end in events]
    if dist.is_initialized():
        dist.barrier()
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        layer(x)
        times.append((time.perf_counter() - begin) * 1e6)
    return times


def floors_us(
    shape: Shape,
    strategy: str,
    group_size: int,
    group_rank: int,
    group: Optional[dist.ProcessGroup],
    expert_idx: torch.Tensor,
    dtype: torch.dtype,
    peak_tbs: float,
    peak_tflops: float,
) -> tuple[float, float, int]:
    """(memory floor, compute floor, local experts read) of this rank, in µs; ``group``:
    the expert group of G ranks (None when G is 1)."""
    counts = torch.zeros(shape.experts, dtype=torch.int64, device=expert_idx.device)
    counts.scatter_add_(0, expert_idx.reshape(-1), torch.ones_like(expert_idx.reshape(-1)))
    ffn_local = shape.ffn
    if strategy == "tp_experts":
        ffn_local = shape.ffn // group_size
    elif group is not None:
        dist.all_reduce(counts, group=group)  # local experts serve the group's tokens
        per_rank = shape.experts // group_size
        counts = counts[group_rank * per_rank : (group_rank + 1) * per_rank]
    experts_read = int((counts > 0).sum())
    rows = int(counts.sum())
    elem = torch.finfo(dtype).bits // 8
    weight_bytes = experts_read * 3 * shape.hidden * ffn_local * elem
    mem_us = weight_bytes / (peak_tbs * 1e12) * 1e6
    compute_us = 2 * 3 * shape.hidden * ffn_local * rows / (peak_tflops * 1e12) * 1e6
    return mem_us, compute_us, experts_read


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def bench_strategy(
    shape: Shape,
    strategy: str,
    args,
    env: DistEnv,
    device: torch.device,
    dtype: torch.dtype,
    link: str,
) -> list[Row]:
    world, rank = env.world_size, env.rank
    group_size = group_size_of(strategy, world, args.group_size)
    base = dict(
        shape=shape.name,
        strategy=strategy,
        world=world,
        group=group_size,
        link=link,
        dtype=args.dtype,
        routing="uniform" if args.uniform_routing else "random",
        timer="cuda_event" if device.type == "cuda" else "perf_counter (CPU)",
        hidden=shape.hidden,
        ffn=shape.ffn,
        experts=shape.experts,
        top_k=shape.top_k,
        warmup=args.warmup,
        iters=args.iters,
        host=socket.gethostname(),
        torch=torch.__version__,
        versions=library_versions(),
    )
    if strategy in PEER_STRATEGIES and group_size != world:
        return [
            Row(
                tokens=t,
                status=f"skipped: peers run EP = world size {world}; drop --group-size",
                **base,
            )
            for t in args.tokens
        ]
    if strategy in PEER_STRATEGIES:  # the peer builds its own groups over all ranks
        process_group, group_rank = (dist.group.WORLD if world > 1 else None), rank
        layer_groups = DispatchGroups()
    else:
        groups = expert_groups(strategy == "tp_experts", world, group_size, args.timeout_s)
        layer_groups = groups.dispatch_groups() if groups else DispatchGroups()
        process_group = layer_groups.etp or layer_groups.ep
        group_rank = (
            0
            if groups is None
            else (groups.etp_rank if strategy == "tp_experts" else groups.ep_rank)
        )
    # Same seed within a tp_experts group (identical router and tokens), else per rank.
    seed = 1234 + (rank - group_rank if strategy == "tp_experts" else rank)
    torch.manual_seed(seed)
    try:
        layer = BUILDERS[strategy](shape, layer_groups, dtype, device, max(args.tokens))
    except ValueError as err:  # a strategy that cannot run here says why in one line
        message = str(err).splitlines()[0]
        return [Row(tokens=t, status=f"skipped: {message}", **base) for t in args.tokens]
    layer.eval()
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, shape.hidden, device=device, dtype=dtype)  # [T, H]
        if getattr(layer, "static_capacity", False):
            layer.dispatcher.set_capacity(tokens)  # every rank feeds T tokens
        with torch.no_grad():
            if args.uniform_routing:
                idx = balanced_expert_idx(
                    tokens,
                    shape.top_k,
                    shape.experts,
                    group_size,
                    0 if strategy == "tp_experts" else group_rank,
                    device,
                )
                if hasattr(layer, "force_routing"):  # a peer library routes inside its layer
                    layer.force_routing(idx)
                else:
                    layer.router = UniformRouting(
                        getattr(layer.router, "router", layer.router), idx
                    )
            else:
                idx = layer.router(x).expert_idx  # [T, k] as the layer will route
            mem_us, compute_us, read = floors_us(
                shape,
                strategy,
                group_size,
                group_rank,
                process_group,
                idx,
                dtype,
                args.peak_tbs,
                args.peak_tflops,
            )
            times = time_forward(layer, x, args.warmup, args.iters)
        mine = dict(
            median=statistics.median(times),
            p10=_percentile(times, 0.1),
            p90=_percentile(times, 0.9),
            mem=mem_us,
            compute=compute_us,
            read=read,
        )
        everyone = _gather(mine, world)
        slowest = max(everyone, key=lambda r: r["median"])
        floor_rank = max(everyone, key=lambda r: max(r["mem"], r["compute"]))
        floor = max(floor_rank["mem"], floor_rank["compute"])
        rows.append(
            Row(
                tokens=tokens,
                status="ok",
                median_us=slowest["median"],
                p10_us=slowest["p10"],
                p90_us=slowest["p90"],
                mem_floor_us=floor_rank["mem"],
                compute_floor_us=floor_rank["compute"],
                achieved=floor / slowest["median"],
                experts_read=floor_rank["read"],
                **base,
            )
        )
    del layer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- output


def _fmt(value: Optional[float], digits: Optional[int] = None) -> str:
    if value is None:
        return "-"
    if digits is None:
        digits = 0 if value >= 100 else 1 if value >= 1 else 3
    return f"{value:.{digits}f}"


def series(r: Row) -> str:
    """The strategy, with its expert group size where that is not the whole world."""
    return r.strategy if r.group in (1, r.world) else f"{r.strategy} G{r.group}"


def _series_order(r: Row) -> tuple:
    return (
        ALL_STRATEGIES.index(r.strategy) if r.strategy in ALL_STRATEGIES else 99,
        r.strategy,
        -r.group,
    )


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'shape':8} {'strategy':22} {'W':>2} {'G':>2} {'link':8} {'T/rank':>6} "
        f"{'median µs':>10} {'p10':>8} {'p90':>8} {'mem floor':>9} {'flop floor':>10} "
        f"{'achieved':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.status != "ok":
            lines.append(
                f"{r.shape:8} {r.strategy:22} {r.world:>2} {r.group:>2} {r.link:8} "
                f"{r.tokens:>6} {r.status}"
            )
            continue
        lines.append(
            f"{r.shape:8} {r.strategy:22} {r.world:>2} {r.group:>2} {r.link:8} "
            f"{r.tokens:>6} {_fmt(r.median_us):>10} {_fmt(r.p10_us):>8} "
            f"{_fmt(r.p90_us):>8} {_fmt(r.mem_floor_us):>9} {_fmt(r.compute_floor_us):>10} "
            f"{_fmt(100 * r.achieved, 1) + '%':>8}"
        )
    timers = sorted({r.timer for r in rows if r.status == "ok"})
    lines.append(
        f"timer: {', '.join(timers) or '-'}; floors: expert weights read at peak "
        f"bandwidth, expert FLOPs at peak throughput; achieved = larger floor / median"
    )
    return "\n".join(lines)


def format_compact(rows: list[Row]) -> str:
    """One line per (shape, world, link, strategy, G): median µs per token count, then the
    achieved fraction at the largest count; one floor line per (shape, world)."""
    tokens = sorted({r.tokens for r in rows})
    head = (
        f"{'shape':8} {'W':>2} {'link':8} {'strategy':22}"
        + "".join(f"{t:>9}" for t in tokens)
        + f"{'ach@max':>9}"
    )
    lines = [
        "median forward µs by tokens per rank ("
        + ", ".join(
            sorted({f"{r.dtype} {r.routing} routing, {r.timer}" for r in rows if r.status == "ok"})
        )
        + ")",
        head,
        "-" * len(head),
    ]
    by_key: dict = {}
    for r in sorted(rows, key=lambda r: (r.shape, r.world, r.link, _series_order(r))):
        by_key.setdefault((r.shape, r.world, r.link, series(r)), {})[r.tokens] = r
    last_group = None
    for (shape, world, link, name), cells in by_key.items():
        if (shape, world) != last_group:
            floors = {
                r.tokens: max(r.mem_floor_us, r.compute_floor_us)
                for r in rows
                if (r.shape, r.world) == (shape, world)
                and r.status == "ok"
                and r.strategy == "replicate"
            }
            if floors:
                lines.append(
                    f"{shape:8} {world:>2} {'-':8} {'floor(repl.)':22}"
                    + "".join(f"{_fmt(floors.get(t)):>9}" for t in tokens)
                )
            last_group = (shape, world)
        statuses = {r.status for r in cells.values() if r.status != "ok"}
        if statuses and all(r.status != "ok" for r in cells.values()):
            lines.append(f"{shape:8} {world:>2} {link:8} {name:22} {sorted(statuses)[0][:160]}")
            continue
        ok = [cells[t] for t in tokens if t in cells and cells[t].status == "ok"]
        lines.append(
            f"{shape:8} {world:>2} {link:8} {name:22}"
            + "".join(
                f"{_fmt(cells[t].median_us) if t in cells and cells[t].status == 'ok' else '-':>9}"
                for t in tokens
            )
            + f"{_fmt(100 * ok[-1].achieved, 1) + '%' if ok else '-':>9}"
        )
    return "\n".join(lines)


def load_rows(path: Path) -> list[Row]:
    if not path.exists():
        return []
    rows = [Row(**{"group": 0, **r}) for r in json.loads(path.read_text())["rows"]]
    for r in rows:  # files from before the group field: G was the world (1 for replicate)
        r.group = r.group or group_size_of(r.strategy, r.world, None)
    return rows


def merge_rows(path: Path, new_rows: list[Row]) -> list[Row]:
    """Replace rows with the same (shape, strategy, world, G, link, tokens, dtype, routing)."""

    def key(r: Row):
        return (r.shape, r.strategy, r.world, r.group, r.link, r.tokens, r.dtype, r.routing)

    merged = {key(r): r for r in load_rows(path)}
    merged.update({key(r): r for r in new_rows})
    rows = sorted(
        merged.values(), key=lambda r: (r.shape, r.world, r.link, _series_order(r), r.tokens)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": [asdict(r) for r in rows]}, indent=1))
    return rows


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    panels = sorted({(r.shape, r.world, r.link) for r in ok})
    if not panels:
        return
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.2 * nrows), squeeze=False)
    for ax, (shape, world, link) in zip(axes.flat, panels):
        mine = [r for r in ok if (r.shape, r.world, r.link) == (shape, world, link)]
        names = list(dict.fromkeys(series(r) for r in sorted(mine, key=_series_order)))
        for name in names:
            pts = sorted((r.tokens, r.median_us) for r in mine if series(r) == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        floor = sorted(
            {
                (r.tokens, max(r.mem_floor_us, r.compute_floor_us))
                for r in mine
                if r.strategy == "replicate"
            }
        )
        if floor:
            ax.plot(
                [p[0] for p in floor], [p[1] for p in floor], "k--", lw=1, label="floor (replicate)"
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel(f"forward latency µs ({mine[0].timer})")
        ax.set_title(f"{shape}, world {world}, {link}, {mine[0].dtype}, {mine[0].routing}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--shape",
        default="mixtral",
        help=f"comma-separated presets {sorted(SHAPES)} or 'custom' "
        f"(with --hidden/--ffn/--experts/--topk)",
    )
    p.add_argument("--hidden", type=int)
    p.add_argument("--ffn", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--topk", type=int)
    p.add_argument("--strategies", default=",".join(ALL_STRATEGIES))
    p.add_argument(
        "--peers",
        default="",
        help="other implementations to add: megatron (mcore_a2a, mcore_ag), deepspeed",
    )
    p.add_argument(
        "--group-size",
        type=int,
        help="G: ranks that share one layer's experts (EP degree; expert-TP degree "
        "for tp_experts); the W/G groups run side by side. Default: W",
    )
    p.add_argument(
        "--tokens", type=positive_int_list, default=[1, 16, 64, 256, 4096], help="tokens per rank"
    )
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument(
        "--uniform-routing",
        action="store_true",
        help="balanced expert choice (same load for every strategy and run)",
    )
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--peak-tbs", type=float, default=4.3, help="memory bandwidth, TB/s")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense TFLOP/s of --dtype")
    p.add_argument(
        "--link",
        help="label for the interconnect setting (default: from "
        "NCCL_P2P_DISABLE: p2p_off, else default; cpu on CPU)",
    )
    p.add_argument("--json", type=Path, help="merge result rows into this JSON file")
    p.add_argument("--png", type=Path, help="draw latency vs tokens from the JSON rows")
    p.add_argument(
        "--report",
        type=Path,
        help="only print the table of this JSON file (and --png); run nothing",
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="with --report: one line per strategy, tokens as columns",
    )
    p.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout")
    args = p.parse_args(argv)
    args.strategies = [s for s in args.strategies.split(",") if s]
    try:
        args.strategies += [s for s in peer_strategies(args.peers) if s not in args.strategies]
    except PeerUnavailable as err:
        p.error(str(err))
    unknown = [s for s in args.strategies if s not in BUILDERS]
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {sorted(BUILDERS)}")
    return args


def resolve_shapes(args) -> list[Shape]:
    shapes = []
    for name in [s for s in args.shape.split(",") if s]:
        if name == "custom":
            missing = [f for f in ("hidden", "ffn", "experts", "topk") if getattr(args, f) is None]
            if missing:
                raise SystemExit(f"--shape custom needs --{' --'.join(missing)}")
            shapes.append(Shape("custom", args.hidden, args.ffn, args.experts, args.topk))
        elif name in SHAPES:
            h, f, e, k = SHAPES[name]
            shapes.append(
                Shape(name, args.hidden or h, args.ffn or f, args.experts or e, args.topk or k)
            )
        else:
            raise SystemExit(f"unknown --shape {name!r}; use {sorted(SHAPES)} or custom")
    return shapes


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        rows = load_rows(args.report)
        print(format_compact(rows) if args.compact else format_table(rows))
        if args.png:
            plot(rows, args.png)
        return 0
    shapes = resolve_shapes(args)
    env = DistEnv.from_environ(os.environ)
    if args.group_size is not None and (args.group_size < 1 or env.world_size % args.group_size):
        raise SystemExit(
            f"--group-size {args.group_size} does not divide the world size "
            f"{env.world_size}; pass a divisor of {env.world_size}"
        )
    device_type = args.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cpu" and args.dtype != "fp32":
        print(f"note: {args.dtype} on CPU; pass --dtype fp32 for a representative CPU run")
    device = init_distributed(env, device_type, args.timeout_s)
    link = args.link or (
        "cpu"
        if device_type == "cpu"
        else "p2p_off"
        if os.environ.get("NCCL_P2P_DISABLE") == "1"
        else "default"
    )
    dtype = DTYPES[args.dtype]
    rows: list[Row] = []
    failed = False
    used_nvshmem = False
    for shape in shapes:
        for strategy in args.strategies:
            try:
                new = bench_strategy(shape, strategy, args, env, device, dtype, link)
            except Exception as err:  # noqa: BLE001 - recorded, reported, exit status 1
                failed = True
                first = (str(err).splitlines() or [type(err).__name__])[0]
                print(
                    f"[rank {env.rank}] {shape.name} {strategy} failed:\n{traceback.format_exc()}",
                    file=sys.stderr,
                    flush=True,
                )
                new = [
                    Row(
                        shape=shape.name,
                        strategy=strategy,
                        world=env.world_size,
                        group=group_size_of(strategy, env.world_size, args.group_size),
                        link=link,
                        tokens=t,
                        dtype=args.dtype,
                        routing="uniform" if args.uniform_routing else "random",
                        timer="-",
                        status=f"error: {type(err).__name__}: {first}",
                        versions=library_versions(),
                    )
                    for t in args.tokens
                ]
            used_nvshmem |= strategy == "ep_nvshmem" and any(r.status == "ok" for r in new)
            rows.extend(new)
            if env.rank == 0:
                print(format_table(new), flush=True)
                if args.json:  # after every strategy: a later hang or crash keeps these
                    merge_rows(args.json, new)
    if env.rank == 0:
        if args.png:
            plot(load_rows(args.json) if args.json else rows, args.png)
        print("\n" + format_table(rows), flush=True)
    if used_nvshmem:
        # NVSHMEM's finalizer can crash at interpreter exit on some torch/NVSHMEM builds,
        # after all work is done; results are written, so leave without running it.
        sys.stdout.flush()
        sys.stderr.flush()
        if env.world_size > 1:
            dist.barrier()
        os._exit(1 if failed else 0)
    destroy()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

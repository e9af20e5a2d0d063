"""Calibration: measure this machine's collectives, memory and kernels into a MachineProfile.

tools/calibrate.py is the launcher (torchrun; it reads the environment); everything here
takes its process group, rank, device and settings as arguments.

# S        bytes per rank: the tensor each rank passes in (MachineProfile's convention):
#            all_reduce      the tensor reduced in place
#            all_to_all      the send buffer (split over the g ranks, unevenly: see below)
#            all_gather      the shard each rank contributes (the output is g * S)
#            reduce_scatter  the full input (each rank keeps S / g)
#            send_recv       the tensor each rank sends to the next rank of its group
#                            while receiving one from the previous (a pipeline hand-off)
# g        group size: contiguous ranks [k g, (k + 1) g), every group of one size at once
# seconds  one call, median over timed iterations, slowest rank
# busbw    nccl-tests' bus bandwidth, bytes / s = bus_factor(op, g) * S / seconds

Timing. Each timed iteration starts after a group sync (a one-element all_reduce, and on
CUDA a device synchronize), so ranks enter together and skew is not counted; the call is
timed with CUDA events on GPU (host launch included, as eager code pays it) and with
``time.perf_counter`` on CPU (gloo calls block until done). Per (op, g, S): the median of
``iters`` iterations after ``warmup`` untimed ones on every rank, then the maximum over
ranks (a collective is done when its slowest member is). A larger message never costs
less: recorded times are made non-decreasing in S by a running minimum from the largest
size down (``monotone``), which removes slow outliers at the latency floor without moving
the bandwidth-bound samples.

all_to_all splits are uneven: every rank sends destination j a share (1 - 0.25) ... (1 +
0.25) of the mean S / g, rising linearly with j, so the last rank of a group receives
1.25x the mean, as a rank holding hot experts does.

Kernels (each rank measures its own device; rank 0's numbers are written):
- hbm_gbps: a large copy, (bytes read + bytes written) / s / 1e9;
- matmul_tflops: dense matmul at ``matmul_shape`` (bf16 8192^3 on GPU, 4096^3 quick; CPU
  fp32 1024^3, 512^3 quick);
- gemv_efficiency: M = 1 projection [1, 4096] x [14336, 4096]^T in bf16, weight bytes / s
  over hbm; the weight rotates over copies that together exceed the L2 cache;
- grouped_efficiency: ``GroupedExperts`` (inference mode) at decode size, 8 rows on 8
  distinct experts of 128 (H 2048, F 768, bf16), bytes of the touched experts / s over hbm;
  CPU: fp32, 16 experts of H 256, F 128;
- kernel_overhead_us: host time of one tiny eager kernel launch (``x.add_(1)``);
- graph_kernel_us: the same kernel replayed in a CUDA graph, per kernel (GPU only).
GEMV and grouped experts run in a CUDA graph on GPU (kernel time; the launch cost is
kernel_overhead_us).

Collectives inside a CUDA graph (GPU only; ``graph_collectives``): decode replays its
collectives in the step's graph, where they pay neither the host dispatch nor the eager
call's synchronisation, and a P2P-off all-reduce of a few KB costs a fraction of its eager
time. The ops decode issues (``GRAPH_OPS``) at decode sizes (``GRAPH_MAX_BYTES`` per rank
at most) are captured ``GRAPH_CALLS`` times back to back in one graph per (op, g, S); each
timed replay starts after a group sync; seconds per call = replay time / GRAPH_CALLS,
median over replays, slowest rank, made non-decreasing in S as above.

``alpha_beta_samples`` builds sample tables from an alpha-beta model (an estimate's
tables, tests): t = alpha + bus_factor(op, g) * S / busbw.
"""

from __future__ import annotations

import datetime
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from moe_ext.errors import MoeExtError
from moe_ext.profile import COLLECTIVES, MachineProfile

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
ALL_TO_ALL_SKEW = 0.25  # +-25% around the mean split
GEMV_SHAPE = (4096, 14336)  # (in, out): a Mixtral-size decode projection
GROUPED_SHAPE = (128, 2048, 768, 8)  # (experts, H, F, rows): qwen3_30b_a3b at one token
CPU_GROUPED_SHAPE = (16, 256, 128, 8)
GRAPH_OPS = ("all_reduce", "all_gather", "reduce_scatter")  # what a decode step's graph holds
GRAPH_CALLS = 20  # collectives captured back to back per timed graph
GRAPH_MAX_BYTES = 4 * MIB  # decode's messages: batch x hidden x 2 bytes, and less
# torch >= 2.12 names them *_single (the *_tensor names warn); 2.11 has only the old ones
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CalibrationError(MoeExtError):
    """A calibration that cannot run as asked (one line: the problem and the fix)."""


# --------------------------------------------------------------------------- alpha-beta
def bus_factor(op: str, group: int) -> float:
    """Bytes on the busiest link per byte of S (nccl-tests' busbw factors, ring algorithms):
    all_reduce 2 (g-1)/g, all_to_all and reduce_scatter (g-1)/g, all_gather g-1 (S is the
    shard), send_recv 1."""
    if op not in COLLECTIVES:
        raise CalibrationError(f"unknown collective {op!r}; use one of {', '.join(COLLECTIVES)}")
    g = group
    return {
        "all_reduce": 2 * (g - 1) / g,
        "all_to_all": (g - 1) / g,
        "reduce_scatter": (g - 1) / g,
        "all_gather": float(g - 1),
        "send_recv": 1.0,
    }[op]


def alpha_beta_seconds(
    op: str, group: int, nbytes: float, alpha_s: float, busbw_gbps: float
) -> float:
    """Seconds of ``op`` over ``group`` ranks with S = ``nbytes`` per rank: latency
    ``alpha_s`` plus the busiest link's bytes at ``busbw_gbps`` (GB/s, 1e9 bytes/s)."""
    return alpha_s + bus_factor(op, group) * nbytes / (busbw_gbps * 1e9)


def alpha_beta_samples(
    op: str, group: int, sizes: Sequence[int], alpha_s: float, busbw_gbps: float
) -> list[list[float]]:
    """``[[bytes, seconds], ...]`` of ``alpha_beta_seconds`` at ``sizes`` (ascending), in
    MachineProfile's ``collectives[op][str(group)]`` form."""
    return [
        [float(s), alpha_beta_seconds(op, group, s, alpha_s, busbw_gbps)] for s in sorted(sizes)
    ]


def estimated_collectives(
    links: dict[int, tuple[float, float]],
    sizes: Sequence[int],
    ops: Sequence[str] = COLLECTIVES,
) -> dict[str, dict[str, list[list[float]]]]:
    """MachineProfile ``collectives`` from the alpha-beta model: ``links`` maps a group size
    to (alpha seconds, busbw GB/s), the same for every op (the ops differ by bus_factor)."""
    return {
        op: {
            str(g): alpha_beta_samples(op, g, sizes, alpha, busbw)
            for g, (alpha, busbw) in sorted(links.items())
        }
        for op in ops
    }


def bus_bandwidth_gbps(op: str, group: int, nbytes: float, seconds: float) -> float:
    """nccl-tests bus bandwidth (GB/s) of one measured call."""
    return bus_factor(op, group) * nbytes / seconds / 1e9


def message_sizes(max_bytes: int, min_bytes: int = 4 * KIB, step: int = 4) -> list[int]:
    """Per-rank sizes min_bytes, min_bytes * step, ... up to max_bytes (included)."""
    if not 0 < min_bytes <= max_bytes or step < 2:
        raise CalibrationError(
            f"message sizes {min_bytes}..{max_bytes} step {step}: need 0 < min <= max, step >= 2"
        )
    sizes, s = [], min_bytes
    while s <= max_bytes:
        sizes.append(s)
        s *= step
    if sizes[-1] != max_bytes:
        sizes.append(max_bytes)
    return sizes


def group_sizes(world: int) -> list[int]:
    """The group sizes measured at this world size: powers of two that divide it, and the
    world itself (2, 4, ..., world)."""
    sizes = [g for g in (2**k for k in range(1, 31)) if g <= world and world % g == 0]
    if world >= 2 and world not in sizes:
        sizes.append(world)
    return sizes


def skewed_splits(numel: int, group: int, skew: float = ALL_TO_ALL_SKEW) -> list[int]:
    """Elements each rank sends to destinations 0..g-1: the mean numel / g scaled by
    1 - skew ... 1 + skew linearly in the destination, summing exactly to ``numel``."""
    if group == 1:
        return [numel]
    weights = [1 - skew + 2 * skew * j / (group - 1) for j in range(group)]
    total = sum(weights)
    counts = [int(numel * w / total) for w in weights]
    counts[-1] += numel - sum(counts)
    return counts


def monotone(samples: list[list[float]]) -> list[list[float]]:
    """``samples`` (ascending bytes) with seconds made non-decreasing in bytes by a running
    minimum from the largest size down: a small message slowed by interference takes the
    time of the next larger one, and the bandwidth-bound samples stay as measured."""
    out, best = [], math.inf
    for nbytes, seconds in reversed(samples):
        best = min(best, seconds)
        out.append([nbytes, best])
    return out[::-1]


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """What to measure: per-rank sizes (bytes), iterations, and the kernel shapes' scale."""

    sizes: tuple[int, ...]
    warmup: int
    iters: int
    quick: bool

    @classmethod
    def for_device(cls, device_type: str, quick: bool) -> "Settings":
        """GPU: 4 KiB .. 256 MiB (quick: .. 64 MiB), x4 steps; CPU: 4 KiB .. 4 MiB
        (quick: .. 1 MiB, x16 steps)."""
        if device_type == "cuda":
            top = 64 * MIB if quick else 256 * MIB
            return cls(tuple(message_sizes(top)), 2 if quick else 3, 5 if quick else 10, quick)
        if quick:
            return cls(tuple(message_sizes(1 * MIB, step=16)), 1, 3, quick)
        return cls(tuple(message_sizes(4 * MIB)), 2, 7, quick)


# --------------------------------------------------------------------------- timing
def _sync(group: Any, device: torch.device) -> None:
    """All ranks of ``group`` reach this point; on CUDA the device is idle after it."""
    flag = torch.ones(1, device=device)
    dist.all_reduce(flag, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any], group: Any, device: torch.device, warmup: int, iters: int
) -> float:
    """Median seconds of ``fn()`` (a collective over ``group``) on this rank: ``warmup``
    untimed calls, then ``iters`` calls each after a group sync."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(group, device)
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_in_graph(
    fn: Callable[[], Any], group: Any, device: torch.device, warmup: int, iters: int
) -> float:
    """Median seconds per call of ``fn()`` (a collective over ``group``) captured
    GRAPH_CALLS times back to back in one CUDA graph: ``warmup`` eager calls on a side
    stream (capture needs the communicator set up), then ``iters`` replays, each after a
    group sync."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()  # first replay uploads the graph
    times = []
    for _ in range(iters):
        _sync(group, device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / GRAPH_CALLS)
    del graph
    return statistics.median(times)


def collective_call(
    op: str, nbytes: int, group: Any, ranks: Sequence[int], rank: int, device: torch.device
) -> tuple[Callable[[], Any], int]:
    """(a no-argument call of ``op`` over ``group`` with about ``nbytes`` per rank, the exact
    bytes per rank it moves). Element counts are rounded down to a multiple of g."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    esize = torch.tensor([], dtype=dtype).element_size()
    g = len(ranks)
    numel = max(g, nbytes // esize // g * g)
    x = torch.ones(numel, dtype=dtype, device=device)
    if op == "all_reduce":
        return (lambda: dist.all_reduce(x, group=group)), numel * esize
    if op == "all_gather":
        out = torch.empty(numel * g, dtype=dtype, device=device)
        return (lambda: _ALL_GATHER(out, x, group=group)), numel * esize
    if op == "reduce_scatter":
        out = torch.empty(numel // g, dtype=dtype, device=device)
        return (lambda: _REDUCE_SCATTER(out, x, group=group)), numel * esize
    if op == "all_to_all":
        me = ranks.index(rank)
        send = skewed_splits(numel, g)  # every source uses the same destination shares
        recv = [send[me]] * g
        out = torch.empty(sum(recv), dtype=dtype, device=device)

        def a2a():
            dist.all_to_all_single(out, x, recv, send, group=group)

        return a2a, numel * esize
    if op == "send_recv":
        me = ranks.index(rank)
        nxt, prev = ranks[(me + 1) % g], ranks[(me - 1) % g]
        out = torch.empty_like(x)

        def send_recv():
            ops = [dist.P2POp(dist.isend, x, nxt, group), dist.P2POp(dist.irecv, out, prev, group)]
            for req in dist.batch_isend_irecv(ops):
                req.wait()

        return send_recv, numel * esize
    raise CalibrationError(f"unknown collective {op!r}; use one of {', '.join(COLLECTIVES)}")


def graph_sizes(settings: Settings) -> tuple[int, ...]:
    """The message sizes timed inside CUDA graphs: those up to GRAPH_MAX_BYTES."""
    return tuple(s for s in settings.sizes if s <= GRAPH_MAX_BYTES)


def contiguous_groups(
    rank: int, world: int, sizes: Sequence[int], timeout_s: float
) -> dict[int, tuple[list[int], Any]]:
    """g -> (ranks of this rank's group, its process group) for each size in ``sizes``.
    Every rank creates every group (torch's rule), each with ``timeout_s``."""
    timeout = datetime.timedelta(seconds=timeout_s)
    mine = {}
    for g in sizes:
        for start in range(0, world, g):
            ranks = list(range(start, start + g))
            pg = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[g] = (ranks, pg)
    return mine


def measure_collectives(
    world_group: Any,
    rank: int,
    world: int,
    device: torch.device,
    settings: Settings,
    timeout_s: float,
    ops: Sequence[str] = COLLECTIVES,
    on_step: Optional[Callable[[str], None]] = None,
    in_graph: bool = False,
) -> dict[str, dict[str, list[list[float]]]]:
    """``collectives[op][str(g)] = [[bytes per rank, seconds], ...]`` ascending, for every
    op and group size the world allows, measured on all ranks at once (each collective
    under ``timeout_s``: a hung link ends the run there, it does not hang). ``on_step``
    is called after each (op, g, size) with a label (progress). ``in_graph``: time each
    inside a CUDA graph (``time_in_graph``; CUDA only) at the sizes up to GRAPH_MAX_BYTES."""
    groups = contiguous_groups(rank, world, group_sizes(world), timeout_s)
    result: dict[str, dict[str, list[list[float]]]] = {op: {} for op in ops}
    timer = time_in_graph if in_graph else time_call
    sizes = graph_sizes(settings) if in_graph else settings.sizes
    for op in ops:
        for g, (ranks, pg) in groups.items():
            mine, used = [], []
            for nbytes in sizes:
                fn, exact = collective_call(op, nbytes, pg, ranks, rank, device)
                mine.append(timer(fn, pg, device, settings.warmup, settings.iters))
                used.append(exact)
                del fn
                if on_step is not None:
                    on_step(f"{op}{' (graph)' if in_graph else ''} g={g} {_fmt_bytes(exact)}")
            slowest = torch.tensor(mine, dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=world_group)
            samples = [[float(b), max(float(t), 1e-9)] for b, t in zip(used, slowest.tolist())]
            result[op][str(g)] = monotone(samples)
    return result


# --------------------------------------------------------------------------- kernels
def _seconds_per_call(calls: Sequence[Callable[[], Any]], device: torch.device, reps: int) -> float:
    """Median seconds per call of running every call of ``calls`` in turn, ``reps`` times:
    on CUDA one CUDA graph of the calls replayed (kernel time; eager if capture fails),
    on CPU wall time."""
    for call in calls:  # warm-up: autotune, compile, allocator
        call()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for call in calls:
                call()
            times.append((time.perf_counter() - t0) / len(calls))
        return statistics.median(times)
    run: Callable[[], Any]
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for call in calls:
                call()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        run = graph.replay
    except Exception:  # noqa: BLE001 - not capturable here: eager (a real bug raises there)

        def run():
            for call in calls:
                call()

    run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def _eager_seconds(fn: Callable[[], Any], device: torch.device, iters: int, reps: int) -> float:
    """Median seconds per call of ``iters`` eager calls of ``fn`` in a row (CUDA events
    around the batch on GPU, wall time on CPU)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def measure_hbm_gbps(device: torch.device, quick: bool) -> float:
    """Copy bandwidth, (read + written bytes) / s / 1e9: 1 GiB on GPU (quick 256 MiB),
    64 MiB on CPU (quick 16 MiB)."""
    if device.type == "cuda":
        nbytes = (256 if quick else 1024) * MIB
    else:
        nbytes = (16 if quick else 64) * MIB
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    s = _eager_seconds(lambda: dst.copy_(src), device, iters=5, reps=3)
    return 2 * nbytes / s / 1e9


def matmul_shape(device_type: str, quick: bool) -> tuple[str, int]:
    """(dtype name, n) of the n^3 matmul measured: bf16 8192 on GPU (quick 4096), fp32 1024
    on CPU (quick 512)."""
    if device_type == "cuda":
        return "bf16", 4096 if quick else 8192
    return "fp32", 512 if quick else 1024


def measure_matmul_tflops(device: torch.device, quick: bool) -> float:
    """Dense matmul TFLOP/s at ``matmul_shape``."""
    name, n = matmul_shape(device.type, quick)
    dtype = torch.bfloat16 if name == "bf16" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    iters = 10 if device.type == "cuda" else 2
    s = _eager_seconds(lambda: a @ b, device, iters=iters, reps=3)
    return 2 * n**3 / s / 1e12


def measure_gemv_efficiency(device: torch.device, hbm_gbps: float, quick: bool) -> float:
    """Achieved weight bytes / s of an M = 1 projection over ``hbm_gbps``, through the
    path decode takes (``dense_linear``: the GEMV kernel on CUDA): bf16
    [1, 4096] x [14336, 4096]^T on GPU, rotating over 4 weight copies (470 MB, beyond any
    L2); CPU fp32 [1, 2048] x [4096, 2048]^T (32 MiB, 2 copies)."""
    from moe_ext.quant.linear import dense_linear

    if device.type == "cuda":
        (k, n), dtype, copies = GEMV_SHAPE, torch.bfloat16, 4
    else:
        (k, n), dtype, copies = (2048, 4096), torch.float32, 2
    weights = [torch.randn(n, k, dtype=dtype, device=device) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, dtype=dtype, device=device)
    with torch.inference_mode():
        calls = [lambda w=w: dense_linear(x, w) for w in weights]
        s = _seconds_per_call(calls, device, reps=5 if quick else 10)
    return weights[0].nbytes / s / (hbm_gbps * 1e9)


def measure_grouped_efficiency(device: torch.device, hbm_gbps: float, quick: bool) -> float:
    """Achieved bytes / s of ``GroupedExperts`` at decode size over ``hbm_gbps``: 8 rows, one
    on each of 8 experts (GPU: 128 experts of H 2048, F 768, bf16; CPU: fp32, 16 of H 256,
    F 128); the touched experts rotate so that successive calls read distinct weights."""
    from moe_ext.moe.experts import GroupedExperts

    if device.type == "cuda":
        (e, h, f, rows), dtype = GROUPED_SHAPE, torch.bfloat16
    else:
        (e, h, f, rows), dtype = CPU_GROUPED_SHAPE, torch.float32
    experts = GroupedExperts(e, h, f, dtype=dtype, device=device)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.02)
    stride = e // rows  # set k touches experts k, k + stride, ...
    counts = []
    for k in range(stride):
        c = torch.zeros(e, dtype=torch.int64, device=device)
        c[k::stride] = 1
        counts.append(c)
    x = torch.randn(rows, h, dtype=dtype, device=device)
    with torch.inference_mode():
        calls = [lambda c=c: experts(x, c) for c in counts]
        s = _seconds_per_call(calls, device, reps=5 if quick else 10)
    touched_bytes = rows * 3 * h * f * torch.tensor([], dtype=dtype).element_size()
    return touched_bytes / s / (hbm_gbps * 1e9)


def measure_kernel_overhead_us(device: torch.device) -> float:
    """Host microseconds per tiny eager kernel launch (``x.add_(1)`` on one element), median
    of 5 runs of 200 launches; on CPU the eager op's dispatch cost."""
    x = torch.zeros(1, device=device)
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(200):
            x.add_(1)
        times.append((time.perf_counter() - t0) / 200)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return statistics.median(times[1:]) * 1e6


def measure_graph_kernel_us(device: torch.device) -> Optional[float]:
    """Microseconds per tiny kernel replayed inside a CUDA graph (its minimum GPU time and
    the gap to the next): one graph of 200 ``x.add_(1)``, median of 10 replays. None on
    CPU (no graphs)."""
    if device.type != "cuda":
        return None
    x = torch.zeros(1, device=device)
    n = 200
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        x.add_(1)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            x.add_(1)
    graph.replay()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n)
    return statistics.median(times)


@dataclass(frozen=True)
class KernelRates:
    hbm_gbps: float
    matmul_tflops: float
    gemv_efficiency: float
    grouped_efficiency: float
    kernel_overhead_us: float
    graph_kernel_us: Optional[float]  # None on CPU


def measure_kernels(
    device: torch.device, quick: bool, on_step: Optional[Callable[[str], None]] = None
) -> KernelRates:
    """Every kernel rate of this rank's device (module docstring); ``on_step`` after each."""
    step = on_step or (lambda label: None)
    hbm = measure_hbm_gbps(device, quick)
    step(f"hbm {hbm:.0f} GB/s")
    tflops = measure_matmul_tflops(device, quick)
    step(f"matmul {tflops:.1f} TFLOP/s")
    gemv = measure_gemv_efficiency(device, hbm, quick)
    step(f"gemv {gemv:.2f} of hbm")
    grouped = measure_grouped_efficiency(device, hbm, quick)
    step(f"grouped experts {grouped:.2f} of hbm")
    overhead = measure_kernel_overhead_us(device)
    step(f"kernel launch {overhead:.1f} us")
    in_graph = measure_graph_kernel_us(device)
    step("graph kernel " + ("n/a on CPU" if in_graph is None else f"{in_graph:.1f} us"))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return KernelRates(hbm, tflops, gemv, grouped, overhead, in_graph)


KERNEL_STEPS = 6  # on_step calls of measure_kernels


# --------------------------------------------------------------------------- the profile
def effective_link(topology: Any, p2p_disabled: bool) -> tuple[str, bool, str]:
    """(link, p2p, note) of a profile measured on ``topology`` (moe_ext.topology.Topology).

    ``link`` is the path the collectives' bytes take: the topology's kind (nvlink, pcie,
    cpu), except that with ``p2p_disabled`` (NCCL_P2P_DISABLE=1) NCCL stages every byte
    through host memory over PCIe, so an NVLink machine records ``pcie``. ``p2p``: every GPU
    pair has peer access and it was not disabled."""
    kind = topology.kind
    if kind == "cpu":
        return "cpu", False, "link cpu: gloo over loopback TCP"
    links = topology.links
    p2p_hw = bool(links) and all(link.p2p for link in links)
    labels = sorted({link.label for link in links}) or ["single GPU"]
    hw = f"probe: {kind} ({', '.join(labels)}), peer access {'yes' if p2p_hw else 'no'}"
    if p2p_disabled:
        return "pcie", False, f"{hw}; NCCL_P2P_DISABLE=1: bytes staged through host memory"
    return kind, p2p_hw, hw


def default_name(device_name: str, world: int, link: str, p2p_disabled: bool) -> str:
    """e.g. ``h200x2_nvlink``, ``h200x2_p2p_off``, ``cpux2``."""
    if link == "cpu":
        return f"cpux{world}"
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower().replace("nvidia", "")).strip("_")
    return f"{slug}x{world}_{'p2p_off' if p2p_disabled else link}"


def calibrate(
    world_group: Any,
    rank: int,
    world: int,
    device: torch.device,
    *,
    topology: Any,
    p2p_disabled: bool,
    quick: bool = False,
    name: Optional[str] = None,
    timeout_s: float = 60.0,
    notes: Sequence[str] = (),
    on_step: Optional[Callable[[str], None]] = None,
) -> MachineProfile:
    """Measure collectives (all ranks together) and this rank's kernels into a profile.

    ``world_group``: the default process group (gloo on CPU, NCCL on CUDA); ``topology``:
    moe_ext.topology's probe of this machine; ``p2p_disabled``: NCCL_P2P_DISABLE was set
    (the caller reads the environment); ``timeout_s``: each collective group's timeout;
    ``notes``: lines to keep (the command line). Every rank returns a profile with the same
    collectives and its own device's kernel rates (rank 0's is the one to write)."""
    if world < 2:
        raise CalibrationError(
            "calibration measures collectives and needs at least 2 ranks; launch with "
            "torchrun --nproc-per-node 2 (or more) tools/calibrate.py"
        )
    settings = Settings.for_device(device.type, quick)
    started = time.perf_counter()
    collectives = measure_collectives(
        world_group, rank, world, device, settings, timeout_s, on_step=on_step
    )
    graph_collectives = (
        measure_collectives(
            world_group,
            rank,
            world,
            device,
            settings,
            timeout_s,
            ops=GRAPH_OPS,
            on_step=on_step,
            in_graph=True,
        )
        if device.type == "cuda"
        else {}
    )
    rates = measure_kernels(device, quick, on_step=on_step)
    _sync(world_group, device)
    link, p2p, link_note = effective_link(topology, p2p_disabled)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        backend = f"NCCL {nccl}, CUDA {torch.version.cuda}"
        dtype = "bf16"
    else:
        device_name = f"CPU ({platform.machine()})"
        backend, dtype = "gloo", "fp32"
    sizes = ", ".join(_fmt_bytes(s) for s in settings.sizes)
    all_notes = [
        *notes,
        f"torch {torch.__version__}, {backend}; {world} ranks on {device.type}",
        link_note,
        f"collectives: {dtype}, S per rank {sizes}; median of {settings.iters} timed calls "
        f"after {settings.warmup} warm-ups, each after a group sync, slowest rank; "
        f"{'CUDA events' if device.type == 'cuda' else 'perf_counter'}; seconds made "
        "non-decreasing in S (running minimum from the largest S down); groups of "
        "contiguous ranks, all groups of a size at once; "
        f"process-group timeout {timeout_s:g} s per collective",
        f"all_to_all splits skewed +-{ALL_TO_ALL_SKEW:.0%} (the last rank of a group receives "
        f"{1 + ALL_TO_ALL_SKEW:.2f}x the mean); send_recv: each rank sends S to the next "
        "rank of its group and receives S from the previous (batch_isend_irecv)",
        (
            f"graph_collectives: {', '.join(GRAPH_OPS)} up to {_fmt_bytes(GRAPH_MAX_BYTES)}, "
            f"{GRAPH_CALLS} calls back to back in one CUDA graph, replay time / "
            f"{GRAPH_CALLS}, each replay after a group sync"
            if graph_collectives
            else "graph_collectives: not measured (CPU)"
        ),
        "kernels (rank 0's device): hbm copy read+write bytes; matmul "
        + "{} {}^3".format(*matmul_shape(device.type, quick))
        + "; gemv and grouped experts in CUDA graphs on GPU, wall time on CPU",
        f"calibration took {time.perf_counter() - started:.1f} s",
    ]
    p2p_label = p2p_disabled and link != "cpu"
    return MachineProfile(
        name=name or default_name(device_name, world, link, p2p_label),
        source="measured",
        date=datetime.date.today().isoformat(),
        device=device_name,
        gpus=world,
        link=link,
        p2p=p2p,
        hbm_gbps=round(rates.hbm_gbps, 1),
        matmul_tflops=round(rates.matmul_tflops, 2),
        gemv_efficiency=round(rates.gemv_efficiency, 3),
        grouped_efficiency=round(rates.grouped_efficiency, 3),
        kernel_overhead_us=round(rates.kernel_overhead_us, 2),
        graph_kernel_us=None if rates.graph_kernel_us is None else round(rates.graph_kernel_us, 2),
        collectives=collectives,
        graph_collectives=graph_collectives,
        notes=tuple(all_notes),
    )


def calibration_steps(world: int, device_type: str, quick: bool) -> int:
    """How many ``on_step`` calls ``calibrate`` makes (a progress bar's total)."""
    settings = Settings.for_device(device_type, quick)
    eager = len(COLLECTIVES) * len(group_sizes(world)) * len(settings.sizes)
    graph = len(GRAPH_OPS) * len(group_sizes(world)) * len(graph_sizes(settings))
    return eager + (graph if device_type == "cuda" else 0) + KERNEL_STEPS


def summary_rows(profile: MachineProfile) -> list[list[str]]:
    """Table rows: op, g, latency (us) at the smallest S, busbw (GB/s) at the largest S;
    the ops timed inside CUDA graphs again, marked "(graph)"."""
    rows = [["op", "g", "smallest S", "latency us", "largest S", "busbw GB/s"]]
    tables = [(op, "", profile.collectives) for op in COLLECTIVES]
    tables += [(op, " (graph)", profile.graph_collectives) for op in GRAPH_OPS]
    for op, mark, table in tables:
        for g, samples in sorted(table.get(op, {}).items(), key=lambda x: int(x[0])):
            (s0, t0), (s1, t1) = samples[0], samples[-1]
            rows.append(
                [
                    op + mark,
                    g,
                    _fmt_bytes(s0),
                    f"{t0 * 1e6:.1f}",
                    _fmt_bytes(s1),
                    f"{bus_bandwidth_gbps(op, int(g), s1, t1):.1f}",
                ]
            )
    return rows


def format_summary(profile: MachineProfile) -> str:
    rows = summary_rows(profile)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    table = "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)
    p = profile
    return (
        f"{p.name}: {p.device} x{p.gpus}, link {p.link}, p2p {p.p2p}\n{table}\n"
        f"hbm {p.hbm_gbps:.0f} GB/s, matmul {p.matmul_tflops:.1f} TFLOP/s, gemv "
        f"{p.gemv_efficiency:.2f} of hbm, grouped experts {p.grouped_efficiency:.2f} of hbm, "
        f"kernel launch {p.kernel_overhead_us:.1f} us"
        + ("" if p.graph_kernel_us is None else f", in a graph {p.graph_kernel_us:.1f} us")
    )


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            v = n / size
            return (
                f"{v:.0f} {unit}" if math.isclose(v, round(v), rel_tol=1e-3) else f"{v:.1f} {unit}"
            )
    return f"{n:.0f} B"

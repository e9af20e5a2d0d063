"""Experts-only forward latency at decode sizes: grouped_mm vs triton backends, and the
triton kernels on fp8 / MXFP4 weights, against the HBM floor.

    python tools/bench_experts.py --json experts.json          # mixtral + qwen3, all formats
    python tools/bench_experts.py --shapes qwen3 --tokens 1,4,16 --peak-tbs 4.8
    python tools/bench_experts.py --formats fp8,mxfp4 --fp8-block 128
    python tools/bench_experts.py --report experts.json --png experts.png  # chart only

# T tokens, T' = T*k rows (sorted by expert), H hidden, F FFN size, E experts, k top-k

Per (shape, T): T tokens routed top-k (seeded uniform scores, distinct experts per token)
give ``tokens_per_expert``; rows are random bf16. Each backend's forward is captured in
one CUDA graph that runs it on ``--copies`` weight copies in turn (so the L2 cache does not
hold the next call's weights), after one eager warm-up that autotunes/compiles; the graph
is replayed ``--iters`` times, each timed with CUDA events; the reported latency is the
median replay / copies. Floor: bytes of the weights of the experts that receive at least
one row (gate_up and down, read once) / ``--peak-tbs``; ``frac`` = floor / latency. The
triton output is checked against grouped_mm's (max abs difference / output scale).
A backend that fails prints its exact error and the run goes on.

``--formats`` (default dense,fp8,mxfp4): ``dense`` rows are the bf16 table above. ``fp8``
(block-scaled, ``--fp8-block``) and ``mxfp4`` rows time the triton kernels reading the
quantized weights (synthetic: random bf16-scale weights through moe_ext.quant.formats'
quantizers), next to the same kernels on the bf16 dequantized weights ("bf16"). Their
floor counts the bytes actually read: the quantized weights plus their scales, of the
experts that receive rows; GB/s = those bytes / latency. rel_err: quantized output vs
the bf16 path (max abs difference / output scale).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from moe_ext.bench.cli import positive_int_list  # noqa: E402
from moe_ext.moe.experts import GroupedExperts  # noqa: E402

SHAPES = {  # name: (H, F, E, k)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3": (2048, 768, 128, 8),
    "gpt_oss": (2880, 2880, 128, 4),  # gpt-oss-120b (fp8: H, F cut 128-blocks at the edge)
}
BACKENDS = ("grouped_mm", "triton")
FORMATS = ("dense", "fp8", "mxfp4")


def routed_counts(tokens: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """tokens_per_expert [E] int64 on the GPU for `tokens` tokens routed top-k."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(tokens, num_experts, device="cuda", generator=gen)
    idx = scores.topk(top_k, dim=-1).indices.flatten()  # [T*k]
    return torch.bincount(idx, minlength=num_experts).to(torch.int64)


def time_calls(calls, x, counts, iters) -> tuple[float, torch.Tensor]:
    """Median microseconds per call (one CUDA graph running every call of ``calls``, one per
    weight copy, in turn) and the output of the first."""
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture: autotune, compile
            for call in calls:
                call(x, counts)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = [call(x, counts) for call in calls]
        for _ in range(3):
            graph.replay()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times), outputs[0].clone()


def time_backend(modules, backend, x, counts, iters) -> tuple[float, torch.Tensor]:
    """time_calls of GroupedExperts modules (one per weight copy) on ``backend``."""
    for module in modules:
        module.backend = backend
    return time_calls(modules, x, counts, iters)


def decode_points(name, tokens_list, args):
    """Each decode size of ``tokens_list`` within --max-rows, for shape ``name``: yields
    (tokens_per_expert [E] int64, rows x [T', H] bf16, the row's shape fields)."""
    hidden, ffn, num_experts, top_k = SHAPES[name]
    for tokens in tokens_list:
        if tokens * top_k > args.max_rows:
            continue
        counts = routed_counts(tokens, num_experts, top_k, seed=tokens)
        touched = int((counts > 0).sum())  # host sync: benchmark bookkeeping only
        rows = tokens * top_k
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        shape = dict(shape=name, H=hidden, F=ffn, E=num_experts, k=top_k)
        yield counts, x, dict(shape, tokens=tokens, rows=rows, experts_touched=touched)


def timed(row: dict, label: str, floor_us: float, run, *run_args) -> Optional[torch.Tensor]:
    """``run(*run_args)`` -> (latency µs, output) into ``row[label_us]`` and
    ``row[label_frac]`` (floor / latency); a failure is printed and kept as
    ``row[label_error]``, and the run goes on. Returns the output, None on failure."""
    try:
        latency, output = run(*run_args)
    except Exception as exc:  # report and go on with the other backend
        traceback.print_exc()
        row[f"{label}_error"] = f"{type(exc).__name__}: {exc}"
        return None
    row[f"{label}_us"] = round(latency, 1)
    row[f"{label}_frac"] = round(floor_us / latency, 3)
    return output


def add_rel_err(row: dict, got: Optional[torch.Tensor], want: Optional[torch.Tensor]) -> None:
    """row["rel_err"]: max abs difference / output scale, when both outputs exist."""
    if got is not None and want is not None:
        diff = (got.float() - want.float()).abs().max().item()
        row["rel_err"] = round(diff / max(want.float().abs().max().item(), 1e-30), 5)


def bench_shape(name, tokens_list, args) -> list[dict]:
    hidden, ffn, num_experts, _ = SHAPES[name]
    torch.manual_seed(0)
    modules = [
        GroupedExperts(num_experts, hidden, ffn, dtype=torch.bfloat16, device="cuda")
        for _ in range(args.copies)
    ]
    expert_bytes = 3 * hidden * ffn * 2  # gate, up, down in bf16
    rows_out = []
    for counts, x, row in decode_points(name, tokens_list, args):
        floor_us = row["experts_touched"] * expert_bytes / (args.peak_tbs * 1e12) * 1e6
        row["floor_us"] = round(floor_us, 1)
        outputs = {}
        for backend in BACKENDS:
            outputs[backend] = timed(
                row, backend, floor_us, time_backend, modules, backend, x, counts, args.iters
            )
        add_rel_err(row, outputs["triton"], outputs["grouped_mm"])
        rows_out.append(row)
        print(format_row(row), flush=True)
    del modules
    torch.cuda.empty_cache()
    return rows_out


def quantized_copy(name, weight_format, block, seed):
    """One weight copy of shape ``name``: (stored tensors + kernel kwargs, bf16 dequantized
    (gate_up, down), bytes per expert actually read). Quantized per expert on the GPU so
    the float32 temporaries stay small."""
    from moe_ext.quant.formats import (
        dequantize_fp8,
        dequantize_mxfp4,
        quantize_fp8,
        quantize_mxfp4,
    )

    hidden, ffn, num_experts, _ = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    parts = {"gate_up": [], "down": []}
    for _ in range(num_experts):
        for part, shape in (("gate_up", (2 * ffn, hidden)), ("down", (hidden, ffn))):
            w = torch.randn(*shape, device="cuda", generator=gen) * shape[1] ** -0.5
            if weight_format == "fp8":
                q, scale = quantize_fp8(w, block)
                deq = dequantize_fp8(q, scale, block, torch.bfloat16)
            else:
                q, scale = quantize_mxfp4(w)
                deq = dequantize_mxfp4(q, scale, torch.bfloat16)
            parts[part].append((q, scale, deq))
    stacked = {
        part: [torch.stack([p[i] for p in items]) for i in range(3)]
        for part, items in parts.items()
    }
    (gate_up, gate_up_scale, gate_up_bf16), (down, down_scale, down_bf16) = (
        stacked["gate_up"],
        stacked["down"],
    )
    kernel = dict(
        gate_up_proj=gate_up,
        down_proj=down,
        weight_format=weight_format,
        gate_up_scale=gate_up_scale,
        down_scale=down_scale,
        fp8_block=block,
    )
    expert_bytes = sum(
        t[0].numel() * t.element_size() for t in (gate_up, gate_up_scale, down, down_scale)
    )
    return kernel, (gate_up_bf16, down_bf16), expert_bytes


def bench_quantized(name, weight_format, tokens_list, args) -> list[dict]:
    """Rows of the triton kernels on ``weight_format`` weights vs on their bf16 copies."""
    from moe_ext.moe.kernels import grouped_gemm

    hidden, ffn, _, _ = SHAPES[name]
    block = tuple(args.fp8_block)
    copies = [quantized_copy(name, weight_format, block, seed) for seed in range(args.copies)]
    expert_bytes = copies[0][2]
    bf16_expert_bytes = 3 * hidden * ffn * 2

    def quantized_call(kernel):
        kw = dict(kernel)
        gate_up, down = kw.pop("gate_up_proj"), kw.pop("down_proj")
        return lambda x, counts: grouped_gemm.swiglu_experts_forward(x, gate_up, down, counts, **kw)

    def bf16_call(weights):
        return lambda x, counts: grouped_gemm.swiglu_experts_forward(x, *weights, counts)

    calls = {
        "bf16": [bf16_call(weights) for _, weights, _ in copies],
        "triton": [quantized_call(kernel) for kernel, _, _ in copies],
    }
    rows_out = []
    for counts, x, base in decode_points(name, tokens_list, args):
        read = base["experts_touched"] * expert_bytes
        floor_us = read / (args.peak_tbs * 1e12) * 1e6
        bf16_floor_us = base["experts_touched"] * bf16_expert_bytes / (args.peak_tbs * 1e12) * 1e6
        row = dict(
            base,
            format=weight_format,
            fp8_block=list(block) if weight_format == "fp8" else None,
            bytes_read=read,
            floor_us=round(floor_us, 1),
            bf16_floor_us=round(bf16_floor_us, 1),
        )
        outputs = {}
        for label, floor in (("bf16", bf16_floor_us), ("triton", floor_us)):
            outputs[label] = timed(
                row, label, floor, time_calls, calls[label], x, counts, args.iters
            )
        if "triton_us" in row:
            row["triton_gbs"] = round(read / row["triton_us"] / 1e3, 1)
        add_rel_err(row, outputs["triton"], outputs["bf16"])
        rows_out.append(row)
        print(format_quant_row(row), flush=True)
    del copies, calls
    torch.cuda.empty_cache()
    return rows_out


HEADER = (
    f"{'shape':8} {'T':>4} {'rows':>4} {'E_hit':>5} {'floor_us':>9} {'grouped_us':>10} "
    f"{'frac':>5} {'triton_us':>9} {'frac':>5} {'speedup':>7} {'rel_err':>8}"
)


def format_row(r: dict) -> str:
    def num(key, fmt):
        return format(r[key], fmt) if key in r else "ERR".rjust(len(format(0.0, fmt)))

    speedup = (
        f"{r['grouped_mm_us'] / r['triton_us']:7.2f}"
        if "grouped_mm_us" in r and "triton_us" in r
        else f"{'-':>7}"
    )
    return (
        f"{r['shape']:8} {r['tokens']:4d} {r['rows']:4d} {r['experts_touched']:5d} "
        f"{r['floor_us']:9.1f} {num('grouped_mm_us', '10.1f')} {num('grouped_mm_frac', '5.2f')} "
        f"{num('triton_us', '9.1f')} {num('triton_frac', '5.2f')} {speedup} "
        f"{num('rel_err', '8.4f')}"
    )


QUANT_HEADER = (
    f"{'shape':8} {'fmt':5} {'T':>4} {'rows':>4} {'E_hit':>5} {'MB_read':>8} {'floor_us':>9} "
    f"{'bf16_us':>9} {'frac':>5} {'triton_us':>9} {'frac':>5} {'GB/s':>6} {'speedup':>7} "
    f"{'rel_err':>8}"
)


def format_quant_row(r: dict) -> str:
    """A quantized row: frac of bf16_us against the bf16 floor, of triton_us against the
    quantized floor; speedup = bf16_us / triton_us."""

    def num(key, fmt):
        return format(r[key], fmt) if key in r else "ERR".rjust(len(format(0.0, fmt)))

    speedup = (
        f"{r['bf16_us'] / r['triton_us']:7.2f}"
        if "bf16_us" in r and "triton_us" in r
        else f"{'-':>7}"
    )
    return (
        f"{r['shape']:8} {r['format']:5} {r['tokens']:4d} {r['rows']:4d} "
        f"{r['experts_touched']:5d} {r['bytes_read'] / 1e6:8.1f} {r['floor_us']:9.1f} "
        f"{num('bf16_us', '9.1f')} {num('bf16_frac', '5.2f')} {num('triton_us', '9.1f')} "
        f"{num('triton_frac', '5.2f')} {num('triton_gbs', '6.0f')} {speedup} "
        f"{num('rel_err', '8.4f')}"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--shapes", default="mixtral,qwen3", help=f"comma-separated from {sorted(SHAPES)}"
    )
    p.add_argument(
        "--tokens",
        type=positive_int_list,
        default=[1, 2, 4, 8, 16, 32, 64, 128],
        help="tokens per step; rows T' = tokens * k",
    )
    p.add_argument("--max-rows", type=int, default=256, help="skip points with more rows")
    p.add_argument("--copies", type=int, default=4, help="weight copies rotated per replay")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak-tbs", type=float, default=4.3, help="HBM TB/s for the floor")
    p.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help=f"comma-separated weight formats from {list(FORMATS)} (dense: bf16 table)",
    )
    p.add_argument(
        "--fp8-block",
        type=positive_int_list,
        default=[128, 128],
        help="fp8 weight_block_size: 'bo,bi', or one number for square blocks",
    )
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--report", type=Path, help="draw --png from this JSON, run nothing")
    p.add_argument("--png", type=Path, help="chart: latency per weight format against floors")
    args = p.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; use names from {sorted(SHAPES)}")
    formats = args.formats.split(",")
    if [f for f in formats if f not in FORMATS] or not formats:
        p.error(f"--formats {args.formats!r}: use names from {list(FORMATS)}")
    if len(args.fp8_block) == 1:
        args.fp8_block = args.fp8_block * 2
    if len(args.fp8_block) != 2 or args.fp8_block[1] % 16:
        p.error("--fp8-block: one or two integers, the columns a multiple of 16 (kernel tiles)")
    if args.copies < 1 or args.iters < 1:
        p.error("--copies and --iters must be >= 1")
    return args


def draw(rows: list[dict], png: Path) -> None:
    """Per shape: latency against rows, bf16 (Triton), fp8 and mxfp4 (Triton on the stored
    bytes), each with its HBM floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        mine = [r for r in rows if r["shape"] == shape]
        dense = [r for r in mine if "format" not in r and r.get("triton_us")]
        series = [("bf16", dense, "triton_us", "floor_us")]
        for fmt in ("fp8", "mxfp4"):
            series.append(
                (fmt, [r for r in mine if r.get("format") == fmt], "triton_us", "floor_us")
            )
        for (label, points, measured, floor), color in zip(series, ("C0", "C1", "C2")):
            if not points:
                continue
            x = [r["rows"] for r in points]
            ax.plot(x, [r[measured] for r in points], "o-", color=color, label=label)
            ax.plot(x, [r[floor] for r in points], "--", color=color, label=f"{label} floor")
        ax.set(xscale="log", yscale="log", xlabel="rows (tokens x top-k)", ylabel="us / forward")
        ax.set_title(f"{shape} experts")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"# chart: {png}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        draw(json.loads(args.report.read_text())["rows"], args.png or Path("bench_experts.png"))
        return 0
    if not torch.cuda.is_available():
        print("bench_experts: needs a CUDA GPU (times CUDA-graph replays)", file=sys.stderr)
        return 2
    began = time.perf_counter()
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 rows, "
        f"{args.copies} weight copies, floor at {args.peak_tbs} TB/s"
    )
    rows = []
    for weight_format in args.formats.split(","):
        if weight_format == "dense":
            print(HEADER, flush=True)
        else:
            print(f"# {weight_format}: triton on quantized weights vs on their bf16 copies")
            print(QUANT_HEADER, flush=True)
        for name in args.shapes.split(","):
            if weight_format == "dense":
                rows += bench_shape(name, args.tokens, args)
            else:
                rows += bench_quantized(name, weight_format, args.tokens, args)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"device": torch.cuda.get_device_name(), "peak_tbs": args.peak_tbs, "rows": rows},
                indent=1,
            )
        )
    if args.png:
        draw(rows, args.png)
    print(f"# {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

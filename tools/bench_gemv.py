"""Decode-size projections: the GEMV kernel (moe_ext::fused_gemv) against cuBLAS
(``F.linear``, one call per weight, as the model ran them before), against the HBM floor.

    python tools/bench_gemv.py --json gemv.json --png gemv.png
    python tools/bench_gemv.py --shapes qwen3_qkv,qwen3_o --rows 1,4,16
    python tools/bench_gemv.py --report gemv.json --png gemv.png     # chart only

# T rows, K in features, N_i out features of each weight sharing the input

Each shape is a model's projection set on one rank: ``*_qkv`` are q, k and v (one fused
launch against three cuBLAS calls), ``*_o`` the output projection, ``*_lm_head`` the LM
head; ``_tp2`` shapes are one rank's slices under tensor parallelism 2. Timing as
tools/bench_experts.py: every call runs on one of ``--copies`` weight copies in turn inside
one CUDA graph (the L2 cache does not hold the next call's weights), median replay /
copies. Floor: the weights' bytes / ``--peak-tbs``. rel_err: the kernel's output against
cuBLAS' (max abs difference / output scale).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moe_ext.bench.cli import positive_int_list  # noqa: E402
from tools.bench_experts import add_rel_err, time_calls, timed  # noqa: E402

SHAPES = {  # name: (K, [N_i])
    "qwen3_qkv": (2048, [4096, 512, 512]),
    "qwen3_o": (4096, [2048]),
    "qwen3_lm_head": (2048, [151936]),
    "mixtral_tp2_qkv": (4096, [2048, 512, 512]),
    "mixtral_tp2_o": (2048, [4096]),
    "qwen2_57b_tp2_qkv": (3584, [1792, 256, 256]),
    "qwen2_57b_tp2_o": (1792, [3584]),
}
BACKENDS = ("cublas", "gemv")


def bench_shape(name: str, rows_list: list[int], args) -> list[dict]:
    from moe_ext.moe.kernels import gemv

    in_features, outs = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    copies = [
        [torch.randn(n, in_features, device="cuda", generator=gen).bfloat16() for n in outs]
        for _ in range(args.copies)
    ]
    weight_bytes = sum(n * in_features * 2 for n in outs)
    floor_us = weight_bytes / (args.peak_tbs * 1e12) * 1e6
    calls = {
        "cublas": [
            (lambda x, _, ws=ws: torch.cat([F.linear(x, w) for w in ws], dim=-1)) for ws in copies
        ],
        "gemv": [(lambda x, _, ws=ws: gemv.fused_gemv(x, ws)) for ws in copies],
    }
    result = []
    for rows in rows_list:
        x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
        row = dict(shape=name, K=in_features, N=outs, rows=rows, floor_us=round(floor_us, 2))
        outputs = {
            b: timed(row, b, floor_us, time_calls, calls[b], x, None, args.iters) for b in BACKENDS
        }
        add_rel_err(row, outputs["gemv"], outputs["cublas"])
        result.append(row)
        print(
            f"{name:18} {rows:4d} {floor_us:8.2f} {row.get('cublas_us', float('nan')):9.2f} "
            f"{row.get('cublas_frac', float('nan')):5.2f} {row.get('gemv_us', float('nan')):9.2f} "
            f"{row.get('gemv_frac', float('nan')):5.2f} {row.get('rel_err', float('nan')):8.4f}",
            flush=True,
        )
    del copies, calls
    torch.cuda.empty_cache()
    return result


def draw(rows: list[dict], png: Path) -> None:
    """Per shape: share of the HBM floor against rows, cuBLAS and the GEMV kernel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    cols = min(len(shapes), 4)
    lines = -(-len(shapes) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.5 * cols, 3.6 * lines), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        mine = [r for r in rows if r["shape"] == shape]
        for backend, color in zip(BACKENDS, ("C0", "C1")):
            points = [r for r in mine if f"{backend}_frac" in r]
            ax.plot(
                [r["rows"] for r in points],
                [r[f"{backend}_frac"] for r in points],
                "o-",
                color=color,
                label=backend,
            )
        ax.set(xscale="log", ylim=(0, 1.05), xlabel="rows", ylabel="share of HBM floor")
        ax.set_title(f"{shape} (K={mine[0]['K']}, N={sum(mine[0]['N'])})", fontsize=9)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"# chart: {png}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--shapes", default=",".join(SHAPES), help=f"comma-separated from {list(SHAPES)}"
    )
    p.add_argument("--rows", type=positive_int_list, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--copies", type=int, default=4, help="weight copies rotated per replay")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak-tbs", type=float, default=4.3, help="HBM TB/s for the floor")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--report", type=Path, help="draw --png from this JSON, run nothing")
    p.add_argument("--png", type=Path, help="chart: share of the floor against rows")
    args = p.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; use names from {list(SHAPES)}")
    if max(args.rows) > 64:
        p.error("--rows: at most 64 (the kernel's row tile limit)")
    if args.copies < 1 or args.iters < 1:
        p.error("--copies and --iters must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        draw(json.loads(args.report.read_text())["rows"], args.png or Path("bench_gemv.png"))
        return 0
    if not torch.cuda.is_available():
        print("bench_gemv: needs a CUDA GPU (times CUDA-graph replays)", file=sys.stderr)
        return 2
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, "
        f"{args.copies} weight copies, floor at {args.peak_tbs} TB/s"
    )
    print(
        f"{'shape':18} {'rows':>4} {'floor_us':>8} {'cublas_us':>9} {'frac':>5} "
        f"{'gemv_us':>9} {'frac':>5} {'rel_err':>8}"
    )
    rows = []
    for name in args.shapes.split(","):
        rows += bench_shape(name, args.rows, args)
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        payload = {"device": torch.cuda.get_device_name(), "peak_tbs": args.peak_tbs, "rows": rows}
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(args.json)
    if args.png:
        draw(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())

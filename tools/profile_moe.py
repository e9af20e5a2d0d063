"""Where a replicated MoE layer's time goes on one GPU: eager vs CUDA-graph replay vs the
experts alone, then a torch.profiler table per shape.

    python3 tools/profile_moe.py [--tokens 1,16,256] [--shapes mixtral,qwen3]

# T tokens, H hidden, F expert FFN size, E experts, k top-k
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_ext.moe.layer import build_moe_layer  # noqa: E402

SHAPES = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8)}  # H, F, E, k


def median_us(fn, iters: int = 30) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()  # sync: read this iteration's timing
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def graph_us(layer, x) -> str:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            layer(x)
    except RuntimeError as err:
        return f"capture failed: {str(err).splitlines()[0][:80]}"
    return f"{median_us(graph.replay):.0f}"


def balanced_counts(rows: int, experts: int, device) -> torch.Tensor:
    """[E] int64: `rows` rows spread as evenly as possible, first experts first."""
    counts = torch.full((experts,), rows // experts, dtype=torch.int64, device=device)
    counts[: rows % experts] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,16,256")
    parser.add_argument("--shapes", default="mixtral,qwen3")
    opts = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    for name in opts.shapes.split(","):
        H, F, E, k = SHAPES[name]
        layer = build_moe_layer(H, F, E, k, dtype=torch.bfloat16, device=device).eval()
        with torch.no_grad():
            for T in map(int, opts.tokens.split(",")):
                x = torch.randn(T, H, device=device, dtype=torch.bfloat16)  # [T, H]
                rows = torch.randn(T * k, H, device=device, dtype=torch.bfloat16)  # [T*k, H]
                counts = balanced_counts(T * k, E, device)  # [E]
                eager = median_us(functools.partial(layer, x))
                experts_only = median_us(functools.partial(layer.experts, rows, counts))
                print(
                    f"{name} T={T}: eager {eager:.0f} us, graph {graph_us(layer, x)} us, "
                    f"experts only {experts_only:.0f} us",
                    flush=True,
                )
            x = torch.randn(16, H, device=device, dtype=torch.bfloat16)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    layer(x)
                torch.cuda.synchronize()
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=12, max_name_column_width=50
            )
        )
        del layer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

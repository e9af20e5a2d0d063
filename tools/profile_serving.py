"""The two GPU micro-measurements behind docs/PERF.md "Serving": an eager prefill forward's
time per chunk length (is it host- or GPU-bound?), and what torch.compile makes of a
per-row KV-cache write in two forms (through a transposed view of the buffer, as the cache
wrote before, and on the buffer itself, as ``KVCache.write`` does now).

    python3 tools/profile_serving.py [--model qwen3_30b_a3b] [--layers 8] \\
        [--lengths 256,512,2048]

# B rows, S chunk length, nKV kv heads, S_max cache slots, D head dim
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_ext.bench.train import bench_model_args  # noqa: E402
from moe_ext.model import Transformer  # noqa: E402
from moe_ext.model.weights import init_random_  # noqa: E402

CACHE_ROWS, CACHE_SLOTS = 64, 4096  # the serving engine's rows x max_context in PERF.md


def wall_ms(fn, iters: int = 5) -> float:
    """Mean wall time of ``fn`` after two warm-up calls (host and GPU together)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()  # sync: timing boundary
    began = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()  # sync: timing boundary
    return (time.perf_counter() - began) / iters * 1e3


def prefill(model: Transformer, length: int, per_row: bool):
    """One prompt chunk of ``length`` tokens into cache row 5: as the serving engine runs it
    (per-row slots, ``cache_rows``) or as launch/infer.py does (shared slots, rows 0..B-1)."""
    device = torch.device("cuda")
    tokens = torch.randint(0, 1000, (1, length), device=device)  # [1, S]
    slots = torch.arange(length, device=device)  # [S]
    zeros = torch.zeros(1, dtype=torch.long, device=device)  # [1]
    rows = torch.tensor([5], device=device) if per_row else None
    slots = slots[None] if per_row else slots  # [1, S] per row

    def run():
        return model(tokens, slots, zeros, length, last_only=True, use_cache=True, cache_rows=rows)

    return run


def prefill_section(name: str, layers: int, lengths: list[int]) -> None:
    args = bench_model_args(name, layers)
    with torch.device("meta"):
        model = Transformer(args)
    model = init_random_(model, device="cuda").to(torch.bfloat16).eval()
    model.setup_caches(CACHE_ROWS, CACHE_SLOTS)
    with torch.inference_mode():
        for length in lengths:
            for label, per_row in (("serve", True), ("infer", False)):
                ms = wall_ms(prefill(model, length, per_row))
                print(f"{label} S={length}: {ms:.1f} ms for {layers} layers", flush=True)
        run = prefill(model, lengths[-1], per_row=True)
        run()
        torch.cuda.synchronize()  # sync: the profile holds this forward only
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()  # sync: the forward's kernels end inside the profile
    ops = prof.key_averages()
    for sort in ("self_cpu_time_total", "self_device_time_total"):
        print(ops.table(sort_by=sort, row_limit=20))
    del model
    torch.cuda.empty_cache()


def kv_write_section() -> None:
    """A compiled one-slot write per row into a [64, 4, 4096, 128] bf16 buffer, read back
    in part, per form; batch 1 and 64 rows."""
    device = torch.device("cuda")
    cache = torch.zeros(CACHE_ROWS, 4, CACHE_SLOTS, 128, dtype=torch.bfloat16, device=device)
    heads = torch.arange(4, device=device)[None, :, None]  # [1, nKV, 1]

    def through_view(k, rows, slots):
        cache.transpose(1, 2).index_put_((rows, slots), k.transpose(1, 2))  # [B, S, nKV, D]
        return cache[:, :, :8].sum()

    def on_buffer(k, rows, slots):
        cache.index_put_((rows[:, None, :], heads, slots[:, None, :]), k)  # [B, nKV, S] index
        return cache[:, :, :8].sum()

    for batch in (1, CACHE_ROWS):
        k = torch.randn(batch, 4, 1, 128, dtype=torch.bfloat16, device=device)  # [B, nKV, 1, D]
        rows = torch.arange(batch, device=device)[:, None]  # [B, 1]
        slots = torch.full((batch, 1), 7, device=device)  # [B, 1]
        for label, form in (
            ("through a transposed view", through_view),
            ("on the buffer", on_buffer),
        ):
            torch._dynamo.reset()
            compiled = torch.compile(form, dynamic=False)
            with torch.inference_mode():
                us = wall_ms(functools.partial(compiled, k, rows, slots), iters=50) * 1e3
                written = bool((cache[:batch, :, 7] == k[:, :, 0]).all())
            print(f"B={batch} {label}: {us:.1f} us a call, written={written}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3_30b_a3b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lengths", default="256,512,2048")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: tools/profile_serving.py measures a GPU; run it where CUDA is available")
    prefill_section(opts.model, opts.layers, [int(n) for n in opts.lengths.split(",")])
    kv_write_section()


if __name__ == "__main__":
    main()

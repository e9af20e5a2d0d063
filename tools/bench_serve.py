"""Serving benchmark: a load generator for launch/serve.py (or any OpenAI-compatible server)
over HTTP, a concurrency sweep with a prompt-length mix, TTFT / inter-token latency
percentiles and output tokens/s; JSON rows and a PNG.

    torchrun --nproc-per-node 2 launch/serve.py strategy=ep_nccl server.max_batch_size=64 &
    python tools/bench_serve.py --url http://127.0.0.1:8000 --concurrency 1,4,16,64 \\
        --prompt-lens 32,128,512 --max-tokens 128 --json serve.json --png serve.png
    python tools/bench_serve.py ... --compare-infer "torchrun --nproc-per-node 2 \\
        launch/infer.py strategy=ep_nccl"        # + launch/infer.py's batch throughput
    python tools/bench_serve.py ... --hf /models/Qwen3-30B-A3B --hf-device cuda
    python tools/bench_serve.py --report serve.json --png serve.png   # table + chart only
    python tools/bench_serve.py --report serve.json --infer-json infer.json  # + bench_infer's

Each concurrency level C sends ``--requests`` requests (default max(2C, 8)) from C
closed-loop clients (a client sends its next request when its previous one ends), after one
warm-up request. Requests are streaming ``/v1/completions`` with token-id prompts (lengths
from ``--prompt-lens``, evenly mixed and shuffled; ids uniform in [0, ``--vocab``), so any
model with at least that many ids takes them), greedy, ``ignore_eos`` so each generates
exactly ``--max-tokens``. Per level: TTFT (send to first text chunk), inter-token latency
(gaps between successive text chunks, pooled over requests; a chunk holding several tokens,
e.g. a character cut across tokens, counts as one gap), TPOT ((end - first chunk) /
(tokens - 1) per request), end-to-end latency, p50 and p99 of each, and output tokens/s =
all generated tokens (the server's usage counts) / the level's wall time. Failed requests
(429, 503, error events) are counted in ``errors`` with their first message, not timed.

``--compare-infer [CMD]`` runs CMD (default: ``python launch/infer.py``; give it the same
model / strategy / parallel overrides as the server) once per level on the same prompts with
``generate.max_batch_size=C``, greedy, ``ignore_eos``, and records the prefill and decode
tok/s it logs; its ``output_tok_s`` is estimated from them (prompt tokens / prefill rate +
generated tokens / decode rate: model loading excluded, unlike a server level's wall time).
``--infer-json FILE`` does the same from rates ``tools/bench_infer.py`` measured (its row at
batch C; ``--infer-strategy`` picks the plan when the file holds several, ``auto`` the rows of
``--plans auto``), e.g. on another GPU while the server ran; it also adds to a ``--report``.
``--hf DIR`` loads DIR with transformers (AutoModelForCausalLM) and serves the first
``--hf-requests`` prompts one at a time (``generate``, greedy, exactly --max-tokens, an EOS
being one more token as under the server's ``ignore_eos``), timing
TTFT and inter-token latency with a streamer: the one-request-at-a-time baseline.

# C concurrency (clients), N requests of a level, L prompt length, M max tokens
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]

INFER_LINE = re.compile(r"prefill: ([\d.]+) tok/s\s+decode: ([\d.]+) tok/s\s+([\d.]+) ms/token")


class BenchError(Exception):
    """A benchmark that cannot go on (server unreachable, every request failed, ...)."""


# ---- prompts and statistics -------------------------------------------------------------


def make_prompts(count: int, lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """``count`` prompts of token ids in [0, vocab): lengths cycle through ``lengths`` (an
    even mix), then the order is shuffled; deterministic in ``seed``."""
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(vocab) for _ in range(lengths[i % len(lengths)])] for i in range(count)
    ]
    rng.shuffle(prompts)
    return prompts


def percentile(values: list[float], q: float) -> Optional[float]:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ms(value: Optional[float]) -> Optional[float]:
    return None if value is None else 1000.0 * value


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from the request's send."""

    prompt_tokens: int
    output_tokens: int = 0  # the server's usage count (else the chunk count)
    ttft_s: Optional[float] = None
    e2e_s: Optional[float] = None
    chunk_s: list[float] = field(default_factory=list)  # arrival of each text chunk
    text: str = ""
    output_ids: Optional[list[int]] = None  # --hf only
    finish_reason: Optional[str] = None
    error: Optional[str] = None

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])]

    def tpot_s(self) -> Optional[float]:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def summarize(
    kind: str, concurrency: int, results: list[RequestResult], wall_s: float, **extra
) -> dict[str, Any]:
    """A level's row: counts, output tok/s over ``wall_s``, p50 / p99 latencies in ms."""
    ok = [r for r in results if r.error is None]
    errors = [r for r in results if r.error is not None]
    gaps = [g for r in ok for g in r.gaps()]
    out_tokens = sum(r.output_tokens for r in ok)
    row = dict(
        kind=kind,
        concurrency=concurrency,
        requests=len(results),
        errors=len(errors),
        first_error=errors[0].error if errors else None,
        prompt_tokens_mean=sum(r.prompt_tokens for r in results) / max(len(results), 1),
        output_tokens=out_tokens,
        wall_s=wall_s,
        output_tok_s=out_tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
    )
    for name, values in (
        ("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]),
        ("itl", gaps),
        ("tpot", [t for t in (r.tpot_s() for r in ok) if t is not None]),
        ("e2e", [r.e2e_s for r in ok if r.e2e_s is not None]),
    ):
        row[f"{name}_p50_ms"] = _ms(percentile(values, 50))
        row[f"{name}_p99_ms"] = _ms(percentile(values, 99))
    row.update(extra)
    return row


# ---- the HTTP load generator ------------------------------------------------------------


async def stream_completion(
    client, base: str, model: str, prompt: list[int], max_tokens: int
) -> RequestResult:
    """One streaming greedy /v1/completions request of exactly ``max_tokens`` (ignore_eos),
    timed from its send; any failure is the result's ``error``, never an exception."""
    result = RequestResult(prompt_tokens=len(prompt))
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    begin = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {_error_message(text)}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"error event: {event['error'].get('message')}"
                    return result
                if event.get("usage"):
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
                for choice in event.get("choices") or []:
                    # a content chunk; textless ones come from servers without a tokenizer
                    if choice.get("text") or (
                        "text" in choice and choice.get("finish_reason") is None
                    ):
                        now = time.perf_counter() - begin
                        result.chunk_s.append(now)
                        result.text += choice["text"]
                        chunks += 1
                        if result.ttft_s is None:
                            result.ttft_s = now
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
    except Exception as err:  # noqa: BLE001 - a failed request is counted, the level goes on
        result.error = f"{type(err).__name__}: {err}"
        return result
    result.e2e_s = time.perf_counter() - begin
    if not result.output_tokens:
        result.output_tokens = chunks
    if result.finish_reason not in ("length", "stop"):
        result.error = f"finished with {result.finish_reason!r}"
    return result


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


async def _run_level(
    base: str, model: str, prompts: list[list[int]], concurrency: int, max_tokens: int, timeout_s
) -> tuple[list[RequestResult], float]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency)
    results: list[Optional[RequestResult]] = [None] * len(prompts)
    todo = iter(range(len(prompts)))

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            for i in todo:  # shared iterator: each index is taken by one worker
                results[i] = await stream_completion(client, base, model, prompts[i], max_tokens)

        begin = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - begin
    return [r for r in results if r is not None], wall_s


def run_level(
    base: str,
    model: str,
    prompts: list[list[int]],
    concurrency: int,
    max_tokens: int,
    timeout_s: float = 600.0,
) -> tuple[list[RequestResult], float]:
    """Send ``prompts`` from ``concurrency`` closed-loop clients; (results in prompt order,
    wall seconds from the first send to the last answer)."""
    return asyncio.run(_run_level(base, model, prompts, concurrency, max_tokens, timeout_s))


def server_model(base: str, timeout_s: float = 30.0) -> str:
    """The first model id /v1/models lists (the name requests must carry)."""
    import httpx

    try:
        resp = httpx.get(f"{base}/v1/models", timeout=timeout_s)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
        raise BenchError(
            f"no model list at {base}/v1/models ({err}); start launch/serve.py first or fix --url"
        ) from err


def sweep(
    base: str,
    levels: list[int],
    lengths: list[int],
    max_tokens: int,
    vocab: int,
    requests: Optional[int] = None,
    seed: int = 0,
    model: Optional[str] = None,
    timeout_s: float = 600.0,
    on_row=None,
) -> tuple[list[dict], dict[int, list[list[int]]]]:
    """Every concurrency level against the server at ``base``: (rows, each level's
    prompts). One warm-up request first; a level where every request failed ends the sweep
    with BenchError (the server is gone or refuses everything)."""
    model = model or server_model(base)
    warm, _ = run_level(base, model, make_prompts(1, lengths[:1], vocab, seed), 1, 2, timeout_s)
    if warm[0].error:
        raise BenchError(f"the warm-up request failed: {warm[0].error}")
    rows, level_prompts = [], {}
    for c in levels:
        n = requests or max(2 * c, 8)
        prompts = make_prompts(n, lengths, vocab, seed + c)
        level_prompts[c] = prompts
        results, wall_s = run_level(base, model, prompts, c, max_tokens, timeout_s)
        row = summarize(
            "serve", c, results, wall_s, model=model, max_tokens=max_tokens, prompt_lens=lengths
        )
        rows.append(row)
        if on_row:
            on_row(row)
        if row["errors"] == row["requests"]:
            raise BenchError(
                f"every request at concurrency {c} failed (first: {row['first_error']})"
            )
    return rows, level_prompts


# ---- launch/infer.py at the same concurrency --------------------------------------------


def infer_output_tok_s(
    prompt_tokens: int, generated: int, requests: int, prefill_tok_s: float, decode_tok_s: float
) -> float:
    """launch/infer.py's output tok/s on a level's work, from its prefill and decode rates:
    generated / (prompt tokens / prefill rate + (generated - requests) / decode rate); each
    request's first id comes with its prefill. Model loading is excluded."""
    busy_s = prompt_tokens / max(prefill_tok_s, 1e-9) + max(generated - requests, 0) / max(
        decode_tok_s, 1e-9
    )
    return generated / busy_s if busy_s > 0 else 0.0


def infer_rows_from_bench(
    path: str, serve_rows: list[dict], strategy: Optional[str] = None
) -> list[dict]:
    """An infer row per serve level C from tools/bench_infer.py's JSON (``path``): its row at
    batch C (of ``strategy`` when the file holds several plans), whose prefill and decode
    rates are applied to the level's own prompts and outputs (``infer_output_tok_s``).
    Levels without a row at their batch get none."""
    try:
        bench_rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BenchError(
            f"--infer-json {path}: not a tools/bench_infer.py JSON ({err}); give the file its "
            f"--json wrote"
        ) from err
    if strategy == "auto":  # bench_infer --plans auto: the plan auto picked per batch
        bench_rows = [r for r in bench_rows if r.get("auto_pick")]
    elif strategy is not None:
        bench_rows = [
            r for r in bench_rows if r.get("strategy") == strategy and not r.get("auto_pick")
        ]
    out = []
    for level in (r for r in serve_rows if r["kind"] == "serve"):
        at_batch = [r for r in bench_rows if r.get("batch") == level["concurrency"]]
        if len(at_batch) > 1:
            plans = sorted({str(r.get("strategy")) for r in at_batch})
            raise BenchError(
                f"--infer-json {path} has {len(at_batch)} rows at batch {level['concurrency']} "
                f"({', '.join(plans)}); pick one with --infer-strategy"
            )
        if not at_batch:
            continue
        bench = at_batch[0]
        n, generated = level["requests"], level["output_tokens"]
        prompt_tokens = round(level["prompt_tokens_mean"] * n)
        out.append(
            dict(
                kind="infer",
                concurrency=level["concurrency"],
                requests=n,
                errors=0,
                prompt_tokens_mean=level["prompt_tokens_mean"],
                output_tokens=generated,
                output_tok_s=infer_output_tok_s(
                    prompt_tokens, generated, n, bench["prefill_tok_s"], bench["decode_tok_s"]
                ),
                prefill_tok_s=bench["prefill_tok_s"],
                decode_tok_s=bench["decode_tok_s"],
                source=f"{path} ({bench.get('strategy')}, batch {bench['batch']}, prompt "
                f"{bench.get('prompt_len')})",
            )
        )
    return out


def infer_row(
    command: list[str], prompts: list[list[int]], concurrency: int, max_tokens: int
) -> dict[str, Any]:
    """Run launch/infer.py (``command``: the launcher and its model overrides) on
    ``prompts`` with ``generate.max_batch_size=concurrency``; its logged prefill / decode
    rates as a row (``outputs``: the generated ids per prompt, from its output file)."""
    with tempfile.TemporaryDirectory(prefix="bench_serve_infer_") as tmp:
        prompts_file, output_file = Path(tmp, "prompts.jsonl"), Path(tmp, "out.jsonl")
        prompts_file.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in prompts))
        full = command + [
            f"prompts={prompts_file}",
            f"output={output_file}",
            f"generate.max_new_tokens={max_tokens}",
            "generate.ignore_eos=true",
            "generate.temperature=0",
            f"generate.max_batch_size={concurrency}",
        ]
        begin = time.perf_counter()
        proc = subprocess.run(full, cwd=tmp, capture_output=True, text=True)
        wall_s = time.perf_counter() - begin
        log = proc.stdout + proc.stderr
        match = INFER_LINE.search(log)
        if proc.returncode != 0 or match is None:
            tail = "\n".join(log.strip().splitlines()[-5:])
            raise BenchError(
                f"{shlex.join(command)} exited {proc.returncode} without a throughput line; "
                f"its last lines:\n{tail}"
            )
        outputs = [json.loads(line)["output_ids"] for line in output_file.read_text().splitlines()]
    prefill_tok_s, decode_tok_s, ms_per_token = map(float, match.groups())
    prompt_tokens = sum(map(len, prompts))
    generated = sum(map(len, outputs))
    return dict(
        kind="infer",
        concurrency=concurrency,
        requests=len(prompts),
        errors=0,
        prompt_tokens_mean=prompt_tokens / max(len(prompts), 1),
        output_tokens=generated,
        output_tok_s=infer_output_tok_s(
            prompt_tokens, generated, len(prompts), prefill_tok_s, decode_tok_s
        ),
        prefill_tok_s=prefill_tok_s,
        decode_tok_s=decode_tok_s,
        ms_per_token=ms_per_token,
        process_wall_s=wall_s,
        command=shlex.join(command),
        max_tokens=max_tokens,
        outputs=outputs,
    )


# ---- transformers, one request at a time ------------------------------------------------


def hf_rows(
    directory: str,
    prompts: list[list[int]],
    max_tokens: int,
    device: str = "cpu",
    dtype: str = "auto",
) -> list[dict[str, Any]]:
    """transformers ``generate`` on ``directory``'s model, each prompt alone (greedy,
    exactly ``max_tokens`` new tokens): one row at concurrency 1 with TTFT / ITL from a
    streamer's token times; the row's ``outputs`` are the generated ids per prompt."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Timer(BaseStreamer):
        """Token arrival times: generate puts the prompt first, then each new token."""

        def __init__(self, begin: float):
            self.begin, self.times, self.prompt_seen = begin, [], False

        def put(self, value) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter() - self.begin)

        def end(self) -> None:
            pass

    dtype_arg = {"auto": "auto", "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype_arg)
    model = model.to(device).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def generate(ids: list[int], n: int, streamer=None):
        tokens = torch.tensor([ids], device=device)  # [1, L]
        with torch.no_grad():
            out = model.generate(
                tokens,
                attention_mask=torch.ones_like(tokens),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,  # EOS is one more token (as the server's ignore_eos)
                pad_token_id=0,
                streamer=streamer,
            )  # [1, L + n]
        return out[0, len(ids) :].tolist()  # sync: the ids to the host

    generate(prompts[0], 2)  # warm-up: kernels, allocator
    results = []
    begin_all = time.perf_counter()
    for ids in prompts:
        sync()
        begin = time.perf_counter()
        timer = Timer(begin)
        out = generate(ids, max_tokens, timer)
        sync()
        results.append(
            RequestResult(
                prompt_tokens=len(ids),
                output_tokens=len(out),
                ttft_s=timer.times[0] if timer.times else None,
                e2e_s=time.perf_counter() - begin,
                chunk_s=timer.times,
                output_ids=out,
                finish_reason="length",
            )
        )
    wall_s = time.perf_counter() - begin_all
    row = summarize(
        "hf",
        1,
        results,
        wall_s,
        model=str(directory),
        max_tokens=max_tokens,
        device=device,
        outputs=[r.output_ids for r in results],
    )
    return [row]  # the model is freed with this frame


# ---- report -----------------------------------------------------------------------------


def _fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'kind':6} {'C':>4} {'reqs':>5} {'err':>4} {'out tok/s':>10} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'TPOT p50':>9} (ms)"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    for r in rows:
        print(
            f"{r['kind']:6} {r['concurrency']:>4} {r['requests']:>5} {r.get('errors', 0):>4} "
            f"{r['output_tok_s']:>10.1f} {_fmt(r.get('ttft_p50_ms')):>9} "
            f"{_fmt(r.get('ttft_p99_ms')):>9} {_fmt(r.get('itl_p50_ms')):>8} "
            f"{_fmt(r.get('itl_p99_ms')):>8} {_fmt(r.get('tpot_p50_ms')):>9}",
            flush=True,
        )


def write_json(rows: list[dict], path: str, meta: dict) -> None:
    target = Path(path)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, target)


def draw_chart(rows: list[dict], png_path: str, title: str = "") -> None:
    """Three panels over concurrency (log2 axis): output tok/s (serve, infer, hf), TTFT
    p50 / p99 and inter-token latency p50 / p99 (ms, log scale)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"serve": ("tab:blue", "o"), "infer": ("tab:green", "s"), "hf": ("tab:gray", "^")}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for kind, (color, marker) in style.items():
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["concurrency"])
        if not mine:
            continue
        cs = [r["concurrency"] for r in mine]
        label = {"serve": "launch/serve.py", "infer": "launch/infer.py batch", "hf": "transformers"}
        axes[0].plot(
            cs, [r["output_tok_s"] for r in mine], marker=marker, color=color, label=label[kind]
        )
        for ax, name in ((axes[1], "ttft"), (axes[2], "itl")):
            for q, dash in (("p50", "-"), ("p99", "--")):
                points = [
                    (c, r[f"{name}_{q}_ms"]) for c, r in zip(cs, mine) if r.get(f"{name}_{q}_ms")
                ]
                if points:
                    ax.plot(
                        *zip(*points),
                        dash,
                        marker=marker,
                        color=color,
                        label=f"{label[kind]} {q}",
                    )
    axes[0].set(ylabel="output tokens/s", title="throughput")
    axes[1].set(ylabel="ms", yscale="log", title="time to first token")
    axes[2].set(ylabel="ms", yscale="log", title="inter-token latency")
    levels = sorted({r["concurrency"] for r in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("concurrent requests")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, comma-separated")
    return values


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--model", help="model name to send (default: the first /v1/models id)")
    parser.add_argument("--concurrency", type=_ints, default=[1, 4, 16, 64])
    parser.add_argument("--prompt-lens", type=_ints, default=[32, 128, 512])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, help="requests per level (default max(2C, 8))")
    parser.add_argument("--vocab", type=int, default=256, help="prompt ids are in [0, vocab)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    parser.add_argument(
        "--compare-infer",
        nargs="?",
        const=f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'launch/infer.py'))}",
        help="also run this launch/infer.py command (default: python launch/infer.py) per "
        "level; give it the server's model/strategy overrides",
    )
    parser.add_argument(
        "--infer-json",
        metavar="FILE",
        help="tools/bench_infer.py's JSON: an infer row per level from its row at batch C "
        "(its prefill and decode rates applied to the level's prompts); with --report too",
    )
    parser.add_argument(
        "--infer-strategy", help="the --infer-json plan if it holds several (auto: auto's picks)"
    )
    parser.add_argument("--hf", metavar="DIR", help="also serve through transformers from DIR")
    parser.add_argument("--hf-device", default="cpu")
    parser.add_argument("--hf-dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--hf-requests", type=int, default=8, help="prompts transformers serves")
    parser.add_argument("--json")
    parser.add_argument("--png")
    parser.add_argument("--report", help="print and chart this JSON, without running anything")
    opts = parser.parse_args(argv)
    if opts.report:
        data = json.loads(Path(opts.report).read_text())
        rows = data["rows"]
        if opts.infer_json:
            try:
                rows = rows + infer_rows_from_bench(opts.infer_json, rows, opts.infer_strategy)
            except BenchError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        print_table(rows)
        if opts.png:
            draw_chart(rows, opts.png, data.get("meta", {}).get("title", ""))
        return 0
    base = opts.url.rstrip("/")
    try:
        rows, level_prompts = sweep(
            base,
            opts.concurrency,
            opts.prompt_lens,
            opts.max_tokens,
            opts.vocab,
            requests=opts.requests,
            seed=opts.seed,
            model=opts.model,
            timeout_s=opts.timeout_s,
            on_row=lambda row: print(json.dumps(row), flush=True),
        )
        model = rows[0]["model"]
        if opts.compare_infer:
            command = shlex.split(opts.compare_infer)
            for c in opts.concurrency:
                rows.append(infer_row(command, level_prompts[c], c, opts.max_tokens))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "outputs"}), flush=True)
        if opts.infer_json:
            rows += infer_rows_from_bench(opts.infer_json, rows, opts.infer_strategy)
        if opts.hf:
            first = level_prompts[opts.concurrency[0]][: opts.hf_requests]
            rows += hf_rows(opts.hf, first, opts.max_tokens, opts.hf_device, opts.hf_dtype)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    title = (
        f"{model}: prompts {'/'.join(map(str, opts.prompt_lens))} tokens + "
        f"{opts.max_tokens} new ({time.strftime('%Y-%m-%d')})"
    )
    print_table(rows)
    meta = dict(url=base, title=title, date=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv)
    if opts.json:
        write_json(rows, opts.json, meta)
    if opts.png:
        draw_chart(rows, opts.png, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())

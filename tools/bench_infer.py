"""End-to-end generation benchmark on synthetic weights: prefill and decode throughput per
strategy and batch size, against the HBM floor of the weights each decode step must read.

    python3 tools/bench_infer.py --model qwen3_30b_a3b --batches 1,16,64
    torchrun --nproc-per-node 2 tools/bench_infer.py --strategy ep_nccl --batches 16
    torchrun --nproc-per-node 2 tools/bench_infer.py --strategy replicate --profile
    python3 tools/bench_infer.py --batches 1,16 --peers hf   # + transformers generate, 1 GPU
    python3 tools/bench_infer.py --report rows.json --png decode.png  # table + chart only

Weights are generated on the GPU (the launcher's deterministic random init, this rank's
shard only); each batch runs once to warm up (autotuning, CUDA-graph capture), then once
timed. strategy=auto (the default) plans per batch, as the launcher would for a job of that
many prompts, and runs each distinct pick on the batches it was picked for (e.g. attention
tp x ep at batch 1, ep with data-parallel attention at 64). Prints a table last; --json
writes the rows, --png a chart (decode tok/s by batch).
``--peers hf`` then frees our model and runs Hugging Face transformers ``generate`` (greedy,
eager, its default cache) on the same shapes with random weights on rank 0's device, timed
the same way (moe_ext.bench.peers.hf_generate_timed). Every row records library versions.

# B batch, E experts, k top-k
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe_ext.bench.collectives import decode_step_collectives, total  # noqa: E402
from moe_ext.bench.peers import (  # noqa: E402
    hf_causal_lm,
    hf_decode_floor_s,
    hf_generate_timed,
    library_versions,  # noqa: E402
)
from moe_ext.cli import infer  # noqa: E402  (the launcher's own prepare/build_model)
from moe_ext.cost import predict, rank_plans, select_profile  # noqa: E402
from moe_ext.dist import DistEnv, init_distributed, peak_memory_bytes  # noqa: E402
from moe_ext.groups import ProcessGroups  # noqa: E402
from moe_ext.launching import exit_now  # noqa: E402

HBM_BYTES_PER_S = 4.3e12  # measured device-to-device copy on the H200s here


def expert_touch_probability(batch_tokens: int, num_experts: int, top_k: int) -> float:
    """Chance that a given expert receives at least one of ``batch_tokens`` tokens under
    uniform top-k routing (what a decode step must read of it)."""
    return 1.0 - (1.0 - top_k / num_experts) ** batch_tokens


def decode_floor_s(model, args, tokens_reaching_experts: int) -> float:
    """Bytes this rank must read per decode step ÷ HBM bandwidth: every local non-expert
    weight once, and each local expert's weights with the chance it is routed to, as
    stored (quantized weights: their FP8 / MXFP4 bytes and scales)."""
    p = expert_touch_probability(
        tokens_reaching_experts, args.num_experts, args.num_experts_per_tok
    )
    total = 0.0
    # parameters and persistent buffers (quantized weights are buffers)
    for name, param in model.state_dict(keep_vars=True).items():
        nbytes = param.numel() * param.element_size()
        if name == "embed_tokens.weight" and model.lm_head is not None:
            continue  # decode reads B rows of the embedding, not the table
        total += nbytes * (p if ".mlp.experts." in name else 1.0)
    return total / HBM_BYTES_PER_S


def synthetic_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3_30b_a3b")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: a functional dry run (timings mean little)",
    )
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="decode blocks eager (no torch.compile), for comparison",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print a torch.profiler table of 4 eager decode steps (batch = first)",
    )
    parser.add_argument(
        "--peers",
        default="",
        choices=["", "hf"],
        help="hf: also time transformers generate on one device, same shapes",
    )
    parser.add_argument(
        "--plans",
        default="",
        help="auto | all | auto,all | topN: the plan auto picks and/or the plans moe_ext.cost "
        "ranks as fitting, instead of --strategy (all/topN need a machine profile)",
    )
    parser.add_argument("--json")
    parser.add_argument(
        "--report", help="print the table and draw --png from this JSON, without running anything"
    )
    parser.add_argument("--png")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (parallel.tp=2 ...)")
    opts = parser.parse_args()
    if opts.report:
        report(json.loads(Path(opts.report).read_text())["rows"], None, opts.png)
        return

    env = DistEnv.from_environ(os.environ)
    batches = [int(b) for b in opts.batches.split(",")]
    overrides = [
        f"model={opts.model}",
        f"strategy={'auto' if opts.plans else opts.strategy}",
        f"device={opts.device}",
        f"generate.max_new_tokens={opts.new_tokens}",
        "generate.ignore_eos=true",
        f"generate.cuda_graphs={not opts.no_cuda_graphs}",
        f"generate.compile_decode={not opts.no_compile}",
        f"generate.max_batch_size={max(batches)}",
        *opts.overrides,
    ]
    cfg, job = prepared(overrides, env, opts.prompt_len, max(batches))
    device = init_distributed(env, job.device_type, cfg.dist_timeout_s)
    profile = select_profile(cfg.plan.profile, job.topology).profile
    specs = plan_specs(opts.plans, job, profile, max(batches), opts.prompt_len, env.world_size)
    runs = []  # (cfg, job, batches) per plan
    for spec in specs:
        if spec:
            runs.append((*prepared(overrides + spec, env, opts.prompt_len, max(batches)), batches))
        elif job.plan.reason.startswith("auto"):
            runs += auto_runs(overrides, env, opts.prompt_len, batches)
        else:
            runs.append((cfg, job, batches))
    rows: list[dict] = []
    model = None
    for cfg, job, plan_batches in runs:
        if model is not None:  # the next plan: its own process groups and weights
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        model = bench_plan(opts, cfg, job, env, device, plan_batches, profile, rows)
    if opts.profile:
        profile_decode(model, cfg, job, batches[0], opts.prompt_len, env.rank)
    if opts.peers == "hf":
        del model  # room for the peer's copy of the weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if env.rank == 0:
            rows += hf_peer_rows(job, opts, batches, device)
        dist.barrier()
    if env.rank == 0:
        report(rows, opts.json, opts.png)
    if device.type != "cuda":
        dist.destroy_process_group()
    exit_now(0)


def prepared(overrides: list[str], env, prompt_len: int, batch: int):
    """(cfg, job) of the launcher's own ``prepare`` for a job of ``batch`` prompts of
    ``prompt_len`` tokens: auto plans for the batch it is told (its prompt count)."""
    # the launcher validates a prompts file (lengths against the context): give it one
    prompts_file = Path(tempfile.gettempdir()) / f"bench_infer_prompts_{env.rank}_{batch}.jsonl"
    prompts_file.write_text((json.dumps({"prompt_ids": [1] * prompt_len}) + "\n") * batch)
    cfg = infer_conf([*overrides, f"prompts={prompts_file}"])
    return cfg, infer.prepare(cfg, env, torch.cuda.is_available(), torch.cuda.device_count())


def auto_runs(overrides: list[str], env, prompt_len: int, batches: list[int]) -> list[tuple]:
    """strategy=auto picks per batch (e.g. tp x ep below the replicas, ep with dp above):
    (cfg, job, batches) for each distinct pick, with the batches it was picked for."""
    runs: dict[tuple, tuple] = {}
    for batch in batches:
        cfg, job = prepared(overrides, env, prompt_len, batch)
        p = job.plan
        key = (p.strategy, p.tp, p.pp, p.dp, p.ep, p.etp)
        if key not in runs:
            runs[key] = (cfg, job, [])
        runs[key][2].append(batch)
    return list(runs.values())


def plan_specs(
    plans: str, job, profile, batch: int, prompt_len: int, world_size: int
) -> list[list[str]]:
    """Hydra overrides of each plan to run, ``[]`` for ``job``'s own plan: ``[[]]`` (the
    --strategy one) without --plans; else auto's pick (``auto``: main() prepared ``job``
    with strategy=auto), the plans moe_ext.cost ranks as fitting, fastest first (``all``,
    ``topN``), or both, auto first and no plan twice."""
    wanted = [w.strip() for w in plans.split(",") if w.strip()]
    if not wanted:
        return [[]]
    bad = [w for w in wanted if w not in ("auto", "all") and not re.fullmatch(r"top\d+", w)]
    if bad:
        raise SystemExit(f"--plans {plans}: {bad} not one of auto, all, topN")
    chosen = []  # (plan, overrides); auto's pick is the job main() prepared with auto
    if "auto" in wanted:
        chosen.append((job.plan, []))
    ranked_wanted = [w for w in wanted if w != "auto"]
    if ranked_wanted:
        if profile is None:
            raise SystemExit(
                "--plans all/topN ranks plans with a machine profile: give plan.profile=<file> "
                "(tools/calibrate.py) or run where a shipped profile matches the topology"
            )
        gpus = [g.memory_bytes for g in job.topology.gpus]
        ranked = rank_plans(
            job.source.args,
            profile,
            world_size,
            batch=batch,
            prompt_len=prompt_len,
            dtype_bytes=torch.finfo(job.dtype).bits // 8,
            available_bytes=min(gpus) if gpus else None,
            topology=job.topology,
        )
        fitting = [r.plan for r in ranked if r.prediction.fits is not False]
        n = len(fitting)
        for w in ranked_wanted:
            if w.startswith("top"):
                n = min(n, int(w[3:]))
        for plan in fitting[:n]:
            spec = [f"strategy={plan.strategy}", f"parallel.tp={plan.tp}", f"parallel.pp={plan.pp}"]
            if plan.is_expert_parallel:
                spec.append(f"parallel.ep={plan.ep}")
            chosen.append((plan, spec))
    specs, seen = [], set()
    for plan, spec in chosen:
        key = (plan.strategy, plan.tp, plan.pp, plan.ep)
        if key not in seen:
            seen.add(key)
            specs.append(spec)
    return specs


def bench_plan(opts, cfg, job, env, device, batches: list[int], profile, rows: list[dict]):
    """Build ``job.plan``'s groups and weights, time every batch, append whole-job rows
    (rank 0 prints each); returns the model (for --profile / --peers)."""
    groups = ProcessGroups.build(
        job.plan,
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=timedelta(seconds=300),
    )
    t0 = time.perf_counter()
    model = infer.build_model(job, groups, env.rank, device)
    synchronize(device)  # sync: time the weight init
    if env.rank == 0:
        print(
            f"plan: {job.plan.describe()}\nweights ready in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    args = job.source.args
    collectives = step_collectives(model, job.plan, batches)
    if env.rank == 0:
        print(f"collectives per decode step (rank 0): {collectives}", flush=True)
    for batch in batches:
        if batch < job.plan.dp:
            if env.rank == 0:
                print(
                    f"batch {batch} skipped: fewer sequences than the plan's {job.plan.dp} "
                    f"replicas (dp); strategy=auto picks attention tp x ep at such batches",
                    flush=True,
                )
            continue
        prompts = synthetic_prompts(batch, opts.prompt_len, args.vocab_size, seed=batch)
        run = functools.partial(
            infer.generate, model, prompts, cfg.generate, eos_id=None, pad_id=0, seed=0
        )
        run()  # warm-up: autotune, graph capture for this batch and cache size
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = run()
        job_stats = whole_job(result, job.plan, env.world_size, device)
        replicas = job.plan.dp  # each replica decodes its own slice of the batch
        per_replica = -(-batch // replicas)
        reaching = batch if job.plan.is_expert_parallel else per_replica
        floor = decode_floor_s(model, args, reaching)
        step_s = job_stats["step_s"]
        predicted = None
        if profile is not None:
            predicted = predict(
                job.plan,
                args,
                profile,
                batch,
                opts.prompt_len,
                dtype_bytes=torch.finfo(job.dtype).bits // 8,
            )
        rows.append(
            dict(
                model=opts.model,
                strategy=job.plan.strategy,
                world=env.world_size,
                plan=job.plan.describe().split(" | auto")[0],
                batch=batch,
                degrees=degrees(job.plan),
                prompt_len=opts.prompt_len,
                new_tokens=opts.new_tokens,
                prefill_tok_s=job_stats["prefill_tok_s"],
                decode_tok_s=job_stats["decode_tok_s"],
                ms_per_step=1000 * step_s,
                prefill_ms=1000 * job_stats["prefill_s"],
                floor_ms_per_step=1000 * floor,
                fraction_of_floor=floor / step_s if step_s else 0.0,
                predicted_ms_per_step=predicted.decode_ms if predicted else None,
                predicted_prefill_ms=predicted.prefill_ms if predicted else None,
                profile=profile.name if profile is not None else None,
                auto_pick=job.plan.reason.startswith("auto"),
                cuda_graphs=result.cuda_graphs,
                compiled=bool(model.compiled_decode_block) and device.type == "cuda",
                collectives_per_step=collectives,
                peak_gib=peak_memory_bytes(device) / 2**30,
                nccl_p2p_disable=os.environ.get("NCCL_P2P_DISABLE", "0"),
                torch=torch.__version__,
                versions=library_versions(),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                date=time.strftime("%Y-%m-%d"),
            )
        )
        if env.rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    return model


def step_collectives(model, plan, batches: list[int]) -> dict[str, int]:
    """Collectives and p2p operations of one eager decode step on this rank, by kind
    (moe_ext.bench.collectives), at the first batch every replica gets a sequence of, under
    the static expert-exchange capacity generate's decode uses (expert-parallel plans).
    The kinds do not depend on the batch, so once per plan; collective over every rank."""
    runnable = [b for b in batches if b >= plan.dp] or [plan.dp]
    batch = -(-runnable[0] // plan.dp)  # sequences per replica
    capacity = batch if plan.is_expert_parallel else None
    return decode_step_collectives(model, batch, capacity=capacity)


def whole_job(result, plan, world_size: int, device: torch.device) -> dict[str, float]:
    """The job's throughput, not one rank's: tokens summed over the ranks (each replica's
    TP/PP members count its tokens once) over the slowest rank's time (all-reduce MAX), so
    a rank that had no sequence neither reports zero nor speeds the job up. Seconds and
    tokens per second; collective over every rank."""
    tokens = torch.tensor(
        [result.prefill_tokens, result.decode_tokens], dtype=torch.float64, device=device
    )
    times = torch.tensor(
        [result.prefill_s, result.decode_s, result.decode_steps], dtype=torch.float64, device=device
    )
    if dist.is_initialized():
        dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    prefill_tokens, decode_tokens = tokens.tolist()  # sync: the row is written on the host
    prefill_s, decode_s, steps = times.tolist()
    copies = max(1, world_size // plan.dp)  # ranks of one replica (its TP x PP group)
    return dict(
        prefill_tok_s=prefill_tokens / copies / max(prefill_s, 1e-9),
        decode_tok_s=decode_tokens / copies / max(decode_s, 1e-9),
        prefill_s=prefill_s,
        step_s=decode_s / max(steps, 1),
    )


def hf_peer_rows(job, opts, batches: list[int], device: torch.device) -> list[dict]:
    """transformers generate on one device, same model shape and prompts; a failure prints
    its traceback and gives no rows (the rest of the table still comes out)."""
    import traceback

    args = job.source.args
    try:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = hf_causal_lm(args, dtype=job.dtype, device=device)
        synchronize(device)  # sync: time the weight init
        print(f"hf peer: weights ready in {time.perf_counter() - t0:.1f} s", flush=True)
    except Exception:  # noqa: BLE001 - reported, the native rows still print
        print(f"hf peer failed to build:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return []
    rows = []
    for batch in batches:
        try:
            prompts = torch.tensor(
                synthetic_prompts(batch, opts.prompt_len, args.vocab_size, seed=batch),
                device=device,
            )  # [B, S]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timed = hf_generate_timed(model, prompts, opts.new_tokens)
        except Exception:  # noqa: BLE001 - reported, the other batches still run
            print(
                f"hf peer failed at batch {batch}:\n{traceback.format_exc()}",
                file=sys.stderr,
                flush=True,
            )
            continue
        step_s = timed["decode_s"] / max(timed["decode_steps"], 1)
        floor = hf_decode_floor_s(
            model, args.num_experts, args.num_experts_per_tok, batch, HBM_BYTES_PER_S
        )
        rows.append(
            dict(
                model=opts.model,
                strategy="hf_generate",
                world=1,
                plan="transformers generate, one device",
                batch=batch,
                prompt_len=opts.prompt_len,
                new_tokens=opts.new_tokens,
                prefill_tok_s=batch * opts.prompt_len / timed["prefill_s"],
                decode_tok_s=batch * timed["decode_steps"] / max(timed["decode_s"], 1e-9),
                ms_per_step=1000 * step_s,
                floor_ms_per_step=1000 * floor,
                fraction_of_floor=floor / step_s if step_s else 0.0,
                cuda_graphs=False,
                peak_gib=peak_memory_bytes(device) / 2**30,
                nccl_p2p_disable=os.environ.get("NCCL_P2P_DISABLE", "0"),
                torch=torch.__version__,
                versions=library_versions(),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                date=time.strftime("%Y-%m-%d"),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def infer_conf(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moe_ext.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_object(compose("config", overrides=overrides))


@torch.inference_mode()
def profile_decode(model, cfg, job, batch: int, prompt_len: int, rank: int) -> None:
    """torch.profiler table of 4 decode steps (no CUDA graph; compiled blocks when
    generate.compile_decode is on) after a prefill of ``prompt_len`` tokens, the number
    of GPU kernels one step launches, and the collectives one eager step issues by kind."""
    from torch.profiler import ProfilerActivity, profile

    device = model.device
    collectives = step_collectives(model, job.plan, [batch])
    if rank == 0:
        print(
            f"collectives per decode step (rank 0, eager step, by kind): {collectives}, "
            f"{total(collectives)} in all",
            flush=True,
        )
    if device.type == "cuda":
        model.compile_decode(cfg.generate.compile_decode)
    prompts = synthetic_prompts(batch, prompt_len, job.source.args.vocab_size, seed=batch)
    tokens = torch.tensor(prompts, device=device)  # [B, L]
    model.setup_caches(batch, prompt_len + 128)
    kv_start = torch.zeros(batch, dtype=torch.long, device=device)
    model(
        tokens,
        torch.arange(prompt_len, device=device),
        kv_start,
        prompt_len,
        last_only=True,
        use_cache=True,
    )
    nxt = tokens[:, -1:]  # [B, 1]

    def step(i: int):
        slot = torch.tensor([prompt_len + i], device=device)
        return model(nxt, slot, kv_start, None, last_only=True, use_cache=True)

    for i in range(3):  # compile and autotune outside the profile
        step(i)
    synchronize(device)  # sync: the profile starts on an idle device
    steps = 4
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(3 + i)
        synchronize(device)  # sync: every kernel inside the profile
    if rank == 0:
        events = prof.key_averages()
        print(events.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
        kernels = sum(
            e.count
            for e in events
            if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        )
        print(
            f"GPU kernels per decode step: {kernels / steps:.0f} "
            f"({len(model.layers)} layers, batch {batch})",
            flush=True,
        )


def degrees(plan) -> str:
    """'tp1 dp4 ep2': the degrees that tell runs of one strategy and world size apart."""
    return f"tp{plan.tp} dp{plan.dp} ep{plan.ep}" + (f" pp{plan.pp}" if plan.pp > 1 else "")


def report(rows: list[dict], json_path, png_path) -> None:
    header = (
        f"{'model':14} {'strategy':12} {'W':>2} {'degrees':11} {'link':7} {'blocks':8} "
        f"{'batch':>5} {'prefill tok/s':>13} {'decode tok/s':>12} {'ms/step':>8} {'floor ms':>8} "
        f"{'of floor':>8} {'pred ms':>8} {'coll/step':>9}"
    )
    print(header + "\n" + "-" * len(header))
    for r in rows:
        link = "P2P off" if r["nccl_p2p_disable"] == "1" else "-"
        blocks = "compiled" if r.get("compiled") else "eager"
        print(
            f"{r['model']:14} {r['strategy']:12} {r['world']:>2} {r.get('degrees', '-'):11} "
            f"{link:7} {blocks:8} {r['batch']:>5} "
            f"{r['prefill_tok_s']:>13.0f} {r['decode_tok_s']:>12.1f} {r['ms_per_step']:>8.2f} "
            f"{r['floor_ms_per_step']:>8.2f} {100 * r['fraction_of_floor']:>7.1f}% "
            f"{_ms(r.get('predicted_ms_per_step')):>8} {_collectives(r):>9}"
        )
    if json_path:
        path = Path(json_path)
        old = json.loads(path.read_text())["rows"] if path.exists() else []
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": old + rows}, indent=1))
        os.replace(tmp, path)
    if png_path:
        draw_chart(json.loads(Path(json_path).read_text())["rows"] if json_path else rows, png_path)


def _collectives(row: dict) -> str:
    """Total collectives + p2p ops of one decode step ('-' for peers and older rows)."""
    counts = row.get("collectives_per_step")
    return "-" if counts is None else str(total(counts))


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def row_label(row: dict) -> str:
    """'ep_nccl compiled\n2 GPUs (tp1 dp2 ep2) P2P off, batch 16' (two lines, for the chart's
    axis)."""
    tag = row["strategy"]
    if tag != "hf_generate":
        tag += " compiled" if row.get("compiled") else " eager blocks"
    gpus = f"{row['world']} GPU{'s' if row['world'] > 1 else ''}"
    if row["world"] > 1 and row.get("degrees"):
        gpus += f" ({row['degrees']})"
    link = " P2P off" if row["nccl_p2p_disable"] == "1" else ""
    return f"{tag}\n{gpus}{link}, batch {row['batch']}"


def draw_chart(rows: list[dict], png_path) -> None:
    """Decode tok/s per (strategy, GPUs, link, batch) row as horizontal bars, log scale;
    peers grey, one GPU blue, several green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [r["decode_tok_s"] for r in rows]
    colors = [
        "tab:gray"
        if r["strategy"] == "hf_generate"
        else "tab:blue"
        if r["world"] == 1
        else "tab:green"
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.45 * len(rows)))
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), [row_label(r) for r in rows], fontsize=7)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.0f}", va="center", fontsize=7)
    # log only where the bars span orders of magnitude (peers): a log axis starting near the
    # smallest bar makes a 1.3x gap look like 10x
    log = max(values) > 20 * min(values)
    if not log:
        ax.set_xlim(0, 1.12 * max(values))
    ax.set(
        xscale="log" if log else "linear",
        xlabel="decode tokens/s (all replicas)" + (", log scale" if log else ""),
        title=f"{rows[0]['model']} decode, prompt {rows[0]['prompt_len']} + "
        f"{rows[0]['new_tokens']} new, {rows[0]['gpu']} ({rows[0]['date']})",
    )
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


if __name__ == "__main__":
    main()

"""Generate text with a MoE model on N ranks (GPUs with NCCL, CPU processes with gloo).

    torchrun --nproc-per-node 2 launch/infer.py +topology=pcie
    torchrun --nproc-per-node 2 launch/infer.py strategy=ep_nccl generate.max_new_tokens=64
    python launch/infer.py checkpoint=/models/Qwen3-30B-A3B prompts=in.jsonl output=out.jsonl

Everything that can be checked is checked before any process group or weight exists
(config, checkpoint headers, prompts, plan); an error is one line on rank 0 and exit 2.
This launcher is the only place that reads the environment (torchrun's variables).
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from moe_ext.config import InferConf, check_group_choices, register_configs  # noqa: E402
from moe_ext.dist import DistEnv, init_distributed  # noqa: E402
from moe_ext.groups import ProcessGroups  # noqa: E402
from moe_ext.launching import (ModelSource, UsageError, as_usage_error,  # noqa: E402
                               build_model_shard, device_type_for, launch_topology,
                               package_path, report_error, resolve_model_source,
                               run_and_exit)
from moe_ext.model import ModelArgs, Transformer, generate  # noqa: E402
from moe_ext.model.tokenizer import load_tokenizer  # noqa: E402
from moe_ext.plan import ParallelPlan, build_plan  # noqa: E402
from moe_ext.topology import Topology  # noqa: E402

log = logging.getLogger("moe_ext.infer")

DEMO_PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "In the beginning",
    "It was a dark and stormy night",
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class IdsOnlyTokenizer:
    """For a checkpoint without tokenizer.json: prompts must come as ids, outputs carry no text."""

    def __init__(self, args: ModelArgs):
        eos = args.eos_token_id
        self.eos_id = eos[0] if isinstance(eos, list) else eos
        self.pad_id = args.pad_token_id if args.pad_token_id is not None else 0
        self.vocab_size = args.vocab_size

    def encode(self, text: str) -> list[int]:
        raise UsageError("the checkpoint has no tokenizer.json: give prompts as "
                         '{"prompt_ids": [...]} lines (prompts=<file.jsonl>)')

    def decode(self, ids: list[int]) -> Optional[str]:
        return None


@dataclass
class Job:
    """Everything decided before process groups exist; identical on every rank."""

    device_type: str
    dtype: torch.dtype
    source: ModelSource
    tokenizer: Any
    prompt_ids: list[list[int]]
    topology: Topology
    plan: ParallelPlan


def _dtype(requested: str, device_type: str) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise UsageError(f"dtype={requested!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def read_prompts(path: Optional[str], tokenizer) -> list[list[int]]:
    """Prompt ids from a JSONL file (``{"prompt": text}`` or ``{"prompt_ids": [...]}``)."""
    if path is None:
        return [tokenizer.encode(text) for text in DEMO_PROMPTS]
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"prompts file {path} does not exist; pass prompts=<file.jsonl>")
    prompts = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{number}: not valid JSON ({err.msg}); each line must be "
                             f'{{"prompt": "text"}} or {{"prompt_ids": [...]}}') from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            ids = tokenizer.encode(record["prompt"])
        elif isinstance(record, dict) and isinstance(record.get("prompt_ids"), list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in record["prompt_ids"]):
            ids = record["prompt_ids"]
        else:
            raise UsageError(f'{path}:{number}: expected {{"prompt": "text"}} or '
                             f'{{"prompt_ids": [int, ...]}}')
        if not ids or any(i < 0 or i >= tokenizer.vocab_size for i in ids):
            raise UsageError(f"{path}:{number}: prompt is empty or has ids outside the "
                             f"vocabulary [0, {tokenizer.vocab_size})")
        prompts.append(ids)
    if not prompts:
        raise UsageError(f"{path} holds no prompts")
    return prompts


def prepare(cfg: InferConf, env: DistEnv, cuda_available: bool, num_local_gpus: int) -> Job:
    """Validate the whole job and decide the plan; creates no process group and no weight."""
    if cfg.engine not in ("native", "megatron"):
        raise UsageError(f"engine={cfg.engine!r} is not one of native, megatron")
    if cfg.engine == "megatron":
        from moe_ext.megatron.engine import require_cuda
        require_cuda(cfg.device, cuda_available, fallback="native")
    device_type = device_type_for(cfg.device, cuda_available)
    dtype = _dtype(cfg.dtype, device_type)
    checkpoint = cfg.checkpoint if cfg.checkpoint is not None else package_path(cfg.model.weights)
    source = resolve_model_source(checkpoint, cfg.model)
    args = source.args
    if source.tokenizer_spec is None and not source.has_tokenizer_json:
        tokenizer = IdsOnlyTokenizer(args)
    else:
        tokenizer = load_tokenizer(source.tokenizer_spec, source.checkpoint)
    prompt_ids = read_prompts(cfg.prompts, tokenizer)
    longest = max(len(p) for p in prompt_ids) + cfg.generate.max_new_tokens
    if longest > args.max_position_embeddings:
        raise UsageError(f"a prompt plus generate.max_new_tokens is {longest} tokens, over the "
                         f"model's context of {args.max_position_embeddings}; shorten the prompt "
                         f"or lower generate.max_new_tokens")
    topology = launch_topology(cfg.topology, device_type, num_local_gpus, env.local_world_size)
    plan = build_plan(cfg.strategy, cfg.parallel, env.world_size, topology, source.model_conf,
                      dtype_bytes=torch.finfo(dtype).bits // 8,
                      tokens_per_step=min(len(prompt_ids), cfg.generate.max_batch_size))
    if cfg.engine == "megatron":
        from moe_ext.megatron.engine import check_plan
        check_plan(plan, args)
    return Job(device_type, dtype, source, tokenizer, prompt_ids, topology, plan)


def build_model(job: Job, groups: ProcessGroups, rank: int, device: torch.device) -> Transformer:
    return build_model_shard(job.source, job.plan, groups, rank, device, job.dtype,
                             progress=rank == 0)


class LoadError(UsageError):
    """Another rank could not build its shard of the model (that rank prints why)."""


def all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """True when every rank reports ok. Without it, a rank that failed to load would leave
    the others waiting in their first collective until the timeout."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0  # sync: the decision to go on is taken on the host


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write_output(path: str, prompt_ids, tokens, tokenizer) -> None:
    """One JSON line per prompt, input order; written to a temp file then renamed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for prompt, out in zip(prompt_ids, tokens):
            f.write(json.dumps({"prompt_ids": prompt, "output_ids": out,
                                "text": tokenizer.decode(out)}) + "\n")
    os.replace(tmp, target)


def _report(job: Job, result, device: torch.device, world_size: int) -> None:
    # sync: one collective to put every rank's throughput and peak memory on rank 0
    stats = torch.tensor([result.prefill_tokens, result.decode_tokens, result.prefill_s,
                          result.decode_s, result.decode_steps], dtype=torch.float64,
                         device=device)
    peaks = torch.zeros(world_size, dtype=torch.float64, device=device)
    peaks[dist.get_rank() if dist.is_initialized() else 0] = peak_memory_bytes(device)
    if dist.is_initialized():
        times = stats[2:].clone()
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        stats[2:] = times
        dist.all_reduce(peaks, op=dist.ReduceOp.SUM)
    prefill_tokens, decode_tokens, prefill_s, decode_s, steps = stats.tolist()
    # replicas of one pipeline / TP group count each token once per group member
    copies = max(1, world_size // job.plan.dp)
    log.info("prefill: %.1f tok/s   decode: %.1f tok/s   %.2f ms/token%s",
             prefill_tokens / copies / max(prefill_s, 1e-9),
             decode_tokens / copies / max(decode_s, 1e-9),
             1000.0 * decode_s / max(steps, 1),
             "   (CUDA graphs)" if result.cuda_graphs else "")
    log.info("peak memory per rank: %s",
             "  ".join(f"r{r}={p / 2**30:.2f} GiB" for r, p in enumerate(peaks.tolist())))


def run(cfg: InferConf, env: DistEnv) -> int:
    cuda_available = torch.cuda.is_available()
    job = as_usage_error(prepare, cfg, env, cuda_available,
                         torch.cuda.device_count() if cuda_available else 0)
    if env.rank == 0:
        log.info("topology: %s", job.topology.describe())
        log.info("plan: %s", job.plan.describe())
    device = init_distributed(env, job.device_type, cfg.dist_timeout_s)
    groups = ProcessGroups.build(job.plan, backend="nccl" if job.device_type == "cuda" else "gloo",
                                 timeout=timedelta(seconds=cfg.dist_timeout_s))
    torch.manual_seed(cfg.seed)
    failure: Optional[ValueError] = None
    try:
        if cfg.engine == "megatron":
            from moe_ext.megatron import engine as megatron_engine
            model = megatron_engine.build_megatron_model(job.source, job.plan, groups, env.rank,
                                                         device, job.dtype, progress=env.rank == 0)
        else:
            model = build_model(job, groups, env.rank, device)
    except ValueError as err:  # e.g. one rank's checkpoint slice is corrupt
        failure = err
    if not all_ranks_ok(failure is None, device):
        raise failure or LoadError("another rank failed to load its weights (its error is above)")
    eos_id = None if cfg.generate.ignore_eos else job.tokenizer.eos_id
    if cfg.engine == "megatron":
        if env.rank == 0:
            log.info(megatron_engine.LOG_LINE)
        result = megatron_engine.generate(model, job.prompt_ids, cfg.generate, eos_id=eos_id,
                                          pad_id=job.tokenizer.pad_id, seed=cfg.seed,
                                          groups=groups, dp=job.plan.dp, dp_rank=groups.dp_rank)
    else:
        result = generate(model, job.prompt_ids, cfg.generate, eos_id=eos_id,
                          pad_id=job.tokenizer.pad_id, seed=cfg.seed)
    _report(job, result, device, env.world_size)
    if env.rank == 0:
        for prompt, out in zip(job.prompt_ids, result.tokens):
            shown = job.tokenizer.decode(prompt), job.tokenizer.decode(out)
            log.info("%r -> %r", *(shown if shown[0] is not None else (prompt, out)))
        if cfg.output is not None:
            write_output(cfg.output, job.prompt_ids, result.tokens, job.tokenizer)
            log.info("wrote %d results to %s", len(result.tokens), cfg.output)
    return 0


register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg) -> None:
    env = DistEnv.from_environ(os.environ)
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                        format="%(message)s", force=True)
    run_and_exit(lambda: run(OmegaConf.to_object(cfg), env), env.rank, env.world_size)


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:], REPO / "conf")
    except ValueError as err:
        env = DistEnv.from_environ(os.environ)
        report_error(UsageError(str(err)), env.rank, env.world_size)
        sys.exit(2)
    main()

"""launch/infer.py: generate text with a MoE model on N ranks (GPUs with NCCL, CPU
processes with gloo).

    torchrun --nproc-per-node 2 launch/infer.py +topology=pcie
    torchrun --nproc-per-node 2 launch/infer.py strategy=ep_nccl generate.max_new_tokens=64
    python launch/infer.py checkpoint=/models/Qwen3-30B-A3B prompts=in.jsonl output=out.jsonl

Everything that can be checked is checked before any process group or weight exists
(config, checkpoint headers, tokenizer, generation_config.json, prompts, output path,
plan); an error is one line on rank 0 and exit 2 (``MOE_EXT_DEBUG=1`` or ``debug=true``
adds its chained traceback).

Prompts encode as the checkpoint's tokenizer does in transformers; generation stops on
generation_config.json's eos ids and takes its sampling defaults for unset ``generate.*``
(moe_ext.cli.generation_config); the launcher prints the sampling it uses.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from moe_ext.cli.generation_config import read_generation_config, resolve_sampling, stop_ids
from moe_ext.cli.io import check_output, read_prompts, write_output
from moe_ext.config import GenerateConf, InferConf
from moe_ext.dist import DistEnv, peak_memory_bytes
from moe_ext.errors import MoeExtError
from moe_ext.groups import ProcessGroups
from moe_ext.launching import (
    DTYPES,
    ModelSource,
    UsageError,
    build_model_shard,
    device_type_for,
    dtype_name,
    launch_plan,
    launcher_main,
    package_path,
    prepare_job,
    resolve_model_source,
    start_ranks,
)
from moe_ext.model import ModelArgs, Transformer, generate
from moe_ext.model.generate import GenerationResult
from moe_ext.model.tokenizer import load_tokenizer
from moe_ext.plan import ParallelPlan
from moe_ext.serve.chat import load_chat_template
from moe_ext.topology import Topology

log = logging.getLogger("moe_ext.infer")


class IdsOnlyTokenizer:
    """For a checkpoint without tokenizer.json: prompts must come as ids, outputs carry no text."""

    def __init__(self, args: ModelArgs):
        eos = args.eos_token_id
        self.eos_id = eos[0] if isinstance(eos, list) else eos
        self.pad_id = args.pad_token_id if args.pad_token_id is not None else 0
        self.vocab_size = args.vocab_size

    def encode(self, text: str) -> list[int]:
        raise UsageError(
            "the checkpoint has no tokenizer.json: give prompts as "
            '{"prompt_ids": [...]} lines (prompts=<file.jsonl>)'
        )

    def decode(self, ids: list[int]) -> Optional[str]:
        return None


class LoadError(UsageError):
    """Another rank could not build its shard of the model (that rank prints why)."""


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
    verify: bool = False  # hash the checkpoint's shards as they load
    # generate.* with every sampling field set (generate.*, else generation_config.json)
    generate: GenerateConf = field(default_factory=GenerateConf)
    sampling: str = ""  # the launcher's line saying where the sampling values come from
    stop_ids: Optional[list[int]] = None  # what generation stops on; None: max_new_tokens


def infer_dtype(requested: str, device_type: str) -> torch.dtype:
    """``dtype=`` (or an alias); auto is bf16 on CUDA and fp32 on CPU."""
    name = dtype_name(requested)
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return DTYPES[name]


def prepare(cfg: InferConf, env: DistEnv, cuda_available: bool, num_local_gpus: int) -> Job:
    """Validate the whole job and decide the plan; creates no process group and no weight.
    Rank 0 alone also checks that it can write ``output=``."""
    if cfg.engine not in ("native", "megatron"):
        raise UsageError(f"engine={cfg.engine!r} is not one of native, megatron")
    if cfg.engine == "megatron":
        from moe_ext.megatron.engine import require_cuda

        require_cuda(cfg.device, cuda_available, fallback="native")
    cfg.generate.check("generate")
    device_type = device_type_for(cfg.device, cuda_available)
    dtype = infer_dtype(cfg.dtype, device_type)
    if cfg.output is not None and env.rank == 0:
        check_output(cfg.output)
    source, tokenizer = model_source_and_tokenizer(cfg.checkpoint, cfg.model)
    generation_file = read_generation_config(source.checkpoint)
    generate_conf, sampling = resolve_sampling(cfg.generate, generation_file)
    stop = stop_ids(generation_file, source.args.eos_token_id, tokenizer.eos_id)
    prompt_ids = read_prompts(
        cfg.prompts,
        tokenizer,
        source.args.vocab_size,
        chat_template=lambda: load_chat_template(source.checkpoint, source.tokenizer_spec),
    )
    _check_context(prompt_ids, cfg.generate.max_new_tokens, source.args)
    topology, plan = launch_plan(
        cfg,
        env,
        device_type,
        num_local_gpus,
        source.args,
        dtype,
        tokens_per_step=min(len(prompt_ids), cfg.generate.max_batch_size),
        batch=min(len(prompt_ids), cfg.generate.max_batch_size),
        prompt_len=max(map(len, prompt_ids), default=None),
    )
    if cfg.engine == "megatron":
        from moe_ext.megatron.engine import check_plan

        check_plan(plan, source.args)
    return Job(
        device_type,
        dtype,
        source,
        tokenizer,
        prompt_ids,
        topology,
        plan,
        verify=cfg.checkpoint_verify,
        generate=generate_conf,
        sampling=sampling,
        stop_ids=None if cfg.generate.ignore_eos else stop,
    )


def model_source_and_tokenizer(
    checkpoint: Optional[str], model_conf: Any
) -> tuple[ModelSource, Any]:
    """The model to load (``checkpoint=``, else the model config's own weights ``pkg:...``,
    else a random init) and its tokenizer (IdsOnlyTokenizer when it has none)."""
    if checkpoint is None:
        checkpoint = package_path(model_conf.get("weights"))
    source = resolve_model_source(checkpoint, model_conf)
    return source, _tokenizer(source)


def _tokenizer(source: ModelSource) -> Any:
    if source.tokenizer_spec is None and not source.has_tokenizer_json:
        return IdsOnlyTokenizer(source.args)
    return load_tokenizer(source.tokenizer_spec, source.checkpoint)


def _check_context(prompt_ids: list[list[int]], max_new_tokens: int, args: ModelArgs) -> None:
    longest = max(len(p) for p in prompt_ids) + max_new_tokens
    if longest > args.max_position_embeddings:
        raise UsageError(
            f"a prompt plus generate.max_new_tokens is {longest} tokens, over the "
            f"model's context of {args.max_position_embeddings}; shorten the prompt "
            f"or lower generate.max_new_tokens"
        )


def build_model(job: Job, groups: ProcessGroups, rank: int, device: torch.device) -> Transformer:
    """This rank's native shard in ``job.dtype``, from the checkpoint or the seeded init."""
    return build_model_shard(
        job.source, job.plan, groups, rank, device, job.dtype, progress=rank == 0, verify=job.verify
    )


def _build_for_engine(
    engine: str, job: Job, groups: ProcessGroups, rank: int, device: torch.device
) -> torch.nn.Module:
    native = build_model(job, groups, rank, device)
    if engine != "megatron":
        return native
    from moe_ext.megatron import engine as megatron_engine

    return megatron_engine.build_megatron_model(
        job.source, job.plan, groups, rank, device, job.dtype, native=native
    )


def load_on_every_rank(
    engine: str, job: Job, groups: ProcessGroups, rank: int, device: torch.device
) -> torch.nn.Module:
    """This rank's model, once every rank has built its own. A rank whose checkpoint slice
    is bad raises its error; the others raise LoadError instead of waiting for it in their
    first collective until the timeout."""
    failure: Optional[MoeExtError] = None
    model = None
    try:
        model = _build_for_engine(engine, job, groups, rank, device)
    except MoeExtError as err:
        failure = err
    if not all_ranks_ok(failure is None, device):
        raise failure or LoadError("another rank failed to load its weights (its error is above)")
    return model


def all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """True when every rank reports ok."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0  # sync: the decision to go on is taken on the host


def _generate(
    cfg: InferConf, job: Job, model: torch.nn.Module, groups: ProcessGroups, rank: int
) -> GenerationResult:
    if cfg.engine != "megatron":
        return generate(
            model,
            job.prompt_ids,
            job.generate,
            eos_id=job.stop_ids,
            pad_id=job.tokenizer.pad_id,
            seed=cfg.seed,
        )
    from moe_ext.megatron import engine as megatron_engine

    if rank == 0:
        log.info(megatron_engine.LOG_LINE)
    return megatron_engine.generate(
        model,
        job.prompt_ids,
        job.generate,
        eos_id=job.stop_ids,
        pad_id=job.tokenizer.pad_id,
        seed=cfg.seed,
        groups=groups,
        dp=job.plan.dp,
        dp_rank=groups.dp_rank,
    )


def _report(job: Job, result: GenerationResult, device: torch.device, world_size: int) -> None:
    # sync: one collective to put every rank's throughput and peak memory on rank 0
    stats = torch.tensor(
        [
            result.prefill_tokens,
            result.decode_tokens,
            result.prefill_s,
            result.decode_s,
            result.decode_steps,
        ],
        dtype=torch.float64,
        device=device,
    )
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
    log.info(
        "prefill: %.1f tok/s   decode: %.1f tok/s   %.2f ms/token%s",
        prefill_tokens / copies / max(prefill_s, 1e-9),
        decode_tokens / copies / max(decode_s, 1e-9),
        1000.0 * decode_s / max(steps, 1),
        "   (CUDA graphs)" if result.cuda_graphs else "",
    )
    log.info(
        "peak memory per rank: %s",
        "  ".join(f"r{r}={p / 2**30:.2f} GiB" for r, p in enumerate(peaks.tolist())),
    )


def _show_and_write(cfg: InferConf, job: Job, result: GenerationResult) -> None:
    """Rank 0: log each prompt's continuation and write ``output=``."""
    for prompt, out in zip(job.prompt_ids, result.tokens):
        shown = job.tokenizer.decode(prompt), job.tokenizer.decode(out)
        log.info("%r -> %r", *(shown if shown[0] is not None else (prompt, out)))
    if cfg.output is not None:
        write_output(cfg.output, job.prompt_ids, result.tokens, job.tokenizer)
        log.info("wrote %d results to %s", len(result.tokens), cfg.output)


def run(cfg: InferConf, env: DistEnv) -> int:
    """The whole job on this rank: validate, set up groups, load, generate, report."""
    job = prepare_job(prepare, cfg, env, log)
    if env.rank == 0:
        log.info("%s", job.sampling)
    device, groups = start_ranks(
        job.plan, env, job.device_type, cfg.dist_timeout_s, cfg.preflight, cfg.debug
    )
    torch.manual_seed(cfg.seed)
    model = load_on_every_rank(cfg.engine, job, groups, env.rank, device)
    result = _generate(cfg, job, model, groups, env.rank)
    _report(job, result, device, env.world_size)
    if env.rank == 0:
        _show_and_write(cfg, job, result)
    return 0


def main(cfg: DictConfig, environ: Mapping[str, str]) -> NoReturn:
    """The Hydra main of launch/infer.py: ``environ`` is the process environment."""
    launcher_main(cfg, environ, run, log)

"""launch/train.py: train (or fine-tune) a MoE model on N ranks with the same
model/strategy/parallel/topology configs as inference: DeepSpeed (``engine=deepspeed``,
GPUs with NCCL or CPU processes with gloo) or Megatron-core's GPTModel with our MoE layer
(``engine=megatron``, GPUs).

Each run writes into its Hydra output directory: ``train_log.json`` (config, plan, every
step's losses and throughput, held-out losses, sample text), ``loss.png``,
``checkpoints/step_*/`` (``resume=`` continues from them bit for bit) and ``model/``
(moe_ext format, or ``export=<dir>``), which ``launch/infer.py checkpoint=<dir>`` loads.

Everything that can be checked is checked before any process group or weight exists
(config, data, plan, resume point, export destination); an error is one line on rank 0 and
exit 2 (``MOE_EXT_DEBUG=1`` or ``debug=true`` adds its chained traceback).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from moe_ext.config import GenerateConf
from moe_ext.deepspeed.engine import ZERO3_REFUSAL, build_engine
from moe_ext.dist import DistEnv
from moe_ext.groups import ProcessGroups
from moe_ext.launching import (
    DTYPES,
    ModelSource,
    UsageError,
    as_usage_error,
    build_model_shard,
    debug_requested,
    device_type_for,
    dtype_name,
    launch_env,
    launch_plan,
    link_environment,
    prepare_job,
    resolve_model_source,
    run_and_exit,
    start_ranks,
)
from moe_ext.model import ModelArgs, Transformer, generate
from moe_ext.model.tokenizer import load_tokenizer
from moe_ext.plan import ParallelPlan
from moe_ext.topology import Topology
from moe_ext.train.config import TrainConf, TrainLoopConf
from moe_ext.train.data import TokenData
from moe_ext.train.export import (
    check_export_destination,
    export_lora,
    export_moe_ext,
    hf_config,
)
from moe_ext.train.loop import RunState, Trainer, trainer_clips
from moe_ext.train.lora import (
    apply_lora,
    check_lora,
    check_resume_lora,
    lora_key,
    memory_lines,
)
from moe_ext.train.pipeline import check_pipeline
from moe_ext.train.report import LOG_NAME, PLOT_NAME, plot_losses, write_json
from moe_ext.train.state import (
    ResumePoint,
    capture_engine,
    check_compatible,
    find_checkpoint,
    load_rank_state,
    restore_engine,
    save_checkpoint,
)

log = logging.getLogger("moe_ext.train")


@dataclass
class Job:
    """Everything decided before process groups exist; identical on every rank."""

    device_type: str
    dtype: torch.dtype
    source: ModelSource  # source.tokenizer_spec is recorded in the export
    tokenizer: Any
    data: TokenData
    topology: Topology
    plan: ParallelPlan
    resume: Optional[ResumePoint]


# ---- checks before any process group ---------------------------------------------------


def train_dtype(
    requested: str, device_type: str, zero_stage: int, engine: str = "deepspeed"
) -> torch.dtype:
    """``dtype=`` (or an alias) for training; auto is bf16 on CUDA with ZeRO 1/2, else fp32.
    engine=megatron keeps fp32 main parameters in its own optimizer, so bf16 needs no ZeRO."""
    name = dtype_name(requested)
    if name == "fp16":
        raise UsageError(
            f"dtype={requested} training needs loss scaling, which this launcher "
            f"does not set up; use dtype=bf16 (GPU) or fp32"
        )
    if name == "auto":
        # bf16 needs DeepSpeed's fp32 masters, which only its ZeRO/bf16 optimizers keep
        return torch.bfloat16 if device_type == "cuda" and zero_stage > 0 else torch.float32
    if name == "bf16" and device_type == "cpu":
        raise UsageError(
            f"dtype={requested} on CPU: DeepSpeed's CPU path trains in fp32; use "
            f"dtype=fp32 (or auto)"
        )
    if name == "bf16" and zero_stage == 0 and engine != "megatron":
        raise UsageError(
            f"dtype={requested} needs train.zero_stage=1 or 2 (fp32 master "
            f"weights live in DeepSpeed's ZeRO/bf16 optimizers); or use "
            f"dtype=fp32"
        )
    return DTYPES[name]


def plan_key(plan: ParallelPlan) -> dict[str, Any]:
    """The plan facts a training checkpoint depends on (its shards and partitions)."""
    return {
        k: getattr(plan, k)
        for k in ("strategy", "world_size", "tp", "pp", "dp", "ep", "etp", "edp")
    }


def model_key(args: ModelArgs) -> dict[str, Any]:
    key = {k: v for k, v in args.to_dict().items() if k != "init_seed"}
    if args.quantization is not None:  # a LoRA base: as its config.json writes it (JSON)
        key["quantization"] = args.quantization.to_hf()
    return key


def _check_loop(conf: TrainLoopConf, args: ModelArgs) -> None:
    if args.quantization is not None and conf.lora.rank == 0:
        raise UsageError(
            f"the model's weights are {args.quantization.describe()}; training updates "
            f"bf16/fp32 weights: start from the unquantized checkpoint, or train LoRA "
            f"adapters on the frozen quantized base (train.lora.rank=16)"
        )
    for name in ("steps", "micro_batch", "seq_len"):
        if getattr(conf, name) < 1:
            raise UsageError(f"train.{name}={getattr(conf, name)}; it must be at least 1")
    if conf.seq_len > args.max_position_embeddings:
        raise UsageError(
            f"train.seq_len={conf.seq_len} is over the model's context of "
            f"{args.max_position_embeddings}; lower train.seq_len"
        )
    if conf.zero_stage == 3:
        raise UsageError(ZERO3_REFUSAL)
    if conf.zero_stage not in (0, 1, 2):
        raise UsageError(f"train.zero_stage={conf.zero_stage}; use 0, 1 or 2")
    if conf.offload_optimizer and conf.zero_stage == 0:
        raise UsageError(
            "train.offload_optimizer=true offloads ZeRO's optimizer partitions; set "
            "train.zero_stage=1 or 2"
        )
    if conf.lr <= 0 or conf.grad_clip < 0 or conf.aux_loss_coeff < 0:
        raise UsageError("train.lr must be > 0, train.grad_clip and train.aux_loss_coeff >= 0")


def _check_plan(plan: ParallelPlan, conf: TrainLoopConf, args: ModelArgs) -> None:
    """Training limits of the native model under ``plan`` (tp, pp: moe_ext.train.pipeline)."""
    if plan.tp > 1 and plan.strategy == "replicate":
        raise UsageError(
            f"strategy=replicate with tp={plan.tp} runs every expert on every TP rank, "
            f"whose duplicate expert gradients DeepSpeed would sum; train with "
            f"strategy=tp_experts or ep_*"
        )
    if plan.etp > 1 and args.expert_bias:
        raise UsageError(
            f"experts with biases sharded over etp={plan.etp}: only the first FFN shard adds "
            f"down_proj's bias, so its copies would drift apart; train with strategy=ep_*"
        )
    if args.qk_norm_type == "per_layer" and args.num_key_value_heads < plan.tp:
        raise UsageError(
            f"{args.num_key_value_heads} kv heads replicated over tp={plan.tp} ranks with a "
            f"whole-projection k norm would train its replicated weight slices apart; train "
            f"with parallel.tp <= {args.num_key_value_heads}"
        )
    if plan.pp > 1 and args.tie_word_embeddings and conf.lora.rank == 0:
        raise UsageError(
            f"the model ties its embeddings to the LM head, which pp={plan.pp} puts on the "
            f"first and last stages (their gradients are not summed across stages); train "
            f"with parallel.pp=1 (or LoRA, which freezes them)"
        )
    as_usage_error(
        check_pipeline,
        plan.pp,
        args.num_hidden_layers,
        conf.micro_batch,
        conf.pipeline_microbatches,
        conf.zero_stage,
    )


def sample_conf(cfg: TrainConf) -> GenerateConf:
    """The generation settings of the end-of-run sample."""
    return GenerateConf(
        max_new_tokens=cfg.sample.max_new_tokens,
        temperature=cfg.sample.temperature,
        top_p=cfg.sample.top_p,
        max_batch_size=1,
        cuda_graphs=False,
    )


def prepare(cfg: TrainConf, env: DistEnv, cuda_available: bool, num_local_gpus: int) -> Job:
    """Validate the whole job and decide the plan; creates no process group and no weight."""
    if cfg.engine not in ("deepspeed", "megatron"):
        raise UsageError(f"engine={cfg.engine!r} is not one of deepspeed, megatron")
    if cfg.engine == "megatron":
        from moe_ext.megatron.engine import check_train_settings, require_cuda

        require_cuda(cfg.device, cuda_available, fallback="deepspeed")
        check_train_settings(dtype_name(cfg.dtype), cfg.train.zero_stage, cfg.resume is not None)
    device_type = device_type_for(cfg.device, cuda_available)
    dtype = train_dtype(cfg.dtype, device_type, cfg.train.zero_stage, cfg.engine)
    if cfg.sample.prompt is not None:
        sample_conf(cfg).check("sample")
    if cfg.export is not None:  # else <run dir>/model, new with the run
        check_export_destination(cfg.export, cfg.train.overwrite_export)
    source = resolve_model_source(cfg.checkpoint, cfg.model)
    args = source.args
    if (
        source.reader is not None
        and source.tokenizer_spec is None
        and not source.has_tokenizer_json
    ):
        raise UsageError(
            f"checkpoint {cfg.checkpoint} has no tokenizer.json (and its config "
            f"names none); training needs one to tokenize data="
        )
    tokenizer = load_tokenizer(source.tokenizer_spec, source.checkpoint)
    _check_loop(cfg.train, args)
    data = TokenData.load(
        cfg.data, tokenizer, args.vocab_size, cfg.train.seq_len, cfg.train.val_fraction
    )
    topology, plan = launch_plan(
        cfg,
        env,
        device_type,
        num_local_gpus,
        source.args,
        dtype,
        tokens_per_step=cfg.train.micro_batch * cfg.train.seq_len,
        # auto with a profile: the fastest forward of micro_batch sequences on every rank
        batch=cfg.train.micro_batch * env.world_size,
        prompt_len=cfg.train.seq_len,
        objective="prefill",
    )
    if cfg.engine == "megatron":
        from moe_ext.megatron.engine import check_plan

        check_plan(plan, args, training=True)
    _check_plan(plan, cfg.train, args)
    if cfg.train.activation_checkpointing and cfg.engine != "deepspeed":
        raise UsageError(
            "train.activation_checkpointing recomputes the native model's blocks; it needs "
            "engine=deepspeed"
        )
    if cfg.train.lora.rank > 0 and cfg.engine != "deepspeed":
        raise UsageError("train.lora needs engine=deepspeed (the native model's adapters)")
    check_lora(cfg.train.lora, args, plan, cfg.train.zero_stage)
    resume = None
    if cfg.resume is not None:
        resume = find_checkpoint(cfg.resume)
        check_compatible(
            resume, env.world_size, plan_key(plan), cfg.train.zero_stage, model_key(args)
        )
        check_resume_lora(resume.meta.get("lora"), cfg.train.lora, str(resume.directory))
    return Job(device_type, dtype, source, tokenizer, data, topology, plan, resume)


# ---- the run -----------------------------------------------------------------------------


def build_model(
    job: Job, groups: ProcessGroups, rank: int, device: torch.device, frozen_base: bool = False
) -> Transformer:
    """This rank's shard in fp32 (DeepSpeed keeps fp32 masters and casts for bf16): built
    on meta, parallelized, then filled from the checkpoint slices or the seeded init.
    ``frozen_base`` (LoRA): in the training dtype instead, as no optimizer keeps masters of
    frozen weights (bf16: half the memory, never an fp32 copy of the base)."""
    dtype = job.dtype if frozen_base else torch.float32
    return build_model_shard(job.source, job.plan, groups, rank, device, dtype, progress=rank == 0)


def build_train_engine(
    cfg: TrainConf, job: Job, model: Transformer, groups: ProcessGroups, device: torch.device
) -> Any:
    """DeepSpeed's engine around ``model``, or (engine=megatron) a GPTModel built from it,
    which the export later copies back into ``model``."""
    conf = cfg.train
    common = dict(
        lr=conf.lr,
        weight_decay=conf.weight_decay,
        betas=(conf.beta1, conf.beta2),
        aux_loss_coeff=conf.aux_loss_coeff,
        z_loss_coeff=conf.z_loss_coeff,
    )
    if cfg.engine == "megatron":
        from moe_ext.megatron.engine import build_train_engine as build_megatron_engine

        return build_megatron_engine(
            model,
            job.source,
            groups,
            device,
            dtype=job.dtype,
            grad_clip=conf.grad_clip,
            zero_stage=conf.zero_stage,
            **common,
        )
    return build_engine(
        model,
        groups,
        micro_batch=conf.micro_batch,
        zero_stage=conf.zero_stage,
        grad_clip=conf.grad_clip,
        offload_optimizer=conf.offload_optimizer,
        dtype=job.dtype,
        **common,
    )


def _run_dir(own: Path, device: torch.device) -> Path:
    """Rank 0's Hydra output directory on every rank (each rank's Hydra picks a timestamp
    of its own; checkpoints and logs must go to one place)."""
    box = [str(own)]
    dist.broadcast_object_list(box, src=0, device=device)
    return Path(box[0])


def _resumed_state(
    engine: Any, job: Job, env: DistEnv, groups: ProcessGroups, device: torch.device
) -> RunState:
    """A fresh RunState, or the one of ``resume=`` with the engine restored to it."""
    if job.resume is None:
        return RunState()
    restore_engine(
        engine,
        load_rank_state(job.resume, env.rank, map_location=device),
        groups.dp_rank,
        job.plan.dp,
    )
    meta = job.resume.meta
    if env.rank == 0:
        log.info("resumed from %s at step %d", job.resume.directory, job.resume.step)
    return RunState(step=job.resume.step, history=meta["history"], evals=meta["evals"])


class RunRecord:
    """``train_log.json`` and ``loss.png`` of the run (written by rank 0)."""

    def __init__(
        self,
        cfg: TrainConf,
        job: Job,
        env: DistEnv,
        run_dir: Path,
        raw_config: dict[str, Any],
        params_on_rank0: int,
    ):
        self.run_dir = run_dir
        self.started = time.perf_counter()
        self.title = f"{job.source.name} | {job.plan.describe().split(' | ')[0]}"
        self.record: dict[str, Any] = {
            "command": sys.argv,
            "config": raw_config,
            "plan": job.plan.describe(),
            "topology": job.topology.describe(),
            "world_size": env.world_size,
            "device": job.device_type,
            "dtype": str(job.dtype).removeprefix("torch."),
            "params_on_rank0": params_on_rank0,
            "data": {
                "source": job.data.source,
                "train_tokens": job.data.train.numel(),
                "val_tokens": job.data.val.numel(),
            },
            "resumed_from": None if job.resume is None else str(job.resume.directory),
        }

    def write(self, state: RunState, **extra: Any) -> None:
        self.record.update(
            history=state.history,
            evals=state.evals,
            steps_done=state.step,
            wall_s=time.perf_counter() - self.started,
            **extra,
        )
        write_json(self.run_dir / LOG_NAME, self.record)
        plot_losses(state.history, state.evals, self.run_dir / PLOT_NAME, self.title)


def _checkpointer(
    engine: Any, job: Job, cfg: TrainConf, env: DistEnv, record: RunRecord
) -> Callable[[RunState], None]:
    """The Trainer's on_checkpoint: every rank saves its state; rank 0 updates the log."""

    def on_checkpoint(state: RunState) -> None:
        meta = {
            "plan": plan_key(job.plan),
            "zero_stage": cfg.train.zero_stage,
            "model": model_key(job.source.args),
            "lora": lora_key(cfg.train.lora),
            "history": state.history,
            "evals": state.evals,
        }
        path = save_checkpoint(
            record.run_dir / "checkpoints",
            state.step,
            env.rank,
            env.world_size,
            capture_engine(engine),
            meta,
            cfg.train.keep_checkpoints,
        )
        if env.rank == 0:
            record.write(state, checkpoint=str(path))

    return on_checkpoint


def _export(
    cfg: TrainConf, job: Job, engine: Any, model: Transformer, env: DistEnv, run_dir: Path
) -> str:
    """Write the trained model as a moe_ext checkpoint (collective); its directory."""
    if cfg.engine == "megatron":
        from moe_ext.megatron.engine import copy_to_native

        copy_to_native(engine.module.model, model)  # the export and sample read `model`
    if cfg.train.lora.rank > 0:  # PEFT adapters, then the merged weights (unquantized base)
        adapter, merged = export_lora(
            model, job.plan, env.rank, str(run_dir / "adapter"), cfg.train.lora
        )
        if adapter is not None and env.rank == 0:
            log.info("LoRA adapters in PEFT's format: %s", adapter)
        if not merged:  # quantized base: the adapters are the result
            dist.barrier()
            return str(adapter)
    destination = cfg.export or str(run_dir / "model")
    tokenizer = job.source.tokenizer_spec if job.source.tokenizer_spec == "byte" else None
    export_moe_ext(
        model,
        job.plan,
        env.rank,
        destination,
        hf_config(job.source.args, tokenizer=tokenizer),
        dtype=job.dtype,
        side_files_from=cfg.checkpoint,
        overwrite=cfg.train.overwrite_export,
    )
    dist.barrier()  # the export is complete before anyone reports or exits
    return destination


def _sample(model: Transformer, job: Job, cfg: TrainConf) -> Optional[dict[str, Any]]:
    """Generate the configured sample with the trained model (collective under EP)."""
    if cfg.sample.prompt is None:
        return None
    prompt = job.tokenizer.encode(cfg.sample.prompt)
    result = generate(
        model,
        [prompt],
        sample_conf(cfg),
        eos_id=job.tokenizer.eos_id,
        pad_id=job.tokenizer.pad_id,
        seed=cfg.train.seed,
    )
    return {"prompt": cfg.sample.prompt, "text": job.tokenizer.decode(result.tokens[0])}


def _log_summary(
    state: RunState, destination: str, sample: Optional[dict[str, Any]], run_dir: Path
) -> None:
    if state.history:
        last = state.history[-1]
        log.info(
            "step %d: loss %.4f (lm %.4f, aux %.4f)",
            last["step"],
            last["loss"],
            last["lm_loss"],
            last["aux_loss"],
        )
    if state.evals:
        log.info("held-out loss: %.4f", state.evals[-1]["val_loss"])
    log.info(
        "model: %s   log: %s   curve: %s", destination, run_dir / LOG_NAME, run_dir / PLOT_NAME
    )
    if sample is not None:
        log.info("sample:\n%s%s", sample["prompt"], sample["text"])


def run(cfg: TrainConf, env: DistEnv, own_run_dir: Path, raw_config: dict[str, Any]) -> int:
    """The whole run on this rank: validate, set up, (resume,) train, export, sample."""
    job = prepare_job(prepare, cfg, env, log)
    if env.rank == 0:
        log.info(
            "data: %s (%d training tokens, %d held out)",
            job.data.source,
            job.data.train.numel(),
            job.data.val.numel(),
        )
    device, groups = start_ranks(
        job.plan, env, job.device_type, cfg.dist_timeout_s, cfg.preflight, cfg.debug
    )
    run_dir = _run_dir(own_run_dir, device)
    model = build_model(job, groups, env.rank, device, frozen_base=cfg.train.lora.rank > 0)
    lora = apply_lora(model, cfg.train.lora, groups.ep_rank) if cfg.train.lora.rank > 0 else None
    engine = build_train_engine(cfg, job, model, groups, device)
    if lora is not None:  # collective: every rank's trainable/frozen params and memory
        for line in memory_lines(lora, device, env.rank, env.world_size):
            log.info("%s", line)
    state = _resumed_state(engine, job, env, groups, device)
    record = RunRecord(
        cfg,
        job,
        env,
        run_dir,
        raw_config,
        params_on_rank0=sum(p.numel() for p in model.parameters()),
    )
    trainer = Trainer(
        engine,
        groups,
        job.data,
        cfg.train,
        device,
        own_clipping=trainer_clips(cfg.engine, job.dtype),
    )
    trainer.run(
        state, _checkpointer(engine, job, cfg, env, record), progress=cfg.progress and env.rank == 0
    )
    extra: dict[str, Any] = {}
    if lora is not None:  # collective: each rank's peak memory over the training steps
        extra["lora_memory"] = memory_lines(lora, device, env.rank, env.world_size)
        for line in extra["lora_memory"]:
            log.info("after training: %s", line)
    destination = _export(cfg, job, engine, model, env, run_dir)
    sample = _sample(model, job, cfg)
    if env.rank == 0:
        record.write(state, export=destination, sample=sample, **extra)
        _log_summary(state, destination, sample, run_dir)
    return 0


def main(cfg: DictConfig, environ: MutableMapping[str, str], output_dir: Path) -> NoReturn:
    """The Hydra main of launch/train.py: ``environ`` is the process environment,
    ``output_dir`` this rank's Hydra output directory."""
    debug = bool(cfg.get("debug")) or debug_requested(environ)
    env = launch_env(environ, debug)
    environ.setdefault("LOCAL_RANK", str(env.local_rank))  # DeepSpeed reads it
    logging.getLogger().setLevel(logging.INFO if env.rank == 0 else logging.WARNING)
    link_environment(cfg.get("topology"), environ, env.rank, log)
    raw = OmegaConf.to_container(cfg, resolve=True)
    run_and_exit(
        lambda: run(OmegaConf.to_object(cfg), env, output_dir, raw), env.rank, env.world_size, debug
    )

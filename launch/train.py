"""Train (or fine-tune) a MoE model on N ranks with the same model/strategy/parallel/topology
configs as inference: DeepSpeed (`engine=deepspeed`, GPUs with NCCL or CPU processes with
gloo) or Megatron-core's GPTModel with our MoE layer (`engine=megatron`, GPUs).

    python launch/train.py                                   # tiny model, shipped corpus, CPU
    torchrun --nproc-per-node 2 launch/train.py strategy=ep_nccl train.steps=200
    torchrun --nproc-per-node 2 launch/train.py strategy=replicate train.zero_stage=2
    python launch/train.py data=my.jsonl checkpoint=/models/tiny-moe train.lr=1e-4
    python launch/train.py resume=outputs/train/<date>/<time>/checkpoints train.steps=2000

Each run writes into its Hydra output directory: ``train_log.json`` (config, plan, every
step's losses and throughput, held-out losses, sample text), ``loss.png``,
``checkpoints/step_*/`` (``resume=`` continues from them bit for bit) and ``model/``
(moe_ext format, or ``export=<dir>``), which ``launch/infer.py checkpoint=<dir>`` loads.

The shipped ``moe_ext/data/checkpoints/tiny`` was made by (about 6 minutes on 2 idle CPU cores):

    python launch/train.py export=moe_ext/data/checkpoints/tiny

Everything that can be checked is checked before any process group or weight exists; an
error is one line on rank 0 and exit 2. This launcher is the only place that reads the
environment (torchrun's variables; DeepSpeed itself wants LOCAL_RANK set).
"""
from __future__ import annotations

import logging
import os
import sys
import time
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

from moe_ext.config import GenerateConf  # noqa: E402
from moe_ext.deepspeed.engine import build_engine, clips_itself  # noqa: E402
from moe_ext.dist import DistEnv, init_distributed  # noqa: E402
from moe_ext.groups import ProcessGroups  # noqa: E402
from moe_ext.launching import (ModelSource, UsageError, as_usage_error,  # noqa: E402
                               build_model_shard, device_type_for, launch_topology,
                               resolve_model_source, run_and_exit)
from moe_ext.model import ModelArgs, Transformer, generate  # noqa: E402
from moe_ext.model.tokenizer import load_tokenizer  # noqa: E402
from moe_ext.plan import ParallelPlan, build_plan  # noqa: E402
from moe_ext.topology import Topology  # noqa: E402
from moe_ext.train.config import TrainConf, register_train_configs  # noqa: E402
from moe_ext.train.data import TokenData  # noqa: E402
from moe_ext.train.export import export_moe_ext, hf_config  # noqa: E402
from moe_ext.train.loop import RunState, Trainer  # noqa: E402
from moe_ext.train.report import LOG_NAME, PLOT_NAME, plot_losses, write_json  # noqa: E402
from moe_ext.train.state import (ResumePoint, capture_engine, check_compatible,  # noqa: E402
                                 find_checkpoint, load_rank_state, restore_engine,
                                 save_checkpoint)

log = logging.getLogger("moe_ext.train")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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


def _dtype(requested: str, device_type: str, zero_stage: int) -> torch.dtype:
    if requested == "fp16":
        raise UsageError("dtype=fp16 training needs loss scaling, which this launcher does not "
                         "set up; use dtype=bf16 (GPU) or fp32")
    if requested == "auto":
        # bf16 needs DeepSpeed's fp32 masters, which only its ZeRO/bf16 optimizers keep
        return torch.bfloat16 if device_type == "cuda" and zero_stage > 0 else torch.float32
    if requested not in DTYPES:
        raise UsageError(f"dtype={requested!r} is not one of auto, {', '.join(DTYPES)}")
    if requested == "bf16" and device_type == "cpu":
        raise UsageError("dtype=bf16 on CPU: DeepSpeed's CPU path trains in fp32; use "
                         "dtype=fp32 (or auto)")
    if requested == "bf16" and zero_stage == 0:
        raise UsageError("dtype=bf16 needs train.zero_stage=1 or 2 (fp32 master weights live "
                         "in DeepSpeed's ZeRO/bf16 optimizers); or use dtype=fp32")
    return DTYPES[requested]


def plan_key(plan: ParallelPlan) -> dict[str, Any]:
    """The plan facts a training checkpoint depends on (its shards and partitions)."""
    return {k: getattr(plan, k) for k in ("strategy", "world_size", "tp", "pp", "dp", "ep",
                                          "etp", "edp")}


def model_key(args: ModelArgs) -> dict[str, Any]:
    return {k: v for k, v in args.to_dict().items() if k != "init_seed"}


def _check_loop(conf: Any, args: ModelArgs) -> None:
    for name in ("steps", "micro_batch", "seq_len"):
        if getattr(conf, name) < 1:
            raise UsageError(f"train.{name}={getattr(conf, name)}; it must be at least 1")
    if conf.seq_len > args.max_position_embeddings:
        raise UsageError(f"train.seq_len={conf.seq_len} is over the model's context of "
                         f"{args.max_position_embeddings}; lower train.seq_len")
    if conf.zero_stage not in (0, 1, 2):
        raise UsageError(f"train.zero_stage={conf.zero_stage}; use 0, 1 or 2")
    if conf.lr <= 0 or conf.grad_clip < 0 or conf.aux_loss_coeff < 0:
        raise UsageError("train.lr must be > 0, train.grad_clip and train.aux_loss_coeff >= 0")


def _check_plan(plan: ParallelPlan, conf: Any, dtype: torch.dtype) -> None:
    """Training limits of the native model (its inference paths are not all differentiable)."""
    if plan.tp > 1:
        raise UsageError(f"plan {plan.strategy} uses tp={plan.tp}, but the native model's "
                         f"tensor-parallel all-reduces are inference-only (not differentiable); "
                         f"train with parallel.tp=1 (strategy=replicate or ep_*)")
    if plan.pp > 1:
        raise UsageError(f"plan uses pp={plan.pp}, but the native model's pipeline sends are "
                         f"inference-only; train with parallel.pp=1")
    if conf.grad_clip > 0 and plan.ep > 1 and not clips_itself(conf.zero_stage, dtype):
        raise UsageError(f"gradient clipping with ep={plan.ep} is exact only without ZeRO in "
                         f"fp32 (DeepSpeed's ZeRO/bf16 clipping takes a per-rank norm); set "
                         f"train.grad_clip=0 or train.zero_stage=0 dtype=fp32")


def prepare(cfg: TrainConf, env: DistEnv, cuda_available: bool, num_local_gpus: int) -> Job:
    """Validate the whole job and decide the plan; creates no process group and no weight."""
    if cfg.engine not in ("deepspeed", "megatron"):
        raise UsageError(f"engine={cfg.engine!r} is not one of deepspeed, megatron")
    if cfg.engine == "megatron":
        from moe_ext.megatron.engine import check_train_settings, require_cuda
        require_cuda(cfg.device, cuda_available, fallback="deepspeed")
        check_train_settings(cfg.dtype, cfg.train.zero_stage)
    device_type = device_type_for(cfg.device, cuda_available)
    dtype = _dtype(cfg.dtype, device_type, cfg.train.zero_stage)
    source = resolve_model_source(cfg.checkpoint, cfg.model)
    args = source.args
    if source.reader is not None and source.tokenizer_spec is None and not source.has_tokenizer_json:
        raise UsageError(f"checkpoint {cfg.checkpoint} has no tokenizer.json (and its config "
                         f"names none); training needs one to tokenize data=")
    tokenizer = load_tokenizer(source.tokenizer_spec, source.checkpoint)
    _check_loop(cfg.train, args)
    data = TokenData.load(cfg.data, tokenizer, args.vocab_size, cfg.train.seq_len,
                          cfg.train.val_fraction)
    topology = launch_topology(cfg.topology, device_type, num_local_gpus, env.local_world_size)
    plan = build_plan(cfg.strategy, cfg.parallel, env.world_size, topology, source.model_conf,
                      dtype_bytes=torch.finfo(dtype).bits // 8,
                      tokens_per_step=cfg.train.micro_batch * cfg.train.seq_len)
    if cfg.engine == "megatron":
        from moe_ext.megatron.engine import check_plan
        check_plan(plan, args, training=True)
    _check_plan(plan, cfg.train, dtype)
    resume = None
    if cfg.resume is not None:
        resume = find_checkpoint(cfg.resume)
        check_compatible(resume, env.world_size, plan_key(plan), cfg.train.zero_stage,
                         model_key(args))
    return Job(device_type, dtype, source, tokenizer, data, topology, plan, resume)


def build_model(job: Job, groups: ProcessGroups, rank: int, device: torch.device
                ) -> Transformer:
    """This rank's shard in fp32 (DeepSpeed keeps fp32 masters and casts for bf16): built
    on meta, parallelized, then filled from the checkpoint slices or the seeded init."""
    return build_model_shard(job.source, job.plan, groups, rank, device, torch.float32,
                             progress=rank == 0)


def _run_dir(own: Path, device: torch.device) -> Path:
    """Rank 0's Hydra output directory on every rank (each rank's Hydra picks a timestamp
    of its own; checkpoints and logs must go to one place)."""
    box = [str(own)]
    dist.broadcast_object_list(box, src=0, device=device)
    return Path(box[0])


def _sample(model: Transformer, job: Job, cfg: TrainConf) -> Optional[dict[str, Any]]:
    """Generate the configured sample with the trained model (collective under EP)."""
    if cfg.sample.prompt is None:
        return None
    prompt = job.tokenizer.encode(cfg.sample.prompt)
    conf = GenerateConf(max_new_tokens=cfg.sample.max_new_tokens,
                        temperature=cfg.sample.temperature, top_p=cfg.sample.top_p,
                        max_batch_size=1, cuda_graphs=False)
    result = generate(model, [prompt], conf, eos_id=job.tokenizer.eos_id,
                      pad_id=job.tokenizer.pad_id, seed=cfg.train.seed)
    return {"prompt": cfg.sample.prompt, "text": job.tokenizer.decode(result.tokens[0])}


def run(cfg: TrainConf, env: DistEnv, own_run_dir: Path, raw_config: dict[str, Any]) -> int:
    cuda_available = torch.cuda.is_available()
    job = as_usage_error(prepare, cfg, env, cuda_available,
                         torch.cuda.device_count() if cuda_available else 0)
    conf = cfg.train
    if env.rank == 0:
        log.info("topology: %s", job.topology.describe())
        log.info("plan: %s", job.plan.describe())
        log.info("data: %s (%d training tokens, %d held out)", job.data.source,
                 job.data.train.numel(), job.data.val.numel())
    device = init_distributed(env, job.device_type, cfg.dist_timeout_s)
    run_dir = _run_dir(own_run_dir, device)
    groups = ProcessGroups.build(job.plan, backend="nccl" if job.device_type == "cuda" else "gloo",
                                 timeout=timedelta(seconds=cfg.dist_timeout_s))
    model = build_model(job, groups, env.rank, device)
    if cfg.engine == "megatron":  # GPTModel from the native shard, which the export reuses
        from moe_ext.megatron.engine import build_train_engine, copy_to_native
        engine = build_train_engine(model, job.source, groups, device, lr=conf.lr,
                                    weight_decay=conf.weight_decay,
                                    betas=(conf.beta1, conf.beta2),
                                    aux_loss_coeff=conf.aux_loss_coeff,
                                    z_loss_coeff=conf.z_loss_coeff)
    else:
        engine = build_engine(model, groups, lr=conf.lr, weight_decay=conf.weight_decay,
                              betas=(conf.beta1, conf.beta2), micro_batch=conf.micro_batch,
                              zero_stage=conf.zero_stage, grad_clip=conf.grad_clip,
                              aux_loss_coeff=conf.aux_loss_coeff,
                              z_loss_coeff=conf.z_loss_coeff, dtype=job.dtype)
    state = RunState()
    if job.resume is not None:
        restore_engine(engine, load_rank_state(job.resume, env.rank, map_location=device),
                       groups.dp_rank, job.plan.dp)
        meta = job.resume.meta
        state = RunState(step=job.resume.step, history=meta["history"], evals=meta["evals"])
        if env.rank == 0:
            log.info("resumed from %s at step %d", job.resume.directory, state.step)
    params = sum(p.numel() for p in model.parameters())
    record: dict[str, Any] = {
        "command": sys.argv, "config": raw_config, "plan": job.plan.describe(),
        "topology": job.topology.describe(), "world_size": env.world_size,
        "device": job.device_type, "dtype": str(job.dtype).removeprefix("torch."),
        "params_on_rank0": params,
        "data": {"source": job.data.source, "train_tokens": job.data.train.numel(),
                 "val_tokens": job.data.val.numel()},
        "resumed_from": None if job.resume is None else str(job.resume.directory),
    }
    started = time.perf_counter()
    title = f"{job.source.model_conf.name} | {job.plan.describe().split(' | ')[0]}"

    def write_reports(state: RunState) -> None:
        record.update(history=state.history, evals=state.evals, steps_done=state.step,
                      wall_s=time.perf_counter() - started)
        write_json(run_dir / LOG_NAME, record)
        plot_losses(state.history, state.evals, run_dir / PLOT_NAME, title)

    def on_checkpoint(state: RunState) -> None:
        rank_state = capture_engine(engine)
        meta = {"plan": plan_key(job.plan), "zero_stage": conf.zero_stage,
                "model": model_key(job.source.args), "history": state.history, "evals": state.evals}
        path = save_checkpoint(run_dir / "checkpoints", state.step, env.rank, env.world_size,
                               rank_state, meta, conf.keep_checkpoints)
        if env.rank == 0:
            record["checkpoint"] = str(path)
            write_reports(state)

    trainer = Trainer(engine, groups, job.data, conf, device,
                      own_clipping=clips_itself(conf.zero_stage, job.dtype))
    trainer.run(state, on_checkpoint, progress=cfg.progress and env.rank == 0)
    if cfg.engine == "megatron":
        copy_to_native(engine.module.model, model)  # the export and sample read `model`
    destination = cfg.export or str(run_dir / "model")
    export_moe_ext(model, job.plan, env.rank, destination,
                   hf_config(job.source.args, tokenizer=job.source.tokenizer_spec
                             if job.source.tokenizer_spec == "byte" else None),
                   dtype=job.dtype, side_files_from=cfg.checkpoint)
    dist.barrier()  # the export is complete before anyone reports or exits
    sample = _sample(model, job, cfg)
    if env.rank == 0:
        record.update(export=destination, sample=sample)
        write_reports(state)
        if state.history:
            last = state.history[-1]
            log.info("step %d: loss %.4f (lm %.4f, aux %.4f)", last["step"], last["loss"],
                     last["lm_loss"], last["aux_loss"])
        if state.evals:
            log.info("held-out loss: %.4f", state.evals[-1]["val_loss"])
        log.info("model: %s   log: %s   curve: %s", destination, run_dir / LOG_NAME,
                 run_dir / PLOT_NAME)
        if sample is not None:
            log.info("sample:\n%s%s", sample["prompt"], sample["text"])
    return 0


register_train_configs()


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    env = DistEnv.from_environ(os.environ)
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))  # DeepSpeed reads it
    logging.getLogger().setLevel(logging.INFO if env.rank == 0 else logging.WARNING)
    raw = OmegaConf.to_container(cfg, resolve=True)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    run_and_exit(lambda: run(OmegaConf.to_object(cfg), env, output_dir, raw), env.rank,
                 env.world_size)


if __name__ == "__main__":
    main()

"""Steps launch/infer.py, launch/serve.py and launch/train.py share: from config to this
rank's model shard, and how a launcher ends (one ``error:`` line for a MoeExtError, a
traceback for a bug).

Everything before ``build_model_shard`` creates no process group and no weight, so bad
input fails the same way on every rank, before any collective could hang.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from moe_ext import preflight
from moe_ext.checkpoint.reader import CheckpointReader, load_sharded
from moe_ext.config import check_group_choices
from moe_ext.cost import select_profile
from moe_ext.dist import DistEnv, init_distributed
from moe_ext.errors import MoeExtError
from moe_ext.groups import ProcessGroups, node_layout
from moe_ext.model import ModelArgs, Transformer
from moe_ext.model.parallelize import RankCoords, parallelize, shard_slices
from moe_ext.model.weights import init_random_, materialize_
from moe_ext.plan import ParallelPlan, build_plan
from moe_ext.quant.layout import stored_requests
from moe_ext.topology import GIB, Topology, TopologyError, probe, resolve_topology

DEBUG_VARIABLE = "MOE_EXT_DEBUG"
# what `dtype=` accepts: our short names and the names torch, transformers and vLLM use
DTYPE_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(MoeExtError):
    """Bad input found before any process group exists (one line: problem and fix)."""


def as_usage_error(prepare: Callable[..., Any], *args: Any) -> Any:
    """Run a launcher's validation step; its MoeExtErrors (PlanError, CheckpointError, ...)
    are the same on every rank, so they become UsageErrors that rank 0 alone prints. Any
    other exception is a bug and propagates as it is."""
    try:
        return prepare(*args)
    except UsageError:
        raise
    except MoeExtError as err:
        raise UsageError(str(err)) from err


def prepare_job(
    prepare: Callable[[Any, DistEnv, bool, int], Any], cfg: Any, env: DistEnv, log: logging.Logger
) -> Any:
    """A launcher's validation step ``prepare(cfg, env, cuda_available, num_local_gpus)``
    (no process group, no weight) with this machine's CUDA, through ``as_usage_error``; rank
    0 then logs the job's topology and plan on ``log``. Returns the job (it has ``.topology``
    and ``.plan``)."""
    cuda_available = torch.cuda.is_available()
    job = as_usage_error(
        prepare, cfg, env, cuda_available, torch.cuda.device_count() if cuda_available else 0
    )
    if env.rank == 0:
        log.info("topology: %s", job.topology.describe())
        log.info("plan: %s", job.plan.describe())
    return job


def link_environment(
    topology_conf: Any, environ: Mapping[str, str], rank: int, log: logging.Logger
) -> None:
    """``+topology=pcie`` (no peer access) sets NCCL_P2P_DISABLE=1 in the process
    environment before NCCL starts (moe_ext.preflight.link_environment); rank 0 logs the
    line on ``log``. A read-only ``environ`` is left as it is."""
    if isinstance(environ, MutableMapping):
        line = preflight.link_environment(topology_conf, environ)
        if line and rank == 0:
            log.info("%s", line)


def launcher_main(
    cfg: Any, environ: Mapping[str, str], run: Callable[[Any, DistEnv], int], log: logging.Logger
) -> NoReturn:
    """The Hydra main of launch/infer.py and launch/serve.py: ``cfg`` the composed
    DictConfig, ``environ`` the process environment, ``run(conf, env)`` the whole job on this
    rank (``conf`` the config as its dataclass) returning the exit code. Logs at INFO on rank
    0 and WARNING on the others."""
    debug = bool(cfg.get("debug")) or debug_requested(environ)
    env = launch_env(environ, debug)
    logging.basicConfig(
        level=logging.INFO if env.rank == 0 else logging.WARNING, format="%(message)s", force=True
    )
    link_environment(cfg.get("topology"), environ, env.rank, log)
    run_and_exit(lambda: run(OmegaConf.to_object(cfg), env), env.rank, env.world_size, debug)


def debug_requested(environ: Mapping[str, str]) -> bool:
    """``MOE_EXT_DEBUG=1`` (or true/yes/on) in the environment the launcher passes in."""
    return environ.get(DEBUG_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def dtype_name(requested: str) -> str:
    """``auto`` or the short name (fp32 / bf16 / fp16) of a ``dtype=`` value or its alias."""
    name = "auto" if requested == "auto" else DTYPE_ALIASES.get(str(requested).lower())
    if name is None:
        raise UsageError(f"dtype={requested!r} is not one of auto, {', '.join(DTYPE_ALIASES)}")
    return name


def device_type_for(requested: str, cuda_available: bool) -> str:
    if requested not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device={requested!r} is not one of auto, cpu, cuda")
    if requested == "cuda" and not cuda_available:
        raise UsageError("device=cuda but CUDA is not available; use device=cpu or device=auto")
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    return requested


def package_path(spec: Optional[str]) -> Optional[str]:
    """``pkg:data/...`` -> that path inside the installed moe_ext package; others unchanged."""
    if spec is None or not spec.startswith("pkg:"):
        return spec
    return str(Path(__file__).parent / spec[len("pkg:") :])


@dataclass
class ModelSource:
    """Where the model comes from: a checkpoint (its config wins) or a ``model=`` config."""

    args: ModelArgs  # what the model, the planner and the checkpoint maps read
    name: str  # the conf/model name or the checkpoint directory's name
    reader: Optional[CheckpointReader]  # None: deterministic random init
    tokenizer_spec: Optional[str]  # "byte", a tokenizer path, or None (checkpoint's own)
    has_tokenizer_json: bool

    @property
    def checkpoint(self) -> Optional[str]:
        return None if self.reader is None else str(self.reader.path)


def resolve_model_source(checkpoint: Optional[str], model_conf: Any) -> ModelSource:
    """Open ``checkpoint`` (headers only) or take ``model_conf``; a moe_ext checkpoint of a
    byte-level model says so in its config (``"tokenizer": "byte"``)."""
    if checkpoint is None:
        return ModelSource(
            ModelArgs.from_model_conf(model_conf),
            model_conf.get("name"),
            None,
            model_conf.get("tokenizer"),
            False,
        )
    reader = CheckpointReader.open(checkpoint)
    args = ModelArgs.from_hf_config(reader.config, f"{checkpoint}/config.json")
    return ModelSource(
        args,
        Path(checkpoint).name,
        reader,
        reader.config.get("tokenizer"),
        (Path(checkpoint) / "tokenizer.json").is_file(),
    )


def launch_topology(
    conf: Any,
    device_type: str,
    num_local_gpus: int,
    local_world_size: int,
    probe: Callable[[], Topology] = probe,
) -> Topology:
    """The topology the plan sees. A forced GPU topology on CPU ranks (``+topology=pcie`` on
    a laptop) emulates one GPU per rank; on GPUs only the ones this launch uses count.
    ``topology.gpu_memory_gib=N`` without a forced kind keeps the probe and sets its GPUs'
    memory (the natural way to say "my cards have N GiB")."""
    gpus = min(num_local_gpus, local_world_size) if device_type == "cuda" else local_world_size
    if _memory_only(conf):
        topology = probed_with_memory(probe(), float(conf.gpu_memory_gib))
    else:
        topology = resolve_topology(conf, gpus, probe=probe)
    if device_type == "cuda" and topology.num_gpus > local_world_size:
        topology = topology.subset(local_world_size)
    return topology


def launch_plan(
    cfg: Any,
    env: DistEnv,
    device_type: str,
    num_local_gpus: int,
    args: ModelArgs,
    dtype: torch.dtype,
    **workload: Any,
) -> tuple[Topology, ParallelPlan]:
    """The topology (``launch_topology`` of ``cfg.topology``) and the plan of ``cfg.strategy``
    / ``cfg.parallel`` / ``cfg.plan.profile`` for ``env.world_size`` ranks running ``args``
    in ``dtype``. ``workload``: build_plan's keywords for what one step does
    (tokens_per_step, batch, prompt_len, objective)."""
    topology = launch_topology(cfg.topology, device_type, num_local_gpus, env.local_world_size)
    plan = build_plan(
        cfg.strategy,
        cfg.parallel,
        env.world_size,
        topology,
        args,
        dtype_bytes=torch.finfo(dtype).bits // 8,
        profile=select_profile(cfg.plan.profile, topology),
        ranks_per_node=env.local_world_size,
        **workload,
    )
    return topology, plan


def _memory_only(conf: Any) -> bool:
    """Kind auto (probe) with gpu_memory_gib the one field set."""
    if conf is None or conf.kind != "auto" or conf.gpu_memory_gib is None:
        return False
    return all(
        getattr(conf, name) is None
        for name in ("num_gpus", "p2p", "p2p_atomics", "nvlink_count", "pcie_gen", "pcie_width")
    )


def probed_with_memory(probed: Topology, gpu_memory_gib: float) -> Topology:
    """``probed`` with every GPU's memory set to ``gpu_memory_gib``."""
    if gpu_memory_gib <= 0:
        raise TopologyError(f"topology.gpu_memory_gib={gpu_memory_gib} must be positive")
    if not probed.gpus:
        raise TopologyError(
            f"topology.gpu_memory_gib={gpu_memory_gib:g}: the probe found no "
            f"GPU to apply it to; to plan for GPUs here add +topology=pcie "
            f"(or +topology=nvlink)"
        )
    memory = int(gpu_memory_gib * GIB)
    return replace(
        probed,
        gpus=tuple(replace(g, memory_bytes=memory) for g in probed.gpus),
        notes=(*probed.notes, f"GPU memory {gpu_memory_gib:g} GiB from topology.gpu_memory_gib"),
    )


def start_ranks(
    plan: ParallelPlan,
    env: DistEnv,
    device_type: str,
    timeout_s: float,
    preflight_requested: Optional[bool],
    debug: bool = False,
) -> tuple[torch.device, ProcessGroups]:
    """What both launchers do between the plan and the weights: refuse a plan whose TP / EP
    groups would span nodes (rank 0 prints it) before any group exists, start
    torch.distributed, build every process group of ``plan``, and check the links they use
    (``moe_ext.preflight``: a broken one is one line per rank and exit 2, not a hang).
    Returns (this rank's device, its ProcessGroups)."""
    as_usage_error(node_layout, plan, env.world_size, env.local_world_size)
    device = init_distributed(env, device_type, timeout_s)
    groups = ProcessGroups.build(
        plan,
        backend="nccl" if device_type == "cuda" else "gloo",
        timeout=timedelta(seconds=timeout_s),
        local_world_size=env.local_world_size,
    )
    preflight.run_or_exit(
        preflight_requested,
        groups,
        device,
        env.local_world_size,
        timeout_s=min(preflight.DEFAULT_TIMEOUT_S, timeout_s),
        debug=debug,
    )
    return device, groups


def build_model_shard(
    source: ModelSource,
    plan: ParallelPlan,
    groups: Any,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
    verify: bool = False,
) -> Transformer:
    """This rank's shard of the model in ``dtype``: built on meta, parallelized, then
    materialized straight from the checkpoint slices it needs (or the seeded random init).
    ``verify``: hash each tensor it touches against the manifest (``checkpoint_verify=true``).
    Quantized weights stay quantized: read as stored, computed with in ``dtype``.
    Raises CheckpointError (a MoeExtError) naming a missing or corrupt tensor."""
    with torch.device("meta"):
        model = Transformer(source.args).to(dtype=dtype)  # cast on meta: no full fp32 copy
    parallelize(model, plan, groups)
    if plan.overlap_microbatches > 1:
        model.set_moe_overlap(plan.overlap_microbatches)
    requests = shard_slices(plan, RankCoords.of(plan, rank), source.args)
    if source.reader is None:
        init_random_(model, seed=source.args.init_seed, requests=requests, device=device)
    else:
        # each tensor in its model dtype: buffers a module keeps in float32 (the router's
        # correction bias) must not pass through ``dtype``
        dtypes = {name: t.dtype for name, t in model.state_dict().items()}
        state = load_sharded(
            source.reader,
            stored_requests(requests, source.args),
            dtype=dtypes,
            device=device,
            progress=progress,
            verify=verify,
        )
        materialize_(model, device).load_state_dict(state, strict=False)
    return model


def run_and_exit(
    body: Callable[[], int], rank: int, world_size: int, debug: bool = False
) -> NoReturn:
    """A launcher's main: a MoeExtError exits 2 through ``report_error`` (one line, plus
    the chained traceback with ``debug``); the process group is torn down whatever happens.
    Other exceptions are bugs: they propagate with their traceback."""
    try:
        code = body()
    except MoeExtError as err:
        report_error(err, rank, world_size, debug)
        code = 2
    finally:
        if dist.is_initialized() and dist.get_backend() != "nccl":
            dist.destroy_process_group()
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """Flush and leave without interpreter teardown.

    Teardown is skipped because a C++ worker thread left joinable by a library (seen with
    DeepSpeed on gloo) can abort the process there ("terminate called without an active
    exception"), turning a finished run into a crash. NCCL process groups are not
    destroyed: after decode steps with NCCL collectives captured in CUDA graphs,
    ``destroy_process_group`` blocked (2xH200, torch 2.11); the ranks first agree that
    all are done (barrier), then process exit releases the communicators."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        dist.barrier()
    end_child_processes()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def end_child_processes(timeout_s: float = 5.0) -> None:
    """Terminate the multiprocessing children libraries leave running until interpreter
    exit (Megatron's checkpoint writer keeps a Manager process for its results queue), which
    ``os._exit`` would orphan."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout_s)


def report_error(err: MoeExtError, rank: int, world_size: int, debug: bool = False) -> None:
    """Print a one-line error once: rank 0 for errors every rank hits alike (UsageError);
    any rank for its own. ``debug`` prints the traceback with its chained causes first.
    torchrun stops all ranks as soon as one exits, so the others wait a moment to let rank
    0 print."""
    if rank == 0 or not isinstance(err, UsageError):
        if debug:
            traceback.print_exception(err, file=sys.stderr)
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
    elif world_size > 1:
        time.sleep(3)


def one_line(err: BaseException) -> str:
    """The message on one line (a wrapped library message may span several)."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def check_command_line(argv: list[str], environ: Mapping[str, str], conf_dir: Path) -> None:
    """What a launcher checks before Hydra composes its config: a group choice that does not
    exist (``strategy=ep_foo``) is one line on rank 0 and exit 2, instead of Hydra's
    dozen-line message on every rank."""
    debug = debug_requested(environ)
    env = launch_env(environ, debug)
    try:
        as_usage_error(check_group_choices, argv, conf_dir)
    except UsageError as err:
        report_error(err, env.rank, env.world_size, debug)
        exit_now(2)


def launch_env(environ: Mapping[str, str], debug: bool) -> DistEnv:
    """torchrun's variables from ``environ``; a malformed one is one line and exit 2."""
    try:
        return DistEnv.from_environ(environ)
    except MoeExtError as err:
        report_error(err, 0, 1, debug)
        exit_now(2)

"""Steps launch/infer.py and launch/train.py share: from config to this rank's model shard.

Everything before ``build_model_shard`` creates no process group and no weight, so bad
input fails the same way on every rank, before any collective could hang.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import torch
import torch.distributed as dist

from moe_ext.checkpoint.reader import CheckpointReader, load_sharded
from moe_ext.model import ModelArgs, Transformer
from moe_ext.model.parallelize import RankCoords, parallelize, shard_slices
from moe_ext.model.weights import init_random_, materialize_
from moe_ext.plan import ParallelPlan
from moe_ext.topology import Topology, resolve_topology
from moe_ext.errors import MoeExtError


class UsageError(MoeExtError):
    """Bad input found before any process group exists (one line: problem and fix)."""


def as_usage_error(prepare: Callable[..., Any], *args: Any) -> Any:
    """Run a launcher's validation step; its ValueErrors (PlanError, CheckpointError, ...)
    are the same on every rank, so they become UsageErrors that rank 0 alone prints."""
    try:
        return prepare(*args)
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(str(err)) from None


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
    return str(Path(__file__).parent / spec[len("pkg:"):])


@dataclass
class ModelSource:
    """Where the model comes from: a checkpoint (its config wins) or a ``model=`` config."""

    args: ModelArgs
    model_conf: Any  # moe_ext.config.ModelConf: what the planner reads
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
        return ModelSource(ModelArgs.from_model_conf(model_conf), model_conf, None,
                           model_conf.tokenizer, False)
    reader = CheckpointReader.open(checkpoint)
    args = ModelArgs.from_hf_config(reader.config)
    return ModelSource(args, args.to_model_conf(name=Path(checkpoint).name), reader,
                       reader.config.get("tokenizer"),
                       (Path(checkpoint) / "tokenizer.json").is_file())


def launch_topology(conf: Any, device_type: str, num_local_gpus: int,
                    local_world_size: int) -> Topology:
    """The topology the plan sees. A forced GPU topology on CPU ranks (``+topology=pcie`` on
    a laptop) emulates one GPU per rank; on GPUs only the ones this launch uses count."""
    gpus = min(num_local_gpus, local_world_size) if device_type == "cuda" else local_world_size
    topology = resolve_topology(conf, gpus)
    if device_type == "cuda" and topology.num_gpus > local_world_size:
        topology = topology.subset(local_world_size)
    return topology


def build_model_shard(source: ModelSource, plan: ParallelPlan, groups: Any, rank: int,
                      device: torch.device, dtype: torch.dtype, progress: bool
                      ) -> Transformer:
    """This rank's shard of the model in ``dtype``: built on meta, parallelized, then
    materialized straight from the checkpoint slices it needs (or the seeded random init).
    Raises CheckpointError (a ValueError) naming a missing or corrupt tensor."""
    with torch.device("meta"):
        model = Transformer(source.args).to(dtype=dtype)  # cast on meta: no full fp32 copy
    parallelize(model, plan, groups)
    requests = shard_slices(plan, RankCoords.of(plan, rank), source.args)
    if source.reader is None:
        init_random_(model, seed=source.args.init_seed, requests=requests, device=device)
    else:
        state = load_sharded(source.reader, requests, dtype=dtype, device=device,
                             progress=progress)
        materialize_(model, device).load_state_dict(state, strict=False)
    return model


def run_and_exit(body: Callable[[], int], rank: int, world_size: int) -> NoReturn:
    """A launcher's main: our one-line errors (ValueError subclasses) exit 2 through
    ``report_error``; the process group is torn down whatever happens. Other exceptions
    propagate with their traceback."""
    try:
        code = body()
    except ValueError as err:
        report_error(err, rank, world_size)
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


def report_error(err: ValueError, rank: int, world_size: int) -> None:
    """Print a one-line error once: rank 0 for errors every rank hits alike (UsageError);
    any rank for its own. torchrun stops all ranks as soon as one exits, so the others wait
    a moment to let rank 0 print."""
    if rank == 0 or not isinstance(err, UsageError):
        print(f"error: {err}", file=sys.stderr, flush=True)
    elif world_size > 1:
        time.sleep(3)

"""Training checkpoints for exact resume: every rank's module shard and optimizer state.

Layout (one directory per run, on a file system every rank sees)::

    checkpoints/latest                  name of the newest complete step directory
    checkpoints/step_00000250/meta.json step, world size, plan, zero stage, history so far
    checkpoints/step_00000250/rank_00000.pt ... one per rank (module + optimizer state)

A step directory is written under a temporary name and renamed once every rank has
written its file, so ``latest`` never names a partial checkpoint. Batches and learning
rates are pure functions of the step (moe_ext.train.data, moe_ext.train.loop), so module
and optimizer state are all a resumed run needs to continue bit for bit. Resuming needs
the same world size, plan and ZeRO stage (the optimizer state is partitioned by them).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from moe_ext.errors import MoeExtError

FORMAT = "moe_ext-train"
FORMAT_VERSION = 1
LATEST = "latest"
META = "meta.json"
_STEP_NAME = re.compile(r"step_\d+")


class ResumeError(MoeExtError):
    """A training checkpoint that cannot be resumed here (one line: problem and fix)."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank:05d}.pt"


@dataclass
class ResumePoint:
    """A complete step directory and its metadata."""

    directory: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def find_checkpoint(path: str) -> ResumePoint:
    """``path`` is a run's ``checkpoints`` directory (its ``latest`` is taken) or one
    ``step_*`` directory. Reads metadata and each rank file's zip directory (a truncated
    file has none), no tensors."""
    directory = Path(path)
    if (directory / LATEST).is_file():
        name = (directory / LATEST).read_text().strip()
        if not _STEP_NAME.fullmatch(name):
            raise ResumeError(
                f"{directory / LATEST} names {name[:80]!r}, not a step_* directory "
                f"next to it; pass resume=<run dir>/checkpoints/step_*"
            )
        directory = directory / name
    meta_file = directory / META
    if not meta_file.is_file():
        raise ResumeError(
            f"{path} is not a training checkpoint (no {META} there and no "
            f"{LATEST} file); pass resume=<run dir>/checkpoints or a step_* dir"
        )
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ResumeError(f"{meta_file} is not a {FORMAT} v{FORMAT_VERSION} checkpoint")
        world_size, _ = int(meta["world_size"]), int(meta["step"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        if isinstance(err, ResumeError):
            raise
        raise ResumeError(
            f"cannot parse {meta_file} ({type(err).__name__}: {err}); {_previous_hint(directory)}"
        ) from err
    missing = [r for r in range(world_size) if not rank_file(directory, r).is_file()]
    if missing:
        raise ResumeError(
            f"{directory} lacks the files of ranks {missing[:4]}; {_previous_hint(directory)}"
        )
    for r in range(world_size):
        _check_rank_file(rank_file(directory, r))
    return ResumePoint(directory, meta)


def _previous_hint(directory: Path) -> str:
    """Where to resume from instead of the broken step directory ``directory``."""
    older = sorted(
        p
        for p in directory.parent.glob("step_*")
        if p.is_dir() and _STEP_NAME.fullmatch(p.name) and p.name < directory.name
    )
    if older:
        return f"resume from the previous checkpoint: resume={older[-1]}"
    return f"there is no earlier step_* checkpoint in {directory.parent}: start without resume="


def _check_rank_file(path: Path) -> None:
    """A rank file is a torch.save zip; a truncated one lacks the zip's closing directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ResumeError(
            f"{path} is truncated or corrupt ({err}); {_previous_hint(path.parent)}"
        ) from err


def check_compatible(
    point: ResumePoint,
    world_size: int,
    plan_key: dict[str, Any],
    zero_stage: int,
    model_key: dict[str, Any],
) -> None:
    """Refuse a checkpoint saved under another world size, plan, ZeRO stage or model."""
    meta = point.meta
    if int(meta["world_size"]) != world_size:
        raise ResumeError(
            f"{point.directory} was saved by {meta['world_size']} ranks, this run "
            f"has {world_size}; resume with torchrun --nproc-per-node "
            f"{meta['world_size']}"
        )
    if meta.get("plan") != plan_key:
        raise ResumeError(
            f"{point.directory} was saved under plan {meta.get('plan')}, this "
            f"run's plan is {plan_key}; resume with the same strategy and "
            f"parallel.*"
        )
    if meta.get("zero_stage") != zero_stage:
        raise ResumeError(
            f"{point.directory} was saved with train.zero_stage="
            f"{meta.get('zero_stage')}; resume with the same stage"
        )
    if meta.get("model") != model_key:
        raise ResumeError(
            f"{point.directory} holds another model shape than this run's; "
            f"resume with the model it was trained with"
        )


def save_checkpoint(
    root: Path,
    step: int,
    rank: int,
    world_size: int,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write this rank's state for ``step`` and, on rank 0, the metadata; collective.

    rank_state: what this rank needs back (module and optimizer state dicts, RNG). meta:
    JSON-serialisable run facts (rank 0's is written). keep: newest step dirs kept (0: all).
    """
    final = root / step_name(step)
    tmp = root / f".{step_name(step)}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()  # the temporary directory exists before anyone writes into it
    torch.save(rank_state, rank_file(tmp, rank))
    dist.barrier()  # every rank's file is complete before the directory is published
    if rank == 0:
        meta = dict(
            meta, format=FORMAT, format_version=FORMAT_VERSION, step=step, world_size=world_size
        )
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(final.name + "\n")
        latest_tmp.replace(root / LATEST)
        if keep > 0:
            steps = sorted(p for p in root.glob("step_*") if p.is_dir())
            for old in steps[:-keep]:
                shutil.rmtree(old)
    dist.barrier()  # nobody moves on (or exits) before the checkpoint is published
    return final


def load_rank_state(
    point: ResumePoint, rank: int, map_location: Optional[torch.device] = None
) -> dict[str, Any]:
    """This rank's saved state, loaded with ``weights_only=True``: tensors, containers,
    plain values and the few DeepSpeed state classes named here, never arbitrary objects."""
    path = rank_file(point.directory, rank)
    with torch.serialization.safe_globals(_deepspeed_state_classes()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = found.group(1) if found else "an object that is not plain data"
            raise ResumeError(
                f"refusing to unpickle {what} from {path}: a rank file holds only "
                f"tensors and plain state, this one could run code; "
                f"{_previous_hint(point.directory)}"
            ) from err
        except (RuntimeError, OSError, EOFError) as err:
            # torch reports a damaged file as RuntimeError ("PytorchStreamReader failed ...")
            # or OSError (EINVAL for a truncated one); the cause keeps torch's message
            lines = str(err).strip().splitlines()
            reason = lines[0][:200] if lines else type(err).__name__
            raise ResumeError(
                f"cannot load {path} ({reason}); the file is truncated, corrupt "
                f"or unreadable: {_previous_hint(point.directory)}"
            ) from err


def _deepspeed_state_classes() -> list[type]:
    """Plain-data classes DeepSpeed puts into its ZeRO optimizer state (loss scaler, stage,
    fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def capture_engine(engine: Any) -> dict[str, Any]:
    """What this rank saves: its module shard, its optimizer state (a ZeRO partition under
    ZeRO) and the CPU RNG state. With a frozen base (LoRA) only the trainable parameters of
    the module are saved: the base comes back from the run's ``checkpoint=`` on resume
    (``check_compatible`` holds the model fixed), and a 30 B base would otherwise be
    rewritten by every rank at every save."""
    module = engine.module
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    frozen = any(not p.requires_grad for p in module.parameters())
    state = module.state_dict()
    if frozen:
        state = {name: tensor for name, tensor in state.items() if name in trainable}
    return {
        "module": state,
        "module_trainable_only": frozen,
        "optimizer": engine.optimizer.state_dict(),
        "rng": torch.get_rng_state(),
    }


def restore_engine(engine: Any, saved: dict[str, Any], dp_rank: int, dp: int) -> None:
    """Put ``capture_engine``'s state back: module first, then the optimizer (ZeRO also
    takes its fp32 master partition from the file), then the RNG."""
    from moe_ext.deepspeed.engine import load_optimizer_state

    module = engine.module
    if saved.get("module_trainable_only", False):
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        if set(saved["module"]) != trainable:
            raise ResumeError(
                f"the checkpoint holds {len(saved['module'])} trainable tensors, this run "
                f"trains {len(trainable)} others; resume with the run's train.lora settings"
            )
        module.load_state_dict(saved["module"], strict=False)
    else:
        module.load_state_dict(saved["module"])
    load_optimizer_state(engine, saved["optimizer"], dp_rank, dp)
    torch.set_rng_state(saved["rng"].cpu())

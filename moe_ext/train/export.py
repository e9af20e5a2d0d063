"""Export a trained, parallelized native model as a moe_ext checkpoint directory (the
format ``CheckpointReader`` and ``launch/infer.py checkpoint=<dir>`` load).

Rank 0 assembles one full tensor at a time from the shards the ranks hold (the regions
``shard_slices`` names: expert blocks over EP, FFN slices over expert TP, head rows over
TP, layers over pipeline stages), receiving each distinct region once from its lowest
owning rank, and streams it into safetensors files through the checkpoint package's
writer. Memory on rank 0: one full tensor at a time.

# E experts, H hidden, F expert FFN size
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from moe_ext.checkpoint.format import (
    MANIFEST,
    SafetensorsWriter,
    TensorEntry,
    confined_file,
    dtype_name,
    nbytes,
    plan_shards,
    staged_directory,
    write_manifest,
)
from moe_ext.errors import MoeExtError
from moe_ext.model.args import ModelArgs
from moe_ext.model.parallelize import RankCoords, shard_slices

# side files of a source checkpoint that describe tokenization and generation
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30


class ExportError(MoeExtError):
    """An export that cannot be written (one line: problem and fix)."""


def hf_config(args: ModelArgs, tokenizer: Optional[str] = None) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of ``args`` (its family writes it)."""
    return args.family.hf_config(args, tokenizer)


def _region_key(request, shape) -> tuple:
    """A hashable identity of the region a ShardRequest names (slices are not hashable)."""
    return tuple(request.bounds(shape)), request.cat_dim


def _place(full: torch.Tensor, request, piece: torch.Tensor) -> None:
    """Write ``piece`` (the request's boxes concatenated along cat_dim) into ``full``."""
    bounds = request.bounds(full.shape)
    sizes = [b[request.cat_dim][1] - b[request.cat_dim][0] for b in bounds] if full.dim() else [1]
    parts = torch.split(piece, sizes, dim=request.cat_dim) if len(bounds) > 1 else [piece]
    for box, part in zip(bounds, parts):
        full[tuple(slice(a, b) for a, b in box)] = part


def _owners(plan: Any, args: Any) -> list[dict[str, Any]]:
    """shard_slices of every rank (pure: no communication)."""
    return [shard_slices(plan, RankCoords.of(plan, r), args) for r in range(plan.world_size)]


def check_export_destination(destination: str, overwrite: bool = False) -> None:
    """Refuse an export ``destination`` that would destroy something: a file, or a non-empty
    directory unless it is a moe_ext checkpoint and ``overwrite`` (``train.overwrite_export``)
    is given. Absent or empty directories are fine. Cheap (no tensor is read): the launcher
    calls it before training, ``export_moe_ext`` again before writing."""
    dst = Path(destination)
    if not dst.exists():
        return
    if not dst.is_dir():
        raise ExportError(f"export={destination} is a file; choose a new directory")
    if not any(dst.iterdir()):
        return
    if not (dst / MANIFEST).is_file():
        raise ExportError(
            f"export={destination} is a non-empty directory that is not a moe_ext "
            f"checkpoint; choose a new or empty directory"
        )
    if not overwrite:
        raise ExportError(
            f"export={destination} already holds a moe_ext checkpoint; pass "
            f"train.overwrite_export=true to replace it, or choose another"
        )


def _side_files(side_files_from: Optional[str]) -> list[Path]:
    """The tokenizer/generation files of the source checkpoint, each inside it."""
    if side_files_from is None or not Path(side_files_from).is_dir():
        return []
    source = Path(side_files_from)
    return [confined_file(source, name, source) for name in SIDE_FILES if (source / name).is_file()]


def export_moe_ext(
    model: torch.nn.Module,
    plan: Any,
    rank: int,
    destination: str,
    config: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    side_files_from: Optional[str] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Optional[Path]:
    """Write the full model that the ranks of ``plan`` hold in shards to ``destination``
    (moe_ext format: safetensors + moe_ext.json manifest + config.json); collective.

    model: this rank's parallelized Transformer (names as in docs/ARCHITECTURE.md);
    config: its Hugging Face config (``hf_config``); dtype: stored dtype; side_files_from:
    a source checkpoint whose tokenizer/generation files are copied. The destination must
    be absent or empty, or a moe_ext checkpoint with ``overwrite`` (``check_export_destination``;
    every rank checks, before any communication, so all refuse together on a shared file
    system); a replaced checkpoint goes only once the new directory is complete. Returns
    the path on rank 0.
    """
    check_export_destination(destination, overwrite)
    side_files = _side_files(side_files_from)
    args = model.args
    shapes = args.family.param_shapes(args)  # name -> full shape, in the model's parameter order
    local = dict(model.named_parameters())
    device = next(iter(local.values())).device
    owners = _owners(plan, args)
    # per tensor: its distinct regions and the lowest rank holding each
    regions: dict[str, list[tuple[int, Any]]] = {}
    for name, shape in shapes.items():
        seen: set = set()
        regions[name] = []
        for r, requests in enumerate(owners):
            request = requests.get(name)
            if request is None:
                continue
            key = _region_key(request, shape)
            if key not in seen:
                seen.add(key)
                regions[name].append((r, request))
        if not regions[name]:
            raise ExportError(f"no rank holds {name}; the plan and the model disagree")
    files = plan_shards(
        [(n, nbytes(s, dtype_name(dtype))) for n, s in shapes.items()], max_shard_bytes
    )
    dst = Path(destination)
    # rank 0 writes into a staged directory (renamed into place at the end, removed on
    # failure); the other ranks only send it their slices
    with staged_directory(dst) if rank == 0 else contextlib.nullcontext() as tmp:
        entries: list[TensorEntry] = []
        for file, names in files:
            writer = (
                SafetensorsWriter(tmp / file, [(n, dtype_name(dtype), shapes[n]) for n in names])
                if rank == 0
                else None
            )
            for name in names:
                if rank == 0:
                    full = torch.empty(shapes[name], dtype=dtype)
                for owner, request in regions[name]:
                    if owner == rank and rank != 0:
                        dist.send(local[name].detach().to(dtype).contiguous(), dst=0)
                    elif rank == 0:
                        if owner == 0:
                            piece = local[name].detach().to(dtype)
                        else:
                            piece = torch.empty(
                                request.shape(shapes[name]), dtype=dtype, device=device
                            )
                            dist.recv(piece, src=owner)
                        _place(full, request, piece.cpu())  # sync: the writer streams host memory
                if rank == 0:
                    sha = writer.write_tensor(name, [full])
                    entries.append(
                        TensorEntry(name, tuple(shapes[name]), dtype_name(dtype), sha, file)
                    )
            if writer is not None:
                writer.close()
        if rank != 0:
            return None
        write_manifest(tmp, args.model_type, dtype_name(dtype), entries)
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        for source in side_files:
            shutil.copyfile(source, tmp / source.name)
    return dst

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
from collections.abc import Mapping, Sequence
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
from moe_ext.checkpoint.shard import ShardRequest
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


def _gather_region(
    full: Optional[torch.Tensor],
    shape: Sequence[int],
    request: Any,
    owner: int,
    local: Mapping[str, torch.Tensor],
    name: str,
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Point to point: ``owner``'s slice ``request`` of tensor ``name`` (whole shape
    ``shape``) reaches rank 0 in ``dtype`` and is placed into ``full``, rank 0's host tensor
    of that shape and dtype (None on the other ranks). ``local``: this rank's tensors by
    name; rank 0 receives on ``device``."""
    if owner == rank and rank != 0:
        dist.send(local[name].detach().to(dtype).contiguous(), dst=0)
    elif rank == 0:
        if owner == 0:
            piece = local[name].detach().to(dtype)
        else:
            piece = torch.empty(request.shape(shape), dtype=dtype, device=device)
            dist.recv(piece, src=owner)
        _place(full, request, piece.cpu())  # sync: written from host memory


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
                full = torch.empty(shapes[name], dtype=dtype) if rank == 0 else None
                for owner, request in regions[name]:
                    _gather_region(
                        full, shapes[name], request, owner, local, name, rank, dtype, device
                    )
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


# ---- LoRA adapters in PEFT's format ------------------------------------------------------

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# families whose transformers experts hold gate_up_proj [E, 2F, H] / down_proj [E, H, F]
# under model.layers.{i}.mlp.experts, as ours do (PEFT's target_parameters then apply;
# tests/unit/test_lora.py loads each). Not yet: gpt_oss (interleaved [E, H, 2F]), and
# deepseek_v3 / glm4_moe, where PEFT sizes the expert adapters of its dense-first layout
# differently
PEFT_EXPERT_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "minimax_m2")


def _adapter_layout(args: ModelArgs, conf: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every adapter tensor of the full model: native name -> (its base tensor's name, full
    shape); pure (a meta model with adapters, no communication)."""
    from moe_ext.model import Transformer
    from moe_ext.train.lora import LORA_MARK, adapter_base_name, apply_lora

    with torch.device("meta"):
        full = Transformer(args)
        apply_lora(full, conf, dtype=torch.float32)
    out = {}
    for name, param in full.named_parameters():
        if LORA_MARK not in name:
            continue
        out[name] = (adapter_base_name(name), tuple(param.shape))
    return out


def _peft_tensors(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's tensors for one full native adapter tensor (transformers' module paths are
    ``model.`` + ours). Projections: ``<path>.lora_A.weight`` [r, K], ``lora_B.weight``
    [N, r]. Experts (PEFT's ParamWrapper, gate_up wrapped inside down): A [E, r, in] ->
    ``lora_A.weight`` [E·r, in]; B [E, out, r] -> ``lora_B.weight`` [out, r·E] (column
    j·E + e is expert e's column j)."""
    module, _, leaf = name.partition(".lora.")
    path = "base_model.model.model." + module
    if module.endswith(".experts"):
        proj, kind = leaf.rsplit("_", 1)  # gate_up / down, A / B
        prefix = path + (".base_layer" if proj == "gate_up" else "")
        if kind == "A":
            return {f"{prefix}.lora_A.weight": tensor.reshape(-1, tensor.shape[-1])}
        E, out_features, r = tensor.shape
        return {f"{prefix}.lora_B.weight": tensor.permute(1, 2, 0).reshape(out_features, r * E)}
    return {f"{path}.lora_{leaf}.weight": tensor}


def export_peft(
    model: torch.nn.Module,
    plan: Any,
    rank: int,
    destination: str,
    conf: Any,
    dtype: torch.dtype = torch.float32,
) -> Optional[Path]:
    """Write the LoRA adapters the ranks of ``plan`` hold (expert adapters over EP, layers
    over stages) as a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads onto the
    transformers model; collective, rank 0 writes. conf: the run's ``LoraConf``.

    Expert adapters need a family whose transformers experts match ours
    (``PEFT_EXPERT_FAMILIES``); elsewhere export them merged (``merge_lora_`` then
    ``export_moe_ext``). Returns the path on rank 0."""
    args = model.args
    targets = list(conf.targets)
    if "experts" in targets and args.model_type not in PEFT_EXPERT_FAMILIES:
        raise ExportError(
            f"PEFT cannot load expert adapters onto {args.model_type}'s transformers experts "
            f"here; export the merged model instead (or drop 'experts' from train.lora.targets)"
        )
    layout = _adapter_layout(args, conf)
    local = dict(model.named_parameters())
    device = next(iter(local.values())).device
    owners = _owners(plan, args)
    tensors: dict[str, torch.Tensor] = {}
    for name, (base, shape) in layout.items():
        seen: set = set()
        full = torch.empty(shape, dtype=dtype) if rank == 0 else None
        for owner, requests in enumerate(owners):
            base_request = requests.get(base)
            if base_request is None:
                continue
            # projections are whole (tp = 1); expert adapters are this owner's expert block
            request = (
                ShardRequest(boxes=((base_request.boxes[0][0],),))
                if ".experts.lora." in name and base_request.boxes[0]
                else ShardRequest.full()
            )
            key = _region_key(request, shape)
            if key in seen:
                continue
            seen.add(key)
            _gather_region(full, shape, request, owner, local, name, rank, dtype, device)
        if rank == 0:
            tensors.update(_peft_tensors(name, full))
    if rank != 0:
        return None
    dense = [t for t in targets if t != "experts"]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": conf.rank,
        "lora_alpha": conf.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": dense or None,
        # order matters: gate_up is wrapped first (inside), down around it
        "target_parameters": (
            ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if "experts" in targets else None
        ),
        "inference_mode": True,
    }
    dst = Path(destination)
    with staged_directory(dst) as tmp:
        writer = SafetensorsWriter(
            tmp / PEFT_WEIGHTS, [(n, dtype_name(dtype), t.shape) for n, t in tensors.items()]
        )
        for n, t in tensors.items():
            writer.write_tensor(n, [t.contiguous()])
        writer.close()
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return dst


def export_lora(
    model: torch.nn.Module,
    plan: Any,
    rank: int,
    adapter_dir: str,
    conf: Any,
    dtype: torch.dtype = torch.float32,
) -> tuple[Optional[str], bool]:
    """The end of a LoRA run (collective): the adapters in PEFT's format to ``adapter_dir``
    where PEFT can load them onto the transformers model (``export_peft``), then the
    adapters merged into the base weights when the base is not quantized (the model then
    exports with ``export_moe_ext`` like a fully trained one). Returns (the adapter
    directory or None when PEFT cannot express the targets, whether the model is merged)."""
    from moe_ext.train.lora import merge_lora_

    args = model.args
    written: Optional[str] = None
    if "experts" not in conf.targets or args.model_type in PEFT_EXPERT_FAMILIES:
        export_peft(model, plan, rank, adapter_dir, conf, dtype)
        written = adapter_dir
    if args.quantization is not None:
        if written is None:
            raise ExportError(
                f"LoRA on quantized {args.model_type} experts can neither merge nor load in "
                f"PEFT here; drop 'experts' from train.lora.targets"
            )
        return written, False
    merge_lora_(model)
    return written, True

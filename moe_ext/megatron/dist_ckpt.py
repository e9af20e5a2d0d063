"""moe_ext checkpoint <-> Megatron-core distributed checkpoint (``torch_dist`` format) of a
GPTModel with moe_ext's MoE layer (``MoEExtLayer``).

# E experts, H hidden, F expert FFN size, V vocab

An exported directory (``export_megatron``) holds:
  metadata.json, common.pt, .metadata, __*_*.distcp   Megatron's checkpoint, written by
                    ``dist_checkpointing.save(model.sharded_state_dict(), dir)`` from one
                    process; every tensor is stored as its global (unsharded) tensor, so
                    any plan (tp, ep, etp) loads it through ``model.sharded_state_dict()``
  config.json       the source's Hugging Face config, byte for byte
  moe_ext_megatron.json  manifest: {"format": "moe_ext-megatron", "format_version",
                    "family", "dtype", "megatron_core", "side_files": [...], "tensors":
                    [{"name", "shape", "dtype", "sha256"}, ...]} of the SOURCE tensors
                    (native names, sha256 of the stored little-endian bytes)
  side files (tokenizer, generation config) copied from the source

``import_megatron`` loads such a directory (or any Megatron checkpoint of this model with a
config.json put next to it) into a GPTModel through ``dist_checkpointing.load``, maps the
names back (``megatron_to_native``), checks that every tensor the config implies is there
with its shape and nothing else, and, when the manifest is present and the dtype kept,
that every tensor is bit-identical to the exported source. Both write into a temporary
directory next to the destination and rename it at the end.

``save_megatron`` / ``load_megatron`` are the collective building blocks for a model built
under any plan (every rank of the model calls them).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from moe_ext.checkpoint.errors import CheckpointError
from moe_ext.checkpoint.format import (
    CAST_DTYPES,
    HF_INDEX,
    MANIFEST,
    SafetensorsWriter,
    TensorEntry,
    check_free_space,
    confined_file,
    destination_problem,
    dtype_name,
    nbytes,
    plan_shards,
    staged_directory,
    tensor_bytes,
    torch_dtype,
    write_manifest,
)
from moe_ext.megatron.safe_load import (
    MEGATRON_FILES,
    check_megatron_files,
    read_dcp_metadata,
    restricted_unpickling,
)

MEGATRON_MANIFEST = "moe_ext_megatron.json"
FORMAT_NAME = "moe_ext-megatron"
FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
DIST_TIMEOUT = datetime.timedelta(seconds=300)
# Megatron's files in a checkpoint directory are never copied as side files
_NOT_SIDE = {"config.json", MANIFEST, MEGATRON_MANIFEST, HF_INDEX, *MEGATRON_FILES}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".distcp", ".pkl", ".gguf")

PathLike = Union[str, Path]


class MegatronCheckpointError(CheckpointError):
    """A Megatron checkpoint that cannot be written or read (one line: tensor/file and fix)."""


# ---- process and device set-up --------------------------------------------------------


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """torch.distributed for one process: a world-1 gloo group on an in-memory store (no port)
    unless one is already up; a group of more ranks is refused (the converters are
    single-process tools). Torn down on exit if made here."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise MegatronCheckpointError(
                f"export/import-megatron run in one process, but torch.distributed has "
                f"{dist.get_world_size()} ranks; run the converter outside the distributed job"
            )
        yield
        return
    dist.init_process_group(
        "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=DIST_TIMEOUT
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _on_cpu(model: torch.nn.Module) -> bool:
    return next(model.parameters()).device.type == "cpu"


@contextlib.contextmanager
def cpu_device_calls(active: bool = True) -> Iterator[None]:
    """For a model on the CPU (``active``): Megatron's checkpoint I/O calls
    ``torch.cuda.synchronize()`` after copying tensors to the host and puts its save-success
    flag, all-reduced over the default group, on ``torch.cuda.current_device()``; both are
    redirected to the CPU (nothing to wait for; a gloo group reduces CPU tensors), and
    restored on exit. Not thread-safe: the converters are single-threaded."""
    if not active:
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved


def replicate_plan() -> Any:
    """The one-process plan the converters build their GPTModel with."""
    from moe_ext.moe.dispatch import DISPATCHERS
    from moe_ext.plan import DEFAULT_DISPATCHER, ParallelPlan

    return ParallelPlan(
        "replicate",
        1,
        1,
        1,
        1,
        1,
        1,
        1,
        DISPATCHERS[DEFAULT_DISPATCHER["replicate"]],
        "checkpoint conversion in one process",
    )


@contextlib.contextmanager
def converter_gpt_model(args: Any, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """The converters' GPTModel of ``args`` in ``dtype`` on the CPU, under one process
    (``single_process_group``) with Megatron's parallel state installed from the replicate
    plan's groups for the duration; both are torn down on exit."""
    from moe_ext.groups import ProcessGroups
    from moe_ext.megatron.state import install_parallel_state, uninstall_parallel_state

    with single_process_group():
        plan = replicate_plan()
        groups = ProcessGroups.build(plan, "gloo", DIST_TIMEOUT)
        install_parallel_state(groups)
        try:
            yield build_gpt_model(args, plan, groups, dtype)
        finally:
            uninstall_parallel_state()


def build_gpt_model(
    args: Any,
    plan: Any,
    groups: Any,
    dtype: torch.dtype,
    device: Union[str, torch.device] = "cpu",
    **config_overrides: Any,
) -> torch.nn.Module:
    """An uninitialised GPTModel (our layer spec, our groups) of ``args`` under ``plan`` in
    ``dtype`` on ``device``; Megatron's parallel_state must already hold ``groups``
    (``install_parallel_state``). Every parameter, norms included, is in ``dtype``.
    ``config_overrides``: further TransformerConfig fields (the loss coefficients)."""
    from megatron.core.models.gpt import GPTModel

    from moe_ext.megatron.config import gpt_model_kwargs, uninitialised_transformer_config
    from moe_ext.megatron.spec import get_gpt_decoder_block_spec
    from moe_ext.megatron.state import pg_collection

    device = torch.device(device)
    config = uninitialised_transformer_config(args, plan, dtype, device, **config_overrides)
    spec = get_gpt_decoder_block_spec(config, plan, groups)
    # Megatron places some tensors (RoPE's inverse frequencies) on the *current* CUDA
    # device at construction: make it the requested one
    placement = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with placement:
        model = GPTModel(
            config, spec, pg_collection=pg_collection(groups), **gpt_model_kwargs(args)
        )
    return model.to(device=device, dtype=dtype)  # Megatron creates norms in fp32


# ---- collective save / load -------------------------------------------------------------


def sharded_state_dict(model: torch.nn.Module) -> dict:
    """``model.sharded_state_dict()``. megatron-core 0.19 also wants the data-parallel (with
    context-parallel) group, from ``metadata`` or its global parallel state; a single
    process that never installed that state gets the world group of one."""
    import inspect

    if "metadata" not in inspect.signature(model.sharded_state_dict).parameters:
        return model.sharded_state_dict()  # megatron-core 0.16
    from megatron.core import parallel_state

    group = getattr(parallel_state, "_DATA_PARALLEL_GROUP_WITH_CP", None)
    if group is None:
        if dist.get_world_size() != 1:
            raise MegatronCheckpointError(
                "Megatron's parallel state is not installed; call "
                "moe_ext.megatron.install_parallel_state(groups) "
                "before saving or loading on several ranks"
            )
        group = dist.group.WORLD
    return model.sharded_state_dict(metadata={"dp_cp_group": group})


def save_megatron(model: torch.nn.Module, directory: PathLike) -> None:
    """Collective over the model's ranks: write ``model.sharded_state_dict()`` to the empty
    or absent ``directory`` in Megatron's torch_dist format (each global tensor written once,
    by its main replica)."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # the directory exists before any rank writes into it
    with cpu_device_calls(_on_cpu(model)):
        dist_checkpointing.save(sharded_state_dict(model), str(directory))


def checkpoint_tensors(directory: PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor key in a torch_dist checkpoint directory (its
    ``.metadata``, unpickled with an allow-list of torch's metadata classes: see
    ``safe_load``; Megatron's ShardedObjects, stored as bytes, are left out)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise MegatronCheckpointError(
            f"{directory} is not a Megatron distributed checkpoint "
            f"(no metadata.json); pass the directory "
            f"dist_checkpointing.save wrote"
        )
    check_megatron_files(directory)
    metadata = read_dcp_metadata(directory)
    return {
        key: (tuple(meta.size), meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }


def _expected_tensors(sharded: dict) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(state-dict name, checkpoint key, global shape) of every ShardedTensor the model's
    sharded state dict reads (factories built into their parts)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def walk(name: str, value: Any) -> Iterator[tuple[str, str, tuple[int, ...]]]:
        if isinstance(value, ShardedTensor):
            yield name, value.key, tuple(value.global_shape)
        elif isinstance(value, ShardedTensorFactory):
            yield from walk(name, value.build())
        elif isinstance(value, dict):
            for part in value.values():
                yield from walk(name, part)
        elif isinstance(value, (list, tuple)):
            for part in value:
                yield from walk(name, part)

    for name, value in sharded.items():
        yield from walk(name, value)


def load_megatron(
    model: torch.nn.Module, directory: PathLike, trust_checkpoint: bool = False
) -> None:
    """Collective over the model's ranks: fill ``model`` from the torch_dist checkpoint in
    ``directory``, each rank reading only its own slices (``model.sharded_state_dict()``:
    experts by EP block and expert-TP FFN fragment, heads and vocabulary rows by TP). Every
    tensor the model needs must be in the checkpoint with its global shape (one-line
    MegatronCheckpointError naming it otherwise); stored tensors the model does not use
    (optimizer states, other models) are ignored. Nothing is unpickled beyond tensors and
    plain data unless ``trust_checkpoint`` (see ``safe_load``)."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    stored = checkpoint_tensors(directory)
    sharded = sharded_state_dict(model)
    for name, key, shape in _expected_tensors(sharded):
        if key not in stored:
            raise MegatronCheckpointError(
                f"tensor {key} (model {name}) is missing from the "
                f"checkpoint {directory}; it was saved from a "
                f"different model or config"
            )
        if stored[key][0] != shape:
            raise MegatronCheckpointError(
                f"tensor {key} is {list(stored[key][0])} in "
                f"{directory / '.metadata'} but the model needs "
                f"{list(shape)}; config.json does not match the "
                f"checkpoint"
            )
    with cpu_device_calls(_on_cpu(model)), restricted_unpickling(directory, trust_checkpoint):
        state = dist_checkpointing.load(sharded, str(directory))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise MegatronCheckpointError(
            f"loading {directory} left model tensors {missing[:3]} "
            f"unset and {list(result.unexpected_keys)[:3]} unused; "
            f"the checkpoint belongs to another model"
        )


# ---- export: moe_ext / HF directory -> Megatron checkpoint --------------------------------


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    problem = destination_problem(src, dst, force)
    if problem is not None:
        raise MegatronCheckpointError(problem)


def _side_files(src: Path) -> list[Path]:
    """Top-level tokenizer/generation files of ``src``, each inside it (links leading out
    are refused)."""
    return sorted(
        confined_file(src, p.name, src)
        for p in src.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in _NOT_SIDE
        and not p.name.endswith(_WEIGHT_SUFFIXES)
    )


def _model_args(config: dict[str, Any], where: Path) -> Any:
    """ModelArgs of a config.json, checked against what GPTModel with our layer maps."""
    from moe_ext.megatron.config import transformer_config_kwargs
    from moe_ext.model import ModelArgs

    try:
        args = ModelArgs.from_hf_config(config)
        transformer_config_kwargs(args)
    except ValueError as e:
        raise MegatronCheckpointError(f"{where / 'config.json'}: {e}") from e
    return args


def _layer_groups(names: list[str]) -> list[list[str]]:
    """Native names grouped so each group maps to Megatron names on its own: one group per
    decoder layer (q/k/v fuse), one for the rest (embedding, final norm, lm_head)."""
    layers: dict[int, list[str]] = {}
    rest = []
    for name in names:
        if name.startswith("layers."):
            layers.setdefault(int(name.split(".", 2)[1]), []).append(name)
        else:
            rest.append(name)
    return [layers[i] for i in sorted(layers)] + [rest]


def export_megatron(
    src: PathLike, dst: PathLike, force: bool = False, progress: bool = True
) -> list[TensorEntry]:
    """Write checkpoint ``src`` (moe_ext, or Hugging Face in any expert layout) as a Megatron
    distributed checkpoint of GPTModel with our layer at ``dst`` (torch_dist format, one
    process, plan replicate), plus config.json, side files and the source manifest. The
    model is built in the source's dtype, so stored tensors keep their bits. Returns the
    manifest rows (native names; ``file`` is the Megatron checkpoint directory name)."""
    import megatron.core

    from moe_ext.checkpoint.reader import CheckpointReader
    from moe_ext.megatron.weights import native_to_megatron

    src, dst = Path(src), Path(dst)
    _check_destination(src, dst, force)
    reader = CheckpointReader.open(src)
    args = _model_args(reader.config, src)
    if args.quantization is not None:
        raise MegatronCheckpointError(
            f"{src} holds {args.quantization.describe()} weights; Megatron training needs "
            f"them dequantized: write a bf16 copy first (convert_checkpoint.py import-hf "
            f"from the unquantized source)"
        )
    names = reader.names()
    dtypes = {n: reader.dtype(n) for n in names}
    model_dtype = dtypes[names[0]]
    for name, dt in dtypes.items():
        if dt != model_dtype:
            raise MegatronCheckpointError(
                f"tensor {name} is {dtype_name(dt)} while {names[0]} is "
                f"{dtype_name(model_dtype)}; a GPTModel holds one dtype: convert first with "
                f"`convert_checkpoint.py import-hf {src} <dir> --dtype {dtype_name(model_dtype)}`"
            )
    if model_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise MegatronCheckpointError(
            f"{src} holds {dtype_name(model_dtype)} tensors; export "
            f"reads {', '.join(CAST_DTYPES)} checkpoints"
        )
    entries: list[TensorEntry] = []
    with converter_gpt_model(args, model_dtype) as model:
        targets = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        filled: set[str] = set()
        with (
            torch.no_grad(),
            tqdm(total=len(names), desc=f"export {src.name}", disable=not progress) as bar,
        ):
            for group in _layer_groups(names):
                native = {n: reader.read(n) for n in group}
                for name in group:
                    digest = hashlib.sha256(tensor_bytes(native[name])).hexdigest()
                    entries.append(
                        TensorEntry(
                            name,
                            tuple(native[name].shape),
                            dtype_name(dtypes[name]),
                            digest,
                            dst.name,
                        )
                    )
                for key, tensor in native_to_megatron(native, args).items():
                    if (
                        key == "output_layer.weight"
                        and args.tie_word_embeddings
                        and key not in targets
                    ):
                        continue  # one stage: the output layer reads the embedding
                    if key not in targets or targets[key].shape != tensor.shape:
                        want = list(targets[key].shape) if key in targets else "no such"
                        raise MegatronCheckpointError(
                            f"{src}: GPTModel tensor {key} would be {list(tensor.shape)} "
                            f"but the model built from config.json has {want}; the "
                            f"tensors disagree with config.json"
                        )
                    targets[key].copy_(tensor)
                    filled.add(key)
                bar.update(len(group))
        unset = sorted(set(targets) - filled)
        if unset:
            raise MegatronCheckpointError(
                f"{src} gives no tensor for GPTModel's {unset[0]}"
                f" ({len(unset)} unset); the checkpoint is "
                f"incomplete for its config.json"
            )
        side = _side_files(src)
        check_free_space(
            dst, sum(reader.nbytes(n) for n in names) + sum(p.stat().st_size for p in side)
        )
        with staged_directory(dst) as tmp:
            save_megatron(model, tmp)
            shutil.copyfile(src / "config.json", tmp / "config.json")
            for path in side:
                shutil.copyfile(path, tmp / path.name)
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "family": reader.family,
                "dtype": dtype_name(model_dtype),
                "megatron_core": megatron.core.__version__,
                "side_files": [p.name for p in side],
                "tensors": [
                    {"name": e.name, "shape": list(e.shape), "dtype": e.dtype, "sha256": e.sha256}
                    for e in entries
                ],
            }
            (tmp / MEGATRON_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return entries


# ---- import: Megatron checkpoint -> moe_ext directory --------------------------------------


def read_megatron_manifest(directory: Path) -> Optional[dict[str, Any]]:
    """The parsed export manifest (tensors as name -> row), or None when absent."""
    path = directory / MEGATRON_MANIFEST
    if not path.exists():
        return None
    confined_file(directory, MEGATRON_MANIFEST, directory)
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT_NAME or raw.get("format_version") != FORMAT_VERSION:
            raise MegatronCheckpointError(
                f"{path} has format {raw.get('format')!r} version {raw.get('format_version')!r}"
                f"; this moe_ext reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        raw["tensors"] = {row["name"]: row for row in raw["tensors"]}
        for name in raw["side_files"]:
            confined_file(directory, name, f"{path} (side_files)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, MegatronCheckpointError):
            raise
        raise MegatronCheckpointError(
            f"cannot parse {path} ({e}); re-run export-megatron or "
            f"remove the file to import without the bit check"
        ) from e
    return raw


def _stored_dtype(
    stored: dict[str, tuple[tuple[int, ...], torch.dtype]], directory: Path
) -> torch.dtype:
    """The dtype to build the loading model in: the checkpoint's (most common) float dtype."""
    counts: dict[torch.dtype, int] = {}
    for _, dt in stored.values():
        if dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + 1
    if not counts:
        raise MegatronCheckpointError(
            f"{directory / '.metadata'} lists no floating-point "
            f"tensors; this is not a model checkpoint"
        )
    return max(counts, key=counts.get)


def import_megatron(
    src: PathLike,
    dst: PathLike,
    dtype: Optional[str] = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    trust_checkpoint: bool = False,
) -> list[TensorEntry]:
    """Convert the Megatron checkpoint ``src`` (``export_megatron``'s output, or a torch_dist
    checkpoint of the same GPTModel with config.json placed next to it) into a moe_ext
    directory ``dst``. Every tensor config.json implies must come out with its shape and
    nothing else; with the export manifest present and the dtype kept, every tensor must
    equal the exported source bit for bit (sha256). ``dtype`` (bf16 | fp16 | fp32) casts.
    Pickles in ``src`` are read as plain data only, unless ``trust_checkpoint`` (see
    ``moe_ext.megatron.safe_load``); every file read lies inside ``src``."""
    from moe_ext.checkpoint import hf_maps
    from moe_ext.megatron.weights import megatron_to_native

    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype_name(dtype) not in CAST_DTYPES:
        raise MegatronCheckpointError(
            f"--dtype {dtype} is not supported; use one of {', '.join(CAST_DTYPES)}"
        )
    if not src.is_dir():
        raise MegatronCheckpointError(f"checkpoint directory {src} does not exist")
    _check_destination(src, dst, force)
    config_path = confined_file(src, "config.json", src)
    try:
        config = json.loads(config_path.read_text())
        family = hf_maps.family_of(config)
    except FileNotFoundError:
        raise MegatronCheckpointError(
            f"{config_path} is missing; put the model's Hugging Face "
            f"config.json next to the Megatron checkpoint"
        ) from None
    except ValueError as e:
        raise MegatronCheckpointError(f"{config_path}: {e}") from e
    args = _model_args(config, src)
    manifest = read_megatron_manifest(src)
    stored = checkpoint_tensors(src)
    model_dtype = _stored_dtype(stored, src)
    with converter_gpt_model(args, model_dtype) as model:
        load_megatron(model, src, trust_checkpoint=trust_checkpoint)
        native = megatron_to_native(model.state_dict(), args)
    expected = hf_maps.native_shapes(config)
    for name, shape in expected.items():
        if name not in native:
            raise MegatronCheckpointError(
                f"tensor {name} {list(shape)} is missing after "
                f"loading {src}; the checkpoint does not match "
                f"config.json"
            )
        if tuple(native[name].shape) != shape:
            raise MegatronCheckpointError(
                f"tensor {name} is {list(native[name].shape)} after "
                f"loading {src}, config.json implies {list(shape)}"
            )
    extra = sorted(set(native) - set(expected))
    if extra:
        raise MegatronCheckpointError(
            f"tensor {extra[0]} from {src} is not implied by "
            f"config.json ({len(extra)} such); wrong config.json?"
        )
    target = torch_dtype(dtype) if dtype is not None else None
    tensors = {}
    for name in expected:  # native model order
        t = native[name]
        tensors[name] = (t.to(target) if target is not None else t).contiguous()
    if manifest is not None:
        _check_against_manifest(tensors, manifest, src)
    overall = dtype_name(target) if target is not None else dtype_name(model_dtype)
    side = manifest["side_files"] if manifest is not None else [p.name for p in _side_files(src)]
    return _write_moe_ext(src, dst, tensors, family, overall, side, max_shard_bytes, progress)


def _check_against_manifest(
    tensors: dict[str, torch.Tensor], manifest: dict[str, Any], src: Path
) -> None:
    """Every source tensor of the export must come back, bit-exact where the dtype is kept."""
    rows = manifest["tensors"]
    for name, row in rows.items():
        if name not in tensors:
            raise MegatronCheckpointError(
                f"tensor {name} of the exported source "
                f"({src / MEGATRON_MANIFEST}) did not come back"
            )
        t = tensors[name]
        if list(t.shape) != list(row["shape"]):
            raise MegatronCheckpointError(
                f"tensor {name} came back {list(t.shape)}, the "
                f"source was {row['shape']} ({src / MEGATRON_MANIFEST})"
            )
        if dtype_name(t.dtype) != row["dtype"]:
            continue  # cast on purpose (--dtype): shapes only
        if hashlib.sha256(tensor_bytes(t)).hexdigest() != row["sha256"]:
            raise MegatronCheckpointError(
                f"tensor {name} differs from the exported source (sha256 in "
                f"{src / MEGATRON_MANIFEST}); the checkpoint changed after export — remove "
                f"the manifest to import changed (e.g. trained) weights"
            )
    extra = sorted(set(tensors) - set(rows))
    if extra:
        raise MegatronCheckpointError(
            f"tensor {extra[0]} is not in the exported source's manifest {src / MEGATRON_MANIFEST}"
        )


def _write_moe_ext(
    src: Path,
    dst: Path,
    tensors: dict[str, torch.Tensor],
    family: str,
    overall: str,
    side_files: list[str],
    max_shard_bytes: int,
    progress: bool,
) -> list[TensorEntry]:
    """Safetensors shards + config.json + side files + moe_ext.json, staged and renamed."""
    shards = plan_shards(
        [(n, nbytes(t.shape, t.dtype)) for n, t in tensors.items()], max_shard_bytes
    )
    entries: list[TensorEntry] = []
    check_free_space(dst, sum(nbytes(t.shape, t.dtype) for t in tensors.values()))
    with staged_directory(dst) as tmp:
        with tqdm(total=len(tensors), desc=f"import {src.name}", disable=not progress) as bar:
            for file, names in shards:
                layout = [(n, dtype_name(tensors[n].dtype), tuple(tensors[n].shape)) for n in names]
                writer = SafetensorsWriter(tmp / file, layout)
                try:
                    for name, dt, shape in layout:
                        sha = writer.write_tensor(name, [tensors[name]])
                        entries.append(TensorEntry(name, shape, dt, sha, file))
                        bar.update(1)
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
        shutil.copyfile(src / "config.json", tmp / "config.json")
        for name in side_files:
            if not (src / name).is_file():
                raise MegatronCheckpointError(
                    f"side file {name} listed in {src / MEGATRON_MANIFEST} is missing from {src}"
                )
            shutil.copyfile(src / name, tmp / name)
        write_manifest(tmp, family, overall, entries)
    return entries

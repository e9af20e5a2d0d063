"""Lazy, slice-exact reading of moe_ext and Hugging Face checkpoint directories in native names.

`CheckpointReader.open(dir)` detects the format (``moe_ext.json`` present -> moe_ext, else
Hugging Face) and exposes every tensor under its native name (docs/ARCHITECTURE.md
"Parameter names"). For HF directories the stacked expert tensors are virtual: a tree of
per-expert tensors (stacked on dim 0, gate rows then up rows) assembled on the fly, so
``read(name, request)`` touches only the per-expert tensors and rows the request covers.
Every leaf read is a ``safe_open(...).get_slice`` box; ``bytes_read`` counts the bytes.
Expert tensors a family stores in another layout (gpt_oss: transposed, gate/up
interleaved; ``hf_maps.STORED_TRANSFORMS``) are ``Relaid`` nodes: a native box maps to the
stored box holding its (gate, up) column pairs, read once per ``read`` call even when the
request's gate and up boxes both need it (an expert-TP shard reads only its columns).

A checkpoint whose config has a ``quantization_config`` is read under the *stored* names
of ``moe_ext.quant.layout.stored_tensors`` (the quantized model's state_dict): an fp8
weight ``P`` (float8_e4m3fn) with ``P_scale_inv`` (HF ``weight_scale_inv``; per-expert
scales stacked like the weights, gate grid rows then up grid rows), MXFP4 ``P_blocks`` /
``P_scales`` (uint8; gpt-oss' gate/up rows interleaved, ``interleaved_rows``). A rank's
requests come from ``stored_requests(shard_slices(...), args)``; ``load_sharded`` returns
quantized parts in their stored dtype (never dequantized or cast on the host). Quantized
tensors without a quantization_config, scales whose shape does not follow the weight and
block size, missing scales and wrong dtypes are one-line problems.

Shape legend: E experts, F expert FFN size, H hidden.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open

from moe_ext.checkpoint import hf_maps
from moe_ext.checkpoint.errors import CheckpointError
from moe_ext.checkpoint.format import (
    HF_INDEX,
    MANIFEST,
    confined_file,
    dtype_name,
    read_manifest,
    tensor_bytes,
    torch_dtype,
)
from moe_ext.checkpoint.shard import Bounds, ShardRequest
from moe_ext.quant.config import QuantizationError
from moe_ext.quant.layout import StoredTensor, stored_tensors

CHUNK_BYTES = 64 << 20  # streaming granularity of iter_chunks
# names of quantized parts (fp8 scales, MXFP4 blocks / scales) in either naming
_QUANTIZED_PART = re.compile(r"(_scale_inv|_blocks|_scales)$")
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp8 scale_inv as stored


# ---- virtual tensor tree ---------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """One tensor stored in one safetensors file."""

    file: str  # file name inside the checkpoint directory
    key: str  # name inside that file
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Cat:
    """Children concatenated along ``dim`` (gate rows then up rows of one expert)."""

    parts: tuple["Node", ...]
    dim: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Stack:
    """Children stacked on a new dim 0 (experts)."""

    parts: tuple["Node", ...]
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Relaid:
    """A stored tensor seen in the native layout (``hf_maps.STORED_TRANSFORMS``)."""

    leaf: Leaf
    transform: str
    shape: tuple[int, ...]  # native
    dtype: torch.dtype


Node = Union[Leaf, Cat, Stack, Relaid]


def _leaves(node: Node) -> Iterator[Leaf]:
    if isinstance(node, Leaf):
        yield node
    elif isinstance(node, Relaid):
        yield node.leaf
    else:
        for part in node.parts:
            yield from _leaves(part)


def _file_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (shape, dtype) of one safetensors file, reading its header only."""
    if not path.is_file():
        raise CheckpointError(f"safetensors file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), torch_dtype(sl.get_dtype()))
            return out
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error type for every malformed file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"cannot read safetensors file {path}: {msg}; the file is truncated or corrupt, "
            "re-download or re-convert it"
        ) from e


class CheckpointReader:
    """Native-named, lazily read view of a checkpoint directory (moe_ext or Hugging Face).

    Attributes: ``format`` ("moe_ext" | "hf"), ``directory``, ``config`` (the HF config dict),
    ``family``, ``manifest`` (moe_ext only), ``problems`` (what disagrees with the config;
    empty for a strictly opened reader), ``bytes_read`` (bytes read from tensor data so far),
    ``specs`` (``moe_ext.quant.layout.stored_tensors`` of the config: names are the
    quantized model's stored names), ``quantization`` (QuantConfig or None).
    """

    def __init__(
        self,
        directory: Path,
        fmt: str,
        config: dict[str, Any],
        nodes: dict[str, Node],
        problems: list[str],
        manifest: Optional[dict[str, Any]] = None,
        specs: Optional[dict[str, StoredTensor]] = None,
    ):
        self.directory = directory
        self.format = fmt
        self.config = config
        self.family = hf_maps.family_of(config)
        self.manifest = manifest
        self.problems = problems
        # stored tensors the config implies (moe_ext.quant.layout): role and stored dtype of
        # each quantized part (fp8 weight, scale_inv, blocks, scales)
        args = hf_maps.config_args(config)
        self.specs = specs if specs is not None else stored_tensors(args)
        self.quantization = args.quantization
        self.bytes_read = 0
        self._nodes = nodes
        self._handles: Optional[dict[str, Any]] = None
        self._stack: Optional[contextlib.ExitStack] = None
        # stored boxes of Relaid leaves read during one read() call: (key, bounds) -> tensor
        self._pairs_read: Optional[dict[tuple[str, Bounds], torch.Tensor]] = None

    # -- construction --

    @staticmethod
    def open(directory: Union[str, Path], strict: bool = True) -> "CheckpointReader":
        """Open ``directory``; with ``strict`` any missing, extra or misshapen tensor raises
        CheckpointError, otherwise it is listed in ``problems`` and left out of ``names()``."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} does not exist")
        config = _read_config(directory)
        if (directory / MANIFEST).exists():
            reader = _open_moe_ext(directory, config)
        else:
            reader = _open_hf(directory, config)
        if strict and reader.problems:
            more = len(reader.problems) - 1
            tail = (
                f" (and {more} more problem{'s' * (more > 1)}: run `tools/convert_checkpoint.py "
                f"verify {directory}`)"
                if more
                else ""
            )
            raise CheckpointError(reader.problems[0] + tail)
        return reader

    # -- metadata --

    @property
    def path(self) -> Path:
        """The checkpoint directory (alias of ``directory``)."""
        return self.directory

    def names(self) -> list[str]:
        """Native names of every tensor, in model order."""
        return list(self._nodes)

    def __contains__(self, name: str) -> bool:
        return name in self._nodes

    def node(self, name: str) -> Node:
        if name not in self._nodes:
            raise CheckpointError(
                f"tensor {name} is not in checkpoint {self.directory} ({self.format} format)"
            )
        return self._nodes[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.node(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.node(name).dtype

    def nbytes(self, name: str) -> int:
        node = self.node(name)
        return node.dtype.itemsize * _numel(node.shape)

    def files(self, name: str) -> list[str]:
        """Files that hold (parts of) tensor ``name``."""
        return sorted({leaf.file for leaf in _leaves(self.node(name))})

    # -- reading --

    def read(self, name: str, request: Optional[ShardRequest] = None) -> torch.Tensor:
        """The part of tensor ``name`` that ``request`` covers (default: all of it), in the stored
        dtype, on CPU, contiguous, owning its memory. Reads only the covered bytes."""
        node = self.node(name)
        request = request or ShardRequest.full()
        with self._open_files():
            self._pairs_read = {}  # the boxes of one request share their stored reads
            try:
                parts = [self._read(node, b) for b in request.bounds(node.shape)]
            finally:
                self._pairs_read = None
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=request.cat_dim)

    def iter_chunks(self, name: str, max_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """Tensor ``name`` as consecutive contiguous pieces whose row-major bytes, concatenated,
        are the tensor's bytes; a piece is one expert part or at most ``max_bytes`` of rows, so
        streaming a conversion holds one piece, not the tensor."""
        node = self.node(name)
        with self._open_files():
            yield from self._chunks(node, max_bytes)

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack, self._handles = None, None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def _open_files(self) -> Iterator[None]:
        # Handles live for one read: tensors come back as copies, so closing unmaps the file
        # pages this read touched and resident memory stays about one tensor.
        if self._handles is not None:
            yield
            return
        self._stack, self._handles = contextlib.ExitStack(), {}
        try:
            yield
        finally:
            self.close()

    def _handle(self, file: str) -> Any:
        assert self._handles is not None and self._stack is not None
        if file not in self._handles:
            path = self.directory / file
            try:
                self._handles[file] = self._stack.enter_context(
                    safe_open(str(path), framework="pt")
                )
            except Exception as e:
                raise CheckpointError(
                    f"cannot read safetensors file {path}: {str(e).splitlines()[0]}; re-download "
                    "or re-convert it"
                ) from e
        return self._handles[file]

    def _read_leaf(self, leaf: Leaf, bounds: Bounds) -> torch.Tensor:
        sizes = [b - a for a, b in bounds]
        if any(n == 0 for n in sizes):
            return torch.empty(sizes, dtype=leaf.dtype)
        f = self._handle(leaf.file)
        try:
            if not leaf.shape:
                t = f.get_tensor(leaf.key)
            else:
                t = f.get_slice(leaf.key)[tuple(slice(a, b) for a, b in bounds)]
        except Exception as e:
            raise CheckpointError(
                f"cannot read tensor {leaf.key} from {self.directory / leaf.file}: "
                f"{str(e).splitlines()[0]}; the file is corrupt, re-download or re-convert it"
            ) from e
        # get_slice returns a view into the file mapping; copy so the result outlives the handle.
        t = t.clone(memory_format=torch.contiguous_format)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def _read_relaid(self, node: Relaid, bounds: Bounds) -> torch.Tensor:
        """The native box ``bounds`` of a stored-layout tensor: the inverse of
        ``hf_maps.to_stored`` on the stored columns (rows, for interleaved_rows) the box
        covers."""
        sizes = [b - a for a, b in bounds]
        if any(n == 0 for n in sizes):
            return torch.empty(sizes, dtype=node.dtype)
        swapped = node.transform in ("transposed", "interleaved_transposed")
        box = list(bounds)
        if swapped:
            box[1], box[2] = box[2], box[1]  # stored dim order, native column numbering
        if node.transform == "transposed":
            return self._read_leaf(node.leaf, tuple(box)).transpose(1, 2).contiguous()
        # interleaved dim d (the last one; dim 1 for interleaved_rows): native [lo, hi) are
        # gate j in [0, F), up j in [F, 2F), stored at 2j and 2j + 1
        d = 1 if node.transform == "interleaved_rows" else len(box) - 1
        lo, hi = box[d]
        half = node.leaf.shape[d] // 2
        parts = [(a, b, off) for a, b, off in ((lo, min(hi, half), 0), (lo - half, hi - half, 1))]
        parts = [(max(a, 0), b, off) for a, b, off in parts if b > max(a, 0)]
        first, last = min(a for a, _, _ in parts), max(b for _, b, _ in parts)
        pairs_box = tuple(box[:d]) + ((2 * first, 2 * last),) + tuple(box[d + 1 :])
        key = (node.leaf.file + "/" + node.leaf.key, pairs_box)
        memo = self._pairs_read if self._pairs_read is not None else {}
        if key not in memo:
            memo[key] = self._read_leaf(node.leaf, pairs_box)
        pairs = memo[key]  # 2 * (last - first) along d
        lead = (slice(None),) * d
        picked = [
            pairs[lead + (slice(off, None, 2),)].narrow(d, a - first, b - a) for a, b, off in parts
        ]
        t = picked[0] if len(picked) == 1 else torch.cat(picked, dim=d)
        return (t.transpose(1, 2) if swapped else t).contiguous()

    def _read(self, node: Node, bounds: Bounds) -> torch.Tensor:
        sizes = [b - a for a, b in bounds]
        if isinstance(node, Leaf):
            return self._read_leaf(node, bounds)
        if isinstance(node, Relaid):
            return self._read_relaid(node, bounds)
        if isinstance(node, Stack):
            (a, b), inner = bounds[0], bounds[1:]
            parts = [
                self._read(child, inner).unsqueeze(0) for child in node.parts[a:b]
            ]  # [1, ...] each
        else:
            d = node.dim
            a, b = bounds[d]
            parts, offset = [], 0
            for child in node.parts:
                n = child.shape[d]
                lo, hi = max(a, offset), min(b, offset + n)
                if lo < hi:
                    sub = bounds[:d] + ((lo - offset, hi - offset),) + bounds[d + 1 :]
                    parts.append(self._read(child, sub))
                offset += n
        if not parts:
            return torch.empty(sizes, dtype=node.dtype)
        dim = 0 if isinstance(node, Stack) else node.dim
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def _chunks(self, node: Node, max_bytes: int) -> Iterator[torch.Tensor]:
        if isinstance(node, Stack) or (isinstance(node, Cat) and node.dim == 0):
            # dim-0 composition: children's bytes follow each other in row-major order.
            for child in node.parts:
                yield from self._chunks(child, max_bytes)
            return
        full = tuple((0, n) for n in node.shape)
        if isinstance(node, Cat) or not node.shape:
            yield self._read(node, full)
            return
        row_bytes = node.dtype.itemsize * _numel(node.shape[1:])
        rows = max(1, max_bytes // max(row_bytes, 1))
        for start in range(0, node.shape[0], rows):
            yield self._read(node, ((start, min(start + rows, node.shape[0])),) + full[1:])


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if path.exists():
        confined_file(directory, path.name, directory)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing; a checkpoint directory needs the model's Hugging Face config.json"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot parse {path}: {e}") from e
    hf_maps.family_of(config)
    return config


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# ---- moe_ext directories ---------------------------------------------------------------


def _open_moe_ext(directory: Path, config: dict[str, Any]) -> CheckpointReader:
    confined_file(directory, MANIFEST, directory)
    manifest = read_manifest(directory)
    args = hf_maps.config_args(config)
    specs = stored_tensors(args)
    problems: list[str] = []
    unquantized = _unquantized_config_problem(
        args,
        ((e.name, e.file, torch_dtype(e.dtype)) for e in manifest["tensors"].values()),
        directory,
    )
    problems += unquantized
    if manifest.get("family") != config["model_type"]:
        problems.append(
            f"{MANIFEST} says family {manifest.get('family')!r} but config.json says "
            f"{config['model_type']!r}; re-run the conversion"
        )
    headers: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
    for file in sorted({e.file for e in manifest["tensors"].values()}, key=str):
        try:
            confined_file(directory, file, directory / MANIFEST)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if not (directory / file).is_file():
            problems.append(
                f"shard {file} named by {MANIFEST} is missing from {directory}; re-run the "
                "conversion"
            )
            continue
        headers[file] = _file_header(directory / file)
    nodes: dict[str, Node] = {}
    for name, spec in specs.items():
        shape = spec.shape
        entry = manifest["tensors"].get(name)
        if entry is None:
            problems.append(
                f"missing tensor {name} {_shape_str(shape)} in {directory} ({MANIFEST} does not "
                f"list it){_role_note(spec, args)}"
            )
            continue
        if entry.shape != shape:
            problems.append(
                f"tensor {name} has shape {_shape_str(entry.shape)} in {MANIFEST}, config.json "
                f"implies {_shape_str(shape)}{_role_note(spec, args)}"
            )
            continue
        if entry.file not in headers:
            continue  # its missing file is already reported
        stored = headers[entry.file].get(name)
        if stored is None:
            problems.append(
                f"tensor {name} is missing from {entry.file} although {MANIFEST} places it there"
            )
            continue
        if stored[0] != shape or dtype_name(stored[1]) != entry.dtype:
            problems.append(
                f"tensor {name} in {entry.file} is {dtype_name(stored[1])} "
                f"{_shape_str(stored[0])}, {MANIFEST} says {entry.dtype} {_shape_str(shape)}"
            )
            continue
        problem = _dtype_problem(name, entry.file, stored[1], spec, args)
        if problem is not None:
            if not unquantized:
                problems.append(problem)
            continue
        nodes[name] = Leaf(entry.file, name, shape, stored[1])
    for name in manifest["tensors"]:
        if name not in specs and not unquantized:
            problems.append(
                f"unexpected tensor {name} in {MANIFEST}: config.json implies no such tensor"
            )
    for file, header in headers.items():
        for key in header:
            if key not in manifest["tensors"] or manifest["tensors"][key].file != file:
                problems.append(
                    f"unexpected tensor {key} in {file}: {MANIFEST} does not list it there"
                )
    return CheckpointReader(directory, "moe_ext", config, nodes, problems, manifest, specs)


# ---- quantized tensors -----------------------------------------------------------------


def _unquantized_config_problem(
    args: Any, tensors: Iterable[tuple[str, str, torch.dtype]], directory: Path
) -> list[str]:
    """[one line] when the checkpoint holds quantized tensors (fp8 weights, scales, MXFP4
    blocks) but its config has no ``quantization_config``, else []. Listed first: every
    other problem of such a checkpoint follows from it."""
    if args.quantization is not None:
        return []
    for key, file, dtype in tensors:
        if dtype in _FP8_DTYPES or _QUANTIZED_PART.search(key):
            if dtype in _FP8_DTYPES:
                what = f"{dtype_name(dtype)} (an fp8 weight)"
            elif key.endswith("_scale_inv"):
                what = "an fp8 scale"
            else:
                what = "an MXFP4 part"
            return [
                f"tensor {key} in {file} is {what}, but {directory / 'config.json'} has no "
                f"quantization_config; add the quantization_config the checkpoint was saved "
                f"with (quant_method fp8 or mxfp4) or use a bf16 checkpoint"
            ]
    return []


def _role_note(spec: StoredTensor, args: Any) -> str:
    """What a stored quantized part is, for messages about its shape."""
    if spec.role == "weight" and spec.dtype is None:
        return ""
    logical = args.family.param_shapes(args)[spec.logical]
    quant = args.quantization
    if spec.role == "scale_inv":
        bo, bi = quant.block
        return (
            f" (the fp8 scales of {spec.logical} {_shape_str(logical)} in blocks of "
            f"weight_block_size [{bo}, {bi}])"
        )
    if spec.role in ("blocks", "scales"):
        return f" (the mxfp4 {spec.role} of {spec.logical} {_shape_str(logical)}, 32 per scale)"
    return f" (the fp8 weight {spec.logical})"


def _dtype_problem(
    key: str, file: str, dtype: torch.dtype, spec: StoredTensor, args: Any
) -> Optional[str]:
    """One line when tensor ``key`` (stored name ``spec``) has a dtype its role cannot have."""
    quant = args.quantization
    method = quant.method if quant is not None else None
    if spec.role == "weight" and spec.dtype is None:
        if dtype not in _FP8_DTYPES:
            return None
        return (
            f"tensor {key} in {file} is {dtype_name(dtype)}, but quantization_config "
            f"({method}) keeps {spec.logical} in the model dtype; fix modules_to_not_convert "
            f"or store it dequantized"
        )
    if spec.role == "scale_inv":
        if dtype in _SCALE_DTYPES:
            return None
        wanted = "float32"
    elif dtype == spec.dtype:
        return None
    else:
        wanted = dtype_name(spec.dtype)
    return (
        f"tensor {key} in {file} is {dtype_name(dtype)}, but quantization_config ({method}) "
        f"stores it as {wanted}{_role_note(spec, args)}; re-convert the checkpoint"
    )


# ---- Hugging Face directories ----------------------------------------------------------


def hf_files(directory: Path) -> dict[str, str]:
    """HF tensor name -> file name, from the index if there is one, else from every
    ``*.safetensors`` file. Raises for a missing shard, an unreadable file, no weights."""
    index = directory / HF_INDEX
    if index.exists():
        confined_file(directory, HF_INDEX, directory)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot parse {index}: {e}; re-download it") from e
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
            raise CheckpointError(
                f"{index}: weight_map is not an object of tensor name -> file name; re-download it"
            )
        for key, file in weight_map.items():
            confined_file(directory, file, f"{index} (weight_map entry {key!r})")
        for file in sorted(set(weight_map.values())):
            if not (directory / file).is_file():
                raise CheckpointError(
                    f"{HF_INDEX} names shard {file}, which is missing from {directory}; "
                    "re-download it"
                )
        return dict(weight_map)
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    for file in files:
        confined_file(directory, file, directory)
    if not files:
        pickles = sorted(p.name for p in directory.glob("*.bin"))
        hint = (
            f" (found {pickles[0]}: pickle checkpoints are not read, save the model with "
            "safe_serialization)"
            if pickles
            else ""
        )
        raise CheckpointError(f"no *.safetensors files in {directory}{hint}")
    out: dict[str, str] = {}
    for file in files:
        for key in _file_header(directory / file):
            if key in out:
                raise CheckpointError(
                    f"tensor {key} is in both {out[key]} and {file} and there is no {HF_INDEX} to "
                    "choose"
                )
            out[key] = file
    return out


def _open_hf(directory: Path, config: dict[str, Any]) -> CheckpointReader:
    family = hf_maps.family_of(config)
    args = hf_maps.config_args(config)
    specs = stored_tensors(args)
    E = args.num_experts
    key_files = hf_files(directory)
    headers = {file: _file_header(directory / file) for file in sorted(set(key_files.values()))}
    problems: list[str] = []
    unquantized = _unquantized_config_problem(
        args,
        ((k, f, headers[f][k][1]) for k, f in key_files.items() if k in headers[f]),
        directory,
    )
    problems += unquantized
    direct: dict[str, Leaf] = {}
    per_expert: dict[str, dict[tuple[int, str], Leaf]] = {}
    for key, file in key_files.items():
        if key not in headers[file]:
            problems.append(
                f"{HF_INDEX} maps tensor {key} to {file}, which does not contain it; re-download "
                "the checkpoint"
            )
            continue
        if hf_maps.is_ignored_hf_key(key) or (key == "lm_head.weight" and args.tie_word_embeddings):
            continue  # not a parameter (rotary cache) / tied to the embedding
        if args.family.hf_skipped(key, args):
            continue  # a layer the engine does not run (the family's MTP layers)
        shape, dtype = headers[file][key]
        dest = hf_maps.parse_hf_key(key, family)
        leaf = Leaf(file, key, shape, dtype)
        if dest.native not in specs:
            if not unquantized:
                problems.append(
                    f"unexpected tensor {key} in {file}: config.json implies no {dest.native}"
                )
        elif dest.expert is None:
            direct[dest.native] = leaf
        elif dest.expert >= E:
            problems.append(
                f"unexpected tensor {key} in {file}: config.json has {E} experts (0..{E - 1})"
            )
        else:
            per_expert.setdefault(dest.native, {})[(dest.expert, dest.part)] = leaf
    nodes: dict[str, Node] = {}
    for name, spec in specs.items():
        shape = spec.shape
        if name in direct and name in per_expert:
            problems.append(
                f"tensor {name} is stored both fused ({direct[name].key}) and per expert; keep one "
                "layout"
            )
            continue
        try:
            transform = hf_maps.stored_transform(name, family)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        stored = shape if transform is None else hf_maps.stored_shape(transform, shape)
        if name in per_expert and (transform is not None or not hf_maps.per_expert_layout(name)):
            some = next(iter(per_expert[name].values()))
            fused = hf_maps.hf_key(name, family, "fused")
            problems.append(
                f"tensor {some.key} in {some.file}: {family} checkpoints store experts fused "
                f"({fused} {_shape_str(stored)}), not per expert; this expert layout is not "
                f"one of {family}'s"
            )
            continue
        if name in per_expert:
            node = _stack_experts(name, family, per_expert[name], spec, args, problems)
        elif name in direct:
            node = direct[name]
            if node.shape != stored:
                problems.append(
                    f"tensor {node.key} in {node.file} has shape {_shape_str(node.shape)}, "
                    f"config.json implies {_shape_str(stored)}{_role_note(spec, args)}"
                )
                continue
            if transform is not None:
                node = Relaid(node, transform, shape, node.dtype)
        else:
            if (
                transform is not None
                or hf_maps.stored_expert(name)
                and not (hf_maps.per_expert_layout(name))
            ):
                hf_name, hf_shape = hf_maps.hf_key(name, family, "fused"), stored
            elif hf_maps.stored_expert(name):
                hf_name = hf_maps.hf_expert_keys(name, family, 0)[0]
                hf_shape = _part_shape(name, shape)
            else:
                hf_name, hf_shape = hf_maps.hf_key(name, family, "per-expert"), shape
            problems.append(
                f"missing tensor {hf_name} {_shape_str(hf_shape)} in {directory} (native "
                f"{name}){_role_note(spec, args)}"
            )
            continue
        if node is None:
            continue
        first = next(_leaves(node))
        problem = _dtype_problem(first.key, first.file, node.dtype, spec, args)
        if problem is not None:
            if not unquantized:
                problems.append(problem)
            continue
        nodes[name] = node
    return CheckpointReader(directory, "hf", config, nodes, problems, specs=specs)


def _part_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one per-expert HF part of stacked tensor ``name`` of ``shape``:
    gate_up_proj [E, 2R, ...] -> [R, ...] (gate and up each), down_proj [E, ...] -> [...]."""
    _, kind = hf_maps.stored_expert(name)  # type: ignore[misc]
    if kind == hf_maps.GATE_UP:
        return (shape[1] // 2, *shape[2:])
    return tuple(shape[1:])


def _stack_experts(
    name: str,
    family: str,
    leaves: Mapping[tuple[int, str], Leaf],
    spec: StoredTensor,
    args: Any,
    problems: list[str],
) -> Optional[Node]:
    """Stack per-expert tensors into the native [E, 2F, H] (gate rows, up rows) or [E, H, F]
    (or their fp8 scales [E, 2F/bo, ceil(H/bi)], [E, ceil(H/bo), ceil(F/bi)])."""
    _, kind = hf_maps.stored_expert(name)  # type: ignore[misc]
    shape = spec.shape
    E = shape[0]
    parts = ("gate", "up") if kind == hf_maps.GATE_UP else ("down",)
    part_shape = _part_shape(name, shape)
    ok = True
    experts = []
    for j in range(E):
        row = []
        for part, hf_name in zip(parts, hf_maps.hf_expert_keys(name, family, j)):
            leaf = leaves.get((j, part))
            if leaf is None:
                problems.append(
                    f"missing tensor {hf_name} (expert {j} of {E}, {part} part of "
                    f"{name}){_role_note(spec, args)}"
                )
                ok = False
            elif leaf.shape != part_shape:
                problems.append(
                    f"tensor {leaf.key} in {leaf.file} has shape {_shape_str(leaf.shape)}, "
                    f"config.json implies {_shape_str(part_shape)}{_role_note(spec, args)}"
                )
                ok = False
            else:
                row.append(leaf)
        experts.append(row)
    if not ok:
        return None
    dtypes = {leaf.dtype for row in experts for leaf in row}
    if len(dtypes) > 1:
        problems.append(
            f"the experts of {name} mix dtypes {sorted(map(dtype_name, dtypes))}; convert them to "
            "one dtype"
        )
        return None
    dtype = dtypes.pop()
    if kind == hf_maps.GATE_UP:
        per = tuple(Cat(tuple(row), 0, tuple(shape[1:]), dtype) for row in experts)  # [2F, H]
        return Stack(per, tuple(shape), dtype)
    return Stack(tuple(row[0] for row in experts), tuple(shape), dtype)


# ---- sharded loading -------------------------------------------------------------------


def load_sharded(
    directory: Union[str, Path, CheckpointReader],
    requests: Mapping[str, ShardRequest],
    dtype: Optional[Union[torch.dtype, str, Mapping[str, torch.dtype]]] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    verify: bool = False,
) -> dict[str, torch.Tensor]:
    """Read each ``requests[name]`` slice (native names) and return it cast to ``dtype``
    (None: stored dtype; a mapping: per name, e.g. the model's own dtype of each tensor, so
    a float32 buffer of a bf16 model keeps its precision) on ``device``. Reads only the
    requested bytes; tqdm bar in bytes.

    Quantized parts (``reader.specs``: fp8 weights, fp8 scale_inv, MXFP4 blocks and scales)
    are never dequantized or cast on the host: they come back in their stored dtype
    (float8_e4m3fn, uint8; fp8 scales as float32, which holds a bf16/fp16 scale exactly).
    A single ``dtype`` leaves them alone; a mapping naming another dtype for one of them is
    a QuantizationError.

    Opening the checkpoint already checked its structure (names, shapes, dtypes, file
    headers). ``verify`` also checks the data: every tensor a request touches is streamed
    in full and its sha256 compared with the manifest's before its slice is used, so a
    flipped byte anywhere in it raises a one-line CheckpointError naming tensor and file.
    That reads each touched tensor whole (an EP rank reads all experts of a layer, not
    its block) and needs a moe_ext checkpoint (Hugging Face directories carry no hashes).
    """
    from tqdm.auto import tqdm

    reader = (
        directory if isinstance(directory, CheckpointReader) else CheckpointReader.open(directory)
    )
    unknown = [name for name in requests if name not in reader]
    if unknown:
        raise CheckpointError(
            f"tensor {unknown[0]} is not in checkpoint {reader.directory} ({len(unknown)} unknown "
            "names requested)"
        )
    if verify and reader.manifest is None:
        raise CheckpointError(
            f"cannot verify {reader.directory} while loading: a Hugging Face "
            f"directory carries no checksums; convert it with "
            f"`tools/convert_checkpoint.py import-hf` or load without verify"
        )
    if isinstance(dtype, Mapping):
        casts = {name: dtype.get(name) for name in requests}
    else:
        casts = dict.fromkeys(requests, torch_dtype(dtype) if dtype is not None else None)
        # one dtype for the whole model casts model-dtype tensors only
        casts.update({n: None for n in requests if _quantized_part(reader, n) is not None})
    for name in requests:
        casts[name] = _load_dtype(reader, name, casts[name])
    total = sum(
        _numel(req.shape(reader.shape(n))) * reader.dtype(n).itemsize for n, req in requests.items()
    )
    if verify:
        total += sum(reader.nbytes(n) for n in requests)
    out: dict[str, torch.Tensor] = {}
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"loading {reader.directory.name}",
        disable=not progress,
    ) as bar:
        for name, req in requests.items():
            if verify:
                check_tensor(reader, name)
                bar.update(reader.nbytes(name))
            t = reader.read(name, req)
            bar.update(t.numel() * t.element_size())
            out[name] = t.to(device=device, dtype=casts[name] or t.dtype)
    return out


def _quantized_part(reader: CheckpointReader, name: str) -> Optional[StoredTensor]:
    spec = reader.specs.get(name)
    return spec if spec is not None and spec.dtype is not None else None


def _load_dtype(
    reader: CheckpointReader, name: str, asked: Optional[torch.dtype]
) -> Optional[torch.dtype]:
    """The dtype tensor ``name`` is loaded in: ``asked`` (None: as stored) for model-dtype
    tensors; the stored dtype of a quantized part (float32 for scale_inv)."""
    spec = _quantized_part(reader, name)
    if spec is None:
        return asked
    if asked is not None and asked != spec.dtype:
        raise QuantizationError(
            f"tensor {name} is a quantized {spec.role} ({dtype_name(spec.dtype)}); loading "
            f"does not cast it to {asked}: give the model's {dtype_name(spec.dtype)} dtype "
            f"for it (quantized weights are dequantized on the device, not on load)"
        )
    return spec.dtype


def tensor_digest(reader: CheckpointReader, name: str) -> str:
    """sha256 of tensor ``name``'s stored bytes, streamed chunk by chunk."""
    digest = hashlib.sha256()
    for chunk in reader.iter_chunks(name):
        digest.update(tensor_bytes(chunk))
    return digest.hexdigest()


def check_tensor(reader: CheckpointReader, name: str) -> None:
    """Raise a one-line CheckpointError unless tensor ``name`` of a moe_ext checkpoint
    hashes to the manifest's sha256."""
    entry = reader.manifest["tensors"][name]  # type: ignore[index]
    if tensor_digest(reader, name) != entry.sha256:
        raise CheckpointError(
            f"checksum mismatch for tensor {name} in "
            f"{reader.directory / entry.file}: the data is corrupt, "
            f"re-download or re-convert the checkpoint"
        )

"""The moe_ext checkpoint directory format, and a streaming safetensors writer.

A moe_ext directory holds:
  config.json       the model's Hugging Face config, unchanged
  moe_ext.json      manifest: {"format": "moe_ext", "format_version": 1, "family", "dtype",
                    "tensors": [{"name", "shape", "dtype", "sha256", "file"}, ...]}
                    (native names; sha256 of the tensor's little-endian bytes as stored)
  model-0000i-of-0000N.safetensors   native-named tensors, stacked experts
  tokenizer and generation files copied from the source

The writer lays out a whole safetensors file from (name, dtype, shape) up front and then
takes each tensor's bytes as a stream of chunks, so converting never holds more than one
chunk of a tensor in memory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from moe_ext.checkpoint.errors import CheckpointError

MANIFEST = "moe_ext.json"
FORMAT_NAME = "moe_ext"
FORMAT_VERSION = 1
HF_INDEX = "model.safetensors.index.json"

# short name -> (torch dtype, safetensors dtype string)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "bf16": (torch.bfloat16, "BF16"),
    "fp16": (torch.float16, "F16"),
    "fp32": (torch.float32, "F32"),
    "fp64": (torch.float64, "F64"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
    "int16": (torch.int16, "I16"),
    "int8": (torch.int8, "I8"),
    "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
    "fp8_e4m3": (torch.float8_e4m3fn, "F8_E4M3"),
    "fp8_e5m2": (torch.float8_e5m2, "F8_E5M2"),
}
_BY_TORCH = {t: name for name, (t, _) in DTYPES.items()}
_BY_ST = {s: name for name, (_, s) in DTYPES.items()}
CAST_DTYPES = ("bf16", "fp16", "fp32")


def dtype_name(dtype: torch.dtype | str) -> str:
    """Short name ("bf16", ...) of a torch dtype, a short name, or a safetensors dtype string."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _BY_TORCH:
            raise CheckpointError(f"dtype {dtype} cannot be stored; use one of {', '.join(DTYPES)}")
        return _BY_TORCH[dtype]
    if dtype in DTYPES:
        return dtype
    if dtype in _BY_ST:
        return _BY_ST[dtype]
    raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(CAST_DTYPES)}")


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype_name(dtype)][0]


def itemsize(dtype: torch.dtype | str) -> int:
    return torch.empty((), dtype=torch_dtype(dtype)).element_size()


def nbytes(shape: Sequence[int], dtype: torch.dtype | str) -> int:
    n = itemsize(dtype)
    for d in shape:
        n *= d
    return n


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Zero-copy little-endian bytes of a contiguous CPU tensor (works for bf16 too)."""
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class TensorEntry:
    """One manifest row."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # short name
    sha256: str
    file: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "sha256": self.sha256, "file": self.file}


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed ``moe_ext.json`` of ``directory`` with ``tensors`` as a name -> TensorEntry dict."""
    path = Path(directory) / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; this is not a moe_ext checkpoint directory") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot parse {path}: {e}; re-run `convert_checkpoint.py import-hf`") from None
    if raw.get("format") != FORMAT_NAME or raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format {raw.get('format')!r} version {raw.get('format_version')!r}; "
            f"this moe_ext reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    tensors: dict[str, TensorEntry] = {}
    try:
        for row in raw["tensors"]:
            entry = TensorEntry(row["name"], tuple(int(d) for d in row["shape"]), dtype_name(row["dtype"]),
                                row["sha256"], row["file"])
            if entry.name in tensors:
                raise CheckpointError(f"{path} lists tensor {entry.name} twice; re-run the conversion")
            tensors[entry.name] = entry
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path} has a malformed tensor row ({e}); re-run the conversion") from None
    raw["tensors"] = tensors
    return raw


def write_manifest(directory: Path, family: str, dtype: str, entries: Iterable[TensorEntry]) -> None:
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "family": family,
        "dtype": dtype,
        "tensors": [e.to_json() for e in entries],
    }
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def plan_shards(
    sizes: Sequence[tuple[str, int]], max_shard_bytes: int, prefix: str = "model"
) -> list[tuple[str, list[str]]]:
    """Group tensors in order into files of at most ``max_shard_bytes`` (a bigger tensor gets
    its own file); names follow the HF ``model-0000i-of-0000N.safetensors`` pattern, a single
    file is ``model.safetensors``."""
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes:
        if current and used + size > max_shard_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current or not groups:
        groups.append(current)
    if len(groups) == 1:
        return [(f"{prefix}.safetensors", groups[0])]
    n = len(groups)
    return [(f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class SafetensorsWriter:
    """Writes one safetensors file whose layout is fixed up front; tensors are then written in
    that order, each as a stream of chunks (row-major, concatenated bytes = the tensor)."""

    def __init__(self, path: Path, layout: Sequence[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None = None):
        """``layout``: (name, dtype short name, shape) per tensor, in write order."""
        self.path = Path(path)
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._order: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in layout:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": DTYPES[dtype_name(dtype)][1], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, size))
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._next = 0

    def write_tensor(self, name: str, chunks: Iterable[torch.Tensor]) -> str:
        """Append tensor ``name`` (the next one in the layout) from its chunks; returns its sha256."""
        expected_name, size = self._order[self._next]
        if name != expected_name:
            raise CheckpointError(f"{self.path.name}: writing {name} but the layout expects {expected_name} next")
        digest = hashlib.sha256()
        written = 0
        for chunk in chunks:
            data = tensor_bytes(chunk)
            written += data.nbytes
            if written > size:
                raise CheckpointError(f"{self.path.name}: tensor {name} got more than its {size} bytes")
            digest.update(data)
            self._file.write(data)
        if written != size:
            raise CheckpointError(f"{self.path.name}: tensor {name} got {written} of its {size} bytes")
        self._next += 1
        return digest.hexdigest()

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._order):
            raise CheckpointError(f"{self.path.name}: closed after {self._next} of {len(self._order)} tensors")

    def abort(self) -> None:
        self._file.close()


def replace_directory(tmp: Path, dst: Path) -> None:
    """Move the finished ``tmp`` to ``dst``; an existing ``dst`` is replaced only now, once
    the new directory is complete."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old)
    else:
        tmp.rename(dst)


@contextlib.contextmanager
def staged_directory(dst: Path) -> Iterator[Path]:
    """A fresh temporary directory next to ``dst``: renamed to ``dst`` when the block
    succeeds, removed when it fails, so no reader ever sees a partial checkpoint."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

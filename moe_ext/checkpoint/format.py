"""The moe_ext checkpoint directory format, and a streaming safetensors writer.

A moe_ext directory holds:
  config.json       the model's Hugging Face config, unchanged
  moe_ext.json      manifest: {"format": "moe_ext", "format_version": 1, "family", "dtype",
                    "tensors": [{"name", "shape", "dtype", "sha256", "file"}, ...]}
                    (native names; sha256 of the tensor's little-endian bytes as stored)
  model-0000i-of-0000N.safetensors   native-named tensors, stacked experts
  tokenizer and generation files copied from the source

A Hugging Face directory written by a conversion (``export-hf``, ``quantize``) carries
``moe_ext.digests.json``: {"format": "moe_ext-digests", "format_version": 1, "family",
"tensors": [rows as in the manifest, by Hugging Face name]}, so ``verify`` can check its
bytes too; readers of the directory ignore it.

Quantized checkpoints store fp8 weights as ``fp8_e4m3`` (safetensors F8_E4M3), fp8 scales
as ``fp32`` and MXFP4 blocks and scales as ``uint8``; those dtypes are never cast.

The writer lays out a whole safetensors file from (name, dtype, shape) up front and then
takes each tensor's bytes as a stream of chunks, so converting never holds more than one
chunk of a tensor in memory.

Every writer of a checkpoint directory goes through ``staged_directory`` (a temporary
directory next to the destination, renamed into place; file-system errors as one line;
leftovers of killed writers cleaned up), and every file name read from a checkpoint goes
through ``confined_file`` (it must stay inside the checkpoint directory).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from moe_ext.checkpoint.errors import CheckpointError

MANIFEST = "moe_ext.json"
FORMAT_NAME = "moe_ext"
FORMAT_VERSION = 1
HF_INDEX = "model.safetensors.index.json"
DIGESTS = "moe_ext.digests.json"
DIGESTS_FORMAT = "moe_ext-digests"

log = logging.getLogger(__name__)

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
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "sha256": self.sha256,
            "file": self.file,
        }


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed ``moe_ext.json`` of ``directory`` with ``tensors`` as a name -> TensorEntry "
    "dict."""
    path = Path(directory) / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing; this is not a moe_ext checkpoint directory"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot parse {path}: {e}; re-run `convert_checkpoint.py import-hf`"
        ) from e
    if raw.get("format") != FORMAT_NAME or raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format {raw.get('format')!r} version {raw.get('format_version')!r}; "
            f"this moe_ext reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    tensors: dict[str, TensorEntry] = {}
    try:
        for row in raw["tensors"]:
            entry = TensorEntry(
                row["name"],
                tuple(int(d) for d in row["shape"]),
                dtype_name(row["dtype"]),
                row["sha256"],
                row["file"],
            )
            if entry.name in tensors:
                raise CheckpointError(
                    f"{path} lists tensor {entry.name} twice; re-run the conversion"
                )
            tensors[entry.name] = entry
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path} has a malformed tensor row ({e}); re-run the conversion"
        ) from e
    raw["tensors"] = tensors
    return raw


def write_manifest(
    directory: Path, family: str, dtype: str, entries: Iterable[TensorEntry]
) -> None:
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "family": family,
        "dtype": dtype,
        "tensors": [e.to_json() for e in entries],
    }
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def write_digests(directory: Path, family: str, entries: Iterable[TensorEntry]) -> None:
    """The ``moe_ext.digests.json`` of a Hugging Face directory (rows by HF name)."""
    digests = {
        "format": DIGESTS_FORMAT,
        "format_version": FORMAT_VERSION,
        "family": family,
        "tensors": [e.to_json() for e in entries],
    }
    (Path(directory) / DIGESTS).write_text(json.dumps(digests, indent=1) + "\n")


def read_digests(directory: Path) -> dict[str, TensorEntry] | None:
    """HF name -> TensorEntry from ``moe_ext.digests.json`` (None: the directory has none)."""
    path = Path(directory) / DIGESTS
    if not path.exists():
        return None
    confined_file(Path(directory), DIGESTS, directory)
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != DIGESTS_FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has format {raw.get('format')!r} version "
                f"{raw.get('format_version')!r}; this moe_ext reads {DIGESTS_FORMAT!r} "
                f"version {FORMAT_VERSION}"
            )
        return {
            row["name"]: TensorEntry(
                row["name"],
                tuple(int(d) for d in row["shape"]),
                dtype_name(row["dtype"]),
                row["sha256"],
                row["file"],
            )
            for row in raw["tensors"]
        }
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot parse {path}: {e}; re-run the conversion") from e


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

    def __init__(
        self,
        path: Path,
        layout: Sequence[tuple[str, str, Sequence[int]]],
        metadata: dict[str, str] | None = None,
    ):
        """``layout``: (name, dtype short name, shape) per tensor, in write order."""
        self.path = Path(path)
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._order: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in layout:
            size = nbytes(shape, dtype)
            header[name] = {
                "dtype": DTYPES[dtype_name(dtype)][1],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._order.append((name, size))
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (
            -(8 + len(blob)) % 8
        )  # data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._next = 0

    def write_tensor(self, name: str, chunks: Iterable[torch.Tensor]) -> str:
        """Append tensor ``name`` (the next one in the layout) from its chunks; returns its "
        "sha256."""
        expected_name, size = self._order[self._next]
        if name != expected_name:
            raise CheckpointError(
                f"{self.path.name}: writing {name} but the layout expects {expected_name} next"
            )
        digest = hashlib.sha256()
        written = 0
        for chunk in chunks:
            data = tensor_bytes(chunk)
            written += data.nbytes
            if written > size:
                raise CheckpointError(
                    f"{self.path.name}: tensor {name} got more than its {size} bytes"
                )
            digest.update(data)
            self._file.write(data)
        if written != size:
            raise CheckpointError(
                f"{self.path.name}: tensor {name} got {written} of its {size} bytes"
            )
        self._next += 1
        return digest.hexdigest()

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._order):
            raise CheckpointError(
                f"{self.path.name}: closed after {self._next} of {len(self._order)} tensors"
            )

    def abort(self) -> None:
        # the failure being handled (a full disk, say) may fail the final flush too: the file
        # is removed with its temporary directory either way
        with contextlib.suppress(OSError):
            self._file.close()


# ---- file names a checkpoint gives ------------------------------------------------------


def confined_file(directory: Path, name: Any, source: Any) -> Path:
    """``directory / name`` for a file ``name`` read from a checkpoint file (``source``, named
    in the error), refused unless it stays inside ``directory``: a relative name without
    ``..`` whose real path (symlinks followed) lies in the directory. A Hugging Face hub
    cache snapshot links its files to ``../../blobs/<hash>``; those links are allowed."""
    directory = Path(directory)
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(
            f"{source} names file {name!r}, which is not a file name; "
            f"re-download or re-convert the checkpoint"
        )
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts:
        raise CheckpointError(
            f"{source} names file {name!r}, outside the checkpoint directory "
            f"{directory}; a checkpoint may only name files inside it"
        )
    path = directory / name
    real, home = path.resolve(), directory.resolve()
    if real != home and home in real.parents:
        return path
    if home.parent.name == "snapshots" and real.parent == home.parent.parent / "blobs":
        return path  # hub cache layout: snapshots/<revision>/<file> -> blobs/<hash>
    raise CheckpointError(
        f"{source} names file {name!r}, a link to {real} outside the "
        f"checkpoint directory {directory}; copy the file into the directory"
    )


# ---- staged output directories ----------------------------------------------------------

# errors of the destination's file system, reported as one line; any other OSError is
# unexpected and keeps its traceback
_WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "the file is too large",
}


def destination_problem(src: Path, dst: Path, force: bool) -> str | None:
    """Why a conversion of ``src`` may not write ``dst`` (None: it may). An existing
    directory is replaced only with ``force``; a file never is."""
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or dst_r in src_r.parents or src_r in dst_r.parents:
        return f"destination {dst} overlaps the source {src}; choose a separate directory"
    if dst.exists() and not dst.is_dir():
        return f"destination {dst} is a file, not a directory; remove it or choose another"
    if dst.exists() and not force:
        return f"destination {dst} exists; pass --force to overwrite it"
    return None


def check_free_space(dst: Path, needed: int) -> None:
    """Refuse up front when the file system that will hold ``dst`` has less than ``needed``
    bytes free (its nearest existing ancestor is asked)."""
    place = Path(dst).absolute().parent
    while not place.exists():
        place = place.parent
    free = shutil.disk_usage(place).free
    if free < needed:
        raise CheckpointError(
            f"writing {dst} needs about {_gib(needed)}, but {place} has "
            f"{_gib(free)} free; free space or choose another destination"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_staging(dst: Path) -> list[str]:
    """Clean up after writers of ``dst`` that were killed (kill -9, power loss): their
    ``.NAME.tmp-<pid>`` directories are removed; a ``.NAME.old-<pid>`` (killed while
    swapping in the new directory) is removed when ``dst`` exists, else moved back to
    ``dst``. Only directories of processes that no longer run on this host are touched.
    Returns one sentence per action (also logged)."""
    done = []
    if not dst.parent.is_dir():
        return done
    staging = re.compile(re.escape(f".{dst.name}.") + r"(tmp|old)-(\d+)")
    for path in sorted(dst.parent.iterdir()):
        m = staging.fullmatch(path.name)
        if m is None:
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or _pid_alive(pid) or not path.is_dir():
            continue
        if m.group(1) == "old" and not dst.exists():
            path.rename(dst)
            done.append(
                f"restored {dst} from {path.name}, left by process {pid} that was "
                f"killed while replacing it"
            )
        else:
            shutil.rmtree(path)
            done.append(f"removed {path}, left by process {pid} that no longer runs")
    for line in done:
        log.warning("%s", line)
    return done


def write_failure(dst: Path, err: OSError) -> CheckpointError | None:
    """A one-line CheckpointError for a file-system error (full disk, no permission,
    read-only) met while writing ``dst`` or reading its inputs; None for any other error."""
    reason = _WRITE_ERRNOS.get(err.errno)
    if reason is None:
        return None
    if err.filename is not None and not _ours(Path(os.fsdecode(err.filename)), Path(dst)):
        return CheckpointError(
            f"cannot access {os.fsdecode(err.filename)}: {reason}; nothing was written to {dst}"
        )
    where = f" ({os.fsdecode(err.filename)})" if err.filename is not None else ""
    return CheckpointError(
        f"cannot write {dst}: {reason}{where}; nothing was written there, "
        f"free space or choose a writable destination"
    )


def _ours(path: Path, dst: Path) -> bool:
    """Whether ``path`` is something writing ``dst`` creates: dst, an ancestor directory,
    or a staging directory next to it (and what lies in it)."""
    path, dst = path.absolute(), dst.absolute()
    inside = path.relative_to(dst.parent).parts if path.is_relative_to(dst.parent) else ()
    return (
        path == dst
        or path in dst.parents
        or (bool(inside) and inside[0].startswith(f".{dst.name}."))
    )


def replace_directory(tmp: Path, dst: Path) -> None:
    """Move the finished ``tmp`` to ``dst``; an existing ``dst`` (a directory) is replaced
    only now, once the new directory is complete."""
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(
            f"destination {dst} is a file, not a directory; remove it or choose another"
        )
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old)
    else:
        tmp.rename(dst)


@contextlib.contextmanager
def staged_directory(dst: Path) -> Iterator[Path]:
    """A fresh temporary directory ``.NAME.tmp-<pid>`` next to ``dst``: renamed to ``dst``
    when the block succeeds, removed when it fails or is interrupted (KeyboardInterrupt,
    or SIGTERM turned into one), so no reader ever sees a partial checkpoint. Staging
    directories of killed writers are cleaned up first (``remove_stale_staging``). A full
    disk, a read-only destination or missing permission raise a one-line CheckpointError."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(
            f"destination {dst} is a file, not a directory; remove it or choose another"
        )
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(dst)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as err:
        failure = write_failure(dst, err)
        if failure is None:
            raise
        raise failure from err
    try:
        yield tmp
        replace_directory(tmp, dst)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(dst, err) if isinstance(err, OSError) else None
        if failure is not None:
            raise failure from err
        raise

"""Hugging Face <-> moe_ext conversion and verification, streamed tensor by tensor.

Conversions read through `CheckpointReader` (safetensors only, never pickle), write into a
temporary directory next to the destination and rename it into place at the end, so a
failure leaves nothing at the destination. Peak memory is one chunk of one tensor (see
`CheckpointReader.iter_chunks`), not the model.

``quantize`` writes a Hugging Face checkpoint of quantized weights (fp8 block-scaled or
MXFP4, ``moe_ext.quant``) from an unquantized one, one tensor (one expert) at a time.
Quantized tensors pass through every other conversion as they are stored.

Shape legend: E experts, F expert FFN size, H hidden.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from moe_ext.checkpoint import hf_maps
from moe_ext.checkpoint.errors import CheckpointError
from moe_ext.checkpoint.format import (
    CAST_DTYPES,
    DIGESTS,
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
    read_digests,
    staged_directory,
    tensor_bytes,
    torch_dtype,
    write_digests,
    write_manifest,
)
from moe_ext.checkpoint.reader import CHUNK_BYTES, CheckpointReader, _file_header, tensor_digest
from moe_ext.checkpoint.shard import ShardRequest
from moe_ext.quant.config import QuantConfig
from moe_ext.quant.layout import StoredTensor, quantize_state, stored_tensors

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # what HF uses: shards stay below common file-size limits

# Weight files never copied as "side files" (everything else at the top level is: tokenizer,
# generation config, chat template, README, ...).
_WEIGHT_FILE = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|pkl|h5|msgpack|gguf|npz)$")
_NOT_COPIED = {"config.json", MANIFEST, HF_INDEX, DIGESTS}

PathLike = Union[str, Path]


def parse_size(text: str) -> int:
    """Bytes of "5GB", "500MB", "2GiB", "1000"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise CheckpointError(f"cannot parse size {text!r}; write e.g. 5GB, 500MB or a byte count")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


@dataclass
class _Output:
    """One tensor of the destination: its name there, dtype, shape and a chunk source."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[torch.Tensor]]
    source_bytes: int  # for the progress bar
    order: tuple[int, int] = (0, -1)  # (native tensor, expert): quantize's write order


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    problem = destination_problem(src, dst, force)
    if problem is not None:
        raise CheckpointError(problem)


def _side_files(src: Path) -> list[Path]:
    """Top-level files of ``src`` copied along (tokenizer, generation config, ...), each
    checked to lie inside ``src`` (a link leading out is refused, not followed)."""
    return sorted(
        confined_file(src, p.name, src)
        for p in src.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in _NOT_COPIED
        and not _WEIGHT_FILE.search(p.name)
    )


def _write_directory(
    src: Path,
    dst: Path,
    force: bool,
    outputs: list[_Output],
    max_shard_bytes: int,
    progress: bool,
    finish: Callable[[Path, list[TensorEntry]], None],
    desc: str,
) -> list[TensorEntry]:
    """Write ``outputs`` as safetensors shards plus config.json and side files of ``src`` into a
    temporary directory next to ``dst``, call ``finish(tmp, entries)``, then rename into place."""
    _check_destination(src, dst, force)
    side_files = _side_files(src)
    check_free_space(
        dst,
        sum(nbytes(o.shape, o.dtype) for o in outputs) + sum(p.stat().st_size for p in side_files),
    )
    with staged_directory(dst) as tmp:
        by_name = {o.name: o for o in outputs}
        shards = plan_shards([(o.name, nbytes(o.shape, o.dtype)) for o in outputs], max_shard_bytes)
        entries: list[TensorEntry] = []
        with tqdm(
            total=sum(o.source_bytes for o in outputs),
            unit="B",
            unit_scale=True,
            desc=desc,
            disable=not progress,
        ) as bar:
            for file, names in shards:
                writer = SafetensorsWriter(
                    tmp / file, [(n, by_name[n].dtype, by_name[n].shape) for n in names]
                )
                try:
                    for n in names:
                        out = by_name[n]
                        sha = writer.write_tensor(n, out.chunks())
                        entries.append(TensorEntry(n, out.shape, out.dtype, sha, file))
                        bar.update(out.source_bytes)
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
        shutil.copyfile(src / "config.json", tmp / "config.json")
        for side in side_files:
            shutil.copyfile(side, tmp / side.name)
        finish(tmp, entries)
    return entries


def import_hf(
    src: PathLike,
    dst: PathLike,
    dtype: Optional[str] = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> list[TensorEntry]:
    """Convert the Hugging Face directory ``src`` (any expert layout) into a moe_ext directory
    ``dst``: native names, stacked experts, ``moe_ext.json`` manifest with sha256 per tensor.
    ``dtype`` (bf16 | fp16 | fp32) casts every floating tensor; None keeps the stored dtypes."""
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype_name(dtype) not in CAST_DTYPES:
        raise CheckpointError(
            f"--dtype {dtype} is not supported; use one of {', '.join(CAST_DTYPES)}"
        )
    _check_destination(src, dst, force)
    reader = CheckpointReader.open(src)
    if reader.format != "hf":
        raise CheckpointError(
            f"{src} is already a moe_ext checkpoint; import-hf reads Hugging Face directories"
        )
    cast = torch_dtype(dtype) if dtype is not None else None

    def chunks_of(name: str, target: torch.dtype) -> Callable[[], Iterator[torch.Tensor]]:
        return lambda: (c.to(target) for c in reader.iter_chunks(name))

    outputs = []
    for name in reader.names():
        stored = reader.dtype(name)
        quantized = reader.specs[name].dtype is not None  # fp8 / scale / MXFP4: kept
        target = cast if cast is not None and stored.is_floating_point and not quantized else stored
        outputs.append(
            _Output(
                name,
                dtype_name(target),
                reader.shape(name),
                chunks_of(name, target),
                reader.nbytes(name),
            )
        )
    kinds = {o.dtype for o in outputs}
    overall = (
        dtype_name(cast) if cast is not None else (kinds.pop() if len(kinds) == 1 else "mixed")
    )

    def finish(tmp: Path, entries: list[TensorEntry]) -> None:
        write_manifest(tmp, reader.family, overall, entries)

    return _write_directory(
        src, dst, force, outputs, max_shard_bytes, progress, finish, f"import {src.name}"
    )


def export_hf(
    src: PathLike,
    dst: PathLike,
    layout: str = "per-expert",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> list[TensorEntry]:
    """Write checkpoint ``src`` (moe_ext, or HF in any layout) as a Hugging Face directory in the
    family's ``layout``: "per-expert" (what transformers ``save_pretrained`` writes) or "fused"
    (transformers-5 stacked ``mlp.experts.gate_up_proj`` / ``down_proj``). A family with one
    expert layout of its own (gpt_oss: ``hf_maps.stored_transform``) writes its experts in
    it whatever ``layout`` says, and MXFP4 experts are always fused. Stored dtypes are kept
    (quantized tensors as they are), so import then export is bit-exact. The directory
    gets ``moe_ext.digests.json`` (sha256 per tensor) for ``verify``."""
    src, dst = Path(src), Path(dst)
    _check_layout(layout)
    _check_destination(src, dst, force)
    reader = CheckpointReader.open(src)
    outputs = _hf_outputs(reader, reader.family, layout)

    def finish(tmp: Path, entries: list[TensorEntry]) -> None:
        _finish_hf(tmp, reader.family, entries)

    return _write_directory(
        src, dst, force, outputs, max_shard_bytes, progress, finish, f"export {src.name}"
    )


def _check_layout(layout: str) -> None:
    if layout not in hf_maps.LAYOUTS:
        raise CheckpointError(
            f"--layout {layout} is not supported; use one of {', '.join(hf_maps.LAYOUTS)}"
        )


def _finish_hf(tmp: Path, family: str, entries: list[TensorEntry]) -> None:
    """The index (several shards) and digests of a Hugging Face directory."""
    files = sorted({e.file for e in entries})
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(nbytes(e.shape, e.dtype) for e in entries)},
            "weight_map": {e.name: e.file for e in entries},
        }
        (tmp / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    write_digests(tmp, family, entries)


def _hf_outputs(source, family: str, layout: str) -> list[_Output]:
    """The Hugging Face tensors of ``source`` (a CheckpointReader, or anything with its
    names / shape / dtype / nbytes / read / iter_chunks over native stored names) in
    ``layout``; per-expert and relaid tensors are read one expert at a time. Each output
    carries ``order``: (index of its native tensor's weight, expert), grouping an expert's
    weight and scale when sorted."""
    logical_index: dict[str, int] = {}

    def whole(name: str) -> Callable[[], Iterator[torch.Tensor]]:
        return lambda: source.iter_chunks(name)

    def box(
        name: str, request: ShardRequest, shape: tuple[int, ...]
    ) -> Callable[[], list[torch.Tensor]]:
        return lambda: [source.read(name, request).reshape(shape)]

    def relaid(name: str, transform: str, experts: int) -> Callable[[], Iterator[torch.Tensor]]:
        return lambda: (
            hf_maps.to_stored(transform, source.read(name, ShardRequest.block(0, j, j + 1)))
            for j in range(experts)
        )  # one expert at a time, in the stored layout

    outputs = []
    for name in source.names():
        group = logical_index.setdefault(hf_maps.split_stored(name)[0], len(logical_index))
        dtype, shape = dtype_name(source.dtype(name)), source.shape(name)
        transform = hf_maps.stored_transform(name, family)
        if transform is not None:
            outputs.append(
                _Output(
                    hf_maps.hf_key(name, family, "fused"),
                    dtype,
                    hf_maps.stored_shape(transform, shape),
                    relaid(name, transform, shape[0]),
                    source.nbytes(name),
                    (group, -1),
                )
            )
            continue
        expert = hf_maps.stored_expert(name)
        if expert is None or layout == "fused" or not hf_maps.per_expert_layout(name):
            outputs.append(
                _Output(
                    hf_maps.hf_key(name, family, layout),
                    dtype,
                    shape,
                    whole(name),
                    source.nbytes(name),
                    (group, -1),
                )
            )
            continue
        E = shape[0]
        if expert[1] == hf_maps.GATE_UP:
            half = shape[1] // 2  # [E, 2R, C]: rows [0, R) gate, [R, 2R) up (R = F or F/bo)
            part = (half, *shape[2:])
            for j in range(E):
                gate_key, up_key = hf_maps.hf_expert_keys(name, family, j)
                for key, rows in ((gate_key, (0, half)), (up_key, (half, 2 * half))):
                    req = ShardRequest(boxes=((slice(j, j + 1), slice(*rows)),))
                    outputs.append(
                        _Output(
                            key, dtype, part, box(name, req, part), nbytes(part, dtype), (group, j)
                        )
                    )
        else:
            part = tuple(shape[1:])  # [E, H, F] (or its scale grid)
            for j in range(E):
                (down_key,) = hf_maps.hf_expert_keys(name, family, j)
                req = ShardRequest(boxes=((slice(j, j + 1),),))
                outputs.append(
                    _Output(
                        down_key, dtype, part, box(name, req, part), nbytes(part, dtype), (group, j)
                    )
                )
    return outputs


# ---- quantize ----------------------------------------------------------------------------


class _QuantizedSource:
    """The stored tensors (``moe_ext.quant.layout.stored_tensors``) of an unquantized
    checkpoint quantized per ``args.quantization``, with the reader's interface. A
    quantized weight is read and quantized whole, an expert tensor one expert (or expert
    range) at a time; the last result is kept, so an expert's weight and scale quantize it
    once when asked for in turn."""

    def __init__(self, reader: CheckpointReader, args) -> None:
        self.reader, self.args = reader, args
        self.specs: dict[str, StoredTensor] = stored_tensors(args)
        self._last: tuple[Optional[tuple], dict[str, torch.Tensor]] = (None, {})

    def names(self) -> list[str]:
        return list(self.specs)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.specs[name].shape

    def dtype(self, name: str) -> torch.dtype:
        spec = self.specs[name]
        return spec.dtype if spec.dtype is not None else self.reader.dtype(spec.logical)

    def nbytes(self, name: str) -> int:
        return nbytes(self.shape(name), self.dtype(name))

    def _passes(self, name: str) -> bool:
        """Stored as read: not a quantized part."""
        return self.specs[name].dtype is None

    def _stored(self, logical: str, experts: Optional[tuple[int, int]]) -> dict[str, torch.Tensor]:
        key = (logical, experts)
        if self._last[0] != key:
            request = ShardRequest.full() if experts is None else ShardRequest.block(0, *experts)
            value = self.reader.read(logical, request)  # [e1 - e0, ...] or the whole tensor
            self._last = (key, quantize_state({logical: value}, self.args))
        return self._last[1]

    def read(self, name: str, request: ShardRequest) -> torch.Tensor:
        if self._passes(name):
            return self.reader.read(name, request)
        spec = self.specs[name]
        bounds = request.bounds(spec.shape)
        first = 0
        if hf_maps.stored_expert(name) is not None:
            first, last = min(b[0][0] for b in bounds), max(b[0][1] for b in bounds)
            stored = self._stored(spec.logical, (first, last))[name]  # experts [first, last)
        else:
            stored = self._stored(spec.logical, None)[name]
        parts = [
            stored[
                tuple(
                    slice(a - first * (d == 0), b - first * (d == 0))
                    for d, (a, b) in enumerate(box)
                )
            ]
            for box in bounds
        ]
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, request.cat_dim)

    def iter_chunks(self, name: str) -> Iterator[torch.Tensor]:
        if self._passes(name):
            yield from self.reader.iter_chunks(name)
        elif hf_maps.stored_expert(name) is not None:
            for j in range(self.specs[name].shape[0]):
                yield self.read(name, ShardRequest.block(0, j, j + 1))
        else:
            yield self.read(name, ShardRequest.full())


def parse_block(block: Optional[Sequence[int]]) -> tuple[int, int]:
    """fp8 ``--block``: one size b (b x b blocks) or two (rows, columns); default 128."""
    if not block:
        return (128, 128)
    if len(block) > 2 or any(int(b) < 1 for b in block):
        raise CheckpointError(
            f"--block {' '.join(map(str, block))} must be one or two positive integers "
            "(rows [columns]), e.g. --block 128"
        )
    return (int(block[0]), int(block[-1]))


def quantize(
    src: PathLike,
    dst: PathLike,
    method: str,
    block: Optional[Sequence[int]] = None,
    layout: str = "per-expert",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> list[TensorEntry]:
    """Write unquantized checkpoint ``src`` (bf16/fp32, HF or moe_ext) as a quantized Hugging
    Face directory ``dst``: ``method`` fp8 (block-scaled, ``block`` = [rows, columns] per
    scale, default 128 x 128; every linear but embeddings, lm_head, norms and routers) or
    mxfp4 (routed experts only). config.json gets the ``quantization_config``; tensors are
    quantized with ``moe_ext.quant.formats``, one tensor or expert at a time, and written in
    the HF layout ``layout`` (gpt_oss: its own layout, MXFP4 experts fused, rows interleaved
    gate/up); other tensors keep their stored dtype. Tokenizer and generation files are
    copied; ``moe_ext.digests.json`` records every tensor's sha256."""
    src, dst = Path(src), Path(dst)
    _check_layout(layout)
    if method not in ("fp8", "mxfp4"):
        raise CheckpointError(f"--format {method} is not supported; use fp8 or mxfp4")
    _check_destination(src, dst, force)
    reader = CheckpointReader.open(src)
    if reader.quantization is not None:
        raise CheckpointError(
            f"{src} is already quantized ({reader.quantization.describe()}); quantize reads "
            "a bf16 or fp32 checkpoint"
        )
    quant = QuantConfig(method, parse_block(block) if method == "fp8" else (128, 128))
    config = dict(reader.config)
    config["quantization_config"] = quant.to_hf()
    args = hf_maps.config_args(config)  # checks the shapes fit (F % bo, in % 32)
    source = _QuantizedSource(reader, args)
    outputs = sorted(_hf_outputs(source, reader.family, layout), key=lambda o: o.order)

    def finish(tmp: Path, entries: list[TensorEntry]) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _finish_hf(tmp, reader.family, entries)

    return _write_directory(
        src,
        dst,
        force,
        outputs,
        max_shard_bytes,
        progress,
        finish,
        f"quantize {src.name} ({quant.describe()})",
    )


def verify(directory: PathLike, progress: bool = True) -> list[str]:
    """Problems of checkpoint ``directory`` (empty list: fine). Every tensor the config implies
    must be present with the right shape and dtype (quantized: fp8 weights, scales whose grid
    matches the weight and block size, MXFP4 blocks and scales), nothing extra; fp8 scales
    must be finite and positive. moe_ext directories also have every tensor's sha256 checked
    against the manifest, HF directories against ``moe_ext.digests.json`` when a conversion
    wrote one (a downloaded HF directory carries no checksums)."""
    try:
        reader = CheckpointReader.open(directory, strict=False)
    except CheckpointError as e:
        return [str(e)]
    problems = list(reader.problems)
    problems += _scale_problems(reader)
    if reader.format != "moe_ext":
        return problems + _digest_problems(reader.directory, progress)
    entries = reader.manifest["tensors"]  # type: ignore[index]
    names = reader.names()
    with tqdm(
        total=sum(reader.nbytes(n) for n in names),
        unit="B",
        unit_scale=True,
        desc=f"verify {reader.directory.name}",
        disable=not progress,
    ) as bar:
        for name in names:
            try:
                digest = tensor_digest(reader, name)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            if digest != entries[name].sha256:
                problems.append(
                    f"checksum mismatch for tensor {name} in {entries[name].file}: the data is "
                    "corrupt, re-run the conversion"
                )
            bar.update(reader.nbytes(name))
    return problems


def _scale_problems(reader: CheckpointReader) -> list[str]:
    """fp8 scale_inv tensors (small: one value per block) with a non-finite or non-positive
    value, which would turn a block into inf / nan or zero."""
    problems = []
    for name in reader.names():
        if reader.specs[name].role != "scale_inv":
            continue
        try:
            scale = reader.read(name).float()
        except CheckpointError as e:
            problems.append(str(e))
            continue
        bad = int((~(torch.isfinite(scale) & (scale > 0))).sum())  # host sync: a CPU tensor
        if bad:
            problems.append(
                f"tensor {name} has {bad} scale{'s' * (bad > 1)} that are not finite and "
                f"positive; the checkpoint is corrupt, re-download or re-quantize it"
            )
    return problems


def _digest_problems(directory: Path, progress: bool) -> list[str]:
    """A Hugging Face directory's tensors against its ``moe_ext.digests.json``."""
    try:
        entries = read_digests(directory)
    except CheckpointError as e:
        return [str(e)]
    if entries is None:
        return []
    problems: list[str] = []
    headers: dict[str, dict] = {}
    with tqdm(
        total=sum(nbytes(e.shape, e.dtype) for e in entries.values()),
        unit="B",
        unit_scale=True,
        desc=f"verify {directory.name}",
        disable=not progress,
    ) as bar:
        for entry in entries.values():
            try:
                path = confined_file(directory, entry.file, directory / DIGESTS)
                if entry.file not in headers:
                    headers[entry.file] = _file_header(path)
                stored = headers[entry.file].get(entry.name)
                if stored is None:
                    problems.append(
                        f"tensor {entry.name} is missing from {entry.file} although {DIGESTS} "
                        "places it there"
                    )
                    continue
                if stored[0] != entry.shape or dtype_name(stored[1]) != entry.dtype:
                    problems.append(
                        f"tensor {entry.name} in {entry.file} is {dtype_name(stored[1])} "
                        f"{list(stored[0])}, {DIGESTS} says {entry.dtype} {list(entry.shape)}"
                    )
                    continue
                if _file_digest(path, entry.name, entry.shape, entry.dtype) != entry.sha256:
                    problems.append(
                        f"checksum mismatch for tensor {entry.name} in {entry.file}: the data "
                        "is corrupt, re-download or re-run the conversion"
                    )
            except CheckpointError as e:
                problems.append(str(e))
            bar.update(nbytes(entry.shape, entry.dtype))
    return problems


def _file_digest(path: Path, key: str, shape: tuple[int, ...], dtype: str) -> str:
    """sha256 of tensor ``key`` of safetensors file ``path``, streamed in row blocks."""
    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        if not shape:
            digest.update(tensor_bytes(f.get_tensor(key)))
            return digest.hexdigest()
        sl = f.get_slice(key)
        rows = max(1, CHUNK_BYTES // max(nbytes(shape[1:], dtype), 1))
        for start in range(0, shape[0], rows):
            digest.update(tensor_bytes(sl[start : start + rows].clone()))
    return digest.hexdigest()

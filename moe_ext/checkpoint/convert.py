"""Hugging Face <-> moe_ext conversion and verification, streamed tensor by tensor.

Conversions read through `CheckpointReader` (safetensors only, never pickle), write into a
temporary directory next to the destination and rename it into place at the end, so a
failure leaves nothing at the destination. Peak memory is one chunk of one tensor (see
`CheckpointReader.iter_chunks`), not the model.

Shape legend: E experts, F expert FFN size, H hidden.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from moe_ext.checkpoint import hf_maps
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
    torch_dtype,
    write_manifest,
)
from moe_ext.checkpoint.reader import CheckpointReader, tensor_digest
from moe_ext.checkpoint.shard import ShardRequest

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # what HF uses: shards stay below common file-size limits

# Weight files never copied as "side files" (everything else at the top level is: tokenizer,
# generation config, chat template, README, ...).
_WEIGHT_FILE = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|pkl|h5|msgpack|gguf|npz)$")
_NOT_COPIED = {"config.json", MANIFEST, HF_INDEX}

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
        target = cast if cast is not None and stored.is_floating_point else stored
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
    it whatever ``layout`` says. Stored dtypes are kept, so import then export is
    bit-exact."""
    src, dst = Path(src), Path(dst)
    if layout not in hf_maps.LAYOUTS:
        raise CheckpointError(
            f"--layout {layout} is not supported; use one of {', '.join(hf_maps.LAYOUTS)}"
        )
    _check_destination(src, dst, force)
    reader = CheckpointReader.open(src)
    family = reader.family

    def whole(name: str) -> Callable[[], Iterator[torch.Tensor]]:
        return lambda: reader.iter_chunks(name)

    def box(
        name: str, request: ShardRequest, shape: tuple[int, ...]
    ) -> Callable[[], list[torch.Tensor]]:
        return lambda: [reader.read(name, request).reshape(shape)]

    def relaid(name: str, transform: str, experts: int) -> Callable[[], Iterator[torch.Tensor]]:
        return lambda: (
            hf_maps.to_stored(transform, reader.read(name, ShardRequest.block(0, j, j + 1)))
            for j in range(experts)
        )  # one expert at a time, in the stored layout

    outputs = []
    for name in reader.names():
        dtype, shape = dtype_name(reader.dtype(name)), reader.shape(name)
        transform = hf_maps.stored_transform(name, family)
        if transform is not None:
            outputs.append(
                _Output(
                    hf_maps.hf_key(name, family, "fused"),
                    dtype,
                    hf_maps.stored_shape(transform, shape),
                    relaid(name, transform, shape[0]),
                    reader.nbytes(name),
                )
            )
            continue
        expert = hf_maps.expert_tensor(name)
        if expert is None or layout == "fused":
            outputs.append(
                _Output(
                    hf_maps.hf_key(name, family, layout),
                    dtype,
                    shape,
                    whole(name),
                    reader.nbytes(name),
                )
            )
            continue
        if expert[1] == hf_maps.GATE_UP:
            E, two_f, H = shape  # [E, 2F, H]: rows [0, F) gate, [F, 2F) up
            F = two_f // 2
            for j in range(E):
                gate_key, up_key = hf_maps.hf_expert_keys(name, family, j)
                for key, rows in ((gate_key, (0, F)), (up_key, (F, 2 * F))):
                    req = ShardRequest(boxes=((slice(j, j + 1), slice(*rows)),))
                    outputs.append(
                        _Output(key, dtype, (F, H), box(name, req, (F, H)), nbytes((F, H), dtype))
                    )
        else:
            E, H, F = shape  # [E, H, F]
            for j in range(E):
                (down_key,) = hf_maps.hf_expert_keys(name, family, j)
                req = ShardRequest(boxes=((slice(j, j + 1),),))
                outputs.append(
                    _Output(down_key, dtype, (H, F), box(name, req, (H, F)), nbytes((H, F), dtype))
                )

    def finish(tmp: Path, entries: list[TensorEntry]) -> None:
        files = sorted({e.file for e in entries})
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(nbytes(e.shape, e.dtype) for e in entries)},
                "weight_map": {e.name: e.file for e in entries},
            }
            (tmp / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    return _write_directory(
        src, dst, force, outputs, max_shard_bytes, progress, finish, f"export {src.name}"
    )


def verify(directory: PathLike, progress: bool = True) -> list[str]:
    """Problems of checkpoint ``directory`` (empty list: fine). Every tensor the config implies
    must be present with the right shape, nothing extra; moe_ext directories also have every
    tensor's sha256 checked against the manifest (HF directories carry no checksums)."""
    try:
        reader = CheckpointReader.open(directory, strict=False)
    except CheckpointError as e:
        return [str(e)]
    problems = list(reader.problems)
    if reader.format != "moe_ext":
        return problems
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

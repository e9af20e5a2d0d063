"""Reading Megatron (torch_dist) checkpoints without running code from them.

A torch_dist directory holds three kinds of pickles: ``.metadata`` (torch's checkpoint
metadata, unpickled by ``FileSystemReader.read_metadata`` with plain ``pickle``),
``common.pt`` (``torch.load``) and byte items inside the ``*.distcp`` files (Megatron's
ShardedObjects such as ``_extra_state``; torch's load planner calls
``torch.load(weights_only=False)`` on them). Any of them could run code from a crafted
checkpoint. Here:

- ``read_dcp_metadata`` unpickles ``.metadata`` with an allow-list: torch's
  checkpoint-metadata dataclasses and enums, ``torch.Size``, dtypes and layouts, nothing
  else; every data file it names must lie inside the checkpoint directory.
- ``restricted_unpickling`` holds, while Megatron loads, the same allow-list for every
  ``.metadata`` read and ``weights_only=True`` for every ``torch.load`` (tensors, plain
  containers and numbers only). A refusal becomes one ``UnsafeCheckpointError`` line
  naming the file and the refused global.

``trust=True`` (``convert_checkpoint.py import-megatron --trust-checkpoint``) leaves the
unpickling to Megatron and torch, for checkpoints that hold other objects (Transformer
Engine's FP8 recipe in ``_extra_state``, say); only for checkpoints you made yourself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from moe_ext.checkpoint.errors import CheckpointError
from moe_ext.checkpoint.format import confined_file

DCP_METADATA = ".metadata"
MEGATRON_FILES = ("metadata.json", "common.pt", DCP_METADATA)
# modules of torch.distributed.checkpoint whose dataclasses and enums make up the metadata
_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
_TRUST_HINT = (
    "if you made this checkpoint yourself, pass --trust-checkpoint "
    "(load_megatron/import_megatron trust_checkpoint=True)"
)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file whose pickle names something other than plain data."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch checkpoint metadata and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            plain = isinstance(obj, type) and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
            )
            if plain:
                return obj
        elif module == "torch" and name == "Size":
            return torch.Size
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout  # maps a layout's name to the layout
        elif (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name}")


def restricted_pickle_load(file: Any) -> Any:
    """``pickle.load`` with the metadata allow-list; refusals raise UnpicklingError."""
    return _MetadataUnpickler(file).load()


def read_dcp_metadata(directory: Path) -> Any:
    """The ``torch.distributed.checkpoint`` Metadata of ``directory``, unpickled with the
    allow-list, every data file it names checked to lie inside ``directory``."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = confined_file(directory, DCP_METADATA, directory)
    try:
        with open(path, "rb") as f:
            metadata = restricted_pickle_load(f)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing; pass the directory dist_checkpointing.save wrote"
        ) from None
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(_refusal(path, str(e))) from e
    except Exception as e:  # noqa: BLE001 - truncated or garbled metadata is one line
        raise CheckpointError(
            f"cannot read {path} ({type(e).__name__}: {e}); only Megatron's "
            f"torch_dist format is read"
        ) from e
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(
            f"{path} holds a {type(metadata).__name__}, not torch checkpoint "
            f"metadata; only Megatron's torch_dist format is read"
        )
    for index, info in metadata.storage_data.items():
        confined_file(
            directory,
            getattr(info, "relative_path", None),
            f"{path} (storage entry {getattr(index, 'fqn', index)!r})",
        )
    return metadata


def check_megatron_files(directory: Path) -> None:
    """Megatron's fixed files in ``directory`` lie inside it (no link leading out)."""
    for name in MEGATRON_FILES:
        if (directory / name).exists() or (directory / name).is_symlink():
            confined_file(directory, name, directory)


def _refusal(where: Any, message: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", message)  # torch's weights_only refusals name it so
    lines = message.strip().splitlines()
    what = found.group(1) if found else lines[0][:200] if lines else "an object"
    return (
        f"refusing to unpickle {what} from {where}: checkpoint files may only hold tensors "
        f"and plain data, this one could run code; {_TRUST_HINT}"
    )


class _RestrictedPickleModule:
    """Stands in for the ``pickle`` module inside torch's checkpoint reader: ``load`` uses
    the metadata allow-list, everything else is ``pickle``'s."""

    def __init__(self, on_refusal: Callable[[str], None]):
        self._on_refusal = on_refusal

    def load(self, file: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return restricted_pickle_load(file)
        except pickle.UnpicklingError as e:
            self._on_refusal(_refusal(getattr(file, "name", DCP_METADATA), str(e)))
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)


@contextlib.contextmanager
def restricted_unpickling(directory: Path, trust: bool = False) -> Iterator[None]:
    """While the block runs (Megatron loading ``directory``): torch's checkpoint reader
    unpickles ``.metadata`` with the allow-list and every ``torch.load`` is
    ``weights_only=True``. Any failure after a refusal is raised as one
    UnsafeCheckpointError line (Megatron and torch wrap errors in their own). ``trust``
    leaves both as they are. Not thread-safe: the patched names are process-wide."""
    if trust:
        yield
        return
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    refusals: list[str] = []
    original_load = torch.load

    def weights_only_load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("pickle_module", None)
        kwargs["weights_only"] = True
        try:
            return original_load(f, map_location, **kwargs)
        except pickle.UnpicklingError as e:
            where = (
                f
                if isinstance(f, (str, Path))
                else f"a pickled object in the *.distcp files of {directory}"
            )
            refusals.append(_refusal(where, str(e)))
            raise

    saved_pickle = dcp_filesystem.pickle
    dcp_filesystem.pickle = _RestrictedPickleModule(refusals.append)
    torch.load = weights_only_load
    try:
        yield
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if refusals and not isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise UnsafeCheckpointError(refusals[0]) from e
        raise
    finally:
        torch.load = original_load
        dcp_filesystem.pickle = saved_pickle

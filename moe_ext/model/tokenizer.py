"""Tokenizers for the native engine: a byte-level one for the built-in ``tiny`` model and a
loader for a checkpoint's ``tokenizer.json`` (Hugging Face ``tokenizers`` library)."""

from __future__ import annotations

import json
import os
from typing import Optional, Protocol

from moe_ext.errors import MoeExtError


class TokenizerError(MoeExtError):
    """A tokenizer that cannot be loaded (one line: problem and fix)."""


class Tokenizer(Protocol):
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: int
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes; then bos, eos, pad (vocab 259, the tiny model pads
    its embedding to 260 rows)."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint's ``tokenizer.json``; special ids from ``tokenizer_config.json`` /
    ``config.json`` / ``generation_config.json`` next to it when present."""

    def __init__(
        self,
        path: str,
        bos_id: Optional[int] = None,
        eos_id: Optional[int] = None,
        pad_id: Optional[int] = None,
    ):
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise TokenizerError(
                "the 'tokenizers' package is missing; pip install tokenizers"
            ) from e
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise TokenizerError(
                f"no tokenizer.json at {path}; point model.tokenizer at a "
                f"checkpoint directory or a tokenizer.json file"
            )
        try:
            self._tok = _Tokenizer.from_file(file)
        except Exception as err:  # the tokenizers library raises plain Exceptions
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TokenizerError(
                f"{file} is not a valid tokenizer.json ({reason}); restore "
                f"it from the model's original files"
            ) from err
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        folder = os.path.dirname(file)
        meta = {}
        for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
            meta.update(_read_special_ids(self._tok, os.path.join(folder, name)))
        self.bos_id = bos_id if bos_id is not None else meta.get("bos")
        eos = eos_id if eos_id is not None else meta.get("eos")
        self.eos_id = eos
        pad = pad_id if pad_id is not None else meta.get("pad")
        self.pad_id = pad if pad is not None else (eos if isinstance(eos, int) else 0)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def _read_special_ids(tok, file: str) -> dict:
    """bos/eos/pad ids from one HF json file (ids, or token strings / AddedToken dicts)."""
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(
            f"cannot read {file} ({err}); fix or remove it (it gives the "
            f"tokenizer's special token ids)"
        ) from err
    if not isinstance(data, dict):
        raise TokenizerError(
            f"{file} holds a JSON {type(data).__name__}, not an object; fix "
            f"or remove it (it gives the tokenizer's special token ids)"
        )
    out = {}
    for key in ("bos", "eos", "pad"):
        for field in (f"{key}_token_id", f"{key}_token"):
            value = data.get(field)
            if field.endswith("_token"):  # a token: its text, or an AddedToken dict
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    value = tok.token_to_id(value)
            if value is not None and not _is_id_or_ids(value):
                raise TokenizerError(
                    f"{file}: {field}={data.get(field)!r} is not a token id "
                    f"(or list of ids) or token text; fix or remove it"
                )
            if value is not None:
                out[key] = value
                break
    return out


def _is_id_or_ids(value) -> bool:
    def is_id(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    return is_id(value) or (isinstance(value, list) and bool(value) and all(map(is_id, value)))


def load_tokenizer(spec: Optional[str], checkpoint: Optional[str] = None):
    """``"byte"`` -> ByteTokenizer; a path -> HFTokenizer; None -> the checkpoint's own."""
    if spec == "byte":
        return ByteTokenizer()
    path = spec or checkpoint
    if path is None:
        raise TokenizerError(
            "no tokenizer: set model.tokenizer=byte or a tokenizer.json path, "
            "or pass checkpoint=<dir> holding tokenizer.json"
        )
    return HFTokenizer(path)

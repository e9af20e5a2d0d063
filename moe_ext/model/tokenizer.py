"""Tokenizers for the native engine: a byte-level one for the built-in ``tiny`` model and a
loader for a checkpoint's ``tokenizer.json`` (Hugging Face ``tokenizers`` library)."""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Protocol

from moe_ext.errors import MoeExtError

log = logging.getLogger(__name__)


class TokenizerError(MoeExtError):
    """A tokenizer that cannot be loaded (one line: problem and fix)."""


class Tokenizer(Protocol):
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: int
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> Optional[str]:
        """The text of ``ids``; None for a tokenizer that has no text (ids only)."""
        ...


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
    """A checkpoint's ``tokenizer.json``, encoding text as transformers'
    ``PreTrainedTokenizerFast`` does for the same files: the special tokens a prompt gets
    are the ones tokenizer.json's post-processor adds (a TemplateProcessing with a BOS as in
    Llama, Mistral and DeepSeek; none as in Qwen and gpt-oss), never ``config.json``'s
    ``bos_token_id``. transformers 5 ignores ``add_bos_token`` / ``add_eos_token`` in
    tokenizer_config.json when tokenizer.json exists; a disagreeing flag is logged.

    ``bos_id`` / ``eos_id`` / ``pad_id``: the declared special ids, from tokenizer_config.json
    (special_tokens_map.json where transformers reads it), else config.json. What generation
    stops on is generation_config.json's business (moe_ext.cli.generation_config)."""

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
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        file = _sibling(folder, "tokenizer.json", path) if os.path.isdir(path) else path
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
        tokenizer_config = _read_json(folder, "tokenizer_config.json", file)
        layers = [("config.json", _read_json(folder, "config.json", file))]
        layers.append(("tokenizer_config.json", tokenizer_config))
        if "added_tokens_decoder" not in tokenizer_config:  # when transformers reads it
            layers.append(("special_tokens_map.json", _read_json(folder, LEGACY_MAP, file)))
        meta: dict = {}
        for name, data in layers:  # later files win
            meta.update(_read_special_ids(self._tok, data, os.path.join(folder, name)))
        self.bos_id = bos_id if bos_id is not None else meta.get("bos")
        eos = eos_id if eos_id is not None else meta.get("eos")
        self.eos_id = eos
        pad = pad_id if pad_id is not None else meta.get("pad")
        self.pad_id = pad if pad is not None else (eos if isinstance(eos, int) else 0)
        _warn_on_ignored_flags(self._tok, tokenizer_config, self.bos_id, _first(eos), folder)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """``text``'s ids; ``add_bos``: with the special tokens the tokenizer's own rules add
        (transformers' ``add_special_tokens``: a BOS only where the tokenizer has one),
        else the text's ids alone."""
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


LEGACY_MAP = "special_tokens_map.json"  # older checkpoints' special tokens


def _sibling(folder: str, name: str, source: str) -> str:
    """``folder/name``, refused when a link takes it outside ``folder`` (a checkpoint's files
    stay inside its directory)."""
    from moe_ext.checkpoint.format import confined_file

    return str(confined_file(folder, name, source))


def _read_json(folder: str, name: str, source: str) -> dict:
    """The JSON object in ``folder/name`` ({} when there is none)."""
    file = os.path.join(folder, name)
    if not os.path.lexists(file):
        return {}
    file = _sibling(folder, name, source)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = str(err).splitlines()[0]
        raise TokenizerError(
            f"cannot read {file} ({reason}); fix or remove it (it gives the "
            f"tokenizer's special tokens)"
        ) from err
    if not isinstance(data, dict):
        raise TokenizerError(
            f"{file} holds a JSON {type(data).__name__}, not an object; fix "
            f"or remove it (it gives the tokenizer's special tokens)"
        )
    return data


def _token_text(value):
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _warn_on_ignored_flags(tok, tokenizer_config: dict, bos_id, eos_id, folder: str) -> None:
    """Say so when tokenizer_config.json's ``add_bos_token`` / ``add_eos_token`` disagree
    with what tokenizer.json's post-processor adds: transformers (5.x) drops the flags
    whenever tokenizer.json exists, and so does this loader; older transformers versions
    rebuilt the post-processor from them for some tokenizer classes."""
    added = tok.encode("", add_special_tokens=True).ids  # the specials alone, in place
    adds = {
        "add_bos_token": bos_id is not None and added[:1] == [bos_id],
        "add_eos_token": eos_id is not None and added[-1:] == [eos_id],
    }
    for flag, does in adds.items():
        value = tokenizer_config.get(flag)
        if isinstance(value, bool) and value != does:
            log.warning(
                "%s: %s=%s, but tokenizer.json's post-processor %s; encoding as tokenizer.json "
                "says (as transformers does)",
                os.path.join(folder, "tokenizer_config.json"),
                flag,
                str(value).lower(),
                "adds that token" if does else "does not add it",
            )


def _read_special_ids(tok, data: dict, file: str) -> dict:
    """bos/eos/pad ids from one HF json object (ids, or token strings / AddedToken dicts)."""
    out = {}
    for key in ("bos", "eos", "pad"):
        for field in (f"{key}_token_id", f"{key}_token"):
            value = data.get(field)
            if field.endswith("_token"):  # a token: its text, or an AddedToken dict
                value = _token_text(value)
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


def _first(ids):
    """An id, or the first of a list of them."""
    return ids[0] if isinstance(ids, list) and ids else ids


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

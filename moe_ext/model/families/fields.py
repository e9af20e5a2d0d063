"""Typed reads of one model config mapping (a ``config.json`` or a ``conf/model`` YAML).

Every read names the source and the key in its error, so a missing or mis-typed field is
one line ("config.json: hidden_size must be an integer, got '4096' (a string)") instead
of a KeyError or TypeError deep inside model construction. The reader remembers the keys
it was asked for: a ``conf/model`` file with a key no family reads is a typo.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from moe_ext.errors import MoeExtError


class ModelConfigError(MoeExtError):
    """A model config that is missing a field or has one of the wrong type."""


_REQUIRED = object()


def _kind(value: Any) -> str:
    return {
        str: "a string",
        bool: "a boolean",
        list: "a list",
        dict: "a mapping",
        float: "a number",
        int: "an integer",
    }.get(type(value), type(value).__name__)


class ConfigFields:
    """Typed, source-naming reads of a config mapping."""

    def __init__(self, config: Mapping[str, Any], source: str):
        self._config = dict(config)
        self.source = source
        self._read: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return self._config.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        """The value as stored (lists, mappings), ``default`` when absent or null."""
        self._read.add(key)
        value = self._config.get(key)
        return default if value is None else value

    def _value(self, key: str, default: Any) -> Any:
        value = self.raw(key)
        if value is None:
            if default is _REQUIRED:
                raise ModelConfigError(
                    f"{self.source}: required field {key!r} is missing; "
                    f"add it (see the model's Hugging Face config.json)"
                )
            return default
        return value

    def _wrong(self, key: str, value: Any, want: str) -> ModelConfigError:
        return ModelConfigError(
            f"{self.source}: {key} must be {want}, got {value!r} ({_kind(value)}); fix the value"
        )

    def int(self, key: str, default: Any = _REQUIRED) -> Optional[int]:
        value = self._value(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise self._wrong(key, value, "an integer")
        return value

    def float(self, key: str, default: Any = _REQUIRED) -> Optional[float]:
        value = self._value(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._wrong(key, value, "a number")
        return float(value)

    def bool(self, key: str, default: Any = _REQUIRED) -> Optional[bool]:
        value = self._value(key, default)
        if value is default:
            return value
        if not isinstance(value, bool):
            raise self._wrong(key, value, "true or false")
        return value

    def str(self, key: str, default: Any = _REQUIRED) -> Optional[str]:
        value = self._value(key, default)
        if value is default:
            return value
        if not isinstance(value, str):
            raise self._wrong(key, value, "a string")
        return value

    def int_list(self, key: str) -> list[int]:
        value = self.raw(key, [])
        if not isinstance(value, (list, tuple)) or any(
            isinstance(v, bool) or not isinstance(v, int) for v in value
        ):
            raise self._wrong(key, value, "a list of integers")
        return [int(v) for v in value]

    def token_ids(self, key: str) -> Optional[int | list[int]]:
        """A token id or a list of them (``eos_token_id`` may be either)."""
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return [int(v) for v in value]
        return self.int(key)

    def overridden(self, **values: Any) -> "ConfigFields":
        """This config with ``values`` in place of the stored ones, for a family whose
        architecture fixes a shared field (MLA: head_dim, num_key_value_heads) as
        transformers does; reads through it count as reads of this config."""
        view = ConfigFields({**self._config, **values}, self.source)
        view._read = self._read
        return view

    def unread(self) -> list[str]:
        """Keys present in the mapping that no read asked for."""
        return sorted(set(self._config) - self._read)

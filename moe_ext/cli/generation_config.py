"""A checkpoint's generation_config.json, read as transformers reads it for ``generate``:
the ids generation stops on, and the sampling defaults (temperature, top_p, top_k) a run
takes for the ``generate.*`` fields it leaves unset.

Stop ids, as transformers: generation_config.json's ``eos_token_id`` (an id or a list),
else config.json's, else the tokenizer's EOS. Sampling, as transformers: the file samples
only with ``do_sample: true`` (then temperature defaults to 1); otherwise it means greedy.
top-k defaults to off (vLLM's default; transformers would use 50).

The file is read as JSON only, through the checkpoint's directory confinement.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from moe_ext.checkpoint.format import confined_file
from moe_ext.config import SAMPLING_DEFAULTS, GenerateConf
from moe_ext.errors import MoeExtError

FILE = "generation_config.json"
SAMPLED_TEMPERATURE = 1.0  # transformers' temperature when do_sample is true and none is set


class GenerationConfigError(MoeExtError):
    """A generation_config.json that cannot be used (one line: file, field and fix)."""


@dataclass(frozen=True)
class GenerationConfig:
    """What ``generate`` takes from generation_config.json (None: the file does not say)."""

    eos_ids: Optional[list[int]] = None
    do_sample: Optional[bool] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None

    def sampling_defaults(self) -> dict[str, Union[float, int]]:
        """The sampling fields this file sets: top_p / top_k as written; temperature its
        own under ``do_sample: true``, 0 (greedy) when the file says not to sample."""
        out: dict[str, Union[float, int]] = {}
        if self.do_sample:
            out["temperature"] = (
                self.temperature if self.temperature is not None else SAMPLED_TEMPERATURE
            )
        elif self.do_sample is False or self.temperature is not None:
            out["temperature"] = 0.0  # transformers decodes greedily unless do_sample is true
        if self.top_p is not None:
            out["top_p"] = self.top_p
        if self.top_k is not None:
            out["top_k"] = self.top_k
        return out


def read_generation_config(checkpoint: Optional[str]) -> GenerationConfig:
    """``checkpoint``'s generation_config.json (an empty one when there is none)."""
    if checkpoint is None or not os.path.lexists(os.path.join(checkpoint, FILE)):
        return GenerationConfig()
    path = confined_file(Path(checkpoint), FILE, f"checkpoint {checkpoint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise GenerationConfigError(
            f"cannot read {path} ({err.strerror}); fix its permissions or remove it"
        ) from err
    except UnicodeDecodeError as err:
        raise GenerationConfigError(
            f"{path} is not UTF-8 ({err.reason} at byte {err.start}); restore it from the "
            f"model's original files or remove it"
        ) from err
    except json.JSONDecodeError as err:
        raise GenerationConfigError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}); restore it from the "
            f"model's original files or remove it"
        ) from err
    if not isinstance(data, dict):
        raise GenerationConfigError(
            f"{path} holds a JSON {type(data).__name__}, not an object; restore it from the "
            f"model's original files or remove it"
        )
    return _parse(data, path)


def _parse(data: dict[str, Any], path: Path) -> GenerationConfig:
    def bad(field: str, want: str) -> GenerationConfigError:
        return GenerationConfigError(
            f"{path}: {field}={data[field]!r} is not {want}; fix or remove the field"
        )

    def number(field: str, ok) -> Optional[float]:
        value = data.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise bad(field, _WANT[field])
        return value

    eos = data.get("eos_token_id")
    if eos is not None:
        eos = [eos] if _is_id(eos) else eos
        if not isinstance(eos, list) or not eos or not all(map(_is_id, eos)):
            raise bad("eos_token_id", "a token id or a list of them")
    do_sample = data.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise bad("do_sample", "true or false")
    top_k = number("top_k", lambda v: isinstance(v, int) and v >= 0)
    return GenerationConfig(
        eos_ids=eos,
        do_sample=do_sample,
        temperature=number("temperature", lambda v: v >= 0),
        top_p=number("top_p", lambda v: 0 < v <= 1),
        top_k=None if top_k is None else int(top_k),
    )


_WANT = {
    "temperature": "a number >= 0",
    "top_p": "a number in (0, 1]",
    "top_k": "a whole number >= 0",
}


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def stop_ids(
    file: GenerationConfig,
    config_eos: Union[int, list[int], None],
    tokenizer_eos: Union[int, list[int], None],
) -> Optional[list[int]]:
    """What generation stops on: the file's ``eos_token_id``, else config.json's
    (``config_eos``), else the tokenizer's EOS; None: nothing (run to max_new_tokens)."""
    for ids in (file.eos_ids, config_eos, tokenizer_eos):
        if ids is not None:
            return list(ids) if isinstance(ids, list) else [ids]
    return None


def resolve_sampling(conf: GenerateConf, file: GenerationConfig) -> tuple[GenerateConf, str]:
    """``conf`` with every sampling field set (``generate.*``, else the file, else the
    built-in greedy defaults), and the launcher's line saying which is which."""
    from_file = file.sampling_defaults()
    resolved = conf.with_sampling(from_file)
    sources: dict[str, list[str]] = {}
    for name in SAMPLING_DEFAULTS:
        if getattr(conf, name) is not None:
            source = "generate.*"
        elif name in from_file:
            source = FILE
            if name == "temperature" and not file.do_sample:
                source = f"{FILE} (do_sample not true)"
        else:
            source = "built-in defaults"
        sources.setdefault(source, []).append(name)
    values = " ".join(f"{name}={getattr(resolved, name):g}" for name in SAMPLING_DEFAULTS)
    if len(sources) == 1:
        origin = f"from {next(iter(sources))}"
    else:
        origin = "; ".join(f"{', '.join(names)} from {source}" for source, names in sources.items())
    greedy = "greedy; " if resolved.temperature == 0 else ""
    return resolved, f"sampling: {values} ({greedy}{origin})"

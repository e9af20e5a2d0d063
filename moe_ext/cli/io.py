"""The files launch/infer.py reads and writes: the JSONL prompts and the JSONL output.

The output's destination is checked before anything is generated, and the file is written
to a temp name and renamed, so a run that fails leaves no file (old or partial) behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from moe_ext.errors import MoeExtError

DEMO_PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "In the beginning",
    "It was a dark and stormy night",
]


class PromptsError(MoeExtError):
    """A prompts file that cannot be used (one line: file, line and fix)."""


class OutputError(MoeExtError):
    """An output path that cannot be written (one line: path and fix)."""


def read_prompts(
    path: Optional[str],
    tokenizer: Any,
    vocab_size: int,
    chat_template: Optional[Callable[[], Any]] = None,
) -> list[list[int]]:
    """Prompt ids from a JSONL file (``{"prompt": text}``, ``{"prompt_ids": [...]}`` or
    ``{"messages": [...]}`` in the OpenAI chat format), or the demo prompts; every id must
    index the model's embedding (``vocab_size`` rows), which a tokenizer larger than the
    model would break. ``chat_template``: called once, at the first messages line, for the
    model's ChatTemplate (moe_ext.serve.chat; None: the model has none), which renders
    and encodes such lines as the server and transformers do."""
    if path is None:
        prompts = [tokenizer.encode(text) for text in DEMO_PROMPTS]
        _check_ids(prompts, vocab_size, "the demo prompts")
        return prompts
    file = Path(path)
    if not file.is_file():
        raise PromptsError(f"prompts file {path} does not exist; pass prompts=<file.jsonl>")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise PromptsError(
            f"prompts file {path} is not UTF-8 ({err.reason} at byte "
            f"{err.start}); convert it to UTF-8"
        ) from err
    prompts = []
    chat = _LazyTemplate(chat_template)
    for number, line in enumerate(lines, start=1):
        if line.strip():
            ids = _prompt_ids(line, tokenizer, f"{path}:{number}", chat)
            _check_ids([ids], vocab_size, f"{path}:{number}")
            prompts.append(ids)
    if not prompts:
        raise PromptsError(f"{path} holds no prompts")
    return prompts


class _LazyTemplate:
    """The chat template, loaded at its first use (a job without messages lines never
    reads it, so a broken template cannot fail it)."""

    def __init__(self, load: Optional[Callable[[], Any]]):
        self.load, self.loaded, self.template = load, False, None

    def get(self) -> Any:
        if not self.loaded:
            self.template = self.load() if self.load is not None else None
            self.loaded = True
        return self.template


def _prompt_ids(line: str, tokenizer: Any, where: str, chat: _LazyTemplate) -> list[int]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise PromptsError(
            f"{where}: not valid JSON ({err.msg}); each line must be "
            f'{{"prompt": "text"}}, {{"prompt_ids": [...]}} or {{"messages": [...]}}'
        ) from err
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return tokenizer.encode(record["prompt"])
    if isinstance(record, dict) and "messages" in record:
        return _chat_ids(record["messages"], tokenizer, where, chat)
    ids = record.get("prompt_ids") if isinstance(record, dict) else None
    if isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return ids
    raise PromptsError(
        f'{where}: expected {{"prompt": "text"}}, {{"prompt_ids": [int, ...]}} or '
        f'{{"messages": [{{"role": ..., "content": ...}}, ...]}}'
    )


def _chat_ids(messages: Any, tokenizer: Any, where: str, chat: _LazyTemplate) -> list[int]:
    """A messages line through the model's chat template (with the assistant's header)."""
    from moe_ext.serve.chat import MessagesError

    try:
        template = chat.get()
    except MoeExtError as err:
        raise PromptsError(f"{where}: {err}") from err
    if template is None:
        raise PromptsError(
            f"{where}: a messages line needs the model's chat template, and it has none (no "
            f"chat_template in tokenizer_config.json, no chat_template.jinja); give "
            f'{{"prompt": "text"}} lines'
        )
    try:
        return template.encode(messages, tokenizer)
    except MessagesError as err:
        raise PromptsError(f"{where}: {err}") from err
    except MoeExtError as err:  # the template refused them, or an ids-only tokenizer
        raise PromptsError(f"{where}: {err}") from err


def _check_ids(prompts: list[list[int]], vocab_size: int, where: str) -> None:
    for ids in prompts:
        if not ids:
            raise PromptsError(f"{where}: the prompt is empty")
        bad = next((i for i in ids if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise PromptsError(
                f"{where}: token id {bad} is outside the model's vocabulary "
                f"[0, {vocab_size}); give ids of this model (or its own "
                f"tokenizer)"
            )


def check_output(path: str) -> None:
    """Refuse, before any weight loads, an output that could not be written: an existing
    directory, a location that is not a directory, or one this process cannot write into
    (read-only mount, permissions); probed by creating and removing a temp file."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(
            f"output={path} is a directory; give a file path, e.g. output={target / 'out.jsonl'}"
        )
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the nearest existing folder (missing ones are created)
    if not parent.is_dir():
        raise OutputError(f"output={path}: {parent} is not a directory; choose another output=")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{target.name}.probe"):
            pass
    except OSError as err:
        raise OutputError(
            f"output={path} cannot be written ({err.strerror} in {parent}); "
            f"choose a writable output="
        ) from err


def write_output(
    path: str, prompt_ids: list[list[int]], tokens: list[list[int]], tokenizer: Any
) -> None:
    """One JSON line per prompt, input order; written to a temp file then renamed. A failed
    write (disk full) removes the temp file and leaves any previous file as it was."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            for prompt, out in zip(prompt_ids, tokens):
                f.write(
                    json.dumps(
                        {"prompt_ids": prompt, "output_ids": out, "text": tokenizer.decode(out)}
                    )
                    + "\n"
                )
        os.replace(tmp, target)
    except OSError as err:
        raise OutputError(
            f"output={path} could not be written ({err.strerror}); free "
            f"space or choose another output="
        ) from err
    finally:
        tmp.unlink(missing_ok=True)

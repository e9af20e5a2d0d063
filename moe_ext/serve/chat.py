"""Chat templates: OpenAI-style ``messages`` -> prompt ids, as ``transformers`` does it.

The template is the checkpoint's own: ``chat_template.jinja`` (the file transformers saves
since 4.50, and the one it prefers), else ``chat_template`` in ``tokenizer_config.json`` (a
string, or a list of ``{"name", "template"}`` of which ``default`` is taken). It is rendered
as ``PreTrainedTokenizerBase.apply_chat_template`` renders it: a jinja2
``ImmutableSandboxedEnvironment`` (chat templates are untrusted code) with ``trim_blocks``
and ``lstrip_blocks``, the loop-controls extension, a ``tojson`` that does not escape HTML,
``raise_exception`` and ``strftime_now``; the variables ``messages``,
``add_generation_prompt``, ``tools`` / ``documents`` (None) and the tokenizer's special
tokens as text (``bos_token``, ``eos_token``, ...). The rendered text is encoded without the
tokenizer's own special tokens (``add_special_tokens=False``): the template writes them.

The byte-level tiny model has no template: it gets BUILTIN_TEMPLATE (``role: content``
lines, then ``assistant:``), encoded with its BOS in front as its plain prompts are.

Messages are checked before rendering (check_messages): a list of objects with a string
``role`` and a ``content`` that is a string, null, or a list of ``{"type": "text", "text":
...}`` parts (joined into one string, as most templates expect). Keys whose value is null
are dropped, as transformers drops them.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from moe_ext.errors import MoeExtError

JINJA_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
LEGACY_MAP = "special_tokens_map.json"
SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# the tiny byte-level model's template (it was trained on plain text, so any simple layout)
BUILTIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(MoeExtError):
    """A chat template that cannot be loaded or rendered (one line: where, why and fix)."""


class MessagesError(MoeExtError):
    """Chat messages of the wrong shape; ``field`` names the offending field
    (``messages[1].content``) for the OpenAI-style 400 error."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def check_messages(messages: Any, field: str = "messages") -> list[dict[str, Any]]:
    """``messages`` as the template sees them (see the module docstring); raises
    MessagesError naming the first bad field."""
    if not isinstance(messages, list) or not messages:
        raise MessagesError(f"'{field}' must be a non-empty list of messages", field)
    out = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise MessagesError(f"'{where}' must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if not isinstance(role, str):
            raise MessagesError(f"'{where}.role' is required and must be a string", f"{where}.role")
        cleaned = {key: value for key, value in message.items() if value is not None}
        if "content" in cleaned:
            cleaned["content"] = _content_text(cleaned["content"], f"{where}.content")
        out.append(cleaned)
    return out


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise MessagesError(
                    f'\'{where}[{j}]\' must be a text part {{"type": "text", "text": ...}} '
                    f"(this server takes text only)",
                    f"{where}[{j}]",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise MessagesError(f"'{where}' must be a string or a list of text parts", where)


class ChatTemplate:
    """One compiled template. ``special_tokens``: the text of bos_token, eos_token, ...
    (the template variables); ``add_special_tokens``: encode the rendered text with the
    tokenizer's own specials (only the built-in template, whose text cannot hold a BOS)."""

    def __init__(
        self,
        source: str,
        where: str,
        special_tokens: Optional[dict[str, str]] = None,
        add_special_tokens: bool = False,
    ):
        self.source = source
        self.where = where
        self.special_tokens = dict(special_tokens or {})
        self.add_special_tokens = add_special_tokens
        self._template = _compile(source, where)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (already through check_messages)."""
        import jinja2

        try:
            return self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as err:  # raise_exception() in the template, or a bug
            raise ChatTemplateError(
                f"the chat template ({self.where}) refused these messages: {err}"
            ) from err

    def encode(
        self, messages: Any, tokenizer: Any, add_generation_prompt: bool = True
    ) -> list[int]:
        """Prompt ids of ``messages`` (checked here) through ``tokenizer.encode``."""
        text = self.render(check_messages(messages), add_generation_prompt)
        return tokenizer.encode(text, add_bos=self.add_special_tokens)


def _compile(source: str, where: str):
    """The template compiled in an environment configured as transformers configures its own
    (see the module docstring)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as err:  # pragma: no cover - a dependency of transformers and fastapi
        raise ChatTemplateError("chat templates need jinja2; pip install jinja2") from err

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(
            f"{where}: the chat template does not parse ({err.message}, line {err.lineno}); "
            f"restore it from the model's original files"
        ) from err


def load_chat_template(
    checkpoint: Optional[str], tokenizer_spec: Optional[str] = None
) -> Optional[ChatTemplate]:
    """The template for a model: the checkpoint's (see the module docstring), the built-in
    one for the byte tokenizer (``tokenizer_spec == "byte"``), else None (no chat)."""
    if checkpoint is not None:
        folder = Path(checkpoint)
        config = _read_json(folder / CONFIG_FILE)
        specials = _special_tokens(config, folder)
        jinja = folder / JINJA_FILE
        if jinja.is_file():
            return ChatTemplate(_read_text(jinja), str(jinja), specials)
        source = _config_template(config.get("chat_template"), folder / CONFIG_FILE)
        if source is not None:
            return ChatTemplate(source, str(folder / CONFIG_FILE), specials)
    if tokenizer_spec == "byte":
        return ChatTemplate(BUILTIN_TEMPLATE, "the built-in template", add_special_tokens=True)
    return None


def _config_template(value: Any, file: Path) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            t.get("name"): t.get("template")
            for t in value
            if isinstance(t, dict) and isinstance(t.get("template"), str)
        }
        if "default" in named:
            return named["default"]
        raise ChatTemplateError(
            f"{file}: chat_template lists {sorted(map(str, named))} but no 'default'; name "
            f"one of them default"
        )
    raise ChatTemplateError(
        f"{file}: chat_template is a {type(value).__name__}; it must be a string or a list of "
        f"{{name, template}}"
    )


def _special_tokens(config: dict, folder: Path) -> dict[str, str]:
    """The special tokens' text as transformers hands them to the template:
    special_tokens_map.json, then tokenizer_config.json (later wins); AddedToken dicts give
    their content."""
    out: dict[str, str] = {}
    for data in (_read_json(folder / LEGACY_MAP), config):
        for name in SPECIAL_TOKENS:
            value = data.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                out[name] = value
    return out


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ChatTemplateError(
            f"cannot read {file} ({err}); restore it from the model's original files"
        ) from err


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(_read_text(file))
    except json.JSONDecodeError as err:
        raise ChatTemplateError(
            f"{file} is not valid JSON ({err.msg} at line {err.lineno}); restore it from the "
            f"model's original files"
        ) from err
    return data if isinstance(data, dict) else {}

"""moe_ext.serve.chat renders a checkpoint's chat template as transformers'
``apply_chat_template`` does: the same text and the same ids, for a template in
tokenizer_config.json, in chat_template.jinja (which wins), and in the named-list form;
``raise_exception`` and ``tojson``; plus the byte model's built-in template, the message
checks (a 400 names the field) and a template's sandbox.

The reference is transformers itself loading the same folder (PreTrainedTokenizerFast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_ext.model.tokenizer import ByteTokenizer, HFTokenizer
from moe_ext.serve.chat import (
    BUILTIN_TEMPLATE,
    ChatTemplateError,
    MessagesError,
    check_messages,
    load_chat_template,
)
from tests.unit.test_tokenizer_parity import LAYOUTS, QWEN_SPECIALS, _save_tokenizer

transformers = pytest.importorskip("transformers")

# A ChatML template as Qwen-style checkpoints ship it (system default, tools rendered with
# tojson, a namespace walk backwards, loop controls, raise_exception on an unknown role).
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- set ns = namespace(last_user=-1) %}\n"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}"
    "{% endif %}{% endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if loop.first and message.role == 'system' %}{% continue %}{% endif %}\n"
    "    {%- if message.role not in ['user', 'assistant', 'tool'] %}\n"
    "        {{- raise_exception('unknown role ' + message.role) }}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content }}\n"
    "    {%- if message.name is defined %}{{ ' ' + {'name': message.name} | tojson }}"
    "{% endif %}\n"
    "    {%- if loop.index0 == ns.last_user %}{{ ' (last user)' }}{% endif %}\n"
    "    {{- '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
# Llama-style: the BOS text from the special tokens, alternation enforced
LLAMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{{ '[' + message['role'] | upper + '] ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endfor %}"
)

CHATS = [
    [{"role": "user", "content": "Hello world"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Once upon a time"},
        {"role": "assistant", "content": "there was a model"},
        {"role": "user", "content": "héllo, wörld! <|im_end|>", "name": "fox"},
    ],
]


def _folder(tmp_path: Path, config_extra: dict, jinja: str | None = None) -> Path:
    directory = tmp_path / "tok"
    _save_tokenizer(directory, QWEN_SPECIALS, "byte_level")
    config = {**LAYOUTS["qwen"][3], "bos_token": "<|endoftext|>", **config_extra}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (directory / "chat_template.jinja").write_text(jinja)
    return directory


def _theirs(directory: Path):
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))


@pytest.mark.parametrize("where", ["config", "jinja", "named_list"])
def test_chatml_equals_transformers(tmp_path, where):
    if where == "config":
        directory = _folder(tmp_path, {"chat_template": CHATML})
    elif where == "jinja":  # the .jinja file wins over the config's (other) template
        directory = _folder(tmp_path, {"chat_template": LLAMA}, jinja=CHATML)
    else:
        named = [{"name": "tool_use", "template": LLAMA}, {"name": "default", "template": CHATML}]
        directory = _folder(tmp_path, {"chat_template": named})
    template = load_chat_template(str(directory))
    ours_tok = HFTokenizer(str(directory))
    theirs = _theirs(directory)
    for chat in CHATS:
        for prompt in (True, False):
            expected = theirs.apply_chat_template(
                chat, add_generation_prompt=prompt, tokenize=False
            )
            assert template.render(check_messages(chat), prompt) == expected
            ids = theirs.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=True)
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
            assert template.encode(chat, ours_tok, prompt) == ids
    assert "<|im_start|>assistant\n" in template.render(check_messages(CHATS[0]))


def test_special_tokens_and_raise_exception(tmp_path):
    directory = _folder(tmp_path, {"chat_template": LLAMA, "eos_token": "<|im_end|>"})
    template = load_chat_template(str(directory))
    theirs = _theirs(directory)
    chat = [
        {"role": "user", "content": " hi "},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "bye"},
    ]
    rendered = template.render(check_messages(chat))
    assert rendered == theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|endoftext|>[USER] hi <|im_end|>")
    bad = [{"role": "assistant", "content": "first"}]
    with pytest.raises(Exception, match="must alternate") as theirs_err:
        theirs.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match="must alternate"):
        template.render(check_messages(bad))
    assert theirs_err.value is not None


def test_text_parts_and_nulls_as_transformers(tmp_path):
    directory = _folder(tmp_path, {"chat_template": CHATML})
    template = load_chat_template(str(directory))
    theirs = _theirs(directory)
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}],
        },
        {"role": "assistant", "content": "ok", "name": None},
    ]
    plain = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "ok"}]
    assert template.render(check_messages(parts)) == theirs.apply_chat_template(
        plain, add_generation_prompt=True, tokenize=False
    )


def test_byte_model_builtin_template():
    template = load_chat_template(None, "byte")
    assert template.source == BUILTIN_TEMPLATE
    tok = ByteTokenizer()
    chat = [{"role": "system", "content": "Speak verse."}, {"role": "user", "content": "Hi"}]
    ids = template.encode(chat, tok)
    assert ids == [tok.bos_id] + list(b"system: Speak verse.\nuser: Hi\nassistant:")
    assert load_chat_template(None, None) is None


@pytest.mark.parametrize(
    "messages, field",
    [
        (None, "messages"),
        ([], "messages"),
        (["hi"], "messages[0]"),
        ([{"content": "hi"}], "messages[0].role"),
        ([{"role": 3, "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}], "messages[1].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages[0].content[0]",
        ),
    ],
)
def test_bad_messages_name_the_field(messages, field):
    with pytest.raises(MessagesError) as err:
        check_messages(messages)
    assert err.value.field == field
    assert field in str(err.value)


def test_sandbox_and_broken_templates(tmp_path):
    escape = "{{ messages.__class__.__mro__ }}"
    directory = _folder(tmp_path, {"chat_template": escape})
    with pytest.raises(Exception) as err:  # jinja2's SecurityError: unsafe attribute
        load_chat_template(str(directory)).render(check_messages(CHATS[0]))
    assert "unsafe" in str(err.value) or "SecurityError" in type(err.value).__name__
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="does not parse"):
        load_chat_template(str(directory))
    (directory / "chat_template.jinja").unlink()
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}]})
    )
    with pytest.raises(ChatTemplateError, match="no 'default'"):
        load_chat_template(str(directory))


# ---- launch/infer.py's {"messages": [...]} prompt lines ------------------------------------


def _env():
    from tests.support import local_dist_env

    return local_dist_env()


def test_infer_messages_lines_as_transformers(tmp_path):
    from moe_ext.cli import infer
    from tests.support import tiny_conf
    from tests.unit.test_tokenizer_parity import _checkpoint_with_hf_tokenizer

    directory, _ = _checkpoint_with_hf_tokenizer(tmp_path)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": CHATML})
    )
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"messages": chat} for chat in CHATS] + [{"prompt": "Hello world"}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = tiny_conf(infer.InferConf, checkpoint=str(directory), prompts=str(prompts))
    job = infer.prepare(cfg, _env(), cuda_available=False, num_local_gpus=0)
    theirs = _theirs(directory)
    expected = [
        theirs.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in CHATS
    ]
    expected = [e if isinstance(e, list) else e["input_ids"] for e in expected]
    assert job.prompt_ids == [*expected, theirs("Hello world").input_ids]


def test_infer_messages_lines_byte_model_and_errors(tmp_path):
    from moe_ext.cli.io import PromptsError, read_prompts

    tok = ByteTokenizer()
    prompts = tmp_path / "p.jsonl"
    chat = [{"role": "user", "content": "Hi"}]
    prompts.write_text(json.dumps({"messages": chat}) + "\n")
    byte_template = lambda: load_chat_template(None, "byte")
    ids = read_prompts(str(prompts), tok, 260, chat_template=byte_template)
    assert ids == [[tok.bos_id, *b"user: Hi\nassistant:"]]
    with pytest.raises(PromptsError, match=r"p\.jsonl:1: a messages line needs"):
        read_prompts(str(prompts), tok, 260, chat_template=lambda: None)
    prompts.write_text(
        '{"prompt": "plain"}\n' + json.dumps({"messages": [{"content": "x"}]}) + "\n"
    )
    with pytest.raises(PromptsError, match=r"p\.jsonl:2: 'messages\[0\]\.role' is required"):
        read_prompts(str(prompts), tok, 260, chat_template=byte_template)

    def broken():
        raise ChatTemplateError("tokenizer_config.json: broken")

    prompts.write_text('{"prompt": "plain"}\n')  # no messages line: the template is never read
    assert read_prompts(str(prompts), tok, 260, chat_template=broken) == [tok.encode("plain")]

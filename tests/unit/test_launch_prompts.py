"""The prompts file of launch/infer.py (issue 15): every bad file is one line naming the file
(and the line where there is one), raised by ``read_prompts`` before any weight loads."""

from __future__ import annotations

import pytest

from moe_ext.cli.io import PromptsError, read_prompts
from moe_ext.model.tokenizer import ByteTokenizer


@pytest.mark.parametrize(
    "text, where, needle",
    [
        ('{"prompt": "a"}\n{"prompt": "b"\n', ":2", "not valid JSON"),
        ('["a"]\n', ":1", "expected"),
        ('{"prompt_ids": [1, "2"]}\n', ":1", "expected"),
        ('{"prompt_ids": [1, true]}\n', ":1", "expected"),
        ('{"prompt_ids": []}\n', ":1", "empty"),
        ("", "", "holds no prompts"),
        ("\n  \n", "", "holds no prompts"),
    ],
    ids=[
        "bad_json",
        "not_an_object",
        "string_id",
        "bool_id",
        "empty_prompt",
        "empty_file",
        "blank_lines",
    ],
)
def test_bad_prompts_file_is_one_line_naming_it(tmp_path, text, where, needle):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(PromptsError) as caught:
        read_prompts(str(path), ByteTokenizer(), vocab_size=260)
    message = str(caught.value)
    assert f"{path}{where}" in message and needle in message, message
    assert "\n" not in message


def test_missing_prompts_file_is_named(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(PromptsError, match=f"prompts file {path} does not exist"):
        read_prompts(str(path), ByteTokenizer(), vocab_size=260)


def test_good_prompts_file_reads_both_forms(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"prompt_ids": [5, 6]}\n')
    assert read_prompts(str(path), ByteTokenizer(), vocab_size=260) == [
        ByteTokenizer().encode("hi"),
        [5, 6],
    ]

"""Tokenizer parity with transformers (issue 16): text prompts encode exactly as
``transformers.PreTrainedTokenizerFast`` encodes them from the same files, for each
layout real checkpoints use (no BOS as in Qwen and gpt-oss; a BOS from the post-processor
as in Llama, Mistral and DeepSeek, whose ``add_bos_token`` agrees), and where
tokenizer_config.json's flags disagree with tokenizer.json; generation stops on
generation_config.json's eos ids; sampling defaults come from generation_config.json
unless ``generate.*`` sets them, and the launcher says which.

Tokenizers are built here with the ``tokenizers`` library (tiny BPE models); nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_ext.checkpoint import CheckpointError
from moe_ext.cli import infer
from moe_ext.cli.generation_config import (
    GenerationConfig,
    GenerationConfigError,
    read_generation_config,
    resolve_sampling,
    stop_ids,
)
from moe_ext.config import ConfigError, GenerateConf
from moe_ext.model.generate import sample
from moe_ext.model.tokenizer import HFTokenizer
from tests.support import local_dist_env, tiny_conf

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
Tokenizer = tokenizers.Tokenizer
decoders, models, pre_tokenizers = tokenizers.decoders, tokenizers.models, tokenizers.pre_tokenizers
processors, trainers = tokenizers.processors, tokenizers.trainers

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "moe_ext" / "data" / "checkpoints" / "tiny"
CORPUS = [
    "Hello world, hello tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a model that stopped where transformers stops.",
]
TEXTS = ["Hello world", " leading space", "héllo, wörld!", "two\nlines", "a <|im_end|> b"]


def _save_tokenizer(
    directory: Path,
    specials: list[str],
    post: str,
    bos: str | None = None,
    byte_level: bool = True,
    vocab_size: int = 400,
) -> dict[str, int]:
    """A BPE tokenizer.json trained on CORPUS; ``post``: "none", "byte_level", "template"
    (``bos`` before $A) or "sequence" (ByteLevel then that template, as DeepSeek and Llama 3
    write it). Returns the vocabulary."""
    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "[UNK]"))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", *specials])
    tok.train_from_iterator(CORPUS, trainer)
    if post in ("template", "sequence"):
        template = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
        tok.post_processor = (
            template
            if post == "template"
            else processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
        )
    elif post == "byte_level":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return tok.get_vocab()


def _added(content: str) -> dict:
    """A special token as tokenizer_config.json writes it (an AddedToken dict)."""
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>"]
SP_SPECIALS = ["<s>", "</s>", "<|im_end|>"]
DS_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|im_end|>"]
OSS_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|im_end|>"]

# name: (specials, post-processor, its bos, tokenizer_config.json, special_tokens_map.json,
#        the BOS transformers puts in front (None: none), the EOS it appends)
LAYOUTS = {
    "qwen": (
        QWEN_SPECIALS,
        "byte_level",
        None,
        {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "add_prefix_space": False,
            "errors": "replace",
        },
        None,
        None,
        None,
    ),
    "gpt_oss": (
        OSS_SPECIALS,
        "none",
        None,
        {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"},
        None,
        None,
        None,
    ),
    "llama3": (
        LLAMA_SPECIALS,
        "sequence",
        "<|begin_of_text|>",
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        None,
        "<|begin_of_text|>",
        None,
    ),
    "mistral": (
        SP_SPECIALS,
        "template",
        "<s>",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": None,
        },
        None,
        "<s>",
        None,
    ),
    "deepseek": (
        DS_SPECIALS,
        "sequence",
        "<｜begin▁of▁sentence｜>",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": _added("<｜begin▁of▁sentence｜>"),
            "eos_token": _added("<｜end▁of▁sentence｜>"),
        },
        None,
        "<｜begin▁of▁sentence｜>",
        None,
    ),
    # transformers 5 drops add_bos_token / add_eos_token when tokenizer.json exists: the
    # post-processor alone decides, whatever the flags say
    "flag_off_under_template": (
        SP_SPECIALS,
        "template",
        "<s>",
        {"add_bos_token": False, "bos_token": "<s>", "eos_token": "</s>"},
        None,
        "<s>",
        None,
    ),
    "flags_on_without_template": (
        SP_SPECIALS,
        "byte_level",
        None,
        {"add_bos_token": True, "add_eos_token": True, "bos_token": "<s>", "eos_token": "</s>"},
        None,
        None,
        None,
    ),
    # legacy special_tokens_map.json and no post-processor at all
    "special_tokens_map": (
        SP_SPECIALS,
        "none",
        None,
        {"add_bos_token": True},
        {"bos_token": "<s>", "eos_token": "</s>"},
        None,
        None,
    ),
}


def _write_layout(directory: Path, name: str) -> dict[str, int]:
    specials, post, bos, config, legacy, _, _ = LAYOUTS[name]
    vocab = _save_tokenizer(directory, specials, post, bos)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if legacy is not None:
        (directory / "special_tokens_map.json").write_text(json.dumps(legacy))
    # config.json's bos_token_id: the id the old loader put in front of every prompt
    (directory / "config.json").write_text(json.dumps({"bos_token_id": vocab[specials[0]]}))
    return vocab


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_prompts_encode_as_transformers(tmp_path, layout):
    vocab = _write_layout(tmp_path, layout)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    ours = HFTokenizer(str(tmp_path))
    *_, bos, eos = LAYOUTS[layout]
    for text in TEXTS:
        want = theirs(text).input_ids
        assert ours.encode(text) == want, text
        assert ours.encode(text, add_bos=False) == theirs(text, add_special_tokens=False).input_ids
        # the layout is what it claims: BOS / EOS exactly where expected, nowhere else
        bare = theirs(text, add_special_tokens=False).input_ids
        assert want == ([vocab[bos]] if bos else []) + bare + ([vocab[eos]] if eos else [])
    assert ours.decode(ours.encode("Hello world")) == "Hello world"


def test_qwen_prompt_gets_no_endoftext_in_front(tmp_path):
    vocab = _write_layout(tmp_path, "qwen")
    ids = HFTokenizer(str(tmp_path)).encode("Hello world")
    assert vocab["<|endoftext|>"] not in ids  # config.json names it bos_token_id
    assert HFTokenizer(str(tmp_path)).eos_id == vocab["<|im_end|>"]


def test_declared_ids_and_disagreeing_flags(tmp_path, caplog):
    vocab = _write_layout(tmp_path, "special_tokens_map")
    with caplog.at_level("WARNING", logger="moe_ext.model.tokenizer"):
        ours = HFTokenizer(str(tmp_path))
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert (ours.bos_id, ours.eos_id) == (vocab["<s>"], vocab["</s>"])
    assert "add_bos_token=true" in caplog.text and "does not add it" in caplog.text
    # with added_tokens_decoder, transformers no longer reads special_tokens_map.json
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {}, "eos_token": "<|im_end|>"})
    )
    assert HFTokenizer(str(tmp_path)).eos_id == vocab["<|im_end|>"]
    # flags transformers ignores are no error here either
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": "yes"}))
    assert HFTokenizer(str(tmp_path)).encode("Hello world") == theirs("Hello world").input_ids


# ---- generation_config.json: stop ids and sampling defaults ------------------------------

QWEN3_GENERATION = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
}


def _gen(tmp_path: Path, data) -> GenerationConfig:
    (tmp_path / "generation_config.json").write_text(
        data if isinstance(data, str) else json.dumps(data)
    )
    return read_generation_config(str(tmp_path))


def test_stop_ids_precedence_as_transformers(tmp_path):
    qwen3 = _gen(tmp_path, QWEN3_GENERATION)
    # the file's list beats config.json and the tokenizer's single eos (<|im_end|>)
    assert stop_ids(qwen3, 151645, 151645) == [151645, 151643]
    assert stop_ids(_gen(tmp_path, {"eos_token_id": 7}), [1, 2], 3) == [7]
    assert stop_ids(_gen(tmp_path, {"do_sample": True}), [1, 2], 3) == [1, 2]
    assert stop_ids(read_generation_config(str(tmp_path / "none")), None, 3) == [3]
    assert stop_ids(GenerationConfig(), None, None) is None


def test_sampling_defaults_come_from_the_file_unless_set(tmp_path):
    qwen3 = _gen(tmp_path, QWEN3_GENERATION)
    conf, line = resolve_sampling(GenerateConf(), qwen3)
    assert (conf.temperature, conf.top_p, conf.top_k) == (0.6, 0.95, 20)
    assert line == "sampling: temperature=0.6 top_p=0.95 top_k=20 (from generation_config.json)"
    conf, line = resolve_sampling(GenerateConf(temperature=0.2, top_k=5), qwen3)
    assert (conf.temperature, conf.top_p, conf.top_k) == (0.2, 0.95, 5)
    assert line == (
        "sampling: temperature=0.2 top_p=0.95 top_k=5 (temperature, top_k from "
        "generate.*; top_p from generation_config.json)"
    )
    conf, line = resolve_sampling(GenerateConf(temperature=0.0), qwen3)  # user's greedy wins
    assert conf.temperature == 0 and "greedy" in line
    # nothing anywhere: today's greedy
    conf, line = resolve_sampling(GenerateConf(), GenerationConfig())
    assert (conf.temperature, conf.top_p, conf.top_k) == (0.0, 1.0, 0)
    assert line == "sampling: temperature=0 top_p=1 top_k=0 (greedy; from built-in defaults)"
    # transformers samples only with do_sample: true
    for data in ({"do_sample": False, "temperature": 0.7, "top_p": 0.9}, {"temperature": 0.7}):
        conf, line = resolve_sampling(GenerateConf(), _gen(tmp_path, data))
        assert conf.temperature == 0, data
        assert "greedy" in line and "do_sample not true" in line
    # do_sample without a temperature samples at transformers' default, 1
    conf, _ = resolve_sampling(GenerateConf(), _gen(tmp_path, {"do_sample": True}))
    assert (conf.temperature, conf.top_p, conf.top_k) == (1.0, 1.0, 0)


@pytest.mark.parametrize(
    "text,field",
    [
        ('{"eos_token_id": [1, 2],', "not valid JSON"),
        ("[1, 2]", "not an object"),
        ('{"eos_token_id": ["</s>"]}', "eos_token_id"),
        ('{"eos_token_id": []}', "eos_token_id"),
        ('{"do_sample": "yes"}', "do_sample"),
        ('{"temperature": -1}', "temperature"),
        ('{"top_p": 0}', "top_p"),
        ('{"top_k": 2.5}', "top_k"),
    ],
)
def test_malformed_generation_config_is_one_line_naming_the_file(tmp_path, text, field):
    with pytest.raises(GenerationConfigError, match=field) as caught:
        _gen(tmp_path, text)
    message = str(caught.value)
    assert str(tmp_path / "generation_config.json") in message and "\n" not in message


def test_generation_config_outside_the_checkpoint_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps(QWEN3_GENERATION))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    os.symlink(outside, checkpoint / "generation_config.json")
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        read_generation_config(str(checkpoint))


def test_generate_conf_checks_top_k():
    GenerateConf(top_k=0).check()
    with pytest.raises(ConfigError, match="generate.top_k=-1"):
        GenerateConf(top_k=-1).check()


def test_top_k_then_top_p_keeps_the_transformers_support():
    # probabilities 0.4, 0.3, 0.2, 0.1 over 4 tokens (listed out of order)
    logits = torch.tensor([0.2, 0.4, 0.1, 0.3]).log().repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, 1.0, gen, top_k=3).tolist()) == {0, 1, 3}
    assert set(sample(logits, 1.0, 1.0, gen, top_k=1).tolist()) == {1}
    # top-3 renormalised: 4/9, 3/9, 2/9; top_p 0.6 keeps the first two (4/9 < 0.6 <= 7/9)
    assert set(sample(logits, 1.0, 0.6, gen, top_k=3).tolist()) == {1, 3}
    # without top-k the same top_p keeps 0.4 + 0.3 too
    assert set(sample(logits, 1.0, 0.6, gen).tolist()) == {1, 3}
    assert set(sample(logits, 1.0, 0.75, gen).tolist()) == {0, 1, 3}
    assert set(sample(logits, 1.0, 0.75, gen, top_k=2).tolist()) == {1, 3}


# ---- the launcher: prepare() and the command line ---------------------------------------


def _checkpoint_with_hf_tokenizer(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """The packaged tiny checkpoint (vocabulary 260) with a Qwen-layout tokenizer.json and a
    Qwen3-style generation_config.json instead of its byte tokenizer."""
    directory = tmp_path / "ckpt"
    shutil.copytree(TINY, directory)
    config = json.loads((directory / "config.json").read_text())
    config.pop("tokenizer")
    vocab = _save_tokenizer(
        directory, QWEN_SPECIALS, "byte_level", vocab_size=300, byte_level=False
    )
    assert len(vocab) <= config["vocab_size"]
    config["bos_token_id"] = vocab["<|endoftext|>"]
    config["eos_token_id"] = vocab["<|im_end|>"]
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer_config.json").write_text(json.dumps(LAYOUTS["qwen"][3]))
    (directory / "generation_config.json").write_text(
        json.dumps(
            {**QWEN3_GENERATION, "eos_token_id": [vocab["<|im_end|>"], vocab["<|endoftext|>"]]}
        )
    )
    return directory, vocab


def test_prepare_encodes_stops_and_samples_as_transformers(tmp_path):
    directory, vocab = _checkpoint_with_hf_tokenizer(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in CORPUS[:2]))
    env = local_dist_env()
    cfg = tiny_conf(infer.InferConf, checkpoint=str(directory), prompts=str(prompts))
    job = infer.prepare(cfg, env, cuda_available=False, num_local_gpus=0)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
    assert job.prompt_ids == [theirs(t).input_ids for t in CORPUS[:2]]
    assert job.stop_ids == [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    assert (job.generate.temperature, job.generate.top_p, job.generate.top_k) == (0.6, 0.95, 20)
    assert job.sampling.endswith("(from generation_config.json)")
    cfg = tiny_conf(
        infer.InferConf,
        checkpoint=str(directory),
        prompts=str(prompts),
        **{"generate.temperature": 0.0, "generate.ignore_eos": True},
    )
    job = infer.prepare(cfg, env, cuda_available=False, num_local_gpus=0)
    assert job.generate.temperature == 0 and job.stop_ids is None
    (directory / "generation_config.json").write_text('{"eos_token_id": [1,')
    with pytest.raises(GenerationConfigError, match="generation_config.json"):
        infer.prepare(cfg, env, cuda_available=False, num_local_gpus=0)


def _infer(args: list[str]) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "MOE_EXT_DEBUG"}
    environ.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "infer.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=environ,
    )


def test_launcher_stops_on_any_listed_eos_and_prints_sampling(tmp_path):
    """The tiny model's greedy continuation of one prompt, then the same run with a
    generation_config.json listing its 3rd token second: output ends right there."""
    directory = tmp_path / "tiny"
    shutil.copytree(TINY, directory)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Once upon a time"}) + "\n")
    out = tmp_path / "out.jsonl"
    common = [
        f"checkpoint={directory}",
        f"prompts={prompts}",
        f"output={out}",
        "generate.max_new_tokens=8",
    ]
    free = _infer([*common, "generate.ignore_eos=true"])
    assert free.returncode == 0, free.stderr
    full = json.loads(out.read_text())["output_ids"]
    assert len(full) == 8
    stop = full[2]
    first = next(i for i in range(256) if i not in full)  # listed first, never generated
    (directory / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "temperature": 0.6, "eos_token_id": [first, stop]})
    )
    res = _infer(common)
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["output_ids"] == full[: full.index(stop) + 1]
    assert (
        "sampling: temperature=0 top_p=1 top_k=0 (greedy; temperature from "
        "generation_config.json (do_sample not true); top_p, top_k from built-in "
        "defaults)"
    ) in res.stdout + res.stderr

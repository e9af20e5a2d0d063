"""Launcher errors (issues 14 and 15): a MoeExtError is one ``error:`` line and exit 2, any
other exception keeps its traceback, MOE_EXT_DEBUG=1 / debug=true adds the chained
traceback; inputs that used to crash (a tokenizer larger than the model, malformed
tokenizer files, a non-UTF-8 prompts file, generate.max_new_tokens <= 0, an unwritable
output=, export= over a directory, strategy=ep_foo in train.py, topology.gpu_memory_gib
alone) are one line naming the file or field, refused before any weight loads, and leave
nothing behind. Hydra's --help and error messages offer no schema as a choice.

Most cases call the launchers' steps in-process; a few run the command line to check the
one line and the exit code (that two ranks print it once: tests/multirank/).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moe_ext.cli import infer, train
from moe_ext.cli.io import OutputError, PromptsError, check_output, read_prompts, write_output
from moe_ext.config import ConfigError, GenerateConf, check_group_choices
from moe_ext.dist import DistEnv
from moe_ext.errors import MoeExtError
from moe_ext.launching import UsageError, as_usage_error, dtype_name, launch_topology
from moe_ext.model.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError
from moe_ext.topology import GIB, GPU, Link, Topology, TopologyError
from tests.support import REPO, run_launcher, tiny_conf
from tests.support import TINY_CHECKPOINT as TINY

INFER, TRAIN = REPO / "launch" / "infer.py", REPO / "launch" / "train.py"


def _error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


# ---- a MoeExtError is one line; anything else keeps its traceback ------------------------


def _run_and_exit_script(raise_line: str) -> str:
    return textwrap.dedent(f"""
        import os

        from moe_ext.errors import MoeExtError
        from moe_ext.launching import debug_requested, run_and_exit

        def body():
            try:
                int("x")
            except ValueError as cause:
                {raise_line}

        run_and_exit(body, 0, 1, debug=debug_requested(os.environ))
    """)


@pytest.mark.parametrize("debug", [False, True])
def test_run_and_exit_prints_a_moe_ext_error_as_one_line(debug):
    script = _run_and_exit_script('raise MoeExtError("bad value; fix it") from cause')
    res = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=dict(os.environ, MOE_EXT_DEBUG="1" if debug else "0"),
        timeout=60,
    )
    assert res.returncode == 2
    assert _error_lines(res) == ["error: bad value; fix it"]
    assert res.stderr.rstrip().endswith("error: bad value; fix it")  # the line comes last
    # debug: the chained traceback too, cause first
    assert ("Traceback" in res.stderr) == debug
    assert ("invalid literal for int()" in res.stderr) == debug
    assert ("direct cause" in res.stderr) == debug


def test_run_and_exit_keeps_the_traceback_of_any_other_error():
    script = _run_and_exit_script('raise ValueError("a bug, not a user error") from cause')
    res = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=dict(os.environ, MOE_EXT_DEBUG="0"),
        timeout=60,
    )
    assert res.returncode != 0 and res.returncode != 2
    assert "Traceback" in res.stderr and "ValueError: a bug, not a user error" in res.stderr
    assert not _error_lines(res)


def test_as_usage_error_chains_moe_ext_errors_and_passes_others_through():
    def fails(err):
        raise err

    cause = ConfigError("generate.top_p=2; use a value in (0, 1]")
    with pytest.raises(UsageError, match="top_p") as caught:
        as_usage_error(fails, cause)
    assert caught.value.__cause__ is cause  # MOE_EXT_DEBUG=1 shows it
    with pytest.raises(KeyError):
        as_usage_error(fails, KeyError("bug"))
    with pytest.raises(ValueError) as plain:
        as_usage_error(fails, ValueError("bug"))
    assert not isinstance(plain.value, MoeExtError)


def test_injected_plain_value_error_in_the_infer_launcher_is_a_traceback():
    """A ValueError raised inside the launcher body (not a MoeExtError) is a bug: the
    process prints its traceback and exits non-zero, not an `error:` line."""
    script = textwrap.dedent(f"""
        import runpy, sys
        import moe_ext.cli.infer as infer

        def prepare(*args):
            raise ValueError("injected bug in prepare")

        infer.prepare = prepare
        sys.argv = [{str(INFER)!r}, "generate.max_new_tokens=2"]
        runpy.run_path({str(INFER)!r}, run_name="__main__")
    """)
    res = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode not in (0, 2), res.stderr[-2000:]
    assert "Traceback" in res.stderr and "injected bug in prepare" in res.stderr
    assert not _error_lines(res)


def test_cli_debug_prints_the_chained_traceback_and_the_line():
    res = run_launcher(INFER, ["generate.max_new_tokens=0", "debug=true"])
    assert res.returncode == 2, res.stderr[-2000:]
    assert _error_lines(res) == ["error: generate.max_new_tokens=0; it must be at least 1"]
    assert "ConfigError" in res.stderr and "direct cause" in res.stderr


def test_debug_switch_values():
    from moe_ext.launching import debug_requested

    assert [debug_requested({"MOE_EXT_DEBUG": v}) for v in ("1", "true", "ON", "0", "")] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert not debug_requested({})


# ---- dtype aliases --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("BFloat16", torch.bfloat16),
    ],
)
def test_dtype_aliases(name, dtype):
    assert infer.infer_dtype(name, "cpu") is dtype


def test_dtype_auto_and_unknown():
    assert infer.infer_dtype("auto", "cpu") is torch.float32
    assert infer.infer_dtype("auto", "cuda") is torch.bfloat16
    with pytest.raises(UsageError) as caught:
        dtype_name("float64")
    message = str(caught.value)
    assert "\n" not in message and "float64" in message
    assert all(name in message for name in ("auto", "bfloat16", "float16", "half", "fp32"))
    # training: the aliases reach the same checks as the short names
    assert train.train_dtype("float32", "cpu", 0) is torch.float32
    with pytest.raises(UsageError, match="loss scaling"):
        train.train_dtype("half", "cuda", 1)
    with pytest.raises(UsageError, match="on CPU"):
        train.train_dtype("bfloat16", "cpu", 1)
    assert train.train_dtype("bfloat16", "cuda", 1) is torch.bfloat16


# ---- Hydra schemas are not choices -----------------------------------------------------------


def test_help_and_choice_errors_offer_no_schema():
    res = run_launcher(INFER, ["--help"])
    assert res.returncode == 0, res.stderr[-2000:]
    groups = res.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "strategy: auto, ep_allgather, ep_nccl, ep_nvshmem, replicate, tp_experts" in groups
    assert "topology: auto, cpu, nvlink, pcie" in groups and "parallel: default" in groups
    assert "schema" not in groups and "base_" not in groups
    for override in ("strategy=ep_foo", "+topology=infiniband", "parallel=wide"):
        with pytest.raises(ConfigError) as caught:
            check_group_choices([override], REPO / "conf")
        assert "schema" not in str(caught.value) and "base_" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"type \+topology=pcie"):
        check_group_choices(["topology=pcie"], REPO / "conf")
    check_group_choices(["strategy=ep_nccl", "+topology=pcie", "topology.p2p=true"], REPO / "conf")


def test_group_options_keep_their_schema():
    """The options still start from their schema: a typo in a key is refused."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from moe_ext.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=["strategy=ep_nccl", "+topology=pcie"])
        assert cfg.strategy.name == "ep_nccl" and cfg.topology.kind == "pcie"
        assert cfg.topology.gpu_memory_gib is None  # a schema field, filled by the schema
        for typo in ("strategy.dispatchr=x", "topology.gpu_mem=3", "parallel.tpp=2"):
            with pytest.raises(ConfigCompositionException):
                compose("config", overrides=["+topology=pcie", typo])


# ---- checks before any weight loads --------------------------------------------------------


def _infer_cfg(**over):
    return tiny_conf(infer.InferConf, **over)


def _prepare(cfg, rank: int = 0, world_size: int = 1):
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size)
    return as_usage_error(infer.prepare, cfg, env, False, 0)


@pytest.mark.parametrize("value", [0, -1])
def test_max_new_tokens_refused_in_prepare(value):
    with pytest.raises(UsageError, match=f"generate.max_new_tokens={value}"):
        _prepare(_infer_cfg(**{"generate.max_new_tokens": value}))
    with pytest.raises(ConfigError, match=f"sample.max_new_tokens={value}"):
        cfg = tiny_conf(train.TrainConf, **{"sample.max_new_tokens": value})
        train.sample_conf(cfg).check("sample")


def test_generate_conf_ranges():
    GenerateConf().check()
    for field, value in (
        ("max_batch_size", 0),
        ("temperature", -0.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
    ):
        with pytest.raises(ConfigError, match=f"generate.{field}="):
            GenerateConf(**{field: value}).check()


class _WideTokenizer:
    """A tokenizer with more ids than the model's 260 embedding rows."""

    eos_id, pad_id, vocab_size = 257, 258, 50_000

    def encode(self, text: str) -> list[int]:
        return [256] + [1000 + ord(c) for c in text]


def test_prompt_ids_are_checked_against_the_models_vocabulary(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2, 3]}\n{"prompt": "hi"}\n')
    with pytest.raises(PromptsError) as caught:
        read_prompts(str(prompts), _WideTokenizer(), vocab_size=260)
    assert f"{prompts}:2" in str(caught.value) and "1104" in str(caught.value)
    assert "[0, 260)" in str(caught.value)
    prompts.write_text('{"prompt_ids": [1, 259, 260]}\n')  # 260 is in no byte tokenizer
    with pytest.raises(PromptsError, match=r":1: token id 260 .*\[0, 260\)"):
        read_prompts(str(prompts), ByteTokenizer(), vocab_size=260)
    with pytest.raises(PromptsError, match="demo prompts"):
        read_prompts(None, _WideTokenizer(), vocab_size=260)
    assert read_prompts(None, ByteTokenizer(), vocab_size=260)[0][:2] == [256, ord("T")]


def test_non_utf8_prompts_file_is_named(tmp_path):
    prompts = tmp_path / "latin1.jsonl"
    prompts.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(UsageError, match=f"prompts file {prompts} is not UTF-8"):
        _prepare(_infer_cfg(prompts=str(prompts)))


def _tokenizer_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    directory = tmp_path / "tok"
    directory.mkdir()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}
    Tokenizer(WordLevel(vocab, unk_token="<unk>")).save(str(directory / "tokenizer.json"))
    return directory


def test_malformed_tokenizer_files_are_named(tmp_path):
    directory = _tokenizer_dir(tmp_path)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert HFTokenizer(str(directory)).eos_id == 2  # the good files load
    for text in (
        '{"eos_token": "</s>",',
        "[1, 2]",
        '{"eos_token_id": "2x"}',
        '{"bos_token_id": 1.5}',
    ):
        (directory / "tokenizer_config.json").write_text(text)
        with pytest.raises(TokenizerError, match="tokenizer_config.json"):
            HFTokenizer(str(directory))
    (directory / "tokenizer_config.json").write_bytes(b'{"eos_token": "\xe9"}')
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        HFTokenizer(str(directory))
    (directory / "tokenizer_config.json").unlink()
    (directory / "tokenizer.json").write_text('{"model": {"type": "WordLevel"')
    with pytest.raises(TokenizerError) as caught:
        HFTokenizer(str(directory))
    assert str(directory / "tokenizer.json") in str(caught.value)
    assert "\n" not in str(caught.value)


def test_bad_tokenizer_json_in_a_checkpoint_is_one_cli_line(tmp_path):
    checkpoint = tmp_path / "tiny"
    checkpoint.mkdir()
    for file in TINY.iterdir():
        (checkpoint / file.name).write_bytes(file.read_bytes())
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("tokenizer", None)  # use the checkpoint's tokenizer.json
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "tokenizer.json").write_text("not json")
    out = tmp_path / "out.jsonl"
    res = run_launcher(INFER, [f"checkpoint={checkpoint}", f"output={out}"])
    assert res.returncode == 2, res.stderr[-2000:]
    errors = _error_lines(res)
    assert len(errors) == 1 and "tokenizer.json" in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not out.exists()


# ---- output= ----------------------------------------------------------------------------------


def test_output_is_checked_before_generating(tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        check_output(str(tmp_path))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="is not a directory"):
        check_output(str(a_file / "out.jsonl"))
    check_output(str(tmp_path / "new" / "deeper" / "out.jsonl"))  # created when written
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe left nothing
    with pytest.raises(UsageError, match="is a directory"):
        _prepare(_infer_cfg(output=str(tmp_path)))
    _prepare(_infer_cfg(output=str(tmp_path)), rank=1, world_size=2)  # rank 0 writes it


def test_read_only_output_is_refused(tmp_path, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(OutputError, match="cannot be written .*Read-only file system"):
        check_output(str(tmp_path / "out.jsonl"))


def test_failed_output_write_leaves_nothing(tmp_path):
    class FullDisk(ByteTokenizer):
        def decode(self, ids):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "out.jsonl"
    with pytest.raises(OutputError, match="No space left"):
        write_output(str(target), [[1]], [[2]], FullDisk())
    assert list(tmp_path.iterdir()) == []  # no .out.jsonl.tmp<pid>
    target.write_text("previous\n")
    with pytest.raises(OutputError):
        write_output(str(target), [[1]], [[2]], FullDisk())
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert target.read_text() == "previous\n"
    write_output(str(target), [[1]], [[104, 105]], ByteTokenizer())
    assert json.loads(target.read_text())["text"] == "hi"


# ---- topology.gpu_memory_gib alone ----------------------------------------------------------


def _gpus(count: int, gib: float) -> Topology:
    """What the probe of a PCIe box with ``count`` GPUs of ``gib`` GiB would say."""
    gpus = tuple(
        GPU(index=i, name="H100", memory_bytes=int(gib * GIB), pcie_gen=5, pcie_width=16)
        for i in range(count)
    )
    links = tuple(Link(a, b) for a in range(count) for b in range(a + 1, count))
    return Topology(kind="pcie", gpus=gpus, links=links, source="test")


def test_gpu_memory_alone_keeps_the_probe():
    cfg = _infer_cfg(**{"topology.gpu_memory_gib": 96})
    topology = launch_topology(cfg.topology, "cuda", 2, 2, probe=lambda: _gpus(2, 80))
    assert topology.kind == "pcie" and topology.num_gpus == 2
    assert [g.memory_bytes for g in topology.gpus] == [96 * GIB] * 2
    assert topology.gpus[0].name == "H100"  # everything else is the probe's
    with pytest.raises(TopologyError, match=r"add \+topology=pcie"):
        launch_topology(cfg.topology, "cpu", 0, 1, probe=lambda: Topology(kind="cpu"))
    cfg.topology.p2p = True  # other fields still need a forced kind
    with pytest.raises(TopologyError, match=r"\+topology=pcie"):
        launch_topology(cfg.topology, "cuda", 2, 2, probe=lambda: _gpus(2, 80))


# ---- training: export= and strategy= ---------------------------------------------------------


def test_export_destination_is_checked_before_training(tmp_path):
    """train.py export= over a directory that is not a checkpoint used to delete it after
    training; now the run is refused before any process group (the export checks again)."""

    def prepare(export, overwrite=False):
        cfg = tiny_conf(train.TrainConf, export=export, **{"train.overwrite_export": overwrite})
        return as_usage_error(train.prepare, cfg, DistEnv(), False, 0)

    prepare(str(tmp_path / "new"))
    precious = tmp_path / "precious"
    precious.mkdir()
    prepare(str(precious))  # empty
    (precious / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="not a moe_ext checkpoint"):
            prepare(str(precious), overwrite)
    with pytest.raises(UsageError, match="is a file"):
        prepare(str(precious / "notes.txt"), True)
    with pytest.raises(UsageError, match="train.overwrite_export=true"):
        prepare(str(TINY))
    prepare(str(TINY), overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs the probe's memory is set")
def test_cli_gpu_memory_alone_without_gpus_is_one_line():
    """Hydra used to fail composing it (AssertionError: Unexpected type for root)."""
    res = run_launcher(INFER, ["topology.gpu_memory_gib=96"])
    assert res.returncode == 2, res.stderr[-2000:]
    errors = _error_lines(res)
    assert len(errors) == 1 and "+topology=pcie" in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_checkpoint_verify_reaches_the_load(tmp_path):
    """checkpoint_verify=true hashes the shards as they load: flipped bytes behind an intact
    header are one line naming the file (without it they would load as weights)."""
    import struct

    checkpoint = tmp_path / "tiny"
    checkpoint.mkdir()
    for file in TINY.iterdir():
        (checkpoint / file.name).write_bytes(file.read_bytes())
    shard = checkpoint / "model.safetensors"
    data = bytearray(shard.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    middle = header + (len(data) - header) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    shard.write_bytes(bytes(data))
    out = tmp_path / "out.jsonl"
    res = run_launcher(
        INFER,
        [
            f"checkpoint={checkpoint}",
            "checkpoint_verify=true",
            "generate.max_new_tokens=2",
            f"output={out}",
        ],
    )
    assert res.returncode == 2, res.stderr[-2000:]
    errors = _error_lines(res)
    assert len(errors) == 1 and "model.safetensors" in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not out.exists()


def test_non_utf8_training_data_is_named(tmp_path):
    from moe_ext.train.data import DataError, read_documents

    for name in ("corpus.txt", "corpus.jsonl"):
        path = tmp_path / name
        path.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
        with pytest.raises(DataError, match=f"{path} is not UTF-8"):
            read_documents(path)

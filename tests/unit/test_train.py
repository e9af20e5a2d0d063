"""Training (single process): schedule, batches, corpus and config checks, HF config round
trip, and launch/train.py end to end (log, curve, checkpoints, export that infer loads,
exact resume through the launcher). The loss going down on the shipped corpus (a spawned
rank) is in tests/multirank/test_train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_ext.model import ByteTokenizer, ModelArgs
from moe_ext.train.config import TrainLoopConf
from moe_ext.train.data import (
    DataError,
    TokenData,
    eval_batches,
    read_documents,
    shipped_corpus_path,
    tokenize_documents,
    train_batch,
)
from moe_ext.train.export import hf_config
from moe_ext.train.loop import lr_at
from tests.support import REPO, qwen2_args, tiny_args, tiny_conf

# ---- schedule, data ---------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine_to_floor():
    conf = TrainLoopConf(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, conf) == pytest.approx(1e-4)
    assert lr_at(9, conf) == pytest.approx(1e-3)
    assert lr_at(55, conf) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way down the cosine
    assert lr_at(100, conf) == pytest.approx(1e-4)
    lrs = [lr_at(s, conf) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_corpus_is_shipped_and_byte_tokenized():
    path = shipped_corpus_path()
    text = path.read_text(encoding="utf-8")
    assert len(text) > 300_000 and "HAMLET" in text
    data = TokenData.load(None, ByteTokenizer(), vocab_size=260, seq_len=64, val_fraction=0.05)
    stream = torch.cat([data.train, data.val])
    assert stream[0] == 256 and stream[-1] == 257  # bos ... eos
    assert bytes(stream[1:-1].tolist()) == text.encode("utf-8")
    assert data.val.numel() == int(stream.numel() * 0.05)


def test_batches_depend_only_on_seed_and_step_and_split_over_dp():
    data = TokenData.load(None, ByteTokenizer(), 260, 32, 0.05)
    whole = train_batch(data, step=7, seed=3, micro_batch=4, seq_len=32, dp=1, dp_rank=0)
    assert whole.shape == (4, 33)
    assert torch.equal(whole, train_batch(data, 7, 3, 4, 32, 1, 0))
    assert not torch.equal(whole, train_batch(data, 8, 3, 4, 32, 1, 0))
    # the global batch of 2 ranks x 2 rows is the single-rank batch of 4 rows
    halves = [train_batch(data, 7, 3, 2, 32, dp=2, dp_rank=r) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)
    windows = data.train.unfold(0, 33, 1)  # [N-32, 33] view: every window of the stream
    for row in whole:
        assert (windows == row).all(dim=1).any()  # rows are contiguous corpus windows
    evals = [eval_batches(data, 3, 2, 32, 2, r) for r in range(2)]
    assert len(evals[0]) == 3 and evals[0][0].shape == (2, 33)
    assert not torch.equal(evals[0][0], evals[1][0])


def test_jsonl_documents_and_bad_input(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text('{"text": "ab"}\n\n{"text": "c"}\n')
    assert read_documents(good) == ["ab", "c"]
    ids = tokenize_documents(["ab", "c"], ByteTokenizer())
    assert ids.tolist() == [256, 97, 98, 257, 256, 99, 257]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected"):
        read_documents(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(DataError, match="fewer than one sequence"):
        TokenData.load(str(short), ByteTokenizer(), 260, 64, 0.0)


@pytest.mark.parametrize(
    "make",
    [
        tiny_args,
        qwen2_args,
        lambda: ModelArgs(
            model_type="mixtral",
            vocab_size=300,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            sliding_window=64,
            rope_theta=1e6,
        ),
    ],
)
def test_hf_config_round_trip(make):
    args = make()
    config = hf_config(args, tokenizer="byte")
    back = ModelArgs.from_hf_config(json.loads(json.dumps(config)))
    back.init_seed = args.init_seed
    assert back == args
    assert config["tokenizer"] == "byte"


# ---- launcher checks (no process group) ---------------------------------------------------


def _train_cfg(**over):
    from moe_ext.train.config import TrainConf

    return tiny_conf(TrainConf, **over)


def _launcher():
    from moe_ext.cli import train  # launch/train.py's steps

    return train


def test_launcher_refuses_megatron_and_inference_only_parallelism():
    from moe_ext.dist import DistEnv

    launcher = _launcher()
    env2 = DistEnv(rank=0, world_size=2, local_world_size=2)
    with pytest.raises(launcher.UsageError, match="needs CUDA"):
        launcher.prepare(_train_cfg(engine="megatron"), DistEnv(), False, 0)
    with pytest.raises(launcher.UsageError, match="tp=2"):
        launcher.prepare(_train_cfg(**{"parallel.tp": 2}), env2, False, 0)
    with pytest.raises(launcher.UsageError, match="zero_stage=2 train.offload_optimizer=true"):
        launcher.prepare(_train_cfg(**{"train.zero_stage": 3}), env2, False, 0)
    with pytest.raises(launcher.UsageError, match="offload_optimizer=true offloads"):
        launcher.prepare(_train_cfg(**{"train.offload_optimizer": True}), env2, False, 0)
    with pytest.raises(launcher.UsageError, match="seq_len"):
        launcher.prepare(_train_cfg(**{"train.seq_len": 4096}), DistEnv(), False, 0)
    with pytest.raises(launcher.UsageError, match="bf16 on CPU"):
        launcher.prepare(_train_cfg(dtype="bf16"), DistEnv(), False, 0)
    job = launcher.prepare(_train_cfg(**{"strategy.name": "ep_nccl"}), env2, False, 0)
    assert (job.plan.strategy, job.plan.dp, job.plan.ep, job.plan.edp) == ("ep_nccl", 2, 2, 1)


# ---- launcher end to end -------------------------------------------------------------------


def _launch(tmp: Path, run: str, *overrides: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    cmd = [
        sys.executable,
        str(REPO / "launch/train.py"),
        f"hydra.run.dir={tmp / run}",
        "train.steps=4",
        "train.save_every=2",
        "train.eval_every=2",
        "train.micro_batch=2",
        "train.seq_len=32",
        "train.eval_batches=1",
        "train.warmup_steps=0",
        "train.lr=1e-2",
        "sample.max_new_tokens=8",
        "progress=false",
        *overrides,
    ]
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp / run / "train_log.json").read_text())


def test_launcher_writes_log_curve_checkpoints_and_resumes_exactly(tmp_path):
    from moe_ext.checkpoint.reader import CheckpointReader

    first = _launch(tmp_path, "a")
    run = tmp_path / "a"
    assert [h["step"] for h in first["history"]] == [1, 2, 3, 4]
    assert all(
        k in first["history"][0]
        for k in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s")
    )
    assert [e["step"] for e in first["evals"]] == [2, 4]
    assert isinstance(first["sample"]["text"], str)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000004"
    reader = CheckpointReader.open(run / "model")
    assert reader.format == "moe_ext" and reader.config["tokenizer"] == "byte"
    resumed = _launch(tmp_path, "b", f"resume={run / 'checkpoints/step_00000002'}")
    assert resumed["resumed_from"].endswith("step_00000002")
    # bit-for-bit the same trajectory after the resume point
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in first["history"]]
    assert resumed["evals"] == first["evals"]
    with CheckpointReader.open(tmp_path / "b/model") as again:
        for name in reader.names():
            assert torch.equal(reader.read(name), again.read(name)), name
    # fine-tuning from the export starts from its weights: the first step's loss is the
    # trained model's, far below the random init's ~5.6
    tuned = _launch(tmp_path, "c", f"checkpoint={run / 'model'}", "train.steps=1")
    assert tuned["history"][0]["lm_loss"] < first["history"][0]["lm_loss"] - 0.3


def test_resume_refuses_another_plan(tmp_path):
    from moe_ext.train.state import (
        FORMAT,
        FORMAT_VERSION,
        ResumeError,
        check_compatible,
        find_checkpoint,
    )

    step = tmp_path / "step_00000002"
    step.mkdir()
    (step / "meta.json").write_text(
        json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "step": 2,
                "world_size": 1,
                "plan": {"strategy": "replicate"},
                "zero_stage": 0,
                "model": {},
                "history": [],
                "evals": [],
            }
        )
    )
    with pytest.raises(ResumeError, match="lacks the files of ranks"):
        find_checkpoint(str(step))
    torch.save({}, step / "rank_00000.pt")
    point = find_checkpoint(str(step))
    with pytest.raises(ResumeError, match="nproc-per-node 1"):
        check_compatible(point, 2, {"strategy": "replicate"}, 0, {})
    with pytest.raises(ResumeError, match="same strategy"):
        check_compatible(point, 1, {"strategy": "ep_nccl"}, 0, {})
    with pytest.raises(ResumeError, match="zero_stage=0"):
        check_compatible(point, 1, {"strategy": "replicate"}, 1, {})
    with pytest.raises(ResumeError, match="not a training checkpoint"):
        find_checkpoint(str(tmp_path))

"""engine=megatron training in bf16 on 2 GPUs (run by the lead:
``python -m pytest tests/gpu/test_megatron_train_gpu.py -m gpu`` on a 2-GPU machine).

1. launch/train.py engine=megatron, strategy=ep_nccl (experts split over the 2 ranks), the
   tiny model from its random init, the same data and seed, 30 steps, clipping at 1.0:
   - fp32 (torch AdamW, the Trainer clips with the exact norm over EP) is the reference;
   - bf16 (Megatron's DDP + mixed-precision optimizer, fp32 main params, Megatron's
     global-norm clipping across EP) and bf16 with train.zero_stage=1 (Megatron's
     DistributedOptimizer) follow its loss trajectory: every step's LM loss within
     0.15 nats of fp32's and the mean difference under 0.05 (bf16 rounds the forward to
     8 bits of mantissa, about 0.4% per value; from ~5.6 nats the runs fall by > 1 nat,
     so a wrong clip, scale or reduction shows at once), the first step's gradient norm
     within 5% of fp32's (same weights, before any update: Megatron's norm is the exact
     one over EP), the aux loss reported and positive, the export loadable.
2. tools/bench_train.py on the tiny model: every system (deepspeed, megatron, mcore_a2a,
   mcore_ag, ds_moe) gives an ``ok`` row in bf16, with tokens/s and MFU.

# B micro-batch, S sequence
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.support import REPO, gpu_torchrun_env, torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.multirank]  # 2 GPUs, one rank each
pytest.importorskip("megatron.core")

STEPS = 30
LOSS_STEP_TOL = 0.15  # nats, any single step
LOSS_MEAN_TOL = 0.05  # nats, mean |bf16 - fp32| over the steps
NORM_TOL = 0.05  # relative, first step's gradient norm


def _train(tmp: Path, name: str, extra: list[str]) -> list[dict]:
    run_dir = tmp / name
    cmd = [
        *torchrun(2),
        str(REPO / "launch" / "train.py"),
        "engine=megatron",
        "strategy=ep_nccl",
        f"train.steps={STEPS}",
        "train.warmup_steps=3",
        "train.lr=3e-3",
        "train.grad_clip=1.0",
        "train.aux_loss_coeff=0.01",
        "train.micro_batch=8",
        "train.seq_len=128",
        "train.eval_every=0",
        "train.save_every=0",
        "sample.prompt=null",
        f"export={tmp / (name + '_model')}",
        f"hydra.run.dir={run_dir}",
        "progress=false",
        *extra,
    ]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env=gpu_torchrun_env(), cwd=REPO
    )  # fmt: skip
    assert res.returncode == 0, f"{name}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    history = json.loads((run_dir / "train_log.json").read_text())["history"]
    assert len(history) == STEPS
    return history


@pytest.mark.timeout(1200)
def test_bf16_loss_trajectory_follows_fp32(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    fp32 = _train(tmp_path, "fp32", ["dtype=fp32", "train.zero_stage=0"])
    ref = [h["lm_loss"] for h in fp32]
    assert ref[-1] < ref[0] - 1.0, ref  # it learns: the comparison is not of flat lines
    for name, extra in (
        ("bf16", ["dtype=bf16", "train.zero_stage=0"]),
        ("bf16_distopt", ["dtype=bf16", "train.zero_stage=1"]),
    ):
        history = _train(tmp_path, name, extra)
        got = [h["lm_loss"] for h in history]
        diffs = [abs(a - b) for a, b in zip(got, ref)]
        assert max(diffs) < LOSS_STEP_TOL, (name, got, ref)
        assert sum(diffs) / len(diffs) < LOSS_MEAN_TOL, (name, got, ref)
        norm, want = history[0]["grad_norm"], fp32[0]["grad_norm"]
        assert norm is not None and want is not None, (name, history[0], fp32[0])
        assert abs(norm - want) <= NORM_TOL * want, (name, norm, want)
        assert all(h["aux_loss"] > 0 for h in history), name
        assert (tmp_path / f"{name}_model" / "moe_ext.json").is_file()


@pytest.mark.timeout(1200)
def test_bench_train_every_system_bf16(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path / "bench.json"
    cmd = [
        *torchrun(2),
        str(REPO / "tools" / "bench_train.py"),
        "--model", "tiny", "--micro-batch", "4", "--seq-len", "256",
        "--steps", "3", "--warmup", "2", "--strategies", "replicate,ep_nccl",
        "--json", str(out), "--png", str(tmp_path / "bench.png"), "--no-progress",
    ]  # fmt: skip
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env=gpu_torchrun_env(), cwd=REPO
    )
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    summary = [(r["system"], r["strategy"], r["status"]) for r in rows]
    assert res.returncode == 0, f"{summary}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    assert len(rows) == 7 and all(r["status"] == "ok" for r in rows), summary
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and len(r["peak_mem_gib"]) == 2, r
    assert (tmp_path / "bench.png").stat().st_size > 1000

"""Training on 2 gloo ranks through the DeepSpeed engine vs a single-rank reference:
reduced gradients of replicate / ep_nccl / ep_allgather equal the reference gradients of
the same global batch, the exact clip norm equals torch's, ZeRO 1/2 follow the stage-0
trajectory, the export reassembles EP shards, and resuming continues
bit for bit (fp32 stage 0, fp32 ZeRO 1, bf16 ZeRO 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moe_ext.model import ByteTokenizer, Transformer
from moe_ext.model.parallelize import shard_slices, take_shard
from moe_ext.model.weights import init_random_full
from moe_ext.train.config import TrainLoopConf
from tests.support import (
    REPO,
    deepspeed_test_engine,
    gpu_torchrun_env,
    groups_per_layout,
    plan_of,
    run_ranks,
    sharded_random_model,
    tiny_args,
    torchrun,
)

AUX = 0.01
MB, SEQ = 2, 16  # per-rank micro batch, sequence length


def _global_batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    return torch.randint(0, 256, (2 * MB, SEQ + 1), generator=gen)  # [dp·B, S+1]


def _reference(args):
    """Full single-rank model: gradients of the mean of the two ranks' losses, and the
    global gradient norm (torch)."""
    from moe_ext.deepspeed.engine import CausalLMWithAux

    model = Transformer(args)
    model.load_state_dict(init_random_full(args))
    wrapped = CausalLMWithAux(model, AUX).train()
    batch = _global_batch()
    loss = 0.5 * sum(wrapped(half)[0] for half in batch.split(MB))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    norm = torch.nn.utils.get_total_norm(list(grads.values()))
    return grads, norm


def _engine(args, plan, groups, zero=0, clip=0.0, lr=3e-3, dtype=torch.float32):
    model, _ = sharded_random_model(args, plan, groups)
    engine = deepspeed_test_engine(
        model,
        groups,
        lr=lr,
        micro_batch=MB,
        zero_stage=zero,
        grad_clip=clip,
        aux_loss_coeff=AUX,
        dtype=dtype,
    )
    return model, engine


def _grads_body(rank, world, export_dir):
    os.environ["LOCAL_RANK"] = str(rank)
    from moe_ext.checkpoint.reader import CheckpointReader
    from moe_ext.train.clip import clip_grad_norm_, grad_placements
    from moe_ext.train.export import export_moe_ext, hf_config

    torch.manual_seed(0)
    args = tiny_args()
    ref_grads, ref_norm = _reference(args)
    cache: dict = {}
    # overlap 2: dual-batch overlap (strategy.overlap_microbatches) in the EP layer
    cases = (("replicate", 1, 1), ("ep_nccl", 2, 1), ("ep_allgather", 2, 1), ("ep_nccl", 2, 2))
    for strategy, ep, overlap in cases:
        plan = plan_of(strategy, dp=2, ep=ep)
        groups = groups_per_layout(plan, cache, timeout_s=60)
        model, engine = _engine(args, plan, groups)
        if overlap > 1:
            model.set_moe_overlap(overlap)
        mine = _global_batch()[rank * MB : (rank + 1) * MB]
        loss, _, aux = engine(mine)
        assert aux > 0
        engine.backward(loss)  # DeepSpeed reduces dense grads over dp, experts over edp
        requests = shard_slices(plan, groups, args)
        for name, param in model.named_parameters():
            expected = take_shard(ref_grads[name], requests[name])
            torch.testing.assert_close(
                param.grad, expected, rtol=1e-4, atol=2e-6, msg=lambda m: f"{strategy} {name}: {m}"
            )
        norm = clip_grad_norm_(model, 0.0, grad_placements(model, groups, args), groups.world)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        if strategy == "ep_nccl" and overlap == 1:  # rank 0 reassembles the expert blocks
            export_moe_ext(model, plan, rank, export_dir, hf_config(args, "byte"))
            torch.distributed.barrier()
            full = init_random_full(args)
            with CheckpointReader.open(export_dir) as reader:
                assert sorted(reader.names()) == sorted(full)
                for name, tensor in full.items():
                    assert torch.equal(reader.read(name), tensor), name


def _zero_body(rank, world):
    """ZeRO 1/2 (expert optimizer groups partitioned over edp) follow stage 0."""
    os.environ["LOCAL_RANK"] = str(rank)
    args = tiny_args()
    cache: dict = {}
    for strategy, ep in (("ep_nccl", 2), ("replicate", 1)):
        plan = plan_of(strategy, dp=2, ep=ep)
        groups = groups_per_layout(plan, cache, timeout_s=60)
        runs = {}
        for zero in (0, 1, 2):
            model, engine = _engine(args, plan, groups, zero=zero)
            losses = []
            for step in range(3):
                batch = torch.randint(
                    0,
                    256,
                    (MB, SEQ + 1),
                    generator=torch.Generator().manual_seed(100 * step + rank),
                )
                loss, _, _ = engine(batch)
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            runs[zero] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()})
        for zero in (1, 2):
            assert runs[zero][0] == pytest.approx(runs[0][0], rel=1e-6, abs=1e-6), (strategy, zero)
            for name, value in runs[0][1].items():
                torch.testing.assert_close(
                    runs[zero][1][name],
                    value,
                    rtol=1e-5,
                    atol=1e-6,
                    msg=lambda m: f"{strategy} zero={zero} {name}: {m}",
                )


def _resume_body(rank, world, root):
    """Train 4 steps saving at 2; a fresh engine restored from step 2 repeats steps 3-4
    exactly, with every optimizer state layout DeepSpeed uses here."""
    os.environ["LOCAL_RANK"] = str(rank)
    from moe_ext.train.data import TokenData
    from moe_ext.train.loop import RunState, Trainer
    from moe_ext.train.state import (
        capture_engine,
        find_checkpoint,
        load_rank_state,
        restore_engine,
        save_checkpoint,
    )

    args = tiny_args()
    plan = plan_of("ep_nccl", dp=2, ep=2)
    groups = groups_per_layout(plan, {}, timeout_s=60)
    # stage 0 fp32, ZeRO 1 fp32, ZeRO 1 bf16 (DeepSpeed's bf16 optimizer
    # with fp32 masters; the launcher uses it on GPUs, the engine glue runs it on CPU too)
    for zero, clip, dtype in (
        (0, 1.0, torch.float32),
        (1, 0.0, torch.float32),
        (1, 0.0, torch.bfloat16),
    ):
        conf = TrainLoopConf(
            steps=4,
            lr=3e-3,
            warmup_steps=1,
            micro_batch=MB,
            seq_len=SEQ,
            zero_stage=zero,
            grad_clip=clip,
            save_every=2,
            eval_every=2,
            eval_batches=1,
            aux_loss_coeff=AUX,
        )
        data = TokenData.load(None, ByteTokenizer(), args.vocab_size, SEQ, 0.05)
        ckpt = Path(root) / f"zero{zero}_{dtype}"

        def trainer():
            model, engine = _engine(args, plan, groups, zero=zero, clip=clip, dtype=dtype)
            return engine, Trainer(
                engine, groups, data, conf, torch.device("cpu"), own_clipping=False
            )

        engine, first = trainer()

        def save(state, engine=engine):
            save_checkpoint(
                ckpt,
                state.step,
                rank,
                world,
                capture_engine(engine),
                {"history": state.history, "evals": state.evals},
                keep=0,
            )

        full = first.run(RunState(), save)
        engine, second = trainer()
        point = find_checkpoint(str(ckpt / "step_00000002"))
        restore_engine(engine, load_rank_state(point, rank), groups.dp_rank, plan.dp)
        resumed = second.run(
            RunState(step=2, history=point.meta["history"], evals=point.meta["evals"])
        )
        losses = [h["loss"] for h in full.history]
        assert losses[-1] < losses[0] and all(0 < x < 7 for x in losses), losses
        assert [h["loss"] for h in resumed.history] == losses, (zero, dtype)
        assert resumed.evals == full.evals
        assert (ckpt / "latest").read_text().strip() == "step_00000004"


def test_gradients_of_strategies_equal_single_rank_reference(tmp_path):
    run_ranks(_grads_body, world_size=2, args=(str(tmp_path / "export"),))


def test_zero_stages_follow_stage_zero():
    run_ranks(_zero_body, world_size=2)


def test_resume_reproduces_loss_trajectory(tmp_path):
    run_ranks(_resume_body, world_size=2, args=(str(tmp_path),))


# ---- GPUs (NCCL; run by the lead on the GPU machine) -----------------------------------------


def _torchrun_train(tmp: Path, run: str, *overrides: str):
    import json
    import subprocess

    env = gpu_torchrun_env()
    cmd = [
        *torchrun(2),
        str(REPO / "launch/train.py"),
        f"hydra.run.dir={tmp / run}",
        "progress=false",
        "train.steps=40",
        "train.save_every=20",
        "train.eval_every=20",
        "sample.max_new_tokens=16",
        *overrides,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((tmp / run / "train_log.json").read_text())


@pytest.mark.gpu
@pytest.mark.parametrize(
    "overrides",
    [
        ("strategy=ep_nccl", "train.zero_stage=1"),  # bf16 (auto), ZeRO 1, exact EP clipping
        ("strategy=ep_allgather", "dtype=fp32"),  # fp32, stage 0, exact EP clipping
        ("strategy=replicate", "train.zero_stage=2"),  # bf16, ZeRO 2, exact clipping (ep=1)
    ],
    ids=["ep_nccl-bf16-zero1", "ep_allgather-fp32", "replicate-bf16-zero2"],
)
def test_gpu_training_two_ranks(tmp_path, overrides):
    from moe_ext.checkpoint.reader import CheckpointReader

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    record = _torchrun_train(tmp_path, "a", *overrides)
    assert record["device"] == "cuda"
    lm = [h["lm_loss"] for h in record["history"]]
    assert all(0 < x < 10 for x in lm) and sum(lm[-5:]) / 5 < lm[0] - 1.0, lm
    with CheckpointReader.open(tmp_path / "a/model") as reader:
        assert reader.format == "moe_ext"
    resumed = _torchrun_train(
        tmp_path, "b", *overrides, f"resume={tmp_path / 'a/checkpoints/step_00000020'}"
    )
    before = [h["loss"] for h in record["history"]]
    after = [h["loss"] for h in resumed["history"]]
    assert after[:21] == before[:21]  # history restored; step 21's forward uses loaded state
    # later steps: GPU backward kernels (atomics in scatter/index_add) need not be bitwise
    assert after[21:] == pytest.approx(before[21:], rel=2e-2)

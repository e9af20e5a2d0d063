"""engine=megatron (moe_ext.megatron.engine, launch/infer.py and launch/train.py with
engine=megatron).

CPU (megatron-core 0.16.1 here; Megatron's CUDA-only helpers redirected to CPU inside the
spawned gloo ranks, as in tests/multirank/test_megatron.py; the refusals without CUDA are in
tests/unit/test_megatron_engine.py):
- world 2: GPTModel loaded from the shipped tiny checkpoint generates the native engine's
  greedy ids (ep_nccl and tp_experts tp=2), with per-request lengths and EOS;
  world 1: sampled ids (temperature, top-p, seed) equal the native engine's;
- world 2 (ep_nccl: experts split, dp 2): the training engine's reduced gradients equal a
  single-process native reference's gradient of the mean of both ranks' losses (LM +
  weighted aux loss), and the weights copied back to a native shard are the trained ones.
GPU (2 ranks, run by the lead): the two launchers end to end under torchrun.

# B batch, S sequence, V vocab
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|DEPRECATED).*")

from tests.support import (  # noqa: E402
    REPO,
    gpu_torchrun_env,
    megatron_on_cpu,
    megatron_plan,
    run_ranks,
    tiny_conf,
    torchrun,
)
from tests.support import TINY_CHECKPOINT as TINY  # noqa: E402

TIMEOUT = datetime.timedelta(seconds=60)
PROMPTS = [
    [256, 84, 104, 101, 32],
    [256, 73, 110],
    [256, 87, 104, 101, 114, 101, 32, 105, 115],
    [256, 79],
]


def _source(checkpoint=TINY):
    from moe_ext.launching import resolve_model_source

    return resolve_model_source(str(checkpoint) if checkpoint else None, None)


# ---- generation vs the native engine ------------------------------------------------------


def _gen_conf(**kw):
    from moe_ext.config import GenerateConf

    base = dict(max_new_tokens=12, temperature=0.0, top_p=1.0, max_batch_size=3, cuda_graphs=False)
    base.update(kw)
    return GenerateConf(**base)


def _models(plan, rank, dtype=torch.float32):
    from moe_ext.groups import ProcessGroups
    from moe_ext.launching import build_model_shard
    from moe_ext.megatron.engine import build_megatron_model

    source = _source()
    groups = ProcessGroups.build(plan, "gloo", TIMEOUT)
    native = build_model_shard(source, plan, groups, rank, torch.device("cpu"), dtype, False)
    gpt = build_megatron_model(source, plan, groups, rank, torch.device("cpu"), dtype)
    return source, groups, native, gpt


def _cpu_train_engine(native, source, groups, *, lr, aux_loss_coeff, **extra):
    """moe_ext.megatron.engine.build_train_engine on the CPU with the tests' optimizer
    (AdamW betas (0.9, 0.95), no weight decay, no z loss); ``extra``: its other keywords
    (dtype, grad_clip, zero_stage)."""
    from moe_ext.megatron.engine import build_train_engine

    return build_train_engine(
        native,
        source,
        groups,
        torch.device("cpu"),
        lr=lr,
        weight_decay=0.0,
        betas=(0.9, 0.95),
        aux_loss_coeff=aux_loss_coeff,
        z_loss_coeff=0.0,
        **extra,
    )


def _generate_body(rank, world):
    from moe_ext.megatron import uninstall_parallel_state
    from moe_ext.megatron.engine import generate as megatron_generate
    from moe_ext.model import generate as native_generate

    with megatron_on_cpu():
        for strategy, tp in (("ep_nccl", 1), ("tp_experts", 2)):
            plan = megatron_plan(strategy, world, tp)
            try:
                source, groups, native, gpt = _models(plan, rank)
                conf = _gen_conf()
                lengths = [12, 3, 7, 12]
                ref = native_generate(
                    native, PROMPTS, conf, eos_id=257, pad_id=258, max_new_tokens=lengths
                )
                ours = megatron_generate(
                    gpt,
                    PROMPTS,
                    conf,
                    eos_id=257,
                    pad_id=258,
                    max_new_tokens=lengths,
                    groups=groups,
                    dp=plan.dp,
                    dp_rank=groups.dp_rank,
                )
                assert ours.tokens == ref.tokens, (strategy, ours.tokens, ref.tokens)
                assert [len(t) for t in ours.tokens] == lengths  # no EOS in this text
                assert ours.finish_reasons == ["length"] * 4
                # an EOS id the model produces mid-way: each request stops right after it
                eos = ref.tokens[0][4]
                ref = native_generate(native, PROMPTS, conf, eos_id=[eos, 257], pad_id=258)
                ours = megatron_generate(
                    gpt, PROMPTS, conf, eos_id=[eos, 257], pad_id=258, groups=groups
                )
                assert ours.tokens == ref.tokens, (strategy, ours.tokens, ref.tokens)
                assert ours.finish_reasons == ref.finish_reasons
                assert ours.finish_reasons[0] == "eos" and len(ours.tokens[0]) <= 5
                assert ours.prefill_s > 0 and ours.decode_steps > 0
            finally:
                uninstall_parallel_state()


@pytest.mark.timeout(120)
def test_greedy_ids_equal_native_engine_world2():
    run_ranks(_generate_body, world_size=2)


def _sample_body(rank, world):
    from moe_ext.megatron import uninstall_parallel_state
    from moe_ext.megatron.engine import generate as megatron_generate
    from moe_ext.model import generate as native_generate

    with megatron_on_cpu():
        try:
            source, groups, native, gpt = _models(megatron_plan("replicate", 1), rank)
            conf = _gen_conf(temperature=0.9, top_p=0.9, max_batch_size=8, max_new_tokens=16)
            ref = native_generate(native, PROMPTS, conf, eos_id=None, pad_id=258, seed=5)
            ours = megatron_generate(
                gpt, PROMPTS, conf, eos_id=None, pad_id=258, seed=5, groups=groups
            )
            again = megatron_generate(
                gpt, PROMPTS, conf, eos_id=None, pad_id=258, seed=6, groups=groups
            )
            greedy = megatron_generate(
                gpt, PROMPTS, _gen_conf(max_new_tokens=16), eos_id=None, pad_id=258, groups=groups
            )
            assert ours.tokens == ref.tokens
            assert again.tokens != ours.tokens and greedy.tokens != ours.tokens
        finally:
            uninstall_parallel_state()


@pytest.mark.timeout(120)
def test_sampled_ids_equal_native_engine_world1():
    run_ranks(_sample_body, world_size=1)


# ---- training: reduced gradients vs a single-process reference --------------------------


def _train_body(rank, world, reduction="engine"):
    """reduction: "engine" (the fp32 engine's own all-reduces, then a step and the copy
    back) or "ddp" (Megatron's DistributedDataParallel + finalize_model_grads, as the bf16
    engine reduces; run here in fp32 on CPU: its fp32 main_grad buffers)."""
    from moe_ext.deepspeed.engine import CausalLMWithAux
    from moe_ext.megatron import megatron_to_native, uninstall_parallel_state
    from moe_ext.megatron.engine import (
        GPTCausalLM,
        copy_to_native,
        megatron_ddp,
    )
    from moe_ext.model import Transformer
    from moe_ext.model.parallelize import shard_slices, take_shard

    aux_coeff = 0.5  # large, so a wrong coefficient mapping shows in the gradients
    with megatron_on_cpu():
        plan = megatron_plan("ep_nccl", world)  # dp 2, ep 2, edp 1: experts split over the ranks
        try:
            source, groups, native, _ = _models(plan, rank)
            engine = _cpu_train_engine(native, source, groups, lr=1e-2, aux_loss_coeff=aux_coeff)
            args = source.args
            gen = torch.Generator().manual_seed(3)
            batches = [torch.randint(0, 256, (2, 9), generator=gen) for _ in range(world)]
            if reduction == "ddp":
                from megatron.core.distributed import finalize_model_grads

                gpt = engine.module.model  # built with the aux coefficient
                ddp = megatron_ddp(gpt, groups)
                module = GPTCausalLM(gpt, aux_coeff, 0.0)
                loss, lm, aux = module(batches[rank])
                loss.backward()
                finalize_model_grads([ddp])
                grads = {n: p.main_grad for n, p in gpt.named_parameters()}
                assert all(p.grad is None for p in gpt.parameters())
            else:
                loss, lm, aux = engine(batches[rank])
                engine.backward(loss)
                grads = {n: p.grad for n, p in engine.module.model.named_parameters()}
            ours = megatron_to_native(grads, args)
            # reference: the full model, one process, mean of both ranks' losses
            full = {n: source.reader.read(n).float() for n in source.reader.names()}
            reference = Transformer(args)
            reference.load_state_dict(full, strict=False)
            wrapped = CausalLMWithAux(reference.train(), aux_coeff)
            total = sum(wrapped(b)[0] for b in batches) / world
            total.backward()
            ref_loss = wrapped(batches[rank])[0].detach()
            torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-5)
            assert aux > 0 and abs(float(loss - lm) - aux_coeff * float(aux)) < 1e-5
            requests = shard_slices(plan, groups, args)
            for name, grad in ours.items():
                want = take_shard(dict(reference.named_parameters())[name].grad, requests[name])
                torch.testing.assert_close(
                    grad, want, rtol=1e-4, atol=3e-5, msg=f"rank {rank} grad {name}"
                )
            assert any(".mlp.experts." in n for n in ours)
            if reduction == "ddp":
                return
            # a step changes the weights; copying back gives the native shard those weights
            engine.step()
            copy_to_native(engine.module.model, native)
            trained = megatron_to_native(engine.module.model.state_dict(), args)
            for name, param in native.named_parameters():
                assert torch.equal(param, trained[name]), name
            assert not torch.equal(native.embed_tokens.weight, full["embed_tokens.weight"])
        finally:
            uninstall_parallel_state()


@pytest.mark.timeout(120)
def test_training_gradients_equal_reference_world2():
    run_ranks(_train_body, world_size=2)


@pytest.mark.timeout(120)
def test_megatron_ddp_reduction_equals_reference_world2():
    """The bf16 engine's gradient path (Megatron's DDP on our parallel_state: dense over dp,
    experts over edp, 1/dp) gives the reference gradients; its optimizer is CUDA-only
    (tests/gpu/test_megatron_train_gpu.py)."""
    run_ranks(_train_body, world_size=2, args=("ddp",))


@contextlib.contextmanager
def _cpu_megatron_optimizer():
    """Inside a spawned rank only, on top of megatron_on_cpu: Megatron's mixed-precision
    optimizer made to run on CPU (its tensors created with device='cuda' land on the CPU;
    CPU bf16/fp32 tensors pass its ``param.type()`` check for torch.cuda.* types)."""
    import functools

    def on_cpu(fn):
        @functools.wraps(fn)
        def wrapped(*a, **k):
            if str(k.get("device", "")).startswith("cuda"):
                k["device"] = "cpu"
            return fn(*a, **k)

        return wrapped

    for name in ("tensor", "zeros", "ones", "empty", "full"):
        setattr(torch, name, on_cpu(getattr(torch, name)))
    tensor_type = torch.Tensor.type

    def cuda_type(self, *a, **k):
        out = tensor_type(self, *a, **k)
        if not a and not k and isinstance(out, str) and not out.startswith("torch.cuda."):
            return "torch.cuda." + out.removeprefix("torch.")
        return out

    torch.Tensor.type = cuda_type
    torch.cuda.FloatTensor = torch.FloatTensor
    torch.cuda.IntTensor = torch.IntTensor
    yield


def _bf16_body(rank, world):
    from moe_ext.deepspeed.engine import CausalLMWithAux
    from moe_ext.megatron import uninstall_parallel_state
    from moe_ext.megatron.engine import MegatronMixedPrecisionEngine
    from moe_ext.model import Transformer
    from moe_ext.train.data import shipped_corpus_path

    aux_coeff = 0.1
    # text the tiny model was trained on (random ids would make its logits extreme)
    text = torch.tensor(list(shipped_corpus_path().read_bytes()[:4096]), dtype=torch.long)
    windows = text[: 2 * world * 33].view(world, 2, 33)  # [ranks, B, S+1]
    batches = [[windows[r] for r in range(world)]] * 3  # the same batch three times
    with megatron_on_cpu(), _cpu_megatron_optimizer():
        plan = megatron_plan("ep_nccl", world)  # experts split over the ranks
        source = _source()
        # the exact global gradient norm at the start: full model, one process
        full = {n: source.reader.read(n).float() for n in source.reader.names()}
        reference = Transformer(source.args)
        reference.load_state_dict(full, strict=False)
        wrapped = CausalLMWithAux(reference.train(), aux_coeff)
        (sum(wrapped(b)[0] for b in batches[0]) / world).backward()
        ref_norm = torch.cat([p.grad.reshape(-1) for p in reference.parameters()]).norm()
        losses = {}
        for dtype, zero in ((torch.float32, 0), (torch.bfloat16, 0), (torch.bfloat16, 1)):
            try:
                _, groups, native, _ = _models(plan, rank)
                engine = _cpu_train_engine(
                    native,
                    source,
                    groups,
                    lr=3e-3,
                    aux_loss_coeff=aux_coeff,
                    dtype=dtype,
                    grad_clip=1.0,
                    zero_stage=zero,
                )
                assert isinstance(engine, MegatronMixedPrecisionEngine) == (dtype == torch.bfloat16)
                got = []
                for step, pair in enumerate(batches):
                    loss, lm, _ = engine(pair[rank])
                    engine.backward(loss)
                    engine.step()
                    got.append(float(lm))
                    if step == 0 and dtype == torch.bfloat16:
                        # Megatron's norm: dense once, experts summed over EP, = the exact one
                        norm = engine.get_global_grad_norm()
                        assert abs(norm - float(ref_norm)) < 0.03 * float(ref_norm), (
                            zero,
                            norm,
                            float(ref_norm),
                        )
                losses[(dtype, zero)] = got
            finally:
                uninstall_parallel_state()
        fp32 = losses[(torch.float32, 0)]
        assert fp32[-1] < fp32[0] - 0.1, fp32  # the same batch three times: it learns
        for key in ((torch.bfloat16, 0), (torch.bfloat16, 1)):
            # bf16 rounds activations to 8 mantissa bits; 3 steps at lr 3e-3 drift ~0.04
            assert max(abs(a - b) for a, b in zip(losses[key], fp32)) < 0.08, (key, losses)


@pytest.mark.timeout(180)
def test_bf16_engine_norm_and_losses_follow_fp32_world2():
    """engine=megatron bf16 (Megatron's DDP + mixed-precision optimizer, and its
    DistributedOptimizer), emulated on CPU: the step's gradient norm is the exact global
    one over EP (a single-process reference) within 3% (bf16 forward; 0.7% measured), and
    three steps' losses stay within 0.08 nats of the fp32 engine's (0.04 measured)."""
    run_ranks(_bf16_body, world_size=2)


# ---- the launchers' engine=megatron path, emulated on CPU ranks ---------------------------


def _conf(schema, **over):
    """A launcher config (InferConf / TrainConf) for the tiny model, with overrides."""
    return tiny_conf(schema, **over)


def _launcher(name: str):
    import importlib

    return importlib.import_module(f"moe_ext.cli.{name}")


def _launchers_body(rank, world, tmp):
    from moe_ext.checkpoint.reader import CheckpointReader
    from moe_ext.dist import DistEnv
    from moe_ext.megatron import engine as megatron_engine
    from moe_ext.megatron import uninstall_parallel_state
    from moe_ext.train.config import TrainConf

    tmp = Path(tmp)
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    megatron_engine.require_cuda = lambda *a, **k: None  # CPU stands in for the GPUs here
    infer, train = _launcher("infer"), _launcher("train")
    with megatron_on_cpu():
        outputs = {}
        for engine in ("native", "megatron"):
            out = tmp / f"{engine}.jsonl"
            cfg = _conf(
                infer.InferConf,
                engine=engine,
                device="cpu",
                output=str(out),
                **{"strategy.name": "ep_nccl", "generate.max_new_tokens": 10},
            )
            assert infer.run(cfg, env) == 0
            uninstall_parallel_state()  # one launcher per process outside this test
            torch.distributed.barrier()
            outputs[engine] = [
                json.loads(line)["output_ids"] for line in out.read_text().splitlines()
            ]
        assert outputs["megatron"] == outputs["native"]
        assert len(outputs["native"]) == 4 and all(len(o) == 10 for o in outputs["native"])
        cfg = _conf(
            TrainConf,
            engine="megatron",
            device="cpu",
            export=str(tmp / "model"),
            progress=False,
            **{
                "strategy.name": "ep_nccl",
                "train.steps": 6,
                "train.lr": 1e-2,
                "train.warmup_steps": 1,
                "train.micro_batch": 2,
                "train.seq_len": 32,
                "train.eval_every": 0,
                "train.save_every": 0,
                "sample.max_new_tokens": 4,
            },
        )
        assert train.run(cfg, env, tmp / "run", {}) == 0
        uninstall_parallel_state()
        resumed = dataclasses.replace(
            cfg,
            resume=str(tmp / "run" / "checkpoints"),
            export=str(tmp / "model2"),
            train=dataclasses.replace(cfg.train, steps=8),
        )
        assert train.run(resumed, env, tmp / "run2", {}) == 0
    if rank == 0:
        again = json.loads((tmp / "run2" / "train_log.json").read_text())["history"]
        assert (
            len(again) == 8
            and again[:6] == json.loads((tmp / "run" / "train_log.json").read_text())["history"]
        )
        history = json.loads((tmp / "run" / "train_log.json").read_text())["history"]
        losses = [h["lm_loss"] for h in history]
        assert len(losses) == 6 and losses[-1] < losses[0] - 0.2, losses
        reader = CheckpointReader.open(str(tmp / "model"))
        assert reader.shape("layers.0.mlp.experts.gate_up_proj") == (8, 64, 64)
        assert (tmp / "run" / "checkpoints" / "latest").is_file()


@pytest.mark.timeout(180)
def test_launchers_engine_megatron_emulated_on_cpu_world2(tmp_path):
    """launch/infer.py engine=megatron == engine=native ids; launch/train.py engine=megatron
    trains (loss falls), checkpoints, resumes and exports a loadable model (CUDA check
    bypassed)."""
    run_ranks(_launchers_body, world_size=2, args=(str(tmp_path),))


# ---- GPU: the launchers end to end (2 ranks, torchrun) ----------------------------------


def _torchrun(script: str, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [*torchrun(nproc), str(REPO / "launch" / script), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env=gpu_torchrun_env(), cwd=REPO
    )


def _infer(tmp: Path, name: str, extra: list[str]) -> list[list[int]]:
    out = tmp / f"{name}.jsonl"
    res = _torchrun(
        "infer.py", [*extra, "generate.max_new_tokens=24", "dtype=fp32", f"output={out}"]
    )
    assert res.returncode == 0, f"{name}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    if "engine=megatron" in " ".join(extra):
        assert "no KV cache" in res.stdout + res.stderr
    return [json.loads(line)["output_ids"] for line in out.read_text().splitlines()]


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_gpu_infer_megatron_equals_native_tiny_and_converted_hf(tmp_path):
    """Shipped tiny checkpoint: engine=megatron greedy ids == engine=native's (ep_nccl);
    the same weights through a Hugging Face export and import-hf: the same ids again."""
    native = _infer(tmp_path, "native", ["engine=native", "strategy=ep_nccl"])
    megatron = _infer(tmp_path, "megatron", ["engine=megatron", "strategy=ep_nccl"])
    assert megatron == native and all(len(ids) > 0 for ids in native)
    convert = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    hf, imported = tmp_path / "hf", tmp_path / "imported"
    for cmd in (
        convert + ["export-hf", str(TINY), str(hf), "--no-progress"],
        convert + ["import-hf", str(hf), str(imported), "--no-progress"],
    ):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert res.returncode == 0, res.stderr[-3000:]
    converted = _infer(
        tmp_path, "converted", ["engine=megatron", "strategy=replicate", f"checkpoint={imported}"]
    )
    assert converted == native


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_gpu_train_megatron_loss_decreases_and_export_loads(tmp_path):
    export = tmp_path / "model"
    run_dir = tmp_path / "run"
    res = _torchrun(
        "train.py",
        [
            "engine=megatron",
            "strategy=ep_nccl",
            "train.steps=20",
            "train.warmup_steps=2",
            "train.micro_batch=8",
            "train.seq_len=64",
            "train.eval_every=0",
            "train.save_every=0",
            "sample.max_new_tokens=16",
            f"export={export}",
            f"hydra.run.dir={run_dir}",
            "progress=false",
        ],
    )
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    history = json.loads((run_dir / "train_log.json").read_text())["history"]
    losses = [h["lm_loss"] for h in history]
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, losses  # from random init (~5.6 nats) it drops fast
    out = tmp_path / "after.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "infer.py"),
            f"checkpoint={export}",
            "device=cpu",
            "generate.max_new_tokens=8",
            f"output={out}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 4

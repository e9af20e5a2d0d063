"""Native training with tp > 1 and pp > 1 (gloo ranks, DeepSpeed engine) against a
single-rank reference: after the engine's reduction every rank's gradients equal the
reference's slices of the same global batch (tp2 with sharded attention, dense MLP and
experts; ep under tp with the token split; pp2 through the 1F1B schedule with 2 and 4
micro-batches, ZeRO 1, activation checkpointing), then the launcher with pp2. The 4-rank
combinations (tp2·ep2, pp2·ep2, pp2·tp2, pp4) are the slow tier.

# MB sequences per data-parallel rank, SEQ tokens each; M pipeline micro-batches
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import timedelta

import pytest
import torch

from moe_ext.model import Transformer
from moe_ext.model.parallelize import parallelize, shard_slices, take_shard
from moe_ext.model.weights import init_random_, init_random_full
from tests.support import (
    REPO,
    deepspeed_test_engine,
    plan_of,
    qwen2_args,
    run_launcher,
    run_ranks,
    sharded_random_model,
    short_train_overrides,
    tiny_args,
)

AUX = 0.01
MB, SEQ = 4, 12


def _qwen2_tp_args():
    """qwen2_moe with a dense (TP-sharded) MLP layer, a gated shared expert and q/k/v
    biases; 2 kv heads so tp=2 shards them."""
    return dataclasses.replace(qwen2_args(), num_key_value_heads=2)


ARGS = {"tiny": tiny_args, "qwen2": _qwen2_tp_args, "qwen2_kv1": qwen2_args}


def _global_batch(args, dp: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.randint(0, min(256, args.vocab_size), (dp * MB, SEQ + 1), generator=gen)


def _reference(args, dp: int, microbatches: int) -> dict[str, torch.Tensor]:
    """Gradients of the full model for the mean over dp ranks of the mean over their M
    micro-batches of the training loss (LM + AUX · load-balancing)."""
    from moe_ext.deepspeed.engine import CausalLMWithAux

    model = Transformer(args)
    model.load_state_dict(init_random_full(args))
    wrapped = CausalLMWithAux(model, AUX).train()
    losses = [
        wrapped(chunk)[0]
        for rank_batch in _global_batch(args, dp).split(MB)
        for chunk in rank_batch.chunk(microbatches)
    ]
    (sum(losses) / len(losses)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _fresh_deepspeed_groups() -> None:
    """DeepSpeed keeps expert groups by name (ep_size_{ep}) process-wide; each case here
    registers its own layout's."""
    from deepspeed.utils import groups as ds_groups

    for table in (
        ds_groups._EXPERT_PARALLEL_GROUP,
        ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
        ds_groups._EXPERT_DATA_PARALLEL_GROUP,
        ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
    ):
        table.clear()


def _check_case(
    rank, world, model_name, strategy, tp=1, pp=1, ep=1, microbatches=1, zero=0, recompute=False
):
    """One plan: build the shard, one forward/backward of this rank's batch, then compare
    every parameter's reduced gradient with the reference's slice."""
    from moe_ext.groups import ProcessGroups
    from moe_ext.train.pipeline import PipelineSchedule

    args = ARGS[model_name]()
    dp = world // (tp * pp)
    etp = tp if strategy == "tp_experts" else 1
    plan = plan_of(strategy, tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, world=world)
    label = f"{model_name} {strategy} tp{tp} pp{pp} ep{ep} M{microbatches} zero{zero}"
    ref = _reference(args, dp, microbatches)
    _fresh_deepspeed_groups()
    groups = ProcessGroups.build(plan, "gloo", timedelta(seconds=120))
    model, requests = sharded_random_model(args, plan, groups)
    model.activation_checkpointing = recompute
    engine = deepspeed_test_engine(
        model, groups, lr=1e-3, micro_batch=MB, zero_stage=zero, aux_loss_coeff=AUX
    )
    mine = _global_batch(args, dp).split(MB)[groups.dp_rank]  # [MB, SEQ+1]
    if pp > 1:
        loss, _, aux = PipelineSchedule(engine, groups, microbatches).train_step(mine)
    else:
        loss, _, aux = engine(mine)
        engine.backward(loss)
    assert aux > 0, label
    grads = _reduced_grads(engine, model)
    assert set(grads) == set(requests), label
    for name, grad in grads.items():
        expected = take_shard(ref[name], requests[name])
        torch.testing.assert_close(
            grad, expected, rtol=2e-4, atol=5e-6, msg=lambda m: f"{label} rank {rank} {name}: {m}"
        )


def _reduced_grads(engine, model) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after the engine's reduction; under ZeRO 1 the reduced
    gradients sit in the optimizer's flat partitions, so gather them back by parameter."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return {n: p.grad for n, p in model.named_parameters()}
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p) for n, p in model.named_parameters()}


def _tp2_body(rank, world):
    os.environ["LOCAL_RANK"] = str(rank)
    torch.manual_seed(0)
    _check_case(rank, world, "tiny", "tp_experts", tp=2)  # per-head q/k norms, FFN-sharded experts
    # dense MLP, shared expert, biases; its one kv head replicated on both TP ranks
    _check_case(rank, world, "qwen2_kv1", "tp_experts", tp=2)
    # token split over the TP pair; every block recomputed in backward, exchanges included
    _check_case(rank, world, "tiny", "ep_nccl", tp=2, ep=2, recompute=True)


def _pp2_body(rank, world):
    os.environ["LOCAL_RANK"] = str(rank)
    torch.manual_seed(0)
    _check_case(rank, world, "tiny", "replicate", pp=2, microbatches=2)
    _check_case(rank, world, "qwen2", "replicate", pp=2, microbatches=4, recompute=True)


def _four_rank_body(rank, world):
    os.environ["LOCAL_RANK"] = str(rank)
    _check_case(rank, world, "tiny", "ep_nccl", tp=2, ep=2)  # tp2 · ep2 (dp 2)
    _check_case(rank, world, "qwen2_kv1", "ep_nccl", tp=2, ep=4, zero=1)  # ep over tp · dp
    _check_case(rank, world, "tiny", "tp_experts", tp=2, zero=1)  # expert TP, dp 2, ZeRO 1
    # pp2 · ep2 over dp 2, ZeRO 1 (its reduced partitions read back per parameter)
    _check_case(rank, world, "tiny", "ep_nccl", pp=2, ep=2, microbatches=2, zero=1)
    _check_case(rank, world, "tiny", "tp_experts", tp=2, pp=2, microbatches=2)  # pp2 · tp2
    # pp4: warm-ups of 3, 2, 1 and 0 forwards; fewer micro-batches (2) than stages, and as many
    _check_case(rank, world, "tiny", "replicate", pp=4, microbatches=2)
    _check_case(rank, world, "tiny", "replicate", pp=4, microbatches=4, recompute=True)


def _families_body(rank, world):
    """Every family's TP pieces (GQA with per-head or whole-projection q/k norms, partial
    rotary, biases; MLA's replicated latents; sinks and sliding windows; shared experts)
    without DeepSpeed: at dp = 1 the model's own gradients after backward must already be
    the reference's slices."""
    from moe_ext.deepspeed.engine import CausalLMWithAux
    from moe_ext.groups import ProcessGroups
    from moe_ext.model.args import ModelArgs
    from tests.unit.test_families import CONFIGS, hf

    torch.manual_seed(0)
    plans = {
        "tp_experts": plan_of("tp_experts", tp=2, etp=2),
        "ep_nccl": plan_of("ep_nccl", tp=2, ep=2),
    }
    groups = {k: ProcessGroups.build(p, "gloo", timedelta(seconds=60)) for k, p in plans.items()}
    batch = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(1))
    # each family, and GQA ones with a kv head replicated over the TP pair (qkv_projections)
    cases = [(f, {}) for f in sorted(CONFIGS)]
    cases += [(f, dict(num_key_value_heads=1)) for f in ("gpt_oss", "qwen3_moe", "glm4_moe")]
    for family, changes in cases:
        args = ModelArgs.from_hf_config(hf(family, **changes))
        state = init_random_full(args)
        full = Transformer(args)
        full.load_state_dict(state)
        CausalLMWithAux(full, AUX)(batch)[0].backward()
        for strategy, plan in plans.items():
            if strategy == "tp_experts" and args.expert_bias:
                continue  # refused for training (_check_plan): one FFN shard adds down's bias
            with torch.device("meta"):
                model = Transformer(args)
            parallelize(model, plan, groups[strategy])
            requests = shard_slices(plan, groups[strategy], args)
            init_random_(model, requests=requests, device="cpu")
            with torch.no_grad():  # the sharded init draws routers' correction biases anew
                for name, tensor in model.state_dict().items():
                    tensor.copy_(take_shard(state[name], requests[name]))
            loss, _, aux = CausalLMWithAux(model, AUX)(batch)
            loss.backward()
            assert aux > 0, (family, strategy)
            for name, param in model.named_parameters():
                torch.testing.assert_close(
                    param.grad,
                    take_shard(full.get_parameter(name).grad, requests[name]),
                    rtol=2e-4,
                    atol=5e-6,
                    msg=lambda m: f"{family} {changes} {strategy} rank {rank} {name}: {m}",
                )


def _two_rank_body(rank, world):
    _families_body(rank, world)
    _tp2_body(rank, world)
    _pp2_body(rank, world)


def test_tp2_pp2_gradients_equal_single_rank_reference():
    """One start of 2 ranks (DeepSpeed's import is most of a start) for every 2-rank case:
    each family's TP pieces, tp2 through the engine, pp2 1F1B."""
    run_ranks(_two_rank_body, world_size=2)


@pytest.mark.slow
def test_four_ranks_tp_ep_pp_gradients_equal_single_rank_reference():
    run_ranks(_four_rank_body, world_size=4)


def test_launcher_trains_pp2(tmp_path):
    done = run_launcher(
        REPO / "launch/train.py",
        [
            *short_train_overrides(tmp_path / "run", steps=3, micro_batch=4),
            "model=tiny",
            "model.weights=null",
            "strategy=replicate",
            "parallel.pp=2",
            "device=cpu",
            "train.pipeline_microbatches=2",
            "sample.max_new_tokens=4",
        ],
        nproc=2,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((tmp_path / "run" / "train_log.json").read_text())
    losses = [h["lm_loss"] for h in record["history"]]
    assert len(losses) == 3 and all(4 < x < 7 for x in losses), losses  # ~ln(260) at random init
    assert record["evals"] and 4 < record["evals"][-1]["val_loss"] < 7


def launcher_losses(
    tmp_path, name: str, nproc: int, *overrides: str, steps: int = 4, env: dict | None = None
) -> list:
    """Per-step losses of ``launch/train.py`` on the tiny model (random init) with a data
    parallel degree of 1, so every layout trains on the same batches; clipping on (1.0)."""
    done = run_launcher(
        REPO / "launch/train.py",
        [
            *short_train_overrides(tmp_path / name, steps=steps, micro_batch=4),
            "model=tiny",
            "model.weights=null",
            "train.lr=3e-3",
            "sample.prompt=null",
            *overrides,
        ],
        nproc=nproc,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((tmp_path / name / "train_log.json").read_text())
    return [h["loss"] for h in record["history"]]


TRAJECTORY_LAYOUTS = {
    # pp2 with one micro-batch is the same objective as one rank, to rounding
    "pp2": ("strategy=replicate", "parallel.pp=2"),
    "tp2_ep2": ("strategy=ep_nccl", "parallel.tp=2", "parallel.ep=2"),
    "tp2_experts": ("strategy=tp_experts", "parallel.tp=2"),
}


@pytest.mark.slow
def test_launcher_loss_trajectories_of_tp_pp_equal_one_rank(tmp_path):
    """fp32 on CPU: 4 clipped AdamW steps of pp2, tp2·ep2 and tp2 (tp_experts) follow the
    one-rank run's losses; pp2 with 2 micro-batches (its aux loss is per micro-batch) stays
    within 1e-3."""
    reference = launcher_losses(tmp_path, "one", 1, "strategy=replicate", "device=cpu")
    for name, layout in TRAJECTORY_LAYOUTS.items():
        got = launcher_losses(tmp_path, name, 2, *layout, "device=cpu")
        assert got == pytest.approx(reference, rel=1e-4, abs=1e-5), (name, got, reference)
    micro = launcher_losses(
        tmp_path,
        "pp2_m2",
        2,
        *TRAJECTORY_LAYOUTS["pp2"],
        "train.pipeline_microbatches=2",
        "device=cpu",
    )
    assert micro == pytest.approx(reference, rel=1e-3), (micro, reference)


@pytest.mark.slow
def test_launcher_resumes_pp2_zero1_bit_for_bit(tmp_path):
    """pp2 with 2 micro-batches under ZeRO 1: a run resumed from its step-2 checkpoint
    repeats steps 3 and 4 exactly (every stage saves and restores its own partition)."""
    layout = (
        *TRAJECTORY_LAYOUTS["pp2"],
        "device=cpu",
        "train.pipeline_microbatches=2",
        "train.zero_stage=1",
        "train.save_every=2",
    )
    first = launcher_losses(tmp_path, "a", 2, *layout)
    step2 = tmp_path / "a" / "checkpoints" / "step_00000002"
    assert launcher_losses(tmp_path, "b", 2, *layout, f"resume={step2}") == first


# ---- refusals, before any process group -------------------------------------------------


def test_pipeline_refusals():
    from moe_ext.train.pipeline import PipelineConfigError, check_pipeline

    check_pipeline(pp=2, num_layers=4, micro_batch=4, microbatches=2, zero_stage=1)
    with pytest.raises(PipelineConfigError, match="larger than the model's 4 layers"):
        check_pipeline(pp=5, num_layers=4, micro_batch=4, microbatches=1, zero_stage=0)
    with pytest.raises(PipelineConfigError, match="does not split"):
        check_pipeline(pp=2, num_layers=4, micro_batch=4, microbatches=3, zero_stage=0)
    with pytest.raises(PipelineConfigError, match="zero_stage=1"):
        check_pipeline(pp=2, num_layers=4, micro_batch=4, microbatches=2, zero_stage=2)


def test_training_plan_refusals():
    from moe_ext.cli.train import _check_plan
    from moe_ext.launching import UsageError
    from moe_ext.model.args import ModelArgs
    from moe_ext.train.config import TrainLoopConf
    from tests.unit.test_families import hf

    conf = TrainLoopConf(micro_batch=4, pipeline_microbatches=2)
    _check_plan(plan_of("ep_nccl", tp=2, ep=2), conf, tiny_args())
    _check_plan(plan_of("tp_experts", tp=2, etp=2), conf, qwen2_args())
    minimax = ModelArgs.from_hf_config(hf("minimax_m2", num_key_value_heads=1))
    with pytest.raises(UsageError, match="kv heads replicated"):
        _check_plan(plan_of("tp_experts", tp=2, etp=2), conf, minimax)
    gpt_oss = ModelArgs.from_hf_config(hf("gpt_oss"))
    with pytest.raises(UsageError, match="experts with biases"):
        _check_plan(plan_of("tp_experts", tp=2, etp=2), conf, gpt_oss)
    with pytest.raises(UsageError, match="strategy=replicate with tp=2"):
        _check_plan(plan_of("replicate", tp=2), conf, tiny_args())
    tied = dataclasses.replace(tiny_args(), tie_word_embeddings=True)
    with pytest.raises(UsageError, match="ties its embeddings"):
        _check_plan(plan_of("replicate", pp=2), conf, tied)
    with pytest.raises(UsageError, match="does not split"):
        bad = dataclasses.replace(conf, pipeline_microbatches=3)
        _check_plan(plan_of("replicate", pp=2), bad, tiny_args())


def test_activation_checkpointing_needs_the_native_model():
    from moe_ext.cli import train
    from moe_ext.dist import DistEnv
    from moe_ext.launching import UsageError
    from moe_ext.train.config import TrainConf
    from tests.support import tiny_conf

    cfg = tiny_conf(TrainConf, engine="megatron", **{"train.activation_checkpointing": True})
    with pytest.raises(UsageError, match="activation_checkpointing"):
        train.prepare(cfg, DistEnv(), True, 1)  # checked before any GPU is touched

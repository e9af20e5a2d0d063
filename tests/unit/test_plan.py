"""ParallelPlan: derivation, validation errors, auto choice, memory model, tools/plan.py, and
Hydra's structured-config rejection of a typo."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from moe_ext.config import ParallelConf, StrategyConf, TopologyConf, register_configs
from moe_ext.model.args import ModelArgs
from moe_ext.moe.dispatch import DISPATCHERS
from moe_ext.plan import (
    STRATEGIES,
    ParallelPlan,
    PlanError,
    build_plan,
    estimate_memory,
    model_memory_bytes,
    model_param_counts,
)
from moe_ext.topology import Topology, resolve_topology

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30

# 16 heads / 4 kv heads / 16 experts / F 64 / 8 layers: divisible by every degree up to 8
SHAPE_HF = dict(
    model_type="qwen3_moe",
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=64,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=16,
    num_experts=16,
    num_experts_per_tok=2,
)
SHAPE = ModelArgs.from_hf_config(SHAPE_HF)
QWEN3_30B = ModelArgs.from_hf_config(
    dict(
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
    )
)
MIXTRAL = ModelArgs.from_hf_config(
    dict(
        model_type="mixtral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
)
HOST = Topology(kind="cpu", host_memory_bytes=64 * GIB, cpu_count=2)


def shape(**changes) -> ModelArgs:
    """SHAPE with Hugging Face config keys changed."""
    return ModelArgs.from_hf_config({**SHAPE_HF, **changes})


def topo(
    kind: str, n: int = 8, mem_gib: float = 80.0, atomics: bool = True, host_gib: float = 64.0
) -> Topology:
    host = Topology(kind="cpu", host_memory_bytes=int(host_gib * GIB), cpu_count=2)
    if kind == "cpu":
        return host
    conf = TopologyConf(kind=kind, num_gpus=n, gpu_memory_gib=mem_gib)
    if kind == "nvlink":
        conf.p2p, conf.p2p_atomics = True, atomics
    return resolve_topology(conf, n, probe=lambda: host)


def plan(strategy="auto", world=2, model=SHAPE, topology=None, tokens=None, **degrees):
    return build_plan(
        StrategyConf(name=strategy),
        ParallelConf(**degrees),
        world,
        topology or topo("pcie", world),
        model,
        tokens_per_step=tokens,
    )


def degrees(p: ParallelPlan):
    return (p.tp, p.pp, p.dp, p.ep, p.etp, p.edp)


# ------------------------------------------------------------------------------ derivation


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_derived_degrees(strategy, world):
    if strategy == "ep_nvshmem" and world == 1:  # NVSHMEM needs an EP group of 2+ ranks
        with pytest.raises(PlanError, match="use strategy=replicate"):
            plan(strategy, world, topology=topo("nvlink", world))
        return
    p = plan(strategy, world, topology=topo("nvlink", world))
    expected = {  # (tp, pp, dp, ep, etp, edp) from docs/ARCHITECTURE.md "Rank layout"
        "replicate": (1, 1, world, 1, 1, world),
        "tp_experts": (world, 1, 1, 1, world, 1),
        "ep_allgather": (1, 1, world, world, 1, 1),
        "ep_nccl": (1, 1, world, world, 1, 1),
        "ep_nvshmem": (1, 1, world, world, 1, 1),
    }[strategy]
    assert degrees(p) == expected
    assert p.strategy == strategy and p.world_size == world
    assert p.tp * p.pp * p.dp == world and p.ep * p.etp * p.edp == p.tp * p.dp
    assert (
        p.dispatcher
        == DISPATCHERS[
            {
                "replicate": "local",
                "tp_experts": "tp_sharded",
                "ep_allgather": "allgather_rs",
                "ep_nccl": "nccl_a2a",
                "ep_nvshmem": "nvshmem",
            }[strategy]
        ]
    )
    assert p.is_expert_parallel == strategy.startswith("ep_")


@pytest.mark.parametrize(
    "strategy, world, given, expected",
    [
        ("ep_nccl", 8, dict(tp=2), (2, 1, 4, 8, 1, 1)),
        ("ep_nccl", 8, dict(tp=2, ep=4), (2, 1, 4, 4, 1, 2)),
        ("ep_allgather", 8, dict(pp=2), (1, 2, 4, 4, 1, 1)),
        ("ep_nccl", 8, dict(tp=2, pp=2, ep=2), (2, 2, 2, 2, 1, 2)),
        ("ep_nccl", 4, dict(ep=1), (1, 1, 4, 1, 1, 4)),
        ("tp_experts", 8, dict(pp=2), (4, 2, 1, 1, 4, 1)),
        ("tp_experts", 8, dict(dp=2), (4, 1, 2, 1, 4, 2)),
        ("tp_experts", 8, dict(tp=2, pp=2), (2, 2, 2, 1, 2, 2)),
        ("replicate", 8, dict(tp=2, pp=2), (2, 2, 2, 1, 1, 4)),
        ("replicate", 4, dict(tp=2, dp=2), (2, 1, 2, 1, 1, 4)),
        ("ep_nccl", 4, dict(tp=1, pp=1, dp=4, ep=4, etp=1), (1, 1, 4, 4, 1, 1)),
    ],
)
def test_explicit_degrees(strategy, world, given, expected):
    p = plan(strategy, world, **given)
    assert degrees(p) == expected
    assert p.reason == f"strategy={strategy} requested"
    assert p.tokens_split_over_tp == (p.is_expert_parallel and p.tp > 1)


def test_plan_is_frozen_and_describes_itself():
    p = plan("ep_nccl", 4, tp=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.ep = 2
    text = p.describe()
    assert "\n" not in text and "ep_nccl" in text and "ep=4" in text and p.reason in text


def test_dispatcher_target_from_strategy_conf():
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["strategy=ep_nccl"])
    p = build_plan(cfg.strategy, cfg.parallel, 2, topo("pcie", 2), SHAPE)
    assert p.dispatcher == cfg.strategy.dispatcher._target_ == DISPATCHERS["nccl_a2a"]
    fast = "moe_ext.moe.dispatch.allgather_rs.AllGatherDispatcher"  # any Dispatcher subclass
    custom = StrategyConf(name="ep_nccl", dispatcher={"_target_": fast})
    assert build_plan(custom, ParallelConf(), 2, topo("pcie", 2), SHAPE).dispatcher == fast
    short = StrategyConf(name="ep_nccl", dispatcher="allgather_rs")
    assert (
        build_plan(short, ParallelConf(), 2, topo("pcie", 2), SHAPE).dispatcher
        == DISPATCHERS["allgather_rs"]
    )


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "strategy, world, model, given, topology, message",
    [
        ("ep_foo", 2, SHAPE, {}, None, "use strategy= one of replicate, tp_experts, ep_allgather"),
        ("replicate", 4, SHAPE, dict(tp=2, pp=2, dp=4), None, "product is 4"),
        ("replicate", 4, SHAPE, dict(tp=3), None, "divides 4"),
        ("tp_experts", 4, SHAPE, dict(pp=3), None, "divides 4"),
        ("ep_nccl", 6, SHAPE, {}, None, "set parallel.ep to a divisor of 16"),
        ("replicate", 3, SHAPE, dict(tp=3), None, "set parallel.tp to a divisor of 16"),
        (
            "replicate",
            2,
            shape(num_attention_heads=12, num_key_value_heads=3),
            dict(tp=2),
            None,
            "divisor or multiple of 3",
        ),
        ("replicate", 16, SHAPE, dict(pp=16), topo("pcie", 16), "set parallel.pp <= 8"),
        ("tp_experts", 8, shape(moe_intermediate_size=36), {}, None, "dividing 36"),
        ("ep_nccl", 4, SHAPE, dict(ep=3), None, "choose ep from the divisors of 4"),
        ("ep_nccl", 4, SHAPE, dict(tp=2, ep=4, dp=1), None, "product is 4"),
        ("ep_nvshmem", 2, SHAPE, {}, topo("pcie", 2), "use strategy=ep_nccl"),
        ("ep_nvshmem", 2, SHAPE, {}, topo("nvlink", 2, atomics=False), "use strategy=ep_nccl"),
        ("ep_nvshmem", 2, SHAPE, {}, topo("cpu"), "on CPU use strategy=ep_nccl"),
        ("tp_experts", 2, SHAPE, dict(pp=2), None, "use strategy=replicate"),
        ("replicate", 2, SHAPE, dict(ep=2), None, "drop parallel.ep/etp or use strategy=ep_nccl"),
        (
            "ep_allgather",
            2,
            SHAPE,
            dict(etp=2),
            None,
            "drop parallel.etp or use strategy=tp_experts",
        ),
        ("tp_experts", 4, SHAPE, dict(tp=4, etp=2), None, "set it to 4"),
        ("tp_experts", 4, SHAPE, dict(ep=2), None, "drop parallel.ep or use strategy=ep_nccl"),
        ("ep_nccl", 2, SHAPE, dict(tp=0), None, "must be >= 1"),
        ("ep_nccl", 0, SHAPE, {}, topo("pcie", 1), "launch at least one rank"),
    ],
)
def test_validation_errors_name_the_fix(strategy, world, model, given, topology, message):
    with pytest.raises(PlanError) as err:
        plan(
            strategy, world, model=model, topology=topology or topo("pcie", max(world, 1)), **given
        )
    assert isinstance(err.value, ValueError)
    text = str(err.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize("strategy", ["ep_nccl", "ep_allgather", "replicate", "tp_experts"])
def test_collective_strategies_run_on_cpu(strategy):
    p = plan(strategy, 2, topology=topo("cpu"))
    assert p.world_size == 2  # gloo carries them


# ------------------------------------------------------------------------------ auto


@pytest.mark.parametrize("kind", ["pcie", "nvlink", "cpu"])
def test_auto_world_one_replicates(kind):
    p = plan("auto", 1, model=QWEN3_30B, topology=topo(kind, 1, mem_gib=1))
    assert p.strategy == "replicate" and p.reason.startswith("auto: world size 1")


def test_auto_pcie_small_model_replicates():
    p = plan("auto", 4, topology=topo("pcie", 4, mem_gib=24))
    assert p.strategy == "replicate" and degrees(p) == (1, 1, 4, 1, 1, 4)
    assert p.reason.startswith("auto: pcie:") and "avoids all token exchange" in p.reason


@pytest.mark.parametrize(
    "model, world, tokens, expected",
    [
        # Qwen3 k=8 >= ep: all-gather never moves more bytes and has one round fewer
        (QWEN3_30B, 4, None, "ep_allgather"),
        (QWEN3_30B, 4, 16, "ep_allgather"),
        (QWEN3_30B, 4, 65536, "ep_allgather"),
        # Mixtral k=2 < ep=4: all-gather moves 2x the bytes; latency still wins for a few tokens
        (MIXTRAL, 4, None, "ep_nccl"),
        (MIXTRAL, 4, 65536, "ep_nccl"),
        (MIXTRAL, 4, 1, "ep_allgather"),
    ],
)
def test_auto_pcie_large_model_expert_parallel(model, world, tokens, expected):
    p = plan("auto", world, model=model, tokens=tokens, topology=topo("pcie", world, mem_gib=24))
    assert p.strategy == expected and p.ep == world and p.edp == 1
    assert p.reason.startswith("auto: pcie: experts do not fit one rank")
    assert "\n" not in p.reason


def test_auto_nvlink():
    big = topo("nvlink", 2, mem_gib=141)
    # 128 experts: spread them (one-sided NVSHMEM dispatch)
    assert plan("auto", 2, model=QWEN3_30B, topology=big).strategy == "ep_nvshmem"
    # few experts and the model fits: nothing to gain from moving tokens
    assert plan("auto", 2, model=shape(num_experts=8), topology=big).strategy == "replicate"
    # Mixtral does not fit an 80 GiB GPU replicated (~104 GiB with headroom)
    p = plan("auto", 2, model=MIXTRAL, topology=topo("nvlink", 2, mem_gib=80))
    assert p.strategy == "ep_nvshmem" and "do not fit" in p.reason
    p = plan("auto", 2, model=QWEN3_30B, topology=topo("nvlink", 2, atomics=False))
    assert p.strategy == "ep_nccl" and "without P2P atomics" in p.reason


def test_auto_cpu_divides_host_memory_by_ranks():
    total, _ = model_memory_bytes(SHAPE, 2)
    needed = total * 1.2
    host_gib = 1.5 * needed / GIB  # one rank fits, two ranks sharing the host do not
    assert plan("auto", 2, topology=topo("cpu", host_gib=host_gib)).strategy in (
        "ep_allgather",
        "ep_nccl",
    )
    assert plan("auto", 2, topology=topo("cpu", host_gib=3 * needed / GIB)).strategy == "replicate"


def test_auto_pcie_takes_the_smallest_ep_that_fits():
    """qwen3-30B bf16 (~61 GB) on 4 PCIe GPUs: 48 GiB holds half the experts, so EP 2 x
    2 (fewer bytes per exchange); 24 GiB needs EP 4; NVLink keeps EP over all ranks."""
    p = plan("auto", 4, model=QWEN3_30B, topology=topo("pcie", 4, mem_gib=48))
    assert p.is_expert_parallel and (p.ep, p.edp, p.dp) == (2, 2, 4)
    assert "ep=2, the smallest EP degree that fits" in p.reason
    assert plan("auto", 4, model=QWEN3_30B, topology=topo("pcie", 4, mem_gib=24)).ep == 4
    assert plan("auto", 4, model=QWEN3_30B, topology=topo("nvlink", 4, mem_gib=48)).ep == 4


def test_auto_shrinks_ep_to_divide_the_experts():
    p = plan("auto", 6, model=QWEN3_30B, topology=topo("pcie", 6, mem_gib=24))
    assert (p.ep, p.edp) == (math.gcd(128, 6), 3) and p.is_expert_parallel


def test_auto_honours_given_expert_degrees():
    small = topo("pcie", 4, mem_gib=80)  # replicate would fit
    p = plan("auto", 4, topology=small, ep=2)
    assert p.is_expert_parallel and (p.ep, p.edp) == (2, 2) and "parallel.ep=2 given" in p.reason
    p = plan("auto", 4, topology=topo("nvlink", 4), ep=4, model=shape(num_experts=8))
    assert p.strategy == "ep_nvshmem" and p.ep == 4
    p = plan("auto", 4, topology=small, tp=2, etp=2)
    assert p.strategy == "tp_experts" and (p.tp, p.etp) == (2, 2)


def test_auto_warns_when_even_ep_does_not_fit():
    # Mixtral (87 GiB) fits 2 x 46 GiB together, but EP 2 needs ~54 GiB per rank with headroom
    p = plan("auto", 2, model=MIXTRAL, topology=topo("pcie", 2, mem_gib=46))
    assert "WARNING" in p.reason and "parallel.pp" in p.reason
    # more weights than all ranks hold together: refused, not warned
    with pytest.raises(PlanError, match="more than the 2 ranks hold together.*add ranks"):
        plan("auto", 2, model=MIXTRAL, topology=topo("pcie", 2, mem_gib=24))


def test_auto_with_dtype_bytes_changes_the_fit():
    t = topo("pcie", 2, mem_gib=48)
    fp8 = build_plan(StrategyConf(), ParallelConf(), 2, t, QWEN3_30B, dtype_bytes=1)
    bf16 = build_plan(StrategyConf(), ParallelConf(), 2, t, QWEN3_30B, dtype_bytes=2)
    assert fp8.strategy == "replicate" and bf16.is_expert_parallel  # 30.5 GB vs 61 GB


# ----------------------------------------------------------- auto: batch < attention replicas


def batch_plan(world, model, topology, batch, profile=None, **given) -> ParallelPlan:
    return build_plan(
        StrategyConf(name="auto"),
        ParallelConf(**given),
        world,
        topology,
        model,
        tokens_per_step=batch,
        batch=batch,
        prompt_len=512,
        profile=profile,
    )


@pytest.mark.parametrize(
    "world, model, mem_gib, batch, expected",
    [
        # Mixtral on 2 x 96 GiB: EP 2; at batch 1 attention runs tp 2 on the EP ranks
        (2, MIXTRAL, 96, 1, (2, 1, 1, 2, 1, 1)),
        (2, MIXTRAL, 96, 2, (1, 1, 2, 2, 1, 1)),  # one sequence per replica: unchanged
        # qwen3-30B on 4 x 48 GiB: EP 2 x edp 2; the smallest tp with dp <= batch
        (4, QWEN3_30B, 48, 1, (4, 1, 1, 2, 1, 2)),
        (4, QWEN3_30B, 48, 2, (2, 1, 2, 2, 1, 2)),
        (4, QWEN3_30B, 48, 3, (2, 1, 2, 2, 1, 2)),
        (4, QWEN3_30B, 48, 4, (1, 1, 4, 2, 1, 2)),
    ],
)
def test_auto_rules_give_every_replica_a_sequence(world, model, mem_gib, batch, expected):
    p = batch_plan(world, model, topo("pcie", world, mem_gib=mem_gib), batch)
    assert p.is_expert_parallel and degrees(p) == expected, p.describe()
    assert p.dp <= batch and p.tokens_split_over_tp == (p.tp > 1)
    if p.tp > 1:
        assert (
            f"batch {batch} < {world} attention replicas: attention tp={p.tp} with ep={p.ep} "
            f"over the same ranks"
        ) in p.reason
    else:
        assert "attention replicas" not in p.reason


def test_auto_rules_reason_for_one_user_on_two_cards():
    p = batch_plan(2, MIXTRAL, topo("pcie", 2, mem_gib=96), 1)
    assert p.reason.startswith("auto: pcie: experts do not fit one rank")
    assert "; batch 1 < 2 attention replicas: attention tp=2 with ep=2 over the same ranks" in (
        p.reason
    )
    assert "\n" not in p.reason


def test_auto_rules_batch_rule_on_nvlink_keeps_the_link_choice():
    p = batch_plan(2, QWEN3_30B, topo("nvlink", 2, mem_gib=141), 1)
    assert p.strategy == "ep_nvshmem" and (p.tp, p.dp, p.ep) == (2, 1, 2)
    p = batch_plan(4, QWEN3_30B, topo("nvlink", 4, mem_gib=141), 2)
    assert (p.tp, p.dp, p.ep, p.edp) == (2, 2, 4, 1)


def test_auto_rules_unknown_batch_or_given_degrees_keep_the_replicas():
    t = topo("pcie", 2, mem_gib=96)
    unknown = batch_plan(2, MIXTRAL, t, None)
    assert (unknown.tp, unknown.dp) == (1, 2) and "attention replicas" not in unknown.reason
    for given in (dict(tp=1), dict(dp=2)):
        p = batch_plan(2, MIXTRAL, t, 1, **given)
        assert p.is_expert_parallel and (p.tp, p.dp, p.ep) == (1, 2, 2), given
        assert "attention replicas" not in p.reason
    # a given ep alone is kept, and attention still spreads over its ranks
    p = batch_plan(4, SHAPE, topo("pcie", 4), 1, ep=2)
    assert p.is_expert_parallel and (p.tp, p.dp, p.ep, p.edp) == (4, 1, 2, 2)
    # a model whose training batch is never below dp: nothing changes at batch >= world
    assert batch_plan(4, SHAPE, topo("pcie", 4), 8, ep=2).dp == 4


def test_auto_rules_say_when_the_heads_cannot_split():
    odd = shape(num_attention_heads=3, num_key_value_heads=1)  # no tp = 2 of 3 heads
    p = batch_plan(2, odd, topo("pcie", 2), 1, ep=2)
    assert p.is_expert_parallel and (p.tp, p.dp) == (1, 2)
    assert "batch 1 < 2 attention replicas, but no tp the model's heads allow" in p.reason


def test_auto_profile_never_leaves_an_ep_replica_idle():
    """With the measured P2P-off profile the cost model ranks ep dp 2 (one replica idle at
    batch 1) above tp 2 x ep 2 (two more collectives per layer); auto takes the fastest
    plan whose replicas all have a sequence and says which one it passed over."""
    from moe_ext.cost import ProfileChoice, rank_plans
    from moe_ext.profile import MachineProfile

    machine = MachineProfile.load(REPO / "conf" / "profiles" / "h200x2_p2p_off.json")
    profile = ProfileChoice(machine, "profile p2p_off")
    t = topo("pcie", 2, mem_gib=96)
    ranked = rank_plans(MIXTRAL, machine, 2, 1, 512, available_bytes=96 * GIB, given={"ep": 2})
    assert ranked[0].plan.dp == 2  # the prediction: the idle-replica plan is faster
    p = batch_plan(2, MIXTRAL, t, 1, profile=profile, ep=2)
    assert p.is_expert_parallel and (p.tp, p.dp, p.ep) == (2, 1, 2)
    assert "dp2 ep2 (" in p.reason and "not taken: batch 1 < its 2 attention replicas" in (p.reason)
    assert "runner-up ep_allgather tp1" not in p.reason  # the runner-up is a busy plan
    # at batch 2 both replicas have a sequence: the model's pick stands
    p = batch_plan(2, MIXTRAL, t, 2, profile=profile, ep=2)
    assert p.dp == 2 and "not taken" not in p.reason
    # without a given ep, auto's pick at batch 1 and 2 never has an idle replica
    for batch in (1, 2, 16, 64):
        p = batch_plan(2, MIXTRAL, t, batch, profile=profile)
        assert p.dp <= batch, (batch, p.describe())


# ------------------------------------------------------------------------------ memory


def _hf_param_count(model: ModelArgs, **hf) -> tuple[int, int]:
    """Parameters of the Hugging Face transformers model of this shape (meta device)."""
    import transformers

    cls = {
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
    }[model.model_type]
    kw = dict(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_key_value_heads,
        num_experts_per_tok=model.num_experts_per_tok,
        tie_word_embeddings=model.tie_word_embeddings,
        **hf,
    )
    if model.model_type == "mixtral":
        kw["num_local_experts"] = model.num_experts
    else:
        kw.update(
            num_experts=model.num_experts,
            moe_intermediate_size=model.moe_intermediate_size,
            decoder_sparse_step=model.decoder_sparse_step,
            mlp_only_layers=list(model.mlp_only_layers),
        )
    if model.head_dim:
        kw["head_dim"] = model.head_dim
    if model.shared_expert_intermediate_size:
        kw["shared_expert_intermediate_size"] = model.shared_expert_intermediate_size
    with torch.device("meta"):
        m = transformers.AutoModelForCausalLM.from_config(cls(**kw))
    params = dict(m.named_parameters())
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
    return sum(p.numel() for p in params.values()), experts


@pytest.mark.parametrize(
    "model, hf",
    [
        (QWEN3_30B, {}),
        (MIXTRAL, {}),
        (
            shape(
                model_type="qwen2_moe",
                head_dim=None,
                shared_expert_intermediate_size=96,
                decoder_sparse_step=2,
                mlp_only_layers=[1, 4],
                tie_word_embeddings=True,
            ),
            {},
        ),
        (shape(attention_bias=True), dict(attention_bias=True)),
    ],
)
def test_param_count_matches_transformers(model, hf):
    assert model_param_counts(model) == _hf_param_count(model, **hf)
    total, experts = model_memory_bytes(model, dtype_bytes=2)
    assert (total, experts) == tuple(2 * n for n in model_param_counts(model))


@pytest.mark.parametrize(
    "name, billions", [("mixtral_8x7b", 46.70), ("qwen3_30b_a3b", 30.53), ("qwen2_57b_a14b", 57.41)]
)
def test_shipped_model_confs_have_their_published_size(name, billions):
    if not (REPO / "conf" / "model" / f"{name}.yaml").exists():
        pytest.skip(f"conf/model/{name}.yaml not written yet")
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={name}"])
    total, _ = model_param_counts(ModelArgs.from_model_conf(cfg.model))
    assert abs(total / 1e9 - billions) < 0.01


def test_memory_estimate_per_rank():
    p = plan("ep_nccl", 4, model=QWEN3_30B, tp=2, topology=topo("pcie", 4, mem_gib=24))
    est = estimate_memory(p, QWEN3_30B, topo("pcie", 4, mem_gib=24))
    total, experts = model_memory_bytes(QWEN3_30B)
    assert est.expert_bytes == math.ceil(experts / 4)
    assert est.dense_bytes == math.ceil((total - experts) / 2)
    assert est.needed_bytes == math.ceil(est.total_bytes * 1.2)
    assert est.available_bytes == 24 * GIB


# ------------------------------------------------------------------------------ CLI, Hydra


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tools_plan", REPO / "tools" / "plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tool_explains_a_plan(capsys, monkeypatch):
    # auto uses the shipped profile closest to the topology when there is one (conf/profiles
    # has a pcie estimate): this test checks the rules, so it ships none (test_cost.py
    # checks the cost-model path)
    monkeypatch.setattr("moe_ext.cost.shipped_profiles", dict)
    tool = _tool()
    assert (
        tool.main(
            [
                "--world-size",
                "4",
                "--model",
                "tiny",
                "--strategy",
                "ep_nccl",
                "--topology",
                "pcie",
                "--json",
                "parallel.tp=2",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["strategy"] == "ep_nccl" and out["plan"]["tp"] == 2
    assert out["plan"]["ep"] == 4 and out["reason"] == "strategy=ep_nccl requested"
    mem = out["memory_per_rank"]
    assert mem["total_bytes"] == mem["dense_bytes"] + mem["expert_bytes"] > 0

    assert (
        tool.main(
            [
                "--world-size",
                "4",
                "--model",
                "qwen3_30b_a3b",
                "--topology",
                "pcie",
                "--tokens-per-step",
                "64",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "reason     auto: pcie" in text and "per rank" in text and "exchange" in text


def test_tool_errors_are_one_line(capsys):
    tool = _tool()
    assert tool.main(["--world-size", "2", "--strategy", "ep_nvshmem", "--topology", "pcie"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "use strategy=ep_nccl" in err and "\n" not in err
    assert tool.main(["--world-size", "2", "parallel.tpp=2"]) == 2
    assert "parallel.tpp" in capsys.readouterr().err


def test_hydra_rejects_a_typo_in_parallel():
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        with pytest.raises(ConfigCompositionException, match="tpp"):
            compose(config_name="config", overrides=["strategy=ep_nccl", "parallel.tpp=2"])
        cfg = compose(config_name="config", overrides=["strategy=ep_nccl", "parallel.tp=2"])
    assert cfg.parallel.tp == 2 and cfg.parallel.dp is None and cfg.strategy.name == "ep_nccl"


def overlap_plan(strategy, parts, world=2, topology=None):
    return build_plan(
        StrategyConf(name=strategy, overlap_microbatches=parts),
        ParallelConf(),
        world,
        topology or topo("pcie", world),
        SHAPE,
    )


@pytest.mark.parametrize("strategy", ["ep_nccl", "ep_allgather"])
def test_overlap_is_carried_by_plans_whose_dispatcher_overlaps(strategy):
    p = overlap_plan(strategy, 2)
    assert p.overlap_microbatches == 2
    assert "overlap=2" in p.describe()
    assert overlap_plan(strategy, 1).overlap_microbatches == 1


@pytest.mark.parametrize("strategy", ["replicate", "tp_experts"])
def test_overlap_without_an_exchange_is_refused_in_one_line(strategy):
    world = 2
    with pytest.raises(PlanError, match="overlap_microbatches=2 but .* no asynchronous") as err:
        build_plan(
            StrategyConf(name=strategy, overlap_microbatches=2),
            ParallelConf(tp=2) if strategy == "tp_experts" else ParallelConf(),
            world,
            topo("pcie", world),
            SHAPE,
        )
    assert "\n" not in str(err.value)


def test_auto_drops_overlap_when_its_pick_has_no_exchange():
    p = overlap_plan("auto", 2)  # SHAPE fits one rank on pcie: replicate
    assert p.strategy == "replicate" and p.overlap_microbatches == 1
    assert "overlap off" in p.reason


@pytest.mark.parametrize("bad", [0, -1, True, "2"])
def test_overlap_count_is_checked(bad):
    with pytest.raises(PlanError, match="strategy.overlap_microbatches"):
        overlap_plan("ep_nccl", bad)

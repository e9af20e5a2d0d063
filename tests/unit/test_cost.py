"""moe_ext.cost: enumeration equals what build_plan accepts, predictions move with bytes,
links and quantization as physics says, auto takes the argmin among fitting plans and
names the runner-up, tools/plan.py --rank prints ranked rows. Profiles are built here."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from moe_ext.config import ParallelConf, StrategyConf, register_configs
from moe_ext.cost import (
    ETHERNET_100G,
    ProfileChoice,
    enumerate_plans,
    expert_touch_probability,
    plan_label,
    predict,
    rank_plans,
    select_profile,
)
from moe_ext.plan import (
    STRATEGIES,
    PlanError,
    build_plan,
    model_weight_bytes,
    plan_with_degrees,
)
from moe_ext.profile import MachineProfile, ProfileError
from tests.unit.test_plan import MIXTRAL, QWEN3_30B, SHAPE, topo

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30
OPS = ("all_reduce", "all_to_all", "all_gather", "reduce_scatter", "send_recv")


def profile(
    name="test",
    link="pcie",
    p2p=False,
    gbps=24.0,
    latency_s=30e-6,
    gpus=2,
    hbm_gbps=4300.0,
    graph_kernel_us=1.5,
) -> MachineProfile:
    """An alpha-beta profile: every collective costs latency + bytes / bandwidth."""
    sizes = [2.0**p for p in range(10, 31, 2)]
    samples = {str(g): [[s, latency_s + s / (gbps * 1e9)] for s in sizes] for g in (2, 4, 8)}
    return MachineProfile(
        name=name,
        source="estimate",
        date="2026-11-30",
        device="test GPU",
        gpus=gpus,
        link=link,
        p2p=p2p,
        hbm_gbps=hbm_gbps,
        matmul_tflops=790.0,
        gemv_efficiency=0.4,
        grouped_efficiency=0.9,
        kernel_overhead_us=4.0,
        collectives={op: samples for op in OPS},
        graph_kernel_us=graph_kernel_us,
    )


PCIE = profile()
NVLINK = profile("test_nvlink", link="nvlink", p2p=True, gbps=280.0, latency_s=20e-6)


def key(p):
    return (p.strategy, p.tp, p.pp, p.dp, p.ep, p.etp, p.edp)


def accepted_by_build_plan(world, model, topology):
    """Independent of enumerate_plans: every strategy x tp x pp x ep that build_plan takes
    (ep_* with ep >= 2, tp_experts with tp >= 2: the degenerate forms are left out)."""
    out = set()
    for strategy in STRATEGIES:
        for tp in range(1, world + 1):
            for pp in range(1, world + 1):
                for ep in [None] + list(range(2, world + 1)):
                    if ep is not None and not strategy.startswith("ep_"):
                        continue
                    if strategy.startswith("ep_") and ep is None:
                        continue
                    try:
                        p = build_plan(
                            StrategyConf(name=strategy),
                            ParallelConf(tp=tp, pp=pp, ep=ep),
                            world,
                            topology,
                            model,
                        )
                    except PlanError:
                        continue
                    if strategy == "tp_experts" and p.tp == 1:
                        continue
                    out.add(key(p))
    return out


# ------------------------------------------------------------------------------ enumeration


@pytest.mark.parametrize("world", [1, 2, 4, 6])
@pytest.mark.parametrize("kind", ["pcie", "nvlink"])
def test_enumeration_is_exactly_what_build_plan_accepts(world, kind):
    t = topo(kind, world)
    plans = enumerate_plans(world, SHAPE, t)
    assert len({key(p) for p in plans}) == len(plans)  # no duplicates
    assert {key(p) for p in plans} == accepted_by_build_plan(world, SHAPE, t)
    for p in plans:  # and each one re-derives to itself
        again = plan_with_degrees(p.strategy, world, p.tp, p.pp, p.ep if p.ep > 1 else None)
        assert key(again) == key(p)


def test_enumeration_covers_hybrids_at_four_ranks():
    plans = enumerate_plans(4, SHAPE, topo("nvlink", 4))
    ep = [p for p in plans if p.is_expert_parallel]
    assert any(p.tp > 1 and p.ep > 1 for p in ep)  # tp x ep
    assert any(p.pp > 1 and p.ep > 1 for p in ep)  # pp x ep
    assert any(p.pp > 1 and p.tp > 1 for p in plans)  # pp x tp
    assert any(p.ep < 4 and p.edp > 1 for p in ep)  # EP groups side by side
    # NVSHMEM only where its dispatcher allows: EP over the whole world, one stage
    assert all(p.ep == 4 and p.pp == 1 for p in plans if p.strategy == "ep_nvshmem")
    assert not any(p.strategy == "ep_nvshmem" for p in enumerate_plans(4, SHAPE, topo("pcie", 4)))


def test_enumeration_skips_block_cutting_quantized_splits():
    from tests.unit.test_quant_plan import TINY_FP8, tiny

    model = tiny(TINY_FP8)  # F 32 in 16-blocks: expert TP 4 would cut them
    plans = enumerate_plans(4, model, topo("pcie", 4))
    assert plans and not any(p.strategy == "tp_experts" and p.etp == 4 for p in plans)
    assert any(p.strategy == "tp_experts" and p.etp == 2 for p in plans)
    for p in plans:
        plan_with_degrees(p.strategy, 4, p.tp, p.pp, p.ep if p.ep > 1 else None, model=model)


def test_nodes_keep_tp_and_ep_inside_a_node():
    plans = enumerate_plans(8, SHAPE, topo("nvlink", 8), gpus_per_node=4)
    assert plans
    for p in plans:
        assert 4 % p.tp == 0 and 4 % (p.ep * p.etp) == 0
    assert any(p.pp == 2 for p in plans) and not any(p.tp == 8 or p.ep == 8 for p in plans)


# ------------------------------------------------------------------------------ predictions


def test_single_rank_decode_is_the_weight_floor_at_the_profile_efficiencies():
    plan = plan_with_degrees("replicate", 1)
    pred = predict(plan, QWEN3_30B, PCIE, batch=4, prompt_len=256)
    w = model_weight_bytes(QWEN3_30B, 2)
    embed = QWEN3_30B.vocab_size * QWEN3_30B.hidden_size * 2  # untied: decode reads rows
    p = 1 - (1 - 8 / 128) ** 4
    expected = (w.dense - embed) / (4300e9 * 0.4) + w.experts * p / (4300e9 * 0.9)
    assert pred.terms["weights"] == pytest.approx(expected * 1e3, rel=1e-6)
    assert pred.terms["collectives"] == pred.terms["pipeline"] == 0
    assert pred.terms["kernels"] == pytest.approx(48 * 25 * 1.5e-3)
    assert sum(pred.terms.values()) == pytest.approx(pred.decode_ms)
    assert sum(pred.prefill_terms.values()) == pytest.approx(pred.prefill_ms)
    assert expert_touch_probability(4, 128, 8) == pytest.approx(p)


def test_more_bytes_is_slower():
    plan = plan_with_degrees("ep_nccl", 2)
    small = predict(plan, QWEN3_30B, PCIE, 16, 512, dtype_bytes=2)
    wide = predict(plan, QWEN3_30B, PCIE, 16, 512, dtype_bytes=4)
    assert wide.terms["weights"] > 1.9 * small.terms["weights"] and wide.decode_ms > small.decode_ms
    # more tokens touch more experts; longer prompts read more KV cache
    assert predict(plan, QWEN3_30B, PCIE, 64, 512).terms["weights"] > small.terms["weights"]
    assert predict(plan, QWEN3_30B, PCIE, 16, 4096).terms["kv"] > 7 * small.terms["kv"]
    slow_hbm = predict(plan, QWEN3_30B, dataclasses.replace(PCIE, hbm_gbps=2000.0), 16, 512)
    assert slow_hbm.decode_ms > small.decode_ms


def test_a_slower_link_costs_ep_and_tp_but_not_replicate():
    slow = profile("slow", gbps=2.0, latency_s=200e-6)
    cases = {
        "ep_nccl": plan_with_degrees("ep_nccl", 2),
        "ep_allgather": plan_with_degrees("ep_allgather", 2),
        "tp_experts": plan_with_degrees("tp_experts", 2, tp=2),
        "replicate_tp": plan_with_degrees("replicate", 2, tp=2),
        "replicate": plan_with_degrees("replicate", 2),
    }
    for name, plan in cases.items():
        fast_p, slow_p = (predict(plan, MIXTRAL, prof, 16, 512) for prof in (PCIE, slow))
        if name == "replicate":
            assert slow_p.decode_ms == fast_p.decode_ms and slow_p.prefill_ms == fast_p.prefill_ms
        else:
            assert slow_p.terms["collectives"] > 5 * fast_p.terms["collectives"] > 0
            assert slow_p.decode_ms > fast_p.decode_ms and slow_p.prefill_ms > fast_p.prefill_ms


def test_quantized_weights_read_fewer_bytes():
    from tests.unit.test_quant_plan import composed

    bf16, fp8 = composed("qwen3_30b_a3b"), composed("qwen3_30b_a3b_fp8")
    plan = plan_with_degrees("replicate", 2)
    a, b = (predict(plan, m, PCIE, 16, 512, available_bytes=40 * GIB) for m in (bf16, fp8))
    assert b.terms["weights"] < 0.6 * a.terms["weights"] and b.decode_ms < a.decode_ms
    assert b.memory_bytes < 0.6 * a.memory_bytes
    assert (a.fits, b.fits) == (False, True)  # 61 GB vs 31 GB of weights on 40 GiB


def test_pipeline_hops_across_nodes_cost_the_inter_node_link():
    plan = plan_with_degrees("replicate", 4, tp=2, pp=2)
    inside = predict(plan, QWEN3_30B, NVLINK, 16, 512)
    across = predict(plan, QWEN3_30B, NVLINK, 16, 512, gpus_per_node=2, inter_node=ETHERNET_100G)
    assert across.terms["pipeline"] > inside.terms["pipeline"] > 0
    # nothing else crosses: same weights, same collectives
    assert across.terms["collectives"] == inside.terms["collectives"]
    single_stage = plan_with_degrees("replicate", 4, tp=2)
    a = predict(single_stage, QWEN3_30B, NVLINK, 16, 512, gpus_per_node=2)
    assert a.decode_ms == predict(single_stage, QWEN3_30B, NVLINK, 16, 512).decode_ms


# ------------------------------------------------------------------------------ auto


def auto(world, model, t, batch=16, prof=PCIE, **degrees):
    return build_plan(
        StrategyConf(name="auto"),
        ParallelConf(**degrees),
        world,
        t,
        model,
        batch=batch,
        prompt_len=512,
        profile=ProfileChoice(prof, f"profile {prof.name}"),
    )


@pytest.mark.parametrize(
    "model, world, mem_gib, batch",
    [(QWEN3_30B, 2, 141, 16), (QWEN3_30B, 4, 24, 64), (MIXTRAL, 2, 80, 1), (MIXTRAL, 4, 48, 16)],
)
def test_auto_takes_the_argmin_among_fitting_plans(model, world, mem_gib, batch):
    t = topo("pcie", world, mem_gib=mem_gib)
    chosen = auto(world, model, t, batch)
    # reference: every plan build_plan accepts, predicted, the fastest that fits
    preds = []
    for k in accepted_by_build_plan(world, model, t):
        strategy, tp, pp, _, ep, _, _ = k
        p = plan_with_degrees(strategy, world, tp, pp, ep if strategy.startswith("ep_") else None)
        pred = predict(p, model, PCIE, batch, 512, available_bytes=int(mem_gib * GIB))
        preds.append((pred.decode_ms, p, pred))
    fitting = sorted((x for x in preds if x[2].fits), key=lambda x: x[0])
    assert fitting, "the case must have a fitting plan"
    best_ms = fitting[0][0]
    mine = next(x for x in preds if key(x[1]) == key(chosen)[:7])
    assert mine[2].fits and mine[0] == pytest.approx(best_ms)
    runner = fitting[1] if len(fitting) > 1 else None
    assert chosen.reason.startswith("auto: profile test: ")
    assert f"predicted {best_ms:.2f} ms/step decode at batch {batch}" in chosen.reason
    if runner is not None:
        # the runner-up's time (another plan may tie it: ep_nccl and ep_allgather decode alike)
        assert f" {runner[0]:.2f} ms/step decode (" in chosen.reason.split("runner-up ")[1]
        assert plan_label(chosen) not in chosen.reason.split("runner-up ")[1]
    assert "\n" not in chosen.reason


def test_auto_skips_the_fastest_plan_when_it_does_not_fit():
    """qwen3-30B at batch 1: replicate (no exchange) is fastest, but its 61 GB do not fit
    48 GiB cards; auto takes the fastest plan that does."""
    ranked = rank_plans(QWEN3_30B, PCIE, 2, 1, 512, available_bytes=48 * GIB)
    fastest = min(ranked, key=lambda r: r.prediction.decode_ms)
    assert fastest.plan.strategy == "replicate" and fastest.prediction.fits is False
    tight = auto(2, QWEN3_30B, topo("pcie", 2, mem_gib=48), batch=1)
    roomy = auto(2, QWEN3_30B, topo("pcie", 2, mem_gib=141), batch=1)
    assert key(tight) == key(ranked[0].plan) and ranked[0].prediction.fits
    assert key(roomy) == key(fastest.plan) and key(tight) != key(roomy)
    assert all(
        r.why_slower.startswith("does not fit") for r in ranked if r.prediction.fits is False
    )


def test_auto_with_a_profile_keeps_given_degrees():
    p = auto(4, QWEN3_30B, topo("pcie", 4, mem_gib=141), tp=2)
    assert p.tp == 2
    p = auto(4, QWEN3_30B, topo("pcie", 4, mem_gib=141), ep=2)
    assert p.is_expert_parallel and p.ep == 2


def test_a_slow_link_moves_auto_away_from_the_exchange():
    """Mixtral fits each 141 GiB card: over a fast link sharding wins (each rank reads
    half the experts); over a link 100x slower and laggier, a plan without per-layer
    collectives does."""
    t = topo("pcie", 2, mem_gib=141)
    slow_link = profile("slow", gbps=0.24, latency_s=2e-3)
    fast = auto(2, MIXTRAL, t, batch=16, prof=NVLINK)
    slow = auto(2, MIXTRAL, t, batch=16, prof=slow_link)
    assert predict(fast, MIXTRAL, NVLINK, 16, 512).terms["collectives"] > 0
    assert predict(slow, MIXTRAL, slow_link, 16, 512).terms["collectives"] == 0
    assert slow.strategy == "replicate" and fast.strategy != "replicate"


def test_model_that_fits_nowhere_is_refused_with_a_profile():
    with pytest.raises(PlanError, match="more than the 2 ranks hold together.*add ranks"):
        auto(2, MIXTRAL, topo("pcie", 2, mem_gib=24))


def test_world_one_and_rules_without_a_profile():
    assert auto(1, QWEN3_30B, topo("pcie", 1)).reason.startswith("auto: world size 1")
    t = topo("pcie", 4, mem_gib=24)
    rules = build_plan(StrategyConf(), ParallelConf(), 4, t, SHAPE)
    noted = build_plan(
        StrategyConf(),
        ParallelConf(),
        4,
        t,
        SHAPE,
        profile=ProfileChoice(None, "no shipped profile for pcie (conf/profiles), rule-based"),
    )
    assert key(rules) == key(noted) and noted.reason.startswith(rules.reason)
    assert "no shipped profile for pcie" in noted.reason


# ------------------------------------------------------------------------------ profiles


def test_select_profile_closest_to_the_topology(tmp_path):
    shipped = {
        "a": profile("nv8", link="nvlink", p2p=True, gpus=8),
        "b": profile("nv2", link="nvlink", p2p=True, gpus=2),
        "c": profile("pcie_p2p_off", link="pcie", p2p=False, gpus=2),
        "d": profile("pcie_p2p_on", link="pcie", p2p=True, gpus=4),
    }
    choice = select_profile(None, topo("nvlink", 4), shipped)
    assert choice.profile.name == "nv2" and "closest to nvlink" in choice.why  # |2-4| < |8-4|
    assert select_profile(None, topo("pcie", 4), shipped).profile.name == "pcie_p2p_off"
    assert select_profile(None, topo("cpu"), shipped).profile is None
    none = select_profile(None, topo("nvlink", 2), {"c": shipped["c"]})
    assert none.profile is None and "no shipped profile for nvlink" in none.why
    f = tmp_path / "mine.json"
    f.write_text(PCIE.to_json())
    given = select_profile(str(f), topo("nvlink", 2), shipped)
    assert given.profile == PCIE and "plan.profile=" in given.why
    rules = select_profile("none", topo("nvlink", 2), shipped)
    assert rules.profile is None and "rule-based" in rules.why


def test_plan_profile_is_a_config_field(tmp_path):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[f"plan.profile={tmp_path}/p.json"])
        assert cfg.plan.profile == f"{tmp_path}/p.json"
        assert compose(config_name="config").plan.profile is None


# ------------------------------------------------------------------------------ tools/plan.py


def run_tool(*argv) -> tuple[int, str]:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import plan as tool
    finally:
        sys.path.pop(0)
    out = io.StringIO()
    with redirect_stdout(out):
        rc = tool.main(list(argv))
    return rc, out.getvalue()


def test_tools_plan_rank_prints_ranked_rows(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(PCIE.to_json())
    rc, out = run_tool(
        "--rank", "--world-size", "4", "--model", "qwen3_30b_a3b", "--topology", "pcie",
        "--gpu-memory-gib", "48", "--profile", str(f), "--batch", "16", "--top", "6",
    )  # fmt: skip
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line[:2].strip().isdigit()]
    assert len(rows) == 6
    assert "fastest that fits" in rows[0] and all("slower by" in r or "NO" in r for r in rows[1:])
    fitting_ms = [float(r.split(" yes ")[0].split()[-4]) for r in rows if " yes " in r]
    assert fitting_ms == sorted(fitting_ms)
    rc, out = run_tool(
        "--rank", "--nodes", "2", "--gpus-per-node", "2", "--model", "tiny", "--topology",
        "nvlink", "--gpu-memory-gib", "80", "--profile", str(f), "--json",
    )  # fmt: skip
    assert rc == 0, out
    import json

    data = json.loads(out)
    assert data["inter_node_profile"] == "ethernet_100g" and data["world_size"] == 4
    assert all(r["degrees"]["tp"] <= 2 and r["degrees"]["ep"] <= 2 for r in data["rows"])


def test_tools_plan_rank_without_a_profile_is_one_line(capsys):
    rc, _ = run_tool("--rank", "--world-size", "2", "--topology", "cpu")
    err = capsys.readouterr().err
    assert rc == 2 and "give --profile FILE" in err and err.count("\n") == 1


def test_memory_and_fits_follow_available_bytes():
    plan = plan_with_degrees("replicate", 2)
    w = model_weight_bytes(QWEN3_30B, 2)
    pred = predict(plan, QWEN3_30B, PCIE, 2, 512, available_bytes=None)
    assert pred.fits is None and pred.memory_bytes >= math.ceil((w.dense + w.experts) * 1.2)
    assert predict(plan, QWEN3_30B, PCIE, 2, 512, available_bytes=pred.memory_bytes).fits
    assert not predict(plan, QWEN3_30B, PCIE, 2, 512, available_bytes=pred.memory_bytes - 1).fits


def test_decode_collectives_read_the_graph_timings_when_the_profile_has_them(tmp_path):
    """A profile with graph_collectives prices decode's all-reduces from them (tp_experts'
    decode collectives scale with the graph table, prefill's stay eager); ops without graph
    samples keep the eager-less-dispatch fallback; a bad graph table is one line."""
    plan = plan_with_degrees("tp_experts", 2, tp=2)
    sizes = [2.0**p for p in range(10, 23)]  # H * 2 bytes = 2^13 is a sample
    graph = {
        "all_reduce": {"2": [[s, 5e-6 + s / 24e9] for s in sizes]},
    }
    with_graph = dataclasses.replace(PCIE, graph_collectives=graph)
    eager_p, graph_p = (predict(plan, MIXTRAL, p, 1, 512) for p in (PCIE, with_graph))
    layers = MIXTRAL.num_hidden_layers
    # two all-reduces per layer at batch 1 (H * 2 bytes), each now 5 us + bytes / 24 GB/s
    want = 2 * layers * (5e-6 + MIXTRAL.hidden_size * 2 / 24e9) * 1e3
    assert graph_p.terms["collectives"] == pytest.approx(want, rel=1e-6)
    assert graph_p.terms["collectives"] < eager_p.terms["collectives"]
    assert graph_p.prefill_terms["collectives"] == eager_p.prefill_terms["collectives"]
    ep = plan_with_degrees("ep_allgather", 2)  # all_gather / reduce_scatter: no graph samples
    assert predict(ep, MIXTRAL, with_graph, 2, 512).terms["collectives"] == pytest.approx(
        predict(ep, MIXTRAL, PCIE, 2, 512).terms["collectives"]
    )
    bad = tmp_path / "bad.json"
    data = dataclasses.asdict(with_graph)
    data["graph_collectives"]["all_reduce"]["2"] = [[0, 1.0]]
    bad.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="graph_collectives.all_reduce.2") as info:
        MachineProfile.load(bad)
    assert "\n" not in str(info.value)

"""The planner on quantized weights: bytes as stored (fp8 + float32 block scales, MXFP4 +
e8m0 scales), the issue's examples on 96 GiB PCIe cards, refusal of a TP / expert-TP split
that cuts a scale block, the fp8 / mxfp4 conf/model files, and tools/plan.py's bytes per
rank."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import moe_ext.plan as plan_module
from moe_ext.config import ParallelConf, StrategyConf, TopologyConf, register_configs
from moe_ext.model.args import ModelArgs
from moe_ext.model.parallelize import RankCoords, shard_slices, take_shard
from moe_ext.model.weights import init_random_full
from moe_ext.plan import (
    PlanError,
    build_plan,
    estimate_memory,
    model_param_counts,
    model_weight_bytes,
    plan_with_degrees,
)
from moe_ext.quant.layout import quantize_state, stored_requests
from moe_ext.topology import Topology, resolve_topology

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30
FP8 = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic")
MXFP4_NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]
QUANTIZED_CONFS = {  # quantized conf -> the bf16 conf of the same shape
    "qwen3_235b_a22b_fp8": "qwen3_235b_a22b",
    "qwen3_30b_a3b_fp8": "qwen3_30b_a3b",
    "gpt_oss_120b_mxfp4": "gpt_oss_120b",
    "gpt_oss_20b_mxfp4": "gpt_oss_20b",
}


def conf(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))


def composed(name: str) -> ModelArgs:
    """conf/model/<name>.yaml as the launcher composes it (``model=<name>``)."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={name}"])
    return ModelArgs.from_model_conf(cfg.model)


def pcie(n: int, mem_gib: float = 96.0) -> Topology:
    """A PCIe box of ``n`` cards with ``topology.gpu_memory_gib=mem_gib`` (as test_plan)."""
    host = Topology(kind="cpu", host_memory_bytes=64 * GIB, cpu_count=2)
    return resolve_topology(
        TopologyConf(kind="pcie", num_gpus=n, gpu_memory_gib=mem_gib), n, probe=lambda: host
    )


def auto(world: int, model: ModelArgs, **degrees):
    return build_plan(StrategyConf(name="auto"), ParallelConf(**degrees), world, pcie(world), model)


def tiny(quantization: dict) -> ModelArgs:
    """conf/model/tiny.yaml (H 64, F 32, 4 heads / 2 kv heads of 16, 8 experts, 4 layers)
    with a quantization_config."""
    c = conf("tiny")
    c["quantization_config"] = quantization
    return ModelArgs.from_model_conf(c)


TINY_FP8 = dict(FP8, weight_block_size=[16, 16])
TINY_MXFP4 = dict(quant_method="mxfp4")


# ------------------------------------------------------------------------------ the issue


def test_gpt_oss_120b_mxfp4_replicates_on_two_96_gib_cards():
    model = composed("gpt_oss_120b_mxfp4")
    p = auto(2, model)
    assert p.strategy == "replicate" and (p.dp, p.ep) == (2, 1)
    est = estimate_memory(p, model, pcie(2))
    assert est.needed_bytes <= est.available_bytes == 96 * GIB
    # the same shape in bf16 (218 GiB) does not even fit both cards: the bytes decided it
    with pytest.raises(PlanError, match="217.6 GiB"):
        auto(2, composed("gpt_oss_120b"))


def test_qwen3_235b_fp8_splits_over_four_96_gib_cards_and_fits():
    model = composed("qwen3_235b_a22b_fp8")
    p = auto(4, model)
    assert p.is_expert_parallel and p.ep == 4 and p.world_size == 4
    assert "WARNING" not in p.reason and "experts do not fit one rank" in p.reason
    est = estimate_memory(p, model, pcie(4))
    assert est.needed_bytes <= est.available_bytes
    assert est.scale_bytes > 0  # float32 scales counted with the weights


def test_qwen3_235b_bf16_on_four_96_gib_cards_is_refused_with_the_reason():
    with pytest.raises(PlanError) as err:
        auto(4, composed("qwen3_235b_a22b"))
    text = str(err.value)
    assert "\n" not in text
    assert "437.9 GiB" in text and "4 x 96.0 GiB" in text  # the weights and the memory
    assert "add ranks" in text and "quantized checkpoint" in text  # the fixes


# ------------------------------------------------------------------------------ bytes


@pytest.mark.parametrize("name", sorted(QUANTIZED_CONFS))
def test_quantized_confs_are_the_bf16_shapes_plus_quantization_config(name):
    quantized, plain = conf(name), conf(QUANTIZED_CONFS[name])
    q = quantized.pop("quantization_config")
    assert quantized.pop("name") == name and plain.pop("name") == QUANTIZED_CONFS[name]
    assert quantized == plain
    if name.endswith("_fp8"):
        assert q == dict(FP8, weight_block_size=[128, 128])
    else:
        assert q == dict(quant_method="mxfp4", modules_to_not_convert=MXFP4_NOT_CONVERTED)
    args = ModelArgs.from_model_conf(conf(name))
    assert args.quantization.method == name.rsplit("_", 1)[1]
    assert model_param_counts(args) == model_param_counts(
        ModelArgs.from_model_conf(conf(QUANTIZED_CONFS[name]))
    )


def _expected_bytes(args: ModelArgs, quantized, dtype_bytes: int) -> tuple[int, int]:
    """(all, expert) stored bytes by hand from the logical shapes: ``quantized(name, shape)``
    says whether a weight is stored quantized."""
    total = experts = 0
    q = args.quantization
    for name, shape in args.family.param_shapes(args).items():
        n = math.prod(shape)
        if not quantized(name, shape):
            b = n * dtype_bytes
        elif q.method == "fp8":  # 1 byte per value, a float32 per block of the last two dims
            bo, bi = q.weight_block_size
            *lead, rows, cols = shape
            b = n + 4 * math.prod(lead) * math.ceil(rows / bo) * math.ceil(cols / bi)
        else:  # 4 bits per value, one byte per 32 values
            b = n // 2 + n // 32
        total += b
        experts += b if ".mlp.experts." in name else 0
    return total, experts


def test_fp8_conf_counts_one_byte_and_block_scales():
    args = ModelArgs.from_model_conf(conf("qwen3_30b_a3b_fp8"))

    def quantized(name, shape):  # every projection; embeddings, lm_head, norms, router not
        return name.endswith("_proj.weight") or name.endswith("_proj")

    w = model_weight_bytes(args, dtype_bytes=2)
    assert (w.dense + w.experts, w.experts) == _expected_bytes(args, quantized, 2)
    total, _ = model_param_counts(args)
    assert 0.5 < (w.dense + w.experts) / (2 * total) < 0.52  # about half of bf16


def test_mxfp4_conf_counts_half_a_byte_and_one_scale_per_32():
    args = ModelArgs.from_model_conf(conf("gpt_oss_120b_mxfp4"))

    def quantized(name, shape):  # routed expert weights only (not their biases)
        return name.endswith(("experts.gate_up_proj", "experts.down_proj"))

    w = model_weight_bytes(args, dtype_bytes=2)
    assert (w.dense + w.experts, w.experts) == _expected_bytes(args, quantized, 2)
    assert w.dense == model_weight_bytes(ModelArgs.from_model_conf(conf("gpt_oss_120b"))).dense


def _held_bytes(stored: dict, args: ModelArgs, p) -> list[tuple[int, int, int, int]]:
    """Per rank: (all, expert, scale, expert scale) bytes of the stored tensors it holds,
    cut from the full quantized state by shard_slices -> stored_requests."""
    out = []
    for rank in range(p.world_size):
        requests = stored_requests(shard_slices(p, RankCoords.of(p, rank), args), args)
        total = experts = scales = expert_scales = 0
        for name, request in requests.items():
            n = take_shard(stored[name], request).nbytes
            expert, scale = ".mlp.experts." in name, name.endswith(("_scale_inv", "_scales"))
            total += n
            experts += n if expert else 0
            scales += n if scale else 0
            expert_scales += n if expert and scale else 0
        out.append((total, experts, scales, expert_scales))
    return out


@pytest.mark.parametrize("quantization", [TINY_FP8, TINY_MXFP4], ids=["fp8", "mxfp4"])
@pytest.mark.parametrize(
    "strategy, world, tp, ep",
    [
        ("replicate", 1, 1, None),
        ("replicate", 2, 1, None),
        ("ep_nccl", 2, 1, None),
        ("ep_allgather", 4, 1, None),
        ("ep_nccl", 4, 1, 2),
        ("tp_experts", 2, 2, None),  # mxfp4 refuses it (see below); fp8 experts split on F
        ("ep_nccl", 4, 2, None),
    ],
)
def test_bytes_per_rank_equal_the_stored_tensors_each_rank_holds(
    quantization, strategy, world, tp, ep
):
    args = tiny(quantization)
    try:
        p = plan_with_degrees(strategy, world, tp=tp, ep=ep, model=args)
    except PlanError:
        assert quantization is TINY_MXFP4 and strategy == "tp_experts"
        return
    # fp32 logical weights (so unquantized tensors count 4 bytes) -> the stored tensors
    stored = quantize_state(init_random_full(args, seed=0), args)
    held = _held_bytes(stored, args, p)
    est = estimate_memory(p, args, Topology(kind="cpu", host_memory_bytes=GIB), dtype_bytes=4)
    assert est.expert_bytes == max(h[1] for h in held)  # experts: exact under every plan
    if tp == 1:  # attention, embeddings and norms are whole on every rank: exact too
        assert est.total_bytes == max(h[0] for h in held)
        assert est.scale_bytes == max(h[2] for h in held) > 0
    else:  # the planner divides the dense bytes by tp (embeddings are held whole: estimate)
        w = model_weight_bytes(args, 4)
        assert est.dense_bytes == math.ceil(w.dense / tp)
        assert est.scale_bytes == math.ceil(w.dense_scales / tp) + max(h[3] for h in held)
    if world == 1:  # the whole stored state, counted independently
        assert est.total_bytes == sum(t.nbytes for t in stored.values())


# ------------------------------------------------------------------------------ scale blocks


def test_expert_tp_that_cuts_an_fp8_block_is_refused_naming_a_degree_that_works():
    args = tiny(TINY_FP8)  # F = 32, blocks of 16 rows: etp 4 leaves 8 rows per rank
    with pytest.raises(PlanError) as err:
        plan_with_degrees("tp_experts", 4, tp=4, model=args)
    text = str(err.value)
    assert "\n" not in text and "tp=4 (etp=4)" in text
    assert "layers.0.mlp.experts.gate_up_proj" in text and "blocks of 16" in text
    assert "parallel.tp=2 keeps whole blocks" in text
    # the degree it names works, under build_plan too
    p = build_plan(StrategyConf(name="tp_experts"), ParallelConf(tp=2), 4, pcie(4), args)
    assert (p.tp, p.etp, p.dp) == (2, 2, 2)
    with pytest.raises(PlanError, match="parallel.tp=2 keeps whole blocks"):
        build_plan(StrategyConf(name="tp_experts"), ParallelConf(), 4, pcie(4), args)
    # auto with a given etp takes tp_experts and is refused the same way
    with pytest.raises(PlanError, match="experts.gate_up_proj.*parallel.tp=2 keeps"):
        auto(4, args, etp=4)


def test_attention_tp_that_cuts_an_fp8_block_is_refused():
    args = tiny(dict(FP8, weight_block_size=[32, 16]))  # kv heads of 16 rows: tp 2 cuts
    with pytest.raises(PlanError) as err:
        build_plan(StrategyConf(name="replicate"), ParallelConf(tp=2), 2, pcie(2), args)
    text = str(err.value)
    assert "layers.0.self_attn.k_proj.weight" in text and "parallel.tp=1 keeps whole" in text
    assert build_plan(StrategyConf(name="replicate"), ParallelConf(), 2, pcie(2), args).tp == 1


def test_mxfp4_expert_tp_without_a_working_degree_points_at_whole_experts():
    args = tiny(TINY_MXFP4)  # down_proj's F = 32 columns: etp 2 leaves half a group
    with pytest.raises(PlanError) as err:
        plan_with_degrees("tp_experts", 2, tp=2, model=args)
    text = str(err.value)
    assert "experts.down_proj" in text and "mxfp4" in text
    assert "no TP degree of this world keeps whole blocks; use an ep_* strategy" in text
    assert plan_with_degrees("ep_nccl", 2, model=args).ep == 2  # whole experts are fine


def test_the_shipped_fp8_conf_refuses_expert_tp_that_cuts_128_row_blocks():
    args = ModelArgs.from_model_conf(conf("qwen3_30b_a3b_fp8"))  # F = 768 = 6 blocks
    with pytest.raises(PlanError, match=r"parallel.tp=2 keeps whole blocks"):
        plan_with_degrees("tp_experts", 4, tp=4, model=args)  # 192 rows per rank
    assert plan_with_degrees("tp_experts", 2, tp=2, model=args).etp == 2
    big = ModelArgs.from_model_conf(conf("qwen3_235b_a22b_fp8"))  # F = 1536 = 12 blocks
    with pytest.raises(PlanError, match=r"parallel.tp=2 or parallel.tp=4 keep whole blocks"):
        plan_with_degrees("tp_experts", 8, tp=8, model=big)


def test_auto_skips_an_ep_candidate_that_cuts_a_block(monkeypatch):
    """auto on PCIe takes the smallest fitting EP degree (2 here, as test_plan shows); a
    candidate refused by the block check is passed over for the next."""
    qwen30b = ModelArgs.from_model_conf(conf("qwen3_30b_a3b"))
    topo = pcie(4, mem_gib=48)
    assert build_plan(StrategyConf(), ParallelConf(), 4, topo, qwen30b).ep == 2
    real = plan_module._block_cut
    monkeypatch.setattr(
        plan_module,
        "_block_cut",
        lambda p, m: ValueError("cut") if p.ep == 2 else real(p, m),
    )
    assert build_plan(StrategyConf(), ParallelConf(), 4, topo, qwen30b).ep == 4


# ------------------------------------------------------------------------------ tools/plan.py


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tools_plan", REPO / "tools" / "plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the rule-based plan the tests recompute with build_plan (no profile): these check the byte
# accounting of a plan; the cost model's picks are tested in test_cost.py
TOOL_ARGS = [
    "--world-size",
    "4",
    "--topology",
    "pcie",
    "--gpu-memory-gib",
    "96",
    "plan.profile=none",
]


def test_tool_prints_bytes_per_rank_and_the_quantization():
    cmd = [sys.executable, str(REPO / "tools" / "plan.py"), *TOOL_ARGS]
    res = subprocess.run(
        cmd + ["--model", "qwen3_235b_a22b_fp8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "fp8 e4m3, 128x128 blocks" in out and "fits" in out
    args = composed("qwen3_235b_a22b_fp8")
    est = estimate_memory(auto(4, args), args, pcie(4))
    assert f"bytes per rank: {est.total_bytes:,} (weights incl. {est.scale_bytes:,}" in out


def test_tool_json_and_refusal(capsys):
    tool = _tool()
    assert tool.main([*TOOL_ARGS, "--model", "gpt_oss_20b_mxfp4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["quantization"] == "mxfp4 (e2m1, e8m0 scale per 32)"
    args = composed("gpt_oss_20b_mxfp4")
    est = estimate_memory(auto(4, args), args, pcie(4))
    assert data["memory_per_rank"]["total_bytes"] == est.total_bytes
    assert data["memory_per_rank"]["scale_bytes"] == est.scale_bytes > 0
    assert data["model"]["weight_bytes"] == sum(model_weight_bytes(args)[:2])

    assert tool.main([*TOOL_ARGS, "--model", "qwen3_235b_a22b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: auto:") and "\n" not in err and "quantized checkpoint" in err


def test_unquantized_bytes_are_unchanged():
    """Without quantization_config every tensor counts dtype_bytes per parameter."""
    args = ModelArgs.from_model_conf(conf("tiny"))
    total, experts = model_param_counts(args)
    w = model_weight_bytes(args, dtype_bytes=2)
    assert (w.dense + w.experts, w.experts, w.dense_scales, w.expert_scales) == (
        2 * total,
        2 * experts,
        0,
        0,
    )
    assert torch.float8_e4m3fn.itemsize == 1  # the fp8 count above relies on it

"""Parallelized native model (2 gloo ranks) == single-rank model: greedy ids for tp=2, pp=2,
ep_nccl (dp=2, lockstep) and ep_nccl with tp=2 (token split); plus sharding/seeding units."""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from omegaconf import OmegaConf

from moe_ext.config import GenerateConf, ModelConf
from moe_ext.model import ModelArgs, Transformer, generate
from moe_ext.model.parallelize import RankCoords, parallelize, shard_slices, stage_layers, take_shard
from moe_ext.model.weights import init_random_, init_random_full, random_tensor
from moe_ext.plan import ParallelPlan
from tests.multirank import run_ranks

DISPATCHERS = {
    "replicate": "moe_ext.moe.dispatch.local.LocalDispatcher",
    "tp_experts": "moe_ext.moe.dispatch.tp_sharded.TPShardedDispatcher",
    "ep_nccl": "moe_ext.moe.dispatch.nccl_a2a.AllToAllDispatcher",
    "ep_allgather": "moe_ext.moe.dispatch.allgather_rs.AllGatherDispatcher",
}
PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 9, 200], [256, 33, 34, 35, 36], [256, 1]]
MAX_NEW = [10, 3, 7, 12]  # different lengths: one dp replica finishes first (lockstep)


def model_conf(name: str):
    """conf/model/<name>.yaml validated against the ModelConf schema (as Hydra does)."""
    raw = OmegaConf.load(f"conf/model/{name}.yaml")
    assert raw.pop("defaults") == ["base_model"]
    return OmegaConf.merge(OmegaConf.structured(ModelConf), raw)


def tiny_args() -> ModelArgs:
    return ModelArgs.from_model_conf(model_conf("tiny"))


def qwen2_args() -> ModelArgs:
    # dense layer (mlp_only_layers), shared expert, q/k/v bias, nKV=1 < tp (kv replicated)
    return ModelArgs(model_type="qwen2_moe", vocab_size=260, hidden_size=48, intermediate_size=64,
                     moe_intermediate_size=16, shared_expert_intermediate_size=24,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                     num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], qkv_bias=True)


def plan_of(strategy, tp=1, pp=1, dp=1, ep=1, etp=1, world=2) -> ParallelPlan:
    return ParallelPlan(strategy=strategy, world_size=world, tp=tp, pp=pp, dp=dp, ep=ep, etp=etp,
                        edp=tp * dp // (ep * etp), dispatcher=DISPATCHERS[strategy], reason="test")


def _reference(args):
    model = Transformer(args)
    model.load_state_dict(init_random_full(args), strict=True)
    return generate(model, PROMPTS, GenerateConf(), eos_id=257, pad_id=258, max_new_tokens=MAX_NEW)


def _parallel_body(rank, world, cases):
    from moe_ext.groups import ProcessGroups

    for family, plan_kwargs, from_meta in cases:
        args = tiny_args() if family == "tiny" else qwen2_args()
        expected = _reference(args).tokens
        plan = plan_of(**plan_kwargs)
        groups = ProcessGroups.build(plan, "gloo", timedelta(seconds=60))
        if from_meta:  # torchtitan path: build on meta, shard, then materialise this rank's slice
            with torch.device("meta"):
                model = Transformer(args)
            parallelize(model, plan, groups)
            init_random_(model, requests=shard_slices(plan, groups, args), device="cpu")
        else:  # slice a full model in place
            model = Transformer(args)
            model.load_state_dict(init_random_full(args))
            parallelize(model, plan, groups)
        got = generate(model, PROMPTS, GenerateConf(max_batch_size=3), eos_id=257, pad_id=258,
                       max_new_tokens=MAX_NEW)
        assert got.tokens == expected, (family, plan_kwargs, got.tokens, expected)


@pytest.mark.multirank
def test_parallel_strategies_match_single_rank():
    cases = [
        ("tiny", dict(strategy="replicate", tp=2), True),
        ("tiny", dict(strategy="replicate", pp=2), False),
        ("tiny", dict(strategy="ep_nccl", dp=2, ep=2), True),
        ("qwen2", dict(strategy="ep_nccl", tp=2, ep=2), False),
        ("qwen2", dict(strategy="tp_experts", tp=2, etp=2), True),
    ]
    run_ranks(_parallel_body, world_size=2, args=(cases,))


def test_shards_of_full_random_weights_equal_sharded_init():
    args = qwen2_args()
    full = init_random_full(args, seed=7)
    plan = plan_of("tp_experts", tp=2, etp=2)
    for rank in range(2):
        coords = RankCoords.of(plan, rank)
        requests = shard_slices(plan, coords, args)
        assert set(requests) == set(full)  # pp=1: every tensor on every rank
        for name, request in requests.items():
            local = take_shard(full[name], request)
            direct = random_tensor(name, tuple(full[name].shape), args, 7, request)
            torch.testing.assert_close(direct, local, rtol=0, atol=0)
        # D = 48 / 4 = 12; the single kv head is replicated on both TP ranks
        assert requests["layers.0.self_attn.k_proj.weight"].shape((12, 48)) == (12, 48)
        assert requests["layers.0.self_attn.q_proj.weight"].shape((48, 48)) == (24, 48)
        assert requests["layers.0.mlp.experts.gate_up_proj"].shape((4, 32, 48)) == (4, 16, 48)


def test_stage_layers_cover_every_layer_once():
    for n, pp in [(4, 2), (5, 2), (7, 3), (3, 3)]:
        layers = [i for s in range(pp) for i in stage_layers(n, pp, s)]
        assert layers == list(range(n))


def test_unsupported_model_type_is_one_line_error():
    with pytest.raises(ValueError, match="supported: mixtral, qwen2_moe, qwen3_moe"):
        ModelArgs.from_hf_config({"model_type": "llama"})


def test_real_shapes_build_on_meta():
    for name in ("mixtral_8x7b", "qwen3_30b_a3b", "qwen2_57b_a14b"):
        args = ModelArgs.from_model_conf(model_conf(name))
        with torch.device("meta"):
            model = Transformer(args)
        total = sum(p.numel() for p in model.parameters())
        expected = {"mixtral_8x7b": 46.7e9, "qwen3_30b_a3b": 30.5e9, "qwen2_57b_a14b": 57.4e9}[name]
        assert abs(total - expected) / expected < 0.01, (name, total)

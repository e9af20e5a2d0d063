"""Sharding and seeding of the parallelized native model, in one process: shards of the full
random weights equal the sharded init, pipeline stages cover every layer once, real model
shapes build on meta. On ranks: tests/multirank/test_model_parallel.py."""

from __future__ import annotations

import torch

from moe_ext.model import ModelArgs, Transformer
from moe_ext.model.parallelize import RankCoords, shard_slices, stage_layers, take_shard
from moe_ext.model.weights import init_random_full, random_tensor
from tests.support import model_conf, plan_of, qwen2_args


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


def test_real_shapes_build_on_meta():
    for name in ("mixtral_8x7b", "qwen3_30b_a3b", "qwen2_57b_a14b"):
        args = ModelArgs.from_model_conf(model_conf(name))
        with torch.device("meta"):
            model = Transformer(args)
        total = sum(p.numel() for p in model.parameters())
        expected = {"mixtral_8x7b": 46.7e9, "qwen3_30b_a3b": 30.5e9, "qwen2_57b_a14b": 57.4e9}[name]
        assert abs(total - expected) / expected < 0.01, (name, total)

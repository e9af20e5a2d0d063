"""gpt_oss against transformers 5 on tiny random checkpoints (CPU, fp32): logits and greedy
ids (prompts and continuations longer than the sliding window, left-padded batches), the
ring-buffer cache of sliding layers, the router and the clamped-SwiGLU experts with biases
(every torch path, expert-TP shards), the planner's numbers and bad configs. Biases and
sinks are drawn non-zero, and the SwiGLU limit is low enough to clamp, so a missing term
fails. Checkpoint conversion: test_family_gpt_oss_ckpt.py; ranks:
tests/multirank/test_family_gpt_oss_ranks.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from moe_ext.config import GenerateConf
from moe_ext.errors import MoeExtError
from moe_ext.model import ModelArgs, Transformer, generate
from moe_ext.model.sink_attention import SinkAttention
from tests.support import GPT_OSS_NEW_TOKENS as NEW_TOKENS
from tests.support import GPT_OSS_PROMPTS as PROMPTS
from tests.support import GPT_OSS_SHAPE as SHAPE
from tests.support import GPT_OSS_WINDOW as WINDOW
from tests.support import REPO, hf_greedy_each
from tests.support import gpt_oss_hf_model as hf_model
from tests.support import gpt_oss_native_state as native_state

transformers = pytest.importorskip("transformers")


def hf_greedy(model, prompts=PROMPTS, new_tokens=NEW_TOKENS) -> list[list[int]]:
    return hf_greedy_each(model, prompts, new_tokens)


def native_model(hf) -> Transformer:
    args = ModelArgs.from_hf_config(hf.config.to_dict())
    model = Transformer(args).eval()
    model.load_state_dict(native_state(hf.state_dict()), strict=True)
    return model


@pytest.fixture(scope="module")
def pair():
    hf = hf_model()
    return hf, native_model(hf)


def test_config_maps_every_gpt_oss_feature(pair):
    hf, model = pair
    args = model.args
    assert args.layer_types == hf.config.layer_types
    assert args.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert (args.sliding_window, args.swiglu_limit, args.swiglu_alpha) == (WINDOW, 2.0, 1.702)
    assert args.qkv_bias and args.o_bias and args.attention_sinks
    assert args.router_bias and args.expert_bias and args.score_func == "topk_softmax"
    assert args.rope_scaling["truncate"] is False and args.rope_type == "yarn"
    windows = [block.self_attn.window for block in model.layers.values()]
    assert windows == [WINDOW, None, WINDOW, None]


def test_logits_equal_transformers(pair):
    hf, model = pair
    ids = torch.randint(2, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_missing_terms_change_the_logits(pair):
    """The checks above can fail: dropping the sinks, the biases or the clamp, or
    attending past the window, each moves the logits well beyond the tolerance."""
    hf, model = pair
    ids = torch.arange(2, 22)[None]  # 20 tokens: longer than the window
    with torch.no_grad():
        reference = model(ids)
        changes = {
            "sinks": lambda m: [b.self_attn.sinks.zero_() for b in m.layers.values()],
            "router bias": lambda m: [b.mlp.router.bias.zero_() for b in m.layers.values()],
            "down bias": lambda m: [
                b.mlp.experts.down_proj_bias.zero_() for b in m.layers.values()
            ],
            "window": lambda m: [setattr(b.self_attn, "window", None) for b in m.layers.values()],
            "clamp": lambda m: [
                setattr(b.mlp.experts, "options", _unclamped(b.mlp.experts.options))
                for b in m.layers.values()
            ],
        }
        for label, change in changes.items():
            changed = native_model(hf)
            change(changed)
            assert (changed(ids) - reference).abs().max() > 1e-3, label


def _unclamped(options):
    import dataclasses

    return dataclasses.replace(options, swiglu_limit=1e9)


def test_greedy_ids_equal_transformers_generate(pair):
    """Left-padded batches (prompts of 3..19 tokens, window 6) through prefill and the ring
    cache, against transformers' generate one prompt at a time."""
    hf, model = pair
    expected = hf_greedy(hf)
    got = generate(
        model,
        PROMPTS,
        GenerateConf(max_batch_size=4),
        eos_id=None,
        pad_id=0,
        max_new_tokens=NEW_TOKENS,
    )
    assert got.tokens == expected
    assert len({tuple(t) for t in expected}) == len(PROMPTS)  # not one degenerate answer


def test_sliding_layers_cache_only_the_window(pair):
    _, model = pair
    model.setup_caches(3, 256)
    shapes = [tuple(b.self_attn.kv_cache.k.shape) for b in model.layers.values()]
    assert shapes == [(3, 2, WINDOW, 16), (3, 2, 256, 16)] * 2
    model.setup_caches(3, 4)  # shorter than the window: the ring is the whole cache
    assert tuple(model.layers["0"].self_attn.kv_cache.k.shape) == (3, 2, 4, 16)


@torch.no_grad()
def test_cached_decode_and_chunked_prefill_equal_a_full_forward(pair):
    """Step-by-step decode through the ring (30 steps, five times round it) and a prefill
    in chunks of 7, 1, 9 and 5 tokens give the logits of one uncached forward."""
    _, model = pair
    ids = torch.randint(2, 128, (2, 22), generator=torch.Generator().manual_seed(3))
    kv_start = torch.tensor([0, 4])  # the second sequence left-padded by 4
    full = model(ids, kv_start=kv_start)  # [2, 22, V], no cache
    model.setup_caches(2, 128)
    model(ids[:, :8], torch.arange(8), kv_start, 8, use_cache=True)
    for slot in range(8, 22):
        step = model(ids[:, slot : slot + 1], torch.tensor([slot]), kv_start, use_cache=True)
        torch.testing.assert_close(step[:, 0], full[:, slot], rtol=1e-5, atol=1e-5)
    model.setup_caches(2, 128)
    start, chunks = 0, []
    for size in (7, 1, 9, 5):
        slots = torch.arange(start, start + size)
        chunks.append(model(ids[:, slots], slots, kv_start, start + size, use_cache=True))
        start += size
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_query_blocks_see_only_their_window(pair, monkeypatch):
    """Prefill scored in blocks of 3 query rows, each over the keys its window reaches
    (sliding layers: from the window start, the ring only while the window reaches into
    it), equals the one-block computation, uncached and through the cache."""
    from moe_ext.model import sink_attention

    _, model = pair
    ids = torch.randint(2, 128, (2, 22), generator=torch.Generator().manual_seed(7))
    kv_start = torch.tensor([3, 0])
    whole = model(ids, kv_start=kv_start)
    model.setup_caches(2, 64)
    first = model(ids[:, :9], torch.arange(9), kv_start, 9, use_cache=True)
    rest = model(ids[:, 9:], torch.arange(9, 22), kv_start, 22, use_cache=True)
    monkeypatch.setattr(sink_attention, "SCORE_BYTES", 3 * 2 * 4 * 64 * 4)  # 3 rows of 64 keys
    torch.testing.assert_close(model(ids, kv_start=kv_start), whole, rtol=1e-5, atol=1e-5)
    model.setup_caches(2, 64)
    first_b = model(ids[:, :9], torch.arange(9), kv_start, 9, use_cache=True)
    rest_b = model(ids[:, 9:], torch.arange(9, 22), kv_start, 22, use_cache=True)
    torch.testing.assert_close(torch.cat([first_b, rest_b], 1), torch.cat([first, rest], 1))
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=1e-5, atol=1e-5)


# ---- the MoE block's pieces -------------------------------------------------------------


def _hf_layer(hf, layer=0):
    return hf.model.layers[layer].mlp


@torch.no_grad()
def test_router_equals_transformers(pair):
    hf, model = pair
    x = torch.randn(40, 64)
    _, scores, idx = _hf_layer(hf).router(x)
    routing = model.layers["0"].mlp.router(x)
    assert torch.equal(routing.expert_idx, idx)
    torch.testing.assert_close(routing.weights, scores, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@torch.no_grad()
def test_experts_equal_transformers(pair, backend):
    hf, model = pair
    hf_experts = _hf_layer(hf).experts
    x = torch.randn(40, 64) * 3
    gate_up = x @ hf_experts.gate_up_proj[3] + hf_experts.gate_up_proj_bias[3]
    assert (gate_up[:, 0::2] > 2.0).any() and (gate_up[:, 1::2].abs() > 2.0).any()  # clamps act
    layer = model.layers["0"].mlp
    layer.experts.backend = backend
    try:
        if backend == "grouped_mm" and not layer.experts.uses_grouped_mm(x):
            pytest.skip("torch's grouped GEMM does not run these operands here")
        routing = layer.router(x)
        expected = hf_experts(x, routing.expert_idx, routing.weights)
        got = layer(x)
    finally:
        layer.experts.backend = "auto"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_expert_tp_shards_sum_to_the_whole_expert(pair):
    """Two F shards (gate/up rows and their biases split, down bias added by shard 0
    only) sum to the unsplit experts."""
    from moe_ext.moe.dispatch.base import Dispatcher
    from moe_ext.moe.layer import build_moe_layer, load_full_expert_weights

    _, model = pair
    whole = model.layers["0"].mlp
    x = torch.randn(12, 64)
    routing = whole.router(x)
    expected = whole(x)
    experts = whole.experts
    total = torch.zeros_like(expected)
    for rank in range(2):

        class Shard(type(whole.dispatcher)):
            ffn_shards = 2
            ffn_shard_rank = rank

        layer = build_moe_layer(
            64,
            48,
            8,
            2,
            score_func="topk_softmax",
            router_bias=True,
            expert_bias=True,
            swiglu_limit=2.0,
            dispatcher=Shard(8),
        )
        assert isinstance(layer.dispatcher, Dispatcher)
        assert layer.experts.options.add_down_bias == (rank == 0)
        load_full_expert_weights(
            layer,
            experts.gate_up_proj,
            experts.down_proj,
            experts.gate_up_proj_bias,
            experts.down_proj_bias,
        )
        x_local, counts, handle = layer.dispatcher.dispatch(x, routing.weights, routing.expert_idx)
        total += layer.dispatcher.combine(layer.experts(x_local, counts), handle)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


# ---- planner ------------------------------------------------------------------------------


def test_param_counts_equal_transformers():
    from moe_ext.plan import model_param_counts

    hf = hf_model()
    args = ModelArgs.from_hf_config(hf.config.to_dict())
    params = dict(hf.named_parameters())
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
    assert model_param_counts(args) == (sum(p.numel() for p in params.values()), experts)
    shapes = args.family.param_shapes(args)
    assert sum(math.prod(s) for s in shapes.values()) == sum(p.numel() for p in params.values())


def test_kv_cache_of_sliding_layers_is_bounded_by_the_window(pair):
    _, model = pair
    args, family = model.args, model.args.family
    slot = 2 * 2 * 16 * 2  # K and V, 2 kv heads, D 16, bf16
    assert family.kv_cache_bytes(args, 1, 4) == 4 * slot * 4  # all layers below the window
    assert family.kv_cache_bytes(args, 1, 1000) == slot * (2 * 1000 + 2 * WINDOW)
    assert family.kv_cache_bytes(args, 2, 1000) == slot * (2 * 1000 + 2 * WINDOW) // 2
    assert family.kv_cache_bytes_per_token(args, 1) == 2 * slot  # the full layers
    # the model allocates what the planner counts
    model.setup_caches(1, 1000, torch.bfloat16)
    held = sum(
        b.self_attn.kv_cache.k.nbytes + b.self_attn.kv_cache.v.nbytes for b in model.layers.values()
    )
    assert held == family.kv_cache_bytes(args, 1, 1000)
    model.setup_caches(1, 8)


@pytest.mark.parametrize("name, billions", [("gpt_oss_20b", 20.91), ("gpt_oss_120b", 116.83)])
def test_shipped_confs_have_the_published_size(name, billions):
    from omegaconf import OmegaConf

    from moe_ext.plan import model_param_counts

    args = ModelArgs.from_model_conf(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))
    total, _ = model_param_counts(args)
    assert abs(total / 1e9 - billions) < 0.01, total
    assert args.layer_types.count("sliding_attention") == args.num_hidden_layers // 2


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(quantization_config={"quant_method": "awq"}), "quant_method 'awq' is not"),
        (dict(layer_types=["sliding_attention"] * 3), "layer_types must list 4 entries"),
        (dict(layer_types=["sliding", "full"] * 2), "layer_types must list 4 entries"),
        (dict(sliding_window=0), "sliding_window 0 must be >= 1"),
        (dict(swiglu_limit="7"), "swiglu_limit must be a number"),
        (dict(rope_parameters={"rope_type": "longrope"}), "rope type 'longrope'"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(change, message):
    config = {**transformers.GptOssConfig(**SHAPE).to_dict(), **change}
    with pytest.raises(MoeExtError) as info:
        ModelArgs.from_hf_config(json.loads(json.dumps(config)), "ckpt/config.json")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_default_rope_is_transformers_yarn():
    config = transformers.GptOssConfig(**{**SHAPE, "rope_parameters": None}).to_dict()
    config.pop("rope_parameters")  # an old config.json without any RoPE key
    args = ModelArgs.from_hf_config(config)
    assert args.rope_scaling == {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    }
    assert args.rope_theta == 150000.0


def test_sink_attention_shards_sinks_by_head():
    args = ModelArgs.from_hf_config(transformers.GptOssConfig(**SHAPE).to_dict())
    shards = args.family.attention_shards(args, 2, 1)
    assert shards["sinks"].shape((4,)) == (2,)
    assert shards["sinks"].bounds((4,)) == [((2, 4),)]
    assert isinstance(args.family.build_attention(args, 1), SinkAttention)

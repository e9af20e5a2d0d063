"""deepseek_v2 / deepseek_v3 against Hugging Face transformers (CPU, fp32): logits and greedy
ids for tiny random models of each routing kind, MLA's absorbed decode against its naive
form, the latent cache, tensor-parallel head shards, and one-line config errors."""

from __future__ import annotations

import json

import pytest
import torch

from moe_ext.config import GenerateConf
from moe_ext.errors import MoeExtError
from moe_ext.model import ModelArgs, Transformer, generate
from moe_ext.model.mla import MLAttention, mla_softmax_scale, yarn_mscale
from moe_ext.model.parallelize import RankCoords, shard_slices, take_shard
from tests.support import DEEPSEEK_VARIANTS as VARIANTS
from tests.support import HF_EOS as EOS
from tests.support import HF_PROMPTS as PROMPTS
from tests.support import REPO, hf_greedy, left_pad
from tests.support import deepseek_hf_config as hf_config
from tests.support import deepseek_hf_model as hf_model

transformers = pytest.importorskip("transformers")


def native_from_hf(hf) -> Transformer:
    args = ModelArgs.from_hf_config(hf.config.to_dict())
    model = Transformer(args)
    state = {}
    for name, value in hf.state_dict().items():
        name = name.removeprefix("model.").replace(".mlp.gate.", ".mlp.router.")
        state[name.replace(".shared_experts.", ".shared_expert.")] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_greedy_match_transformers(variant, monkeypatch):
    absorbed_calls = []
    real = MLAttention._absorbed

    def spy(self, q_nope, *rest):
        absorbed_calls.append(q_nope.shape[2])  # query length
        return real(self, q_nope, *rest)

    monkeypatch.setattr(MLAttention, "_absorbed", spy)
    hf = hf_model(variant)
    model = native_from_hf(hf)
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = model(ids, kv_start=(mask == 0).sum(1))
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)

    expected = hf_greedy(hf, PROMPTS, 12)
    got = generate(model, PROMPTS, GenerateConf(max_new_tokens=12), eos_id=EOS)
    assert got.tokens == expected
    # every decode step ran MLA's absorbed form, once per layer; prefill the naive one
    assert got.decode_steps > 0 and absorbed_calls == [1] * (3 * got.decode_steps)


def test_routing_terms_matter():
    """A missing correction bias or group rule would change V3's / V2's picks: the
    test models above route differently without them."""
    hf = hf_model("v3")
    model = native_from_hf(hf)
    router = model.layers["1"].mlp.router
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        picks = router(x).expert_idx.sort(-1).values
        bias = router.e_score_correction_bias.clone()
        router.e_score_correction_bias.zero_()
        unbiased = router(x).expert_idx.sort(-1).values
        router.e_score_correction_bias.copy_(bias)
    assert not torch.equal(picks, unbiased)
    hf_gate = hf.model.layers[1].mlp.gate
    with torch.no_grad():
        assert torch.equal(picks, hf_gate(x)[2].sort(-1).values)

    hf_v2 = hf_model("v2_group")
    v2 = native_from_hf(hf_v2).layers["1"].mlp.router
    assert v2.group_score == "max" and v2.n_group == 4
    with torch.no_grad():
        out = v2(x)
        _, ref_weights, ref_idx = hf_v2.model.layers[1].mlp.gate(x)
        order, ref_order = out.expert_idx.argsort(-1), ref_idx.argsort(-1)
        by_max = out.expert_idx.gather(1, order)
        assert torch.equal(by_max, ref_idx.gather(1, ref_order))  # same picks as transformers
        torch.testing.assert_close(out.weights.gather(1, order), ref_weights.gather(1, ref_order))
        v2.group_score = "top2_sum"
        by_sum = v2(x).expert_idx.sort(-1).values
    assert not torch.equal(by_max, by_sum)


# ---- MLA: absorbed decode, naive prefill, the latent cache ---------------------------------


@pytest.mark.parametrize("variant", ["v2_lite", "v3"])
def test_absorbed_decode_equals_naive(variant):
    """Prefill 5 tokens into the latent cache, then decode 3 steps over the whole static
    cache: the absorbed form (W_UK in the query, W_UV in the output) gives the naive
    form's outputs within fp32 rounding, at every step."""
    torch.manual_seed(0)
    model = native_from_hf(hf_model(variant))
    args = model.args
    attn = model.layers["0"].self_attn
    assert isinstance(attn, MLAttention)
    B, S0, S_max = 2, 5, 12
    model.setup_caches(B, S_max)
    assert attn.kv_cache.latent.shape == (B, S_max, args.kv_lora_rank + args.head_dim)
    kv_start = torch.tensor([0, 2])  # the second sequence is left-padded by two slots
    x = torch.randn(B, S0 + 3, args.hidden_size)
    positions = (torch.arange(S0 + 3)[None] - kv_start[:, None]).clamp(min=0)
    cos, sin = model.rotary(positions, x.dtype)
    outs = {}
    for absorb in (False, True):
        attn.kv_cache.latent.zero_()
        attn.absorb = None  # prefill: naive either way
        steps = [attn(x[:, :S0], cos[:, :S0], sin[:, :S0], torch.arange(S0), kv_start, S0, True)]
        attn.absorb = absorb
        for s in range(S0, S0 + 3):
            slot = torch.tensor([s])
            step = attn(x[:, s : s + 1], cos[:, s : s + 1], sin[:, s : s + 1], slot, kv_start,
                        None, True)  # fmt: skip
            steps.append(step)
        outs[absorb] = torch.cat(steps, dim=1)
    attn.absorb = None
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)
    # and both equal attention without a cache over the same tokens
    with torch.no_grad():
        whole = attn(x, cos, sin, torch.arange(S0 + 3), kv_start)
    torch.testing.assert_close(outs[True], whole, atol=1e-5, rtol=1e-5)


def test_absorbed_form_over_a_whole_prompt_equals_naive():
    model = native_from_hf(hf_model("v2_group"))
    attn = model.layers["2"].self_attn
    x = torch.randn(3, 7, 32)
    kv_start = torch.tensor([0, 3, 1])
    positions = (torch.arange(7)[None] - kv_start[:, None]).clamp(min=0)
    cos, sin = model.rotary(positions, x.dtype)
    with torch.no_grad():
        attn.absorb = True
        absorbed = attn(x, cos, sin, torch.arange(7), kv_start)
        attn.absorb = False
        naive = attn(x, cos, sin, torch.arange(7), kv_start)
    real = torch.arange(7)[None] >= kv_start[:, None]
    torch.testing.assert_close(absorbed[real], naive[real], atol=1e-5, rtol=1e-5)


def test_latent_cache_bytes_and_softmax_scale():
    args = ModelArgs.from_hf_config(hf_config("v3").to_dict())
    family = args.family
    # C + Dr values per token and layer, whatever tp (replicated on every TP rank)
    per_token = args.num_hidden_layers * (16 + 4) * 2
    assert family.kv_cache_bytes_per_token(args, 1) == per_token
    assert family.kv_cache_bytes_per_token(args, 4) == per_token
    # the planner's count is what setup_caches allocates (fp32: 4 bytes a value)
    model = Transformer(args)
    model.setup_caches(batch=1, max_slots=10)
    allocated = sum(b.nbytes for n, b in model.named_buffers() if n.endswith("kv_cache.latent"))
    assert allocated == family.kv_cache_bytes(args, 1, 10, dtype_bytes=4)
    m = yarn_mscale(4.0, 0.7)
    assert mla_softmax_scale(args) == pytest.approx((8 + 4) ** -0.5 * m * m)
    hf_attn = transformers.AutoModelForCausalLM.from_config(hf_config("v3")).model.layers[0]
    assert mla_softmax_scale(args) == pytest.approx(hf_attn.self_attn.scaling)


# ---- tensor parallelism: heads split, the latent path replicated ---------------------------


@pytest.mark.parametrize("variant", ["v2_lite", "v3_half_bias", "v3"])
def test_tp_shards_are_whole_heads_and_a_replicated_latent(variant):
    args = ModelArgs.from_hf_config(hf_config(variant).to_dict())
    shapes = args.family.param_shapes(args)
    full = {name: torch.randn(shape) for name, shape in shapes.items()}

    class Plan:
        tp, pp, ep, etp = 2, 1, 1, 1

    n, Dn, Dr, Dv = 4, 8, 4, 6
    for rank in (0, 1):
        requests = shard_slices(Plan, RankCoords(tp_rank=rank), args)
        p = "layers.0.self_attn."
        q = p + ("q_proj.weight" if args.q_lora_rank is None else "q_b_proj.weight")
        heads = slice(rank * n // 2, (rank + 1) * n // 2)

        def shard(name: str, requests=requests) -> torch.Tensor:
            return take_shard(full[name], requests[name])

        per_head = full[q].view(n, Dn + Dr, -1)[heads].reshape(-1, full[q].shape[1])
        assert torch.equal(shard(q), per_head)
        kv_b = full[p + "kv_b_proj.weight"].view(n, Dn + Dv, -1)[heads].reshape(-1, 16)
        assert torch.equal(shard(p + "kv_b_proj.weight"), kv_b)
        o = full[p + "o_proj.weight"].view(32, n, Dv)[:, heads].reshape(32, -1)
        assert torch.equal(shard(p + "o_proj.weight"), o)
        for name in ("kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "o_proj.bias"):
            if p + name in shapes:
                assert requests[p + name].is_full(shapes[p + name]), name


# ---- config -----------------------------------------------------------------------------


def _hf_dict(variant: str, **changes) -> dict:
    config = hf_config(variant).to_dict()
    config.update(changes)
    return json.loads(json.dumps(config))


def test_config_reads_back_and_kimi_k2_is_deepseek_v3():
    for variant in VARIANTS:
        args = ModelArgs.from_hf_config(_hf_dict(variant))
        assert ModelArgs.from_hf_config(args.family.hf_config(args)) == args
    kimi = ModelArgs.from_hf_config(_hf_dict("v3", model_type="kimi_k2"))
    assert kimi.model_type == "deepseek_v3" and kimi.router_correction_bias


def test_moe_layer_freq_places_dense_layers():
    args = ModelArgs.from_hf_config(
        _hf_dict("v3", num_hidden_layers=7, first_k_dense_replace=2, moe_layer_freq=2)
    )
    assert [args.is_moe_layer(i) for i in range(7)] == [False] * 2 + [True, False] * 2 + [True]
    assert ModelArgs.from_hf_config(args.family.hf_config(args)) == args


@pytest.mark.parametrize(
    "variant, change, message",
    [
        ("v2_lite", dict(topk_method="noaux_tc"), "topk_method 'noaux_tc' is not supported"),
        ("v2_lite", dict(scoring_func="sigmoid"), "scoring_func 'sigmoid' is not supported"),
        ("v2_lite", dict(norm_topk_prob=True), "norm_topk_prob=true is not supported"),
        ("v3", dict(topk_method="greedy"), "topk_method 'greedy' is not supported"),
        ("v3", dict(scoring_func="softmax"), "scoring_func 'softmax' is not supported"),
        ("v3", dict(qk_rope_head_dim=5), "qk_rope_head_dim 5 must be even"),
        ("v3", dict(kv_lora_rank=None), "required field 'kv_lora_rank' is missing"),
        ("v3", dict(kv_lora_rank=0), "kv_lora_rank 0 must be >= 1"),
        ("v3", dict(mlp_bias=True), "mlp_bias=true is not supported"),
        ("v3", dict(moe_layer_freq=0), "moe_layer_freq 0 must be >= 1"),
        ("v2_group", dict(n_group=0), "needs n_group and topk_group >= 1"),
        ("v3", dict(rope_parameters={"rope_type": "longrope"}), "rope type 'longrope'"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(variant, change, message):
    config = {k: v for k, v in _hf_dict(variant, **change).items() if v is not None}
    with pytest.raises(MoeExtError) as info:
        ModelArgs.from_hf_config(config, "ckpt/config.json")
    text = str(info.value)
    assert message in text and "\n" not in text


# ---- shipped model configs --------------------------------------------------------------


@pytest.mark.parametrize("name, billions", [("deepseek_v2_lite", 15.71), ("deepseek_v3", 671.03)])
def test_shipped_confs_have_their_published_size(name, billions):
    """The conf/model shapes count the published parameters, and exactly what transformers
    builds from the same config (parameters; V3's correction biases are buffers there)."""
    from omegaconf import OmegaConf

    from moe_ext.plan import model_param_counts

    args = ModelArgs.from_model_conf(OmegaConf.load(f"{REPO}/conf/model/{name}.yaml"))
    total, _ = model_param_counts(args)
    assert abs(total / 1e9 - billions) < 0.01
    config = dict(args.family.hf_config(args))
    config.pop("architectures")
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(config.pop("model_type"), **config)
        )
    buffers = sum(b.numel() for n, b in hf.named_buffers() if "e_score_correction" in n)
    assert total == sum(p.numel() for p in hf.parameters()) + buffers


def test_megatron_engine_refuses_mla():
    """A V2 shape Megatron's router could take (softmax, no groups, no RoPE scaling) is
    still refused in one line: its attention is MLA."""
    from moe_ext.megatron.config import MegatronConfigError, transformer_config_kwargs

    args = ModelArgs.from_hf_config(_hf_dict("v2_lite"))
    assert args.rope_scaling is None and args.n_group is None
    with pytest.raises(MegatronConfigError, match="Multi-head Latent Attention is not mapped"):
        transformer_config_kwargs(args)


def test_random_init_zeroes_the_correction_bias(monkeypatch):
    """Random weights (no checkpoint) materialise a meta model; the router's correction
    bias is a buffer, not a parameter, so it is reset to zero rather than left as whatever
    memory to_empty handed out (which differed across ranks and strategies)."""
    from moe_ext.model.weights import init_random_

    real_to_empty = torch.nn.Module.to_empty

    def to_garbage(module, *, device, recurse=True):
        out = real_to_empty(module, device=device, recurse=recurse)
        for buffer in module.buffers():
            if buffer.is_floating_point():
                buffer.fill_(float("nan"))  # what uninitialised memory may hold
        return out

    monkeypatch.setattr(torch.nn.Module, "to_empty", to_garbage)
    args = ModelArgs.from_hf_config(_hf_dict("v3"))
    with torch.device("meta"):
        model = Transformer(args)
    init_random_(model, device="cpu")
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert len(biases) == 2 and all(torch.equal(b, torch.zeros_like(b)) for b in biases)

"""The family registry: one model description feeds the model, the planner and the
checkpoint maps, and a bad config is one line naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from moe_ext.checkpoint import CheckpointError, CheckpointReader
from moe_ext.errors import MoeExtError
from moe_ext.model.args import ModelArgs
from moe_ext.model.decoder import Transformer
from moe_ext.model.families import MODEL_TYPES, ModelConfigError, get_family
from tests.support import decode_logits

REPO = Path(__file__).resolve().parents[2]
BASE = dict(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    rms_norm_eps=1e-6,
)
CONFIGS = {
    "mixtral": dict(model_type="mixtral", num_local_experts=4, sliding_window=16),
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        num_experts=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        num_experts=4,
        moe_intermediate_size=16,
        head_dim=16,
        attention_bias=True,
        decoder_sparse_step=2,
        norm_topk_prob=True,
        tie_word_embeddings=True,
    ),
    # MLA without a q LoRA, V2's softmax group-limited routing, two shared experts
    "deepseek_v2": dict(
        model_type="deepseek_v2",
        n_routed_experts=4,
        moe_intermediate_size=16,
        n_shared_experts=2,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        first_k_dense_replace=1,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
    ),
    # MLA with a q LoRA and attention biases, sigmoid routing with correction bias
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        n_routed_experts=4,
        moe_intermediate_size=16,
        n_shared_experts=1,
        kv_lora_rank=16,
        q_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        attention_bias=True,
        rope_interleave=False,
    ),
    # sinks, attention biases, sliding layers among full ones, router bias with softmax
    # over the top-k, experts with biases and the clamped SwiGLU (tests/test_family_gpt_oss*)
    "gpt_oss": dict(
        model_type="gpt_oss",
        num_local_experts=4,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "full_attention"],
        swiglu_limit=5.0,
    ),
    # partial rotary, q/k/v biases, per-head q/k norm, grouped sigmoid router with scaling,
    # a shared expert of 2 x moe_intermediate_size, one dense layer first
    "glm4_moe": dict(
        model_type="glm4_moe",
        n_routed_experts=4,
        moe_intermediate_size=16,
        n_shared_experts=2,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        attention_bias=True,
        use_qk_norm=True,
        partial_rotary_factor=0.5,
        head_dim=16,
    ),
    # q/k norm over the whole projection, rotary_dim of head_dim, sigmoid router with bias
    "minimax_m2": dict(
        model_type="minimax_m2",
        num_local_experts=4,
        head_dim=16,
        rotary_dim=8,
        use_routing_bias=True,
        qk_norm_type="per_layer",
        num_mtp_modules=3,
    ),
}


def hf(family: str, **changes) -> dict:
    return {**BASE, **CONFIGS[family], **changes}


def test_every_registered_family_has_a_test_config():
    assert set(CONFIGS) == set(MODEL_TYPES)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_param_shapes_are_the_models_parameters_in_order(family):
    args = ModelArgs.from_hf_config(hf(family))
    with torch.device("meta"):
        model = Transformer(args)
    built = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    assert built == list(args.family.param_shapes(args).items())


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_hf_config_reads_back_to_the_same_args(family):
    args = ModelArgs.from_hf_config(hf(family))
    written = json.loads(json.dumps(args.family.hf_config(args)))
    assert ModelArgs.from_hf_config(written) == args
    assert written["model_type"] == family


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_family_specific_fields_are_read(family):
    args = ModelArgs.from_hf_config(hf(family))
    if family == "mixtral":
        assert (args.num_experts, args.sliding_window, args.norm_topk_prob) == (4, 16, True)
        assert args.family.hf_expert_keys(0, "gate_up_proj", 3) == [
            "model.layers.0.block_sparse_moe.experts.3.w1.weight",
            "model.layers.0.block_sparse_moe.experts.3.w3.weight",
        ]
    elif family == "qwen2_moe":
        assert args.qkv_bias and not args.o_bias and args.has_shared_expert
        assert [args.is_moe_layer(i) for i in range(3)] == [True, False, True]
    elif family.startswith("deepseek"):
        assert args.kv_lora_rank == 16 and args.head_dim == 4 and args.v_head_dim == 6
        assert args.num_key_value_heads == args.num_attention_heads  # MLA: no kv heads
        assert [args.is_moe_layer(i) for i in range(3)] == [False, True, True]
        assert args.has_shared_expert and not args.shared_expert_gate
        if family == "deepseek_v2":
            assert args.q_lora_rank is None and args.shared_expert_intermediate_size == 32
            assert (args.score_func, args.topk_method, args.n_group) == (
                "softmax",
                "group_limited_greedy",
                2,
            )
        else:
            assert args.q_lora_rank == 12 and args.o_bias and args.router_correction_bias
            assert (args.score_func, args.topk_method, args.norm_topk_prob) == (
                "sigmoid",
                "noaux_tc",
                True,
            )
    elif family == "glm4_moe":
        assert args.qkv_bias and not args.o_bias and args.qk_norm and args.router_correction_bias
        assert (args.partial_rotary_factor, args.shared_expert_intermediate_size) == (0.5, 32)
        assert (args.n_group, args.topk_group, args.routed_scaling_factor) == (2, 1, 2.5)
        assert [args.is_moe_layer(i) for i in range(3)] == [False, True, True]
        assert args.family.hf_skipped("model.layers.3.eh_proj.weight", args)  # MTP layer
    elif family == "minimax_m2":
        assert (args.qk_norm_type, args.partial_rotary_factor, args.mtp_layers) == (
            "per_layer",
            0.5,
            3,
        )
        assert args.router_correction_bias and args.score_func == "sigmoid"
        assert args.family.hf_expert_keys(0, "down_proj", 3) == [
            "model.layers.0.block_sparse_moe.experts.3.w2.weight"
        ]
    elif family == "gpt_oss":
        assert args.layer_types[0] == "sliding_attention" and args.sliding_window == 8
        assert args.attention_sinks and args.router_bias and args.expert_bias and args.o_bias
        # transformers' default RoPE for gpt_oss is yarn
        assert (args.score_func, args.swiglu_limit, args.rope_type) == ("topk_softmax", 5.0, "yarn")
    else:
        assert args.qk_norm and args.qkv_bias and args.o_bias and args.tie_word_embeddings
        assert [args.is_moe_layer(i) for i in range(3)] == [False, True, False]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_experts_per_tok=None), "required field 'num_experts_per_tok' is missing"),
        (dict(hidden_size="32"), "hidden_size must be an integer, got '32' (a string)"),
        (dict(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
        (dict(rms_norm_eps="1e-6"), "rms_norm_eps must be a number"),
        (dict(mlp_only_layers=[1, "2"]), "mlp_only_layers must be a list of integers"),
        (dict(model_type="llama"), "unknown model_type 'llama'"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        (dict(num_attention_heads=0), "num_attention_heads=0 must be >= 1"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(change, message):
    config = {k: v for k, v in {**hf("qwen2_moe"), **change}.items() if v is not None}
    with pytest.raises(MoeExtError) as info:
        ModelArgs.from_hf_config(config, "ckpt/config.json")
    text = str(info.value)
    assert message in text and "\n" not in text
    assert text.startswith("ckpt/config.json") or "must be >= 1" in text


def test_bad_config_json_in_a_checkpoint_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf("qwen3_moe", num_experts="4")))
    with pytest.raises(CheckpointError, match="num_experts must be an integer"):
        CheckpointReader.open(tmp_path)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml")))
def test_shipped_model_confs_parse(name):
    args = ModelArgs.from_model_conf(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))
    assert args.family is get_family(args.model_type)


def test_model_conf_typo_is_an_error_naming_the_key():
    conf = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml"))
    conf["num_expert_per_tok"] = 2
    with pytest.raises(ModelConfigError, match="unknown field.*num_expert_per_tok.*qwen3_moe"):
        ModelArgs.from_model_conf(conf)


def test_unknown_keys_of_a_checkpoint_config_are_ignored():
    args = ModelArgs.from_hf_config(hf("mixtral", architectures=["X"], torch_dtype="bfloat16"))
    assert args.model_type == "mixtral"


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("slots", [3, 40])  # below and above every test config's window
def test_kv_cache_bytes_equal_what_setup_caches_allocates(family, slots):
    args = ModelArgs.from_hf_config(hf(family))
    model = Transformer(args)
    model.setup_caches(batch=1, max_slots=slots, dtype=torch.float32)
    allocated = sum(t.nbytes for name, t in model.named_buffers() if ".self_attn.kv_cache." in name)
    assert allocated == args.family.kv_cache_bytes(args, 1, slots, dtype_bytes=4)


def test_planner_kv_figure_is_the_familys_for_one_stage():
    from moe_ext.plan import estimate_memory, plan_with_degrees
    from moe_ext.topology import Topology

    args = ModelArgs.from_hf_config(hf("deepseek_v2", num_hidden_layers=4))
    topology = Topology(kind="cpu", host_memory_bytes=2**34, cpu_count=2)
    one_stage = estimate_memory(plan_with_degrees("replicate", 1), args, topology, 2, 100)
    two_stages = estimate_memory(plan_with_degrees("replicate", 2, pp=2), args, topology, 2, 100)
    assert one_stage.kv_bytes_per_sequence == args.family.kv_cache_bytes(args, 1, 100, 2)
    assert two_stages.kv_bytes_per_sequence * 2 == one_stage.kv_bytes_per_sequence


def test_correction_bias_stays_float32_in_a_bf16_model(tmp_path):
    """The bias decides near-tied expert picks: a bf16 model (cast, or built on meta and
    loaded) keeps it float32 and bit-exact, as transformers does."""
    from safetensors.torch import save_file

    from moe_ext.checkpoint import load_sharded
    from moe_ext.checkpoint.shard import ShardRequest
    from moe_ext.model.weights import materialize_

    args = ModelArgs.from_hf_config(hf("glm4_moe"))
    bias_name = next(n for n in args.family.param_shapes(args) if "correction_bias" in n)
    exact = torch.tensor([1e-3, 2.0001, 3.00007, -0.0123])  # not representable in bf16
    model = Transformer(args)
    model.get_buffer(bias_name).copy_(exact)
    cast = model.to(torch.bfloat16)
    assert cast.get_buffer(bias_name).dtype == torch.float32
    assert torch.equal(cast.get_buffer(bias_name), exact)

    (tmp_path / "config.json").write_text(json.dumps(args.family.hf_config(args)))
    state = {k: v.contiguous() for k, v in Transformer(args).state_dict().items()}
    state[bias_name] = exact
    save_file(state, tmp_path / "model.safetensors")
    with torch.device("meta"):
        meta = Transformer(args).to(torch.bfloat16)
    dtypes = {name: t.dtype for name, t in meta.state_dict().items()}
    loaded = load_sharded(
        tmp_path,
        {bias_name: ShardRequest.full(), "norm.weight": ShardRequest.full()},
        dtype=dtypes,
        progress=False,
    )
    assert loaded[bias_name].dtype == torch.float32 and torch.equal(loaded[bias_name], exact)
    assert loaded["norm.weight"].dtype == torch.bfloat16
    materialize_(meta, "cpu").load_state_dict(loaded, strict=False)
    assert torch.equal(meta.get_buffer(bias_name), exact)


GPU_PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_gpu_decode_fast_path_matches_eager(family):
    """Every attention kind and router on the GPU fast path (bf16): the CUDA-graph decode
    gives eager's ids; the inductor-compiled decode step gives eager's logits within bf16
    rounding over steps past gpt_oss's window of 8 (its ring wraps); the compiled + graphed
    default is stable across capture and replay."""
    from moe_ext.config import GenerateConf
    from moe_ext.model import generate, init_random_full

    args = ModelArgs.from_hf_config(hf(family))
    model = Transformer(args)
    model.load_state_dict(init_random_full(args), strict=False)
    model = model.to("cuda", torch.bfloat16).eval()

    def run(**flags):
        conf = GenerateConf(max_new_tokens=24, **flags)
        return generate(model, GPU_PROMPTS, conf, eos_id=None, pad_id=0)

    eager = run(cuda_graphs=False, compile_decode=False)
    graphed = run(compile_decode=False)
    assert graphed.cuda_graphs and not eager.cuda_graphs
    assert graphed.tokens == eager.tokens
    prompt = torch.tensor([GPU_PROMPTS[0]] * 2, device="cuda")  # [2, 11]
    with torch.inference_mode():
        eager_logits = decode_logits(model, prompt, steps=6)
        model.compile_decode()
        compiled_logits = decode_logits(model, prompt, steps=6)
    scale = eager_logits.abs().max().item()
    assert (compiled_logits - eager_logits).abs().max().item() <= 0.03 * scale
    compiled = [run(), run()]  # capture, then replay of the same graph
    assert all(r.cuda_graphs for r in compiled) and compiled[0].tokens == compiled[1].tokens

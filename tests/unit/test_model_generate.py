"""Generation behaviour (sampling, EOS, per-request lengths, EOS-check batching), config
parsing, tokenizers, loading a saved HF checkpoint through the checkpoint reader, and the
CUDA-graph decode path (GPU only)."""

from __future__ import annotations

import json

import pytest
import torch

from moe_ext.config import GenerateConf
from moe_ext.model import (
    ByteTokenizer,
    ModelArgs,
    RankCoords,
    Transformer,
    generate,
    init_random_full,
    load_tokenizer,
    shard_slices,
)
from moe_ext.model.generate import sample
from tests.support import plan_of, tiny_args

PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 9, 200], [256, 33, 34, 35, 36]]


@pytest.fixture(scope="module")
def tiny():
    args = tiny_args()
    model = Transformer(args)
    model.load_state_dict(init_random_full(args))
    return model.eval()


def test_sampling_is_seeded_and_top_p_collapses_to_greedy(tiny):
    conf = GenerateConf(max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = generate(tiny, PROMPTS, conf, eos_id=None, seed=3).tokens
    b = generate(tiny, PROMPTS, conf, eos_id=None, seed=3).tokens
    c = generate(tiny, PROMPTS, conf, eos_id=None, seed=4).tokens
    assert a == b and a != c
    greedy = generate(tiny, PROMPTS, GenerateConf(max_new_tokens=8), eos_id=None).tokens
    nucleus = generate(
        tiny,
        PROMPTS,
        GenerateConf(max_new_tokens=8, temperature=1.0, top_p=1e-6),
        eos_id=None,
        seed=3,
    ).tokens
    assert nucleus == greedy != a


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    picks = sample(logits, 1.0, 0.7, gen)  # 0.5 < 0.7 <= 0.8: tokens 0 and 1 only
    counts = torch.bincount(picks, minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03
    assert (sample(logits, 0.0, 1.0, None) == 0).all()


def test_eos_stops_each_sequence_and_lengths_are_per_request(tiny):
    free = generate(tiny, PROMPTS, GenerateConf(max_new_tokens=10), eos_id=None).tokens
    eos = free[0][3]  # the 4th token of request 0 becomes the EOS id
    got = generate(tiny, PROMPTS, GenerateConf(max_new_tokens=10), eos_id=eos)
    for row, ref in zip(got.tokens, free):
        cut = ref.index(eos) + 1 if eos in ref else len(ref)
        assert row == ref[:cut]
    assert got.finish_reasons[0] == "eos" and len(got.tokens[0]) <= 4
    lengths = generate(tiny, PROMPTS, GenerateConf(), eos_id=None, max_new_tokens=[1, 5, 3])
    assert [len(r) for r in lengths.tokens] == [1, 5, 3]
    assert lengths.tokens == [r[:n] for r, n in zip(free, [1, 5, 3])]
    batched_check = generate(
        tiny, PROMPTS, GenerateConf(max_new_tokens=10), eos_id=eos, check_every=4
    )
    assert batched_check.tokens == got.tokens
    small_batches = generate(
        tiny, PROMPTS, GenerateConf(max_new_tokens=10, max_batch_size=2), eos_id=eos
    )
    assert small_batches.tokens == got.tokens
    assert got.decode_tokens_per_s > 0 and got.prefill_tokens_per_s > 0 and got.ms_per_token > 0


def test_bad_inputs_are_one_line_errors(tiny):
    with pytest.raises(ValueError, match="empty prompt"):
        generate(tiny, [[]], GenerateConf(), eos_id=None)
    with pytest.raises(ValueError, match="one per prompt"):
        generate(tiny, PROMPTS, GenerateConf(), eos_id=None, max_new_tokens=[1, 2])
    with pytest.raises(ValueError, match="rope type 'su'"):
        ModelArgs.from_hf_config({**_qwen3_hf(), "rope_scaling": {"type": "su", "factor": 2.0}})


def _qwen3_hf(**extra):
    return dict(
        model_type="qwen3_moe",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        **extra,
    )


def test_rope_config_old_and_new_forms_agree():
    old = ModelArgs.from_hf_config(
        _qwen3_hf(
            rope_theta=5e5,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        )
    )
    new = ModelArgs.from_hf_config(
        _qwen3_hf(
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 5e5,
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
            }
        )
    )
    assert old.rope_theta == new.rope_theta == 5e5
    assert (
        old.rope_scaling
        == new.rope_scaling
        == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    )
    plain = ModelArgs.from_hf_config(
        _qwen3_hf(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    )
    assert plain.rope_scaling is None and plain.rope_theta == 1e6


def test_byte_tokenizer_and_tokenizer_json(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids[0] == tok.bos_id and tok.decode(ids) == "héllo"
    assert tiny_args().vocab_size >= tok.vocab_size
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    hf_tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )
    loaded = load_tokenizer(None, checkpoint=str(tmp_path))
    assert (loaded.bos_id, loaded.eos_id) == (0, 1)
    # no post-processor: transformers adds no BOS either (bos_token is declared, not added)
    assert loaded.encode("hello world") == [2, 3]
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "missing"))


def test_saved_hf_checkpoint_loads_through_shard_slices(tmp_path):
    pytest.importorskip("transformers")
    from moe_ext.checkpoint import load_sharded
    from tests.support import HF_EOS as EOS
    from tests.support import HF_PROMPTS, hf_greedy, hf_model

    hf = hf_model("qwen2_moe")
    hf.save_pretrained(tmp_path)
    args = ModelArgs.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    requests = shard_slices(plan_of("replicate", world=1), RankCoords(), args)
    model = Transformer(args)
    model.load_state_dict(load_sharded(tmp_path, requests, progress=False), strict=True)
    got = generate(model, HF_PROMPTS, GenerateConf(max_new_tokens=8), eos_id=EOS)
    assert got.tokens == hf_greedy(hf, HF_PROMPTS, 8)


def _decode_step_logits(model, prompt_ids):
    """Prefill ``prompt_ids`` [B, L] into fresh caches, then one decode step (the static
    shape compile_decode compiles). Returns its logits [B, 1, V]."""
    B, L = prompt_ids.shape
    device = prompt_ids.device
    model.setup_caches(B, 128)
    kv_start = torch.zeros(B, dtype=torch.long, device=device)
    logits = model(
        prompt_ids, torch.arange(L, device=device), kv_start, L, last_only=True, use_cache=True
    )
    nxt = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    return model(
        nxt, torch.tensor([L], device=device), kv_start, None, last_only=True, use_cache=True
    )


@torch.inference_mode()
def test_compiled_decode_step_matches_eager(tiny):
    """compile_decode traces every block of the decode step (aot_eager: dynamo and AOT
    autograd without a C compiler) and computes the same logits and greedy ids."""
    prompt_ids = torch.tensor([p[:3] for p in PROMPTS])  # [3, 3]
    eager = _decode_step_logits(tiny, prompt_ids)
    want = generate(tiny, PROMPTS, GenerateConf(max_new_tokens=6), eos_id=None).tokens
    tiny.compile_decode(backend="aot_eager")
    try:
        compiled = _decode_step_logits(tiny, prompt_ids)
        got = generate(tiny, PROMPTS, GenerateConf(max_new_tokens=6), eos_id=None).tokens
    finally:
        tiny.compile_decode(False)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert got == want


class _FailingCapture:
    """Stands in for a decode step whose CUDA-graph capture raises ``error``."""

    graph = None

    def __init__(self, error: Exception):
        self.error = error

    def __call__(self, *args):
        raise self.error


def test_failed_capture_decodes_eagerly_but_a_collective_failure_propagates(monkeypatch):
    import importlib

    import torch.distributed as dist

    generation = importlib.import_module("moe_ext.model.generate")  # the module, not the function

    args = tiny_args()
    model = Transformer(args)
    model.load_state_dict(init_random_full(args))
    model.eval()
    conf = GenerateConf(max_new_tokens=5)
    want = generate(model, PROMPTS, conf, eos_id=None).tokens
    monkeypatch.setattr(generation, "_graphs_usable", lambda *a, **k: True)
    monkeypatch.setattr(
        generation,
        "_graph_for",
        lambda *a, **k: _FailingCapture(
            RuntimeError("operation not permitted when stream is capturing")
        ),
    )
    assert generate(model, PROMPTS, conf, eos_id=None).tokens == want
    assert model.decode_state.capture_failed  # later calls stay eager

    monkeypatch.setattr(
        generation,
        "_graph_for",
        lambda *a, **k: _FailingCapture(
            dist.DistBackendError("Watchdog caught collective operation timeout")
        ),
    )
    with pytest.raises(dist.DistBackendError, match="timeout"):
        generate(model, PROMPTS, conf, eos_id=None)


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager():
    args = tiny_args()
    model = Transformer(args)
    model.load_state_dict(init_random_full(args))
    model = model.to("cuda", torch.bfloat16).eval()
    with torch.inference_mode():  # inductor-compiled step against the eager one, bf16
        prompt_ids = torch.tensor([p[:3] for p in PROMPTS], device="cuda")
        eager_logits = _decode_step_logits(model, prompt_ids).float()
        model.compile_decode()
        compiled_logits = _decode_step_logits(model, prompt_ids).float()
        model.compile_decode(False)
    scale = eager_logits.abs().max().item()
    assert (compiled_logits - eager_logits).abs().max().item() <= 0.02 * scale
    eager = generate(
        model,
        PROMPTS,
        GenerateConf(max_new_tokens=24, cuda_graphs=False, compile_decode=False),
        eos_id=None,
    )
    graphed = generate(
        model, PROMPTS, GenerateConf(max_new_tokens=24, compile_decode=False), eos_id=None
    )
    again = generate(
        model, PROMPTS, GenerateConf(max_new_tokens=24, compile_decode=False), eos_id=None
    )  # replay
    assert graphed.cuda_graphs and again.cuda_graphs and not eager.cuda_graphs
    assert graphed.tokens == eager.tokens == again.tokens
    # compiled + graphed (the default) twice: capture, then replay of the same graph
    compiled = [
        generate(model, PROMPTS, GenerateConf(max_new_tokens=24), eos_id=None) for _ in range(2)
    ]
    assert all(r.cuda_graphs for r in compiled) and compiled[0].tokens == compiled[1].tokens
    assert model.compiled_decode_block is not None

"""ServeEngine on one GPU: the eager engine's greedy ids equal ``generate`` of each prompt
alone (fp32); CUDA-graph decode per bucket (captured before serving), with and without the
compiled decode blocks, gives the eager engine's ids in bf16 (the experts' loop backend,
which fp32 runs, syncs and cannot be captured).

# B decode bucket
"""

from __future__ import annotations

import pytest
import torch

from moe_ext.config import GenerateConf
from moe_ext.model import ModelArgs, Transformer, generate
from moe_ext.model.weights import init_random_
from moe_ext.serve.engine import ServeEngine
from tests.serve_support import random_requests, serve_greedy
from tests.support import agreeing_share

pytestmark = pytest.mark.gpu

QWEN3 = dict(
    model_type="qwen3_moe",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
    qk_norm=True,
    max_position_embeddings=256,
    init_seed=5,
)


def _requests(n: int = 20) -> list[tuple[list[int], int]]:
    return random_requests(n, seed=0, prompt_lengths=(1, 50), new_tokens=(1, 16), ids=(0, 512))


def _serve(model, requests, **flags) -> tuple[list[list[int]], ServeEngine]:
    engine = ServeEngine(
        model,
        None,
        model_name="gpu",
        rows=8,
        max_context=80,
        prefill_chunk=16,
        max_queue=len(requests),
        **flags,
    )
    return serve_greedy(engine, requests, collect_s=300, join_s=60), engine


def test_graph_buckets_equal_eager_and_generate():
    model = init_random_(Transformer(ModelArgs.from_hf_config(QWEN3)).to("cuda")).eval()
    requests = _requests()
    conf = GenerateConf(cuda_graphs=False, compile_decode=False)
    expected = [
        generate(model, [p], conf, eos_id=None, max_new_tokens=m).tokens[0] for p, m in requests
    ]
    eager, _ = _serve(model, requests, cuda_graphs=False, compile_decode=False)
    assert eager == expected
    model = model.to(torch.bfloat16)
    eager, _ = _serve(model, requests, cuda_graphs=False, compile_decode=False)
    graphed, engine = _serve(model, requests, compile_decode=False)
    assert sorted(engine.graphs) == [1, 2, 4, 8]
    assert all(g.graph is not None for g in engine.graphs.values())
    # the same kernels on the same rows; the graphs read the whole cache where eager steps
    # may read a prefix, so a bf16 near-tie may still part late in a sequence
    assert agreeing_share(graphed, eager) >= 0.9, (graphed, eager)
    compiled, engine = _serve(model, requests)
    assert engine.use_graphs and sorted(engine.graphs) == [1, 2, 4, 8]
    assert agreeing_share(compiled, eager) >= 0.8, (compiled, eager)
    model.compile_decode(False)

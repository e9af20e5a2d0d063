"""ServeEngine on one process over every family's real attention (GQA with windows and q/k
norms, MLA's latent cache, gpt-oss sinks with sliding rings): mixed-length greedy requests
through few rows, small chunks (batched with padding where the model allows) and decode
buckets give exactly the ids ``generate`` gives each prompt alone (fp32, random weights).
"""

from __future__ import annotations

import json
from typing import Optional

import pytest
import torch

from moe_ext.config import GenerateConf
from moe_ext.model import init_random_full
from moe_ext.model.args import ModelArgs
from moe_ext.model.decoder import Transformer
from moe_ext.model.generate import generate
from moe_ext.serve.engine import ProfileWindow, ServeEngine
from tests.serve_support import random_requests, serve_greedy
from tests.support import stand_in_graph_capture
from tests.unit.test_families import CONFIGS, hf

MAX_CONTEXT = 40


def requests(n: int = 12) -> list[tuple[list[int], int]]:
    """Prompts longer and shorter than gpt-oss's window of 8, and the chunk of 6."""
    return random_requests(n, seed=3, prompt_lengths=(1, 22), new_tokens=(1, 14), ids=(2, 64))


def engine_and_expected(
    family: str, profile: Optional[ProfileWindow] = None
) -> tuple[ServeEngine, list, list]:
    """A one-process engine on a random ``family`` model, the requests, and generate's ids
    for each request alone."""
    torch.manual_seed(0)
    args = ModelArgs.from_hf_config(hf(family, vocab_size=64))
    model = Transformer(args)
    model.load_state_dict(init_random_full(args, seed=5), strict=False)
    model = model.float().eval()
    reqs = requests()
    conf = GenerateConf()
    expected = [
        generate(model, [p], conf, eos_id=None, max_new_tokens=m).tokens[0] for p, m in reqs
    ]
    engine = ServeEngine(
        model,
        None,
        model_name=family,
        rows=4,
        max_context=MAX_CONTEXT,
        prefill_chunk=6,
        max_queue=len(reqs),
        profile=profile,
    )
    return engine, reqs, expected


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_engine_equals_generate_alone(family):
    engine, reqs, expected = engine_and_expected(family)
    got = serve_greedy(engine, reqs, collect_s=120, join_s=30)
    assert got == expected
    assert engine.counts["decode"] > 0 and engine.counts["prefill"] > 0
    assert engine.scheduler.pad_chunks == (family != "gpt_oss")


def test_bucket_graphs_replay_the_same_ids(monkeypatch):
    """The engine's per-bucket decode graphs (stood in for on CPU) give the ids of generate
    alone; every bucket is captured once, before serving."""
    from moe_ext.serve import engine as serve_engine

    captured = stand_in_graph_capture(serve_engine._BucketGraph, monkeypatch)
    engine, reqs, expected = engine_and_expected("qwen3_moe")
    engine.use_graphs = True  # as on a GPU
    got = serve_greedy(engine, reqs, collect_s=120, join_s=30)
    assert got == expected
    assert sorted(captured) == sorted(engine.decode_buckets)
    assert set(engine.graphs) <= set(engine.decode_buckets)


def test_profile_window_writes_a_trace_and_changes_nothing(tmp_path):
    """server.profile_dir: steps 3..5 land in a Chrome trace and an op table per rank, with
    the engine's own ranges; the served ids stay generate's."""
    window = ProfileWindow(str(tmp_path / "prof"), steps=3, skip=2)
    engine, reqs, expected = engine_and_expected("qwen3_moe", profile=window)
    assert serve_greedy(engine, reqs, collect_s=120, join_s=30) == expected
    trace = json.loads((tmp_path / "prof" / "serve_rank0.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "serve.schedule" in names and names & {"serve.decode", "serve.prefill"}
    assert "serve." in (tmp_path / "prof" / "serve_rank0.txt").read_text()
    assert not [p for p in (tmp_path / "prof").iterdir() if p.name.startswith(".")]

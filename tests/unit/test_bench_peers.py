"""Benchmark peers in one process: the transformers peer (moe_ext.bench.peers) generates on a
tiny random model of our shapes, and tools/bench_infer.py --peers hf as a smoke run. The
DeepSpeed and Megatron-core peers on ranks: tests/multirank/test_bench_peers.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.support import REPO


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def test_hf_peer_same_shapes_generates_exact_count():
    pytest.importorskip("transformers")
    from moe_ext.bench.peers import hf_causal_lm, hf_decode_floor_s, hf_generate_timed
    from moe_ext.model import ModelArgs, Transformer

    args = ModelArgs(
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
        rope_theta=10000.0,
        qk_norm=True,
    )
    torch.manual_seed(0)
    model = hf_causal_lm(args, dtype=torch.float32, device=torch.device("cpu"))
    native = Transformer(args)
    ours = sum(p.numel() for p in native.parameters())
    assert sum(p.numel() for p in model.parameters()) == ours
    prompts = torch.randint(0, 64, (2, 7))
    timed = hf_generate_timed(model, prompts, 5)
    assert timed["decode_steps"] == 4 and timed["prefill_s"] > 0 and timed["decode_s"] > 0
    # floor: batch 1 reads every non-embedding weight once and each expert with p = k/E
    expert = sum(p.numel() for n, p in native.named_parameters() if ".mlp.experts." in n)
    embed = native.embed_tokens.weight.numel()
    expected = (ours - expert - embed + expert * 2 / 4) * 4 / 1e12
    assert hf_decode_floor_s(model, 4, 2, 1, 1e12) == pytest.approx(expected)


@pytest.mark.timeout(120)
def test_bench_infer_with_hf_peer_smoke(tmp_path):
    out = tmp_path / "infer.json"
    cmd = [
        sys.executable,
        "tools/bench_infer.py",
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--strategy",
        "replicate",
        "--batches",
        "1",
        "--prompt-len",
        "6",
        "--new-tokens",
        "3",
        "--no-cuda-graphs",
        "--peers",
        "hf",
        "--json",
        str(out),
        "model.weights=null",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["replicate", "hf_generate"]
    native, hf = rows
    assert hf["floor_ms_per_step"] == pytest.approx(native["floor_ms_per_step"])
    assert hf["decode_tok_s"] > 0 and hf["versions"]["transformers"] != "absent"
    assert "hf_generate" in proc.stdout.splitlines()[-1]

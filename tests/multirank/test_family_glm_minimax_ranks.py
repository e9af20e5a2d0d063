"""glm4_moe and minimax_m2 through the launcher's own steps (prepare -> groups -> build_model
-> generate) in spawned gloo ranks: greedy ids equal transformers' generate on the same
saved checkpoint under every strategy at 1 and 2 ranks and with pp=2, and one
representative 4-rank plan per family (GLM: tp=2 heads x expert parallel with the token
split; MiniMax: tp=4, kv heads replicated, its whole-projection q/k norm all-reduced)."""

from __future__ import annotations

import json

import pytest

from tests.support import check_launcher_cases, hf_greedy_each, launcher_cases, run_ranks
from tests.support import glm_hf_model as glm_model
from tests.support import minimax_hf_model as minimax_model

pytest.importorskip("transformers")

PROMPTS = [[1, 5, 7, 9, 11, 13], [2, 4, 6], [3, 8, 30, 31, 32, 33, 34, 35]]
NEW_TOKENS = 6
FAMILIES = ("glm4_moe", "minimax_m2")
STRATEGIES = [
    (s, [f"strategy={s}"]) for s in ("replicate", "tp_experts", "ep_allgather", "ep_nccl")
]
PIPELINES = [
    ("replicate pp=2", ["strategy=replicate", "parallel.pp=2"]),
    ("ep_nccl pp=2", ["strategy=ep_nccl", "parallel.pp=2"]),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """family -> (saved directory, transformers' greedy continuations of PROMPTS)."""
    root = tmp_path_factory.mktemp("glm_minimax")
    models = {
        # grouped sigmoid routing with scaling, q/k norm, biases, one dense layer first
        "glm4_moe": glm_model("grouped", num_hidden_layers=4, first_k_dense_replace=1),
        "minimax_m2": minimax_model("m2", num_hidden_layers=4),
    }
    out = {}
    for family, model in models.items():
        directory = root / family
        model.save_pretrained(directory)
        out[family] = (str(directory), hf_greedy_each(model, PROMPTS, NEW_TOKENS))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    out["prompts"] = str(prompts)
    return out


def test_single_rank_matches_transformers(checkpoints):
    run_ranks(
        check_launcher_cases,
        1,
        args=(launcher_cases(checkpoints, FAMILIES, [("auto", [])], NEW_TOKENS),),
    )


def test_two_ranks_every_strategy_and_pipeline(checkpoints):
    run_ranks(
        check_launcher_cases,
        2,
        args=(launcher_cases(checkpoints, FAMILIES, STRATEGIES + PIPELINES, NEW_TOKENS),),
    )


@pytest.mark.slow  # 4 ranks; tests/multirank/test_hybrid_degrees.py runs one by default
def test_four_ranks_one_plan_per_family(checkpoints):
    ep_tp = [("ep_nccl tp=2", ["strategy=ep_nccl", "parallel.tp=2"])]
    cases = launcher_cases(checkpoints, ("glm4_moe",), ep_tp, NEW_TOKENS)
    tp4 = [("tp_experts tp=4", ["strategy=tp_experts"])]
    cases += launcher_cases(checkpoints, ("minimax_m2",), tp4, NEW_TOKENS)
    run_ranks(check_launcher_cases, 4, args=(cases,))

"""deepseek_v2 / deepseek_v3 through the launcher's own steps (prepare -> groups ->
build_model -> generate) in spawned gloo ranks: greedy ids equal transformers' generate on
the same saved checkpoint under every strategy at 1 and 2 ranks and with pp=2, and one
representative 4-rank plan (tp=2 heads split x expert parallel with the token split)."""

from __future__ import annotations

import json

import pytest

from tests.support import check_launcher_cases, hf_greedy_each, launcher_cases, run_ranks
from tests.support import deepseek_hf_model as hf_model

transformers = pytest.importorskip("transformers")

PROMPTS = [[1, 5, 7, 9, 11, 13], [2, 4, 6], [3, 8, 30, 31, 32, 33, 34, 35]]
NEW_TOKENS = 6
# V2-Lite-like (plain q_proj, softmax greedy), V2 (group_limited_greedy), V3 (sigmoid
# noaux_tc with groups and a non-zero correction bias, YaRN mscale)
VARIANTS = ("v2_lite", "v2_group", "v3")
STRATEGIES = [
    (s, [f"strategy={s}"]) for s in ("replicate", "tp_experts", "ep_allgather", "ep_nccl")
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """variant -> (saved directory, transformers' greedy continuations of PROMPTS)."""
    root = tmp_path_factory.mktemp("deepseek")
    out = {}
    for variant in VARIANTS:
        model = hf_model(variant, num_hidden_layers=4, eos_token_id=None)
        directory = root / variant
        model.save_pretrained(directory)
        out[variant] = (str(directory), hf_greedy_each(model, PROMPTS, NEW_TOKENS))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    out["prompts"] = str(prompts)
    return out


def test_single_rank_matches_transformers(checkpoints):
    run_ranks(
        check_launcher_cases,
        1,
        args=(launcher_cases(checkpoints, VARIANTS, [("auto", [])], NEW_TOKENS),),
    )


def test_two_ranks_every_strategy_and_pipeline(checkpoints):
    pipelines = [
        ("replicate pp=2", ["strategy=replicate", "parallel.pp=2"]),
        ("ep_nccl pp=2", ["strategy=ep_nccl", "parallel.pp=2"]),
    ]
    run_ranks(
        check_launcher_cases,
        2,
        args=(launcher_cases(checkpoints, VARIANTS, STRATEGIES + pipelines, NEW_TOKENS),),
    )


@pytest.mark.slow  # 4 ranks; tests/multirank/test_hybrid_degrees.py runs one by default
def test_four_ranks_heads_split_with_expert_parallel(checkpoints):
    plans = [("ep_nccl tp=2", ["strategy=ep_nccl", "parallel.tp=2"])]
    run_ranks(
        check_launcher_cases, 4, args=(launcher_cases(checkpoints, ("v3",), plans, NEW_TOKENS),)
    )

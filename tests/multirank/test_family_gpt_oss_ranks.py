"""gpt_oss through the launcher's own steps (prepare -> groups -> build_model -> generate)
in spawned gloo ranks: greedy ids equal transformers' generate on the same saved checkpoint
(prompts longer than the sliding window, continuations past it) under every strategy at 1
and 2 ranks, with tp=2 (heads and sinks split) and pp=2, and one representative 4-rank plan
(tp=2 x expert parallel with the token split)."""

from __future__ import annotations

import json

import pytest

from tests.support import GPT_OSS_NEW_TOKENS as NEW_TOKENS
from tests.support import GPT_OSS_PROMPTS as PROMPTS
from tests.support import check_launcher_cases, hf_greedy_each, launcher_cases, run_ranks
from tests.support import gpt_oss_hf_model as hf_model

pytest.importorskip("transformers")

STRATEGIES = [
    (s, [f"strategy={s}"]) for s in ("replicate", "tp_experts", "ep_allgather", "ep_nccl")
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """gpt_oss -> (saved directory, transformers' greedy continuations of PROMPTS), and
    the prompts file."""
    root = tmp_path_factory.mktemp("gpt_oss_ranks")
    model = hf_model(seed=1)
    model.save_pretrained(root / "hf")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    expected = hf_greedy_each(model, PROMPTS, NEW_TOKENS)
    return {"gpt_oss": (str(root / "hf"), expected), "prompts": str(prompts)}


def _cases(checkpoints, plans: list[tuple[str, list[str]]]) -> list:
    return launcher_cases(checkpoints, ("gpt_oss",), plans, NEW_TOKENS)


def test_single_rank_matches_transformers(checkpoints):
    run_ranks(check_launcher_cases, 1, args=(_cases(checkpoints, [("auto", [])]),))


def test_two_ranks_every_strategy_tp_and_pipeline(checkpoints):
    extra = [
        ("replicate tp=2", ["strategy=replicate", "parallel.tp=2"]),
        ("replicate pp=2", ["strategy=replicate", "parallel.pp=2"]),
        ("ep_nccl pp=2", ["strategy=ep_nccl", "parallel.pp=2"]),
    ]
    run_ranks(check_launcher_cases, 2, args=(_cases(checkpoints, STRATEGIES + extra),))


@pytest.mark.slow  # 4 ranks; tests/multirank/test_hybrid_degrees.py runs one by default
def test_four_ranks_tp_times_expert_parallel(checkpoints):
    plan = [("ep_nccl tp=2", ["strategy=ep_nccl", "parallel.tp=2"])]
    run_ranks(check_launcher_cases, 4, args=(_cases(checkpoints, plan),))


# ---- random weights built on meta and initialised per rank (no checkpoint) ---------------


def _random_init_body(rank: int, world: int, plans: list[dict]) -> None:
    from datetime import timedelta

    import torch
    import transformers

    from moe_ext.config import GenerateConf
    from moe_ext.groups import ProcessGroups
    from moe_ext.model import ModelArgs, Transformer, generate
    from moe_ext.model.parallelize import parallelize, shard_slices
    from moe_ext.model.weights import init_random_, init_random_full
    from tests.support import GPT_OSS_SHAPE, plan_of

    args = ModelArgs.from_hf_config(transformers.GptOssConfig(**GPT_OSS_SHAPE).to_dict())
    conf = GenerateConf(max_batch_size=4)
    reference = Transformer(args)
    reference.load_state_dict(init_random_full(args), strict=True)
    expected = generate(reference, PROMPTS, conf, eos_id=None, pad_id=0, max_new_tokens=8)
    for plan_kwargs in plans:
        plan = plan_of(**plan_kwargs, world=world)
        groups = ProcessGroups.build(plan, "gloo", timedelta(seconds=60))
        with torch.device("meta"):
            model = Transformer(args)
        parallelize(model, plan, groups)
        init_random_(model, requests=shard_slices(plan, groups, args), device="cpu")
        got = generate(model, PROMPTS, conf, eos_id=None, pad_id=0, max_new_tokens=8)
        assert got.tokens == expected.tokens, (plan_kwargs, got.tokens, expected.tokens)


def test_meta_built_random_model_matches_single_rank():
    plans = [
        dict(strategy="replicate", tp=2),  # heads, sinks and q/k/v/o biases split
        dict(strategy="tp_experts", tp=2, etp=2),  # expert F and gate/up biases split
        dict(strategy="ep_nccl", dp=2, ep=2),  # experts and their biases split, lockstep
    ]
    run_ranks(_random_init_body, 2, args=(plans,))

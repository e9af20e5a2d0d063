"""deepseek_v2 / deepseek_v3 through the launcher's own steps (prepare -> groups ->
build_model -> generate) in spawned gloo ranks: greedy ids equal transformers' generate on
the same saved checkpoint under every strategy at 1 and 2 ranks and with pp=2, and one
representative 4-rank plan (tp=2 heads split x expert parallel with the token split)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.multirank import run_ranks
from tests.test_family_deepseek import hf_model

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
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
        expected = []
        for prompt in PROMPTS:
            ids = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            expected.append(ids[0, len(prompt) :].tolist())
        out[variant] = (str(directory), expected)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    out["prompts"] = str(prompts)
    return out


def _launcher_generate(overrides: list[str], rank: int, world_size: int) -> list[list[int]]:
    from hydra import compose, initialize_config_dir

    from moe_ext.cli import infer
    from moe_ext.config import register_configs
    from moe_ext.dist import DistEnv
    from moe_ext.groups import ProcessGroups
    from moe_ext.model import generate

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    env = DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=rank,
        local_world_size=world_size,
        master_addr="127.0.0.1",
        master_port=0,
    )
    job = infer.prepare(cfg, env, cuda_available=False, num_local_gpus=0)
    groups = ProcessGroups.build(job.plan, backend="gloo", timeout=timedelta(seconds=120))
    model = infer.build_model(job, groups, rank, torch.device("cpu"))
    result = generate(
        model,
        job.prompt_ids,
        cfg.generate,
        eos_id=job.tokenizer.eos_id,
        pad_id=job.tokenizer.pad_id,
        seed=cfg.seed,
    )
    return result.tokens


def _check(rank: int, world_size: int, cases: list) -> None:
    failures = []
    for label, overrides, expected in cases:
        got = _launcher_generate(overrides, rank, world_size)
        if got != expected:
            failures.append(f"{label}: got {got}, transformers {expected}")
    assert not failures, "\n".join(failures)


def _cases(checkpoints, plans, variants=VARIANTS) -> list:
    cases = []
    for variant in variants:
        directory, expected = checkpoints[variant]
        for label, extra in plans:
            overrides = [
                f"checkpoint={directory}",
                f"prompts={checkpoints['prompts']}",
                f"generate.max_new_tokens={NEW_TOKENS}",
                "dtype=fp32",
                *extra,
            ]
            cases.append((f"{variant} {label}", overrides, expected))
    return cases


@pytest.mark.multirank
def test_single_rank_matches_transformers(checkpoints):
    run_ranks(_check, 1, args=(_cases(checkpoints, [("auto", [])]),))


@pytest.mark.multirank
def test_two_ranks_every_strategy_and_pipeline(checkpoints):
    pipelines = [
        ("replicate pp=2", ["strategy=replicate", "parallel.pp=2"]),
        ("ep_nccl pp=2", ["strategy=ep_nccl", "parallel.pp=2"]),
    ]
    run_ranks(_check, 2, args=(_cases(checkpoints, STRATEGIES + pipelines),))


@pytest.mark.multirank
def test_four_ranks_heads_split_with_expert_parallel(checkpoints):
    plans = [("ep_nccl tp=2", ["strategy=ep_nccl", "parallel.tp=2"])]
    run_ranks(_check, 4, args=(_cases(checkpoints, plans, variants=("v3",)),))

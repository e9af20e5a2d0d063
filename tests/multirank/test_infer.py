"""launch/infer.py end to end: greedy ids equal Hugging Face transformers' greedy generate
on the same weights, for every strategy at 1, 2 and 4 ranks and with pp=2; a plan for
another world size is one line on stderr.

The rank matrix calls the launcher's own steps (prepare -> groups -> build_model ->
generate) inside spawned gloo ranks, many configurations per spawn; the command line
itself runs through torchrun in a few subprocess cases. Bad input on one rank:
tests/unit/test_infer.py.
"""
from __future__ import annotations

import json
import subprocess
from datetime import timedelta

import pytest
import torch
from omegaconf import OmegaConf

from tests.support import (
    INFER_FAMILIES,
    INFER_NEW_TOKENS,
    REPO,
    make_infer_checkpoints,
    run_launcher,
    run_ranks,
)

INFER = REPO / "launch" / "infer.py"
FAMILIES = INFER_FAMILIES
NEW_TOKENS = INFER_NEW_TOKENS


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    return make_infer_checkpoints(tmp_path_factory.mktemp("hf"))


def _infer_conf(overrides: list[str]):
    """The launcher's config, composed exactly as `launch/infer.py <overrides>` would."""
    from hydra import compose, initialize_config_dir

    from moe_ext.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def _generate_with_launcher(overrides: list[str], rank: int, world_size: int) -> list[list[int]]:
    from moe_ext.cli import infer  # launch/infer.py's steps
    from moe_ext.dist import DistEnv
    from moe_ext.groups import ProcessGroups
    from moe_ext.model import generate

    cfg = _infer_conf(overrides)
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank,
                  local_world_size=world_size, master_addr="127.0.0.1", master_port=0)
    job = infer.prepare(cfg, env, cuda_available=False, num_local_gpus=0)
    groups = ProcessGroups.build(job.plan, backend="gloo", timeout=timedelta(seconds=120))
    model = infer.build_model(job, groups, rank, torch.device("cpu"))
    result = generate(model, job.prompt_ids, cfg.generate, eos_id=job.tokenizer.eos_id,
                            pad_id=job.tokenizer.pad_id, seed=cfg.seed)
    return result.tokens


def _check_cases(rank: int, world_size: int, cases: list[tuple[str, list[str], list]]) -> None:
    failures = []
    for label, overrides, expected in cases:
        got = _generate_with_launcher(overrides, rank, world_size)
        if got != expected:
            failures.append(f"{label}: got {got}, transformers {expected}")
    assert not failures, "\n".join(failures)


def _cases(checkpoints, strategy_overrides: list[tuple[str, list[str]]]):
    cases = []
    for family in FAMILIES:
        directory, expected = checkpoints[family]
        for label, extra in strategy_overrides:
            overrides = [f"checkpoint={directory}", f"prompts={checkpoints['prompts']}",
                         f"generate.max_new_tokens={NEW_TOKENS}", "dtype=fp32", *extra]
            cases.append((f"{family} {label}", overrides, expected))
    return cases


STRATEGIES = [(s, [f"strategy={s}"]) for s in
              ("replicate", "tp_experts", "ep_allgather", "ep_nccl")]


def test_single_rank_matches_transformers(checkpoints):
    run_ranks(_check_cases, 1, args=(_cases(checkpoints, [("auto", [])]),))


def test_two_ranks_every_strategy_and_pipeline(checkpoints):
    extra = [("replicate pp=2", ["strategy=replicate", "parallel.pp=2"]),
             ("ep_nccl pp=2", ["strategy=ep_nccl", "parallel.pp=2"])]
    run_ranks(_check_cases, 2, args=(_cases(checkpoints, STRATEGIES + extra),))


def test_four_ranks_every_strategy(checkpoints):
    extra = [("ep_nccl tp=2", ["strategy=ep_nccl", "parallel.tp=2"]),
             ("tp_experts pp=2", ["strategy=tp_experts", "parallel.pp=2"]),
             ("ep_allgather pp=2", ["strategy=ep_allgather", "parallel.pp=2"]),
             # EP 2 x 2 replicas: what auto picks on PCIe when half the experts fit a GPU
             ("ep_allgather ep=2", ["strategy=ep_allgather", "parallel.ep=2"])]
    run_ranks(_check_cases, 4, args=(_cases(checkpoints, STRATEGIES + extra),))


# -- the command line --------------------------------------------------------------------

def _cli(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    return run_launcher(INFER, args, nproc, timeout=300)


def test_cli_demo_writes_output(tmp_path, checkpoints):
    out = tmp_path / "out.jsonl"
    res = _cli(["+topology=pcie", "generate.max_new_tokens=5", f"output={out}"], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "plan: replicate" in res.stdout + res.stderr  # auto on PCIe with a tiny model
    assert "decode:" in res.stdout + res.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and all(len(r["output_ids"]) == 5 for r in lines)
    assert all(isinstance(r["text"], str) and r["prompt_ids"] for r in lines)

    directory, expected = checkpoints["qwen3_moe"]
    out2 = tmp_path / "hf.jsonl"
    res = _cli([f"checkpoint={directory}", f"prompts={checkpoints['prompts']}",
                f"generate.max_new_tokens={NEW_TOKENS}", "strategy=ep_nccl", f"output={out2}"],
               nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [json.loads(x)["output_ids"] for x in out2.read_text().splitlines()] == expected


def test_cli_world_size_mismatch_two_ranks(tmp_path):
    res = _cli(["strategy=tp_experts", "parallel.tp=4"], nproc=2)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "world" in errors[0], res.stderr[-2000:]

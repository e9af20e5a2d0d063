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

import pytest

from tests.support import (
    INFER_FAMILIES,
    INFER_NEW_TOKENS,
    REPO,
    check_launcher_cases,
    launcher_cases,
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


STRATEGIES = [
    (s, [f"strategy={s}"]) for s in ("replicate", "tp_experts", "ep_allgather", "ep_nccl")
]


def test_single_rank_matches_transformers(checkpoints):
    run_ranks(
        check_launcher_cases,
        1,
        args=(launcher_cases(checkpoints, FAMILIES, [("auto", [])], NEW_TOKENS),),
    )


def test_two_ranks_every_strategy_and_pipeline(checkpoints):
    extra = [
        ("replicate pp=2", ["strategy=replicate", "parallel.pp=2"]),
        ("ep_nccl pp=2", ["strategy=ep_nccl", "parallel.pp=2"]),
    ]
    run_ranks(
        check_launcher_cases,
        2,
        args=(launcher_cases(checkpoints, FAMILIES, STRATEGIES + extra, NEW_TOKENS),),
    )


@pytest.mark.slow  # 4-rank launcher matrix; every strategy at 2 ranks runs by default
def test_four_ranks_every_strategy(checkpoints):
    extra = [
        ("ep_nccl tp=2", ["strategy=ep_nccl", "parallel.tp=2"]),
        ("tp_experts pp=2", ["strategy=tp_experts", "parallel.pp=2"]),
        ("ep_allgather pp=2", ["strategy=ep_allgather", "parallel.pp=2"]),
        # EP 2 x 2 replicas: what auto picks on PCIe when half the experts fit a GPU
        ("ep_allgather ep=2", ["strategy=ep_allgather", "parallel.ep=2"]),
    ]
    run_ranks(
        check_launcher_cases,
        4,
        args=(launcher_cases(checkpoints, FAMILIES, STRATEGIES + extra, NEW_TOKENS),),
    )


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
    res = _cli(
        [
            f"checkpoint={directory}",
            f"prompts={checkpoints['prompts']}",
            f"generate.max_new_tokens={NEW_TOKENS}",
            "strategy=ep_nccl",
            f"output={out2}",
        ],
        nproc=2,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert [json.loads(x)["output_ids"] for x in out2.read_text().splitlines()] == expected


def test_cli_world_size_mismatch_two_ranks(tmp_path):
    res = _cli(["strategy=tp_experts", "parallel.tp=4"], nproc=2)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "world" in errors[0], res.stderr[-2000:]

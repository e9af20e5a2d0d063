"""Hybrid degrees at 4 ranks through the launcher's own steps (prepare -> groups ->
build_model -> generate, in spawned gloo ranks): greedy ids equal transformers' greedy
generate on the same saved checkpoint (tiny qwen3_moe and mixtral, random weights) for

  tp 2 x ep 2   attention TP over a pair, experts split over the same pair, tokens split
                over TP for the exchange, two such replicas (ep_nccl and ep_allgather)
  pp 2 x ep 2   two stages, experts split over the two ranks of each stage (dp 2)
  pp 2 x tp 2   two stages of a TP pair, experts whole (replicate) or FFN-sharded
                (tp_experts)
  auto, batch below the replicas: parallel.ep=2 with generate.max_batch_size=1 (3 prompts
                one at a time) makes auto run attention tp 4 with ep 2 over the same
                ranks (moe_ext.plan._attention_tp_for_batch), batch 3: tp 2 x dp 2 x ep 2

The default run is one representative case (auto at batch 1 on qwen3_moe: the planner's
rule, attention TP over all ranks, EP with the token split leaving ranks without tokens);
the rest are marked slow (4 ranks on 2 CPU cores: each case loads and generates on every
rank); so is auto at batch 1 on 2 ranks (tp 2 x ep 2, issue 18's one-user case). The
explicit strategies at 2 ranks: tests/multirank/test_infer.py.
"""

from __future__ import annotations

import pytest

from tests.support import (
    INFER_NEW_TOKENS,
    check_launcher_cases,
    launcher_cases,
    launcher_conf,
    local_dist_env,
    make_infer_checkpoints,
    run_ranks,
)

pytest.importorskip("transformers")

WORLD = 4

# label -> (overrides, (tp, pp, dp, ep, etp) the plan must have)
PLANS = {
    "tp2 x ep2 ep_nccl": (
        ["strategy=ep_nccl", "parallel.tp=2", "parallel.ep=2"],
        (2, 1, 2, 2, 1),
    ),
    "tp2 x ep2 ep_allgather": (
        ["strategy=ep_allgather", "parallel.tp=2", "parallel.ep=2"],
        (2, 1, 2, 2, 1),
    ),
    "pp2 x ep2 ep_nccl": (["strategy=ep_nccl", "parallel.pp=2"], (1, 2, 2, 2, 1)),
    "pp2 x ep2 ep_allgather": (["strategy=ep_allgather", "parallel.pp=2"], (1, 2, 2, 2, 1)),
    "pp2 x tp2 replicate": (
        ["strategy=replicate", "parallel.tp=2", "parallel.pp=2"],
        (2, 2, 1, 1, 1),
    ),
    "pp2 x tp2 tp_experts": (["strategy=tp_experts", "parallel.pp=2"], (2, 2, 1, 1, 2)),
    "auto batch 1: tp4 x ep2": (
        ["strategy=auto", "parallel.ep=2", "generate.max_batch_size=1"],
        (4, 1, 1, 2, 1),
    ),
    "auto batch 3: tp2 x dp2 x ep2": (["strategy=auto", "parallel.ep=2"], (2, 1, 2, 2, 1)),
}
DEFAULT = ("qwen3_moe", "auto batch 1: tp4 x ep2")
# issue 18's case: one user, a model that needs two cards (experts over both)
TWO_RANKS = {
    "auto batch 1: tp2 x ep2": (
        ["strategy=auto", "parallel.ep=2", "generate.max_batch_size=1"],
        (2, 1, 1, 2, 1),
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """qwen3_moe / mixtral -> (saved directory, transformers' greedy ids), and the prompts."""
    return make_infer_checkpoints(tmp_path_factory.mktemp("hybrid"), ("qwen3_moe", "mixtral"))


def _check(checkpoints: dict, family: str, label: str, world: int = WORLD) -> None:
    overrides, expected_degrees = PLANS[label] if world == WORLD else TWO_RANKS[label]
    cases = launcher_cases(checkpoints, (family,), [(label, overrides)], INFER_NEW_TOKENS)
    # the plan the launcher derives (prepare makes no process group): the degrees asked for
    from moe_ext.cli import infer

    _, case_overrides, _ = cases[0]
    job = infer.prepare(launcher_conf(case_overrides), local_dist_env(0, world), False, 0)
    plan = job.plan
    assert (plan.tp, plan.pp, plan.dp, plan.ep, plan.etp) == expected_degrees, plan.describe()
    run_ranks(check_launcher_cases, world, args=(cases,))


def test_auto_batch_one_spreads_attention_over_the_ep_ranks(checkpoints):
    _check(checkpoints, *DEFAULT)


@pytest.mark.slow  # 4 ranks on 2 cores: ~10-20 s a case
@pytest.mark.parametrize(
    "family, label",
    [(f, label) for f in ("qwen3_moe", "mixtral") for label in PLANS if (f, label) != DEFAULT],
)
def test_hybrid_degrees_match_transformers(checkpoints, family, label):
    _check(checkpoints, family, label)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_two_ranks_auto_batch_one(checkpoints, family):
    _check(checkpoints, family, "auto batch 1: tp2 x ep2", world=2)

"""The typed runtime contract between parallelize() and generate(): ParallelContext is the
one place the plan's runtime facts live, frozen, with a single-rank default; generate()
keeps its memory in the declared DecodeState and adds no attributes to the model."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from moe_ext.config import GenerateConf
from moe_ext.model import Transformer, generate, init_random_full
from moe_ext.model.context import ParallelContext
from moe_ext.model.parallelize import parallel_context
from tests.support import plan_of, tiny_args

PP_GROUP, DP_GROUP = object(), object()  # stand-ins: only their identity is checked


def _groups(pp_prev=None, pp_next=None, pp_ranks=(0,), dp_rank=0):
    """The ProcessGroups attributes parallel_context reads (the multirank tests of
    tests/multirank/test_model_parallel.py run it on real groups)."""
    return SimpleNamespace(
        pp_prev_rank=pp_prev,
        pp_next_rank=pp_next,
        pp=PP_GROUP,
        ranks_of=lambda axis: list(pp_ranks),
        dp_rank=dp_rank,
        dp=DP_GROUP,
    )


def test_unparallelized_model_holds_the_single_rank_context():
    context = Transformer(tiny_args()).context
    assert context == ParallelContext()
    assert (context.plan, context.dp_size, context.dp_group, context.pp_group) == (
        None,
        1,
        None,
        None,
    )
    assert context.is_first_stage and context.is_last_stage
    assert not context.lockstep and not context.expert_parallel and context.cuda_graph_safe


def test_context_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Transformer(tiny_args()).context.lockstep = True


def test_lockstep_only_when_experts_are_split_across_replicas():
    ep = parallel_context(plan_of("ep_nccl", dp=2, ep=2), _groups(dp_rank=1))
    assert (ep.dp_size, ep.dp_rank, ep.dp_group) == (2, 1, DP_GROUP)
    assert ep.lockstep and ep.expert_parallel and not ep.cuda_graph_safe
    replicas = parallel_context(plan_of("replicate", dp=2), _groups(dp_rank=1))
    assert replicas.dp_size == 2 and not replicas.lockstep and replicas.cuda_graph_safe
    # EP over the TP ranks of one replica: expert parallel, but no replicas to keep in step
    tp_ep = parallel_context(plan_of("ep_nccl", tp=2, ep=2), _groups())
    assert tp_ep.expert_parallel and not tp_ep.lockstep and tp_ep.dp_group is None


def test_pipeline_stages_know_their_neighbours_and_the_sampling_rank():
    plan = plan_of("replicate", pp=2)
    first = parallel_context(plan, _groups(pp_next=1, pp_ranks=(0, 1)))
    last = parallel_context(plan, _groups(pp_prev=0, pp_ranks=(0, 1)))
    assert first.is_first_stage and not first.is_last_stage and first.pp_next == 1
    assert last.is_last_stage and not last.is_first_stage and last.pp_prev == 0
    assert first.pp_group is last.pp_group is PP_GROUP and first.pp_last_rank == 1
    assert not first.cuda_graph_safe  # per-step send/recv between stages


def test_without_pipeline_no_pipeline_group():
    context = parallel_context(plan_of("replicate", tp=2), _groups())
    assert context.pp_group is None and context.pp_last_rank is None
    assert context.is_first_stage and context.is_last_stage and context.cuda_graph_safe


def test_generate_adds_no_attributes_to_the_model():
    args = tiny_args()
    model = Transformer(args)
    model.load_state_dict(init_random_full(args))
    before = set(vars(model))
    generate(model, [[256, 1, 2]], GenerateConf(max_new_tokens=3), eos_id=None)
    assert set(vars(model)) == before

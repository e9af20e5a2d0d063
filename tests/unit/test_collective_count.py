"""moe_ext.bench.collectives: the counter sees every kind of c10d operation, sync and async,
on a gloo group of one (still real c10d calls), and nothing in a single-rank decode step.
Exact counts per decode step of parallel plans: tests/multirank/test_collective_count.py.
"""

from __future__ import annotations

import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moe_ext.bench.collectives import count_collectives, decode_step_collectives, kind_of, total


def test_kind_of_names():
    assert kind_of("c10d::allreduce_") == "all_reduce"
    assert kind_of("c10d::_allgather_base_") == "all_gather"
    assert kind_of("c10d::_reduce_scatter_base_") == "reduce_scatter"
    assert kind_of("c10d::alltoall_base_") == "all_to_all"
    assert kind_of("c10d::recv_") == "recv"
    assert kind_of("aten::add") is None
    assert kind_of("gloo:all_reduce") is None  # the backend's own event: not counted twice


@pytest.fixture
def world_of_one():
    with tempfile.TemporaryDirectory() as directory:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{directory}/store",
            rank=0,
            world_size=1,
            timeout=timedelta(seconds=30),
        )
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_counts_every_kind(world_of_one):
    x = torch.ones(4, 3)
    # torch 2.13 names (the older ones warn), as moe_ext.moe.dispatch.comm picks them
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    def issue():
        dist.all_reduce(x)
        dist.all_reduce(x, async_op=True).wait()
        all_gather(torch.empty(4, 3), x)
        reduce_scatter(torch.empty(4, 3), x)
        dist.all_to_all_single(torch.empty(4, 3), x)
        dist.broadcast(x, 0)
        return "done"

    result, counts = count_collectives(issue)
    assert result == "done"
    assert counts == {
        "all_reduce": 2,
        "all_gather": 1,
        "reduce_scatter": 1,
        "all_to_all": 1,
        "broadcast": 1,
    }
    assert total(counts) == 6
    assert count_collectives(lambda: x + 1)[1] == {}


def test_single_rank_decode_step_has_none():
    from moe_ext.model import Transformer
    from moe_ext.model.weights import init_random_full
    from tests.support import tiny_args

    args = tiny_args()
    model = Transformer(args)
    model.load_state_dict(init_random_full(args))
    assert decode_step_collectives(model, batch=2) == {}
    assert model.cache_shape == (2, 6)

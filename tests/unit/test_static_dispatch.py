"""Static-capacity expert exchange in one process (world size 1): equals the dynamic exchange
and the float64 reference (tests.support.check_static_equals_dynamic), makes no host sync,
refuses T > capacity; experts accept trailing padding rows. On 2 and 4 ranks:
tests/multirank/test_static_dispatch.py.

# T tokens on a rank, C capacity, H hidden, E experts, k top-k
"""

from __future__ import annotations

import pytest
import torch

from moe_ext.moe.dispatch import DispatchGroups
from moe_ext.moe.experts import GroupedExperts
from tests.support import (
    CASES,
    STATIC,
    H,
    check_static_equals_dynamic,
    no_sync_body,
    static_dispatcher,
)


def test_static_world_size_1():
    for name in STATIC:
        check_static_equals_dynamic(name, DispatchGroups(), 3, CASES, 1)


# ---- no host sync -----------------------------------------------------------------------


def test_static_dispatch_makes_no_host_sync_world_1():
    no_sync_body(0, 1)  # world 2 and 4: in tests/multirank/test_static_dispatch.py


# ---- errors and padding rows ------------------------------------------------------------


def test_capacity_errors():
    dispatcher = static_dispatcher("allgather_rs", DispatchGroups(), 3)
    x, w, idx = torch.randn(4, H), torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(
        ValueError, match="4 tokens on this rank exceed .* capacity max_tokens_per_rank=3; raise it"
    ) as err:
        dispatcher.dispatch(x, w, idx)
    assert "\n" not in str(err.value)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive int or None"):
            dispatcher.set_capacity(bad)
    dispatcher.set_capacity(None)
    assert dispatcher.dispatch(x, w, idx)[0].shape == (8, H)  # dynamic again: T*k rows


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_experts_accept_trailing_padding_rows(backend):
    torch.manual_seed(0)
    experts = GroupedExperts(4, H, 32, backend=backend)
    counts = torch.tensor([2, 0, 3, 1])  # 6 real rows
    x = torch.randn(10, H)
    x[6:] = float("nan")  # padding rows may hold anything
    y = experts(x, counts)
    assert y.shape == (10, H)
    torch.testing.assert_close(y[:6], experts(x[:6].clone(), counts))
    if backend == "loop":
        assert torch.equal(y[6:], torch.zeros(4, H))

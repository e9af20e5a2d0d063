"""Every dispatcher at world size 1 computes the dense reference's outputs and gradients
(tests.support.check_strategy); a bad dispatcher name or operands are errors. At world
sizes 2 and 4: tests/multirank/test_moe_dispatch.py.

# T tokens, H hidden, E experts, k top-k
"""

from __future__ import annotations

import pytest
import torch

from moe_ext.moe.dispatch import DispatchGroups
from tests.support import STRATEGIES, E, H, check_strategy


def test_all_strategies_world_size_1():
    for strategy in STRATEGIES:
        check_strategy(strategy, DispatchGroups(), 0, torch.float32, torch.device("cpu"), "fp32")


def test_dispatcher_errors():
    from moe_ext.moe.dispatch import build_dispatcher

    with pytest.raises(ValueError, match="unknown dispatcher"):
        build_dispatcher("carrier_pigeon", E)
    d = build_dispatcher("local", E)
    with pytest.raises(ValueError, match="int64"):
        d.dispatch(torch.randn(3, H), torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="shapes disagree"):
        d.dispatch(torch.randn(3, H), torch.rand(3, 2), torch.zeros(4, 2, dtype=torch.int64))

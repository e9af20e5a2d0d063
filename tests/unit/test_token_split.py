"""The TP token split of moe_ext.moe.dispatch.comm without a group: the identity. On 2 ranks:
tests/multirank/test_token_split.py."""

from __future__ import annotations

import torch

from moe_ext.moe.dispatch.comm import gather_slices, run_on_token_slice, take_slice

H = 6


def test_group_of_one_is_the_identity():
    x = torch.randn(3, H, requires_grad=True)
    assert take_slice(x, None) is x and gather_slices(x, None) is x
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(H, 10), torch.nn.Tanh(), torch.nn.Linear(10, H))
    torch.testing.assert_close(run_on_token_slice(mlp, (x,), None), mlp(x))

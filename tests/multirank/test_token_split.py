"""The TP token split of moe_ext.moe.dispatch.comm (used by the native decoder and the Megatron
layer): outputs and gradients on 2 gloo ranks against a single-rank float64 reference.
A group of one (no split): tests/unit/test_token_split.py.

# T tokens, H hidden, k top-k

Convention checked: a TP-replicated tensor has the full, identical gradient on every rank;
parameters replicated over TP that only saw this rank's slice hold partial gradients whose
sum over the group is the full one.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_ext.model.decoder import split_tokens_forward
from moe_ext.moe.dispatch.comm import gather_slices, run_on_token_slice, take_slice
from tests.support import run_ranks

H = 6


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(H, 10), torch.nn.Tanh(), torch.nn.Linear(10, H)
    ).double()


def _weighted(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [T, H], w [T, k] float, idx [T, k] int64 -> [T, H]: per-token, uses all three."""
    return x * (w * (idx + 1)).sum(-1, keepdim=True)


def _replicated_body(rank, world):
    group = dist.group.WORLD
    for tokens in (5, 4, 1):  # 5 and 1 pad to a multiple of 2; 1 leaves rank 1 all padding
        gen = torch.Generator().manual_seed(tokens)  # same tokens on both ranks
        x_full = torch.randn(tokens, H, generator=gen, dtype=torch.float64)
        cot = torch.randn(tokens, H, generator=gen, dtype=torch.float64)
        mlp, ref_mlp = _mlp(), _mlp()

        x = x_full.clone().requires_grad_(True)
        y = run_on_token_slice(mlp, (x,), group)
        (y * cot).sum().backward()
        x_ref = x_full.clone().requires_grad_(True)
        y_ref = ref_mlp(x_ref)
        (y_ref * cot).sum().backward()
        where = f"T={tokens} rank {rank}"
        torch.testing.assert_close(y, y_ref, msg=where)
        torch.testing.assert_close(x.grad, x_ref.grad, msg=where)  # full gradient everywhere
        for p, p_ref in zip(mlp.parameters(), ref_mlp.parameters()):
            summed = p.grad.clone()
            dist.all_reduce(summed)  # each rank saw only its slice
            torch.testing.assert_close(summed, p_ref.grad, msg=where)

        # several per-token tensors, one of them integer, through the same split
        w_full = torch.rand(tokens, 2, generator=gen, dtype=torch.float64)
        idx = torch.randint(0, 4, (tokens, 2), generator=gen)
        x, w = x_full.clone().requires_grad_(True), w_full.clone().requires_grad_(True)
        (run_on_token_slice(_weighted, (x, w, idx), group) * cot).sum().backward()
        x_ref, w_ref = x_full.clone().requires_grad_(True), w_full.clone().requires_grad_(True)
        (_weighted(x_ref, w_ref, idx) * cot).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, msg=where)
        torch.testing.assert_close(w.grad, w_ref.grad, msg=where)

    # the decoder's wrapper on a MoE layer (whole routing, sliced exchange) keeps leading
    # dims and equals the unsplit layer; T = 0 runs without a collective
    moe = _moe_layer()
    hidden = moe.router.weight.shape[1]
    x = torch.randn(2, 3, hidden, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(split_tokens_forward(moe, x, group), moe(x))
        assert split_tokens_forward(moe, x[:0], group).shape == (0, 3, hidden)


def _moe_layer() -> torch.nn.Module:
    """The tiny model's first MoE layer with its seeded weights, float64, local experts."""
    from moe_ext.model import Transformer
    from moe_ext.model.weights import init_random_full
    from tests.support import tiny_args

    args = tiny_args()
    model = Transformer(args)
    model.load_state_dict(init_random_full(args))
    return next(b.mlp for b in model.layers.values() if b.is_moe).double()


def _sharded_body(rank, world):
    """Sequence-parallel shape: each rank holds its own rows, gathers them for a replicated
    computation whose input gradient is already full on every rank, keeps its own rows."""
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(3)
    x_full = torch.randn(2 * world, H, generator=gen, dtype=torch.float64)
    cot = torch.randn(2 * world, H, generator=gen, dtype=torch.float64)
    mine = slice(2 * rank, 2 * rank + 2)

    x = x_full[mine].clone().requires_grad_(True)
    gathered = gather_slices(x, group)  # [2*world, H], identical on every rank
    y = take_slice(torch.sin(gathered) * 3, group)  # this rank's rows again
    (y * cot[mine]).sum().backward()
    x_ref = x_full.clone().requires_grad_(True)
    (torch.sin(x_ref) * 3 * cot).sum().backward()
    torch.testing.assert_close(y, (torch.sin(x_full) * 3)[mine])
    torch.testing.assert_close(x.grad, x_ref.grad[mine])


@pytest.mark.timeout(120)
def test_token_split_matches_single_rank_world2():
    run_ranks(_replicated_body, world_size=2)


@pytest.mark.timeout(120)
def test_gather_then_take_slice_matches_single_rank_world2():
    run_ranks(_sharded_body, world_size=2)

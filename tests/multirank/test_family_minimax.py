"""minimax_m2 (MiniMax-M2) on 2 gloo ranks: the whole-projection q/k norm split over TP
ranks equals the unsplit one (forward, and gradients where the kv heads split). The
single-process cases: tests/unit/test_family_minimax.py."""

from __future__ import annotations

import pytest
import torch

from moe_ext.model import ModelArgs
from tests.support import minimax_hf_model as hf_model
from tests.support import run_ranks

pytest.importorskip("transformers")


def _projection_norm_body(rank: int, world: int) -> None:
    """The per_layer q/k norm with q/k split by heads over ``world`` TP ranks (norm weights
    sliced by the family's attention_shards): each rank's normalised q and k equal its
    rows of the unsplit computation, with kv heads split (2 over 2 ranks) or replicated
    (1 over 2); with split heads, the projections' gradients equal the unsplit ones."""
    import torch.distributed as dist

    from moe_ext.model.layers import Attention

    for kv_heads in (2, 1):
        config = hf_model("m2", num_key_value_heads=kv_heads).config.to_dict()
        args = ModelArgs.from_hf_config(config)
        torch.manual_seed(1)
        full = Attention(args)
        with torch.no_grad():
            for p in full.parameters():
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
        x = torch.randn(2, 5, args.hidden_size)
        q = full.q_proj(x).detach().requires_grad_(True)
        k = full.k_proj(x).detach().requires_grad_(True)
        ref_q, ref_k = full.q_norm(q), full.k_norm(k)
        weights_q, weights_k = torch.randn_like(ref_q), torch.randn_like(ref_k)
        ((ref_q * weights_q).sum() + (ref_k * weights_k).sum()).backward()

        shards = args.family.attention_shards(args, world, rank)
        q_rows = slice(*shards["q_norm.weight"].bounds(full.q_norm.weight.shape)[0][0])
        k_rows = slice(*shards["k_norm.weight"].bounds(full.k_norm.weight.shape)[0][0])
        local = Attention(args)
        with torch.no_grad():
            local.q_norm.weight.data = full.q_norm.weight[q_rows].clone()
            local.k_norm.weight.data = full.k_norm.weight[k_rows].clone()
        local.tp_group = dist.group.WORLD
        lq = q.detach()[..., q_rows].clone().requires_grad_(True)
        lk = k.detach()[..., k_rows].clone().requires_grad_(True)
        out_q, out_k = local.normalize_projections(lq, lk)
        torch.testing.assert_close(out_q, ref_q[..., q_rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_k, ref_k[..., k_rows], atol=1e-5, rtol=1e-5)
        if kv_heads % world == 0:  # no replicated head counted twice in the local losses
            (
                (out_q * weights_q[..., q_rows]).sum() + (out_k * weights_k[..., k_rows]).sum()
            ).backward()
            torch.testing.assert_close(lq.grad, q.grad[..., q_rows], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lk.grad, k.grad[..., k_rows], atol=1e-5, rtol=1e-5)


def test_projection_norm_split_over_tp_equals_unsplit():
    run_ranks(_projection_norm_body, 2)

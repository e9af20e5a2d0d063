"""Exact global-norm clipping inside the DeepSpeed engine vs a single-rank reference, on
gloo ranks: for ep2 / ep_allgather / replicate at 2 ranks and ep2·dp2 / ep4 at 4, under ZeRO
0, 1 and 2 (fp32), ZeRO 2 with the optimizer offloaded to CPU, and bf16 with ZeRO 1 (DeepSpeed's
bf16 optimizer) and ZeRO 2, and (slow) tp2 / tp2·ep2 / pp2 (1F1B), three clipped AdamW
steps give the reference's per-rank losses, the reference's pre-clip global norm as
``engine.get_global_grad_norm()`` every step, and the reference's weights afterwards.
launch/train.py (slow) trains ep_nccl with ZeRO 2, offload and clipping, and resumes it
exactly.

The clip is made to matter: ``MAX_NORM`` is so small that the clipped gradients are of the
order of AdamW's eps, where the update depends on the clip factor (at larger scales Adam
would normalise a wrong factor away)."""

from __future__ import annotations

import os

import pytest
import torch

from moe_ext.model import Transformer
from moe_ext.model.parallelize import take_shard
from moe_ext.model.weights import init_random_full
from tests.support import (
    deepspeed_test_engine,
    groups_per_layout,
    plan_of,
    run_ranks,
    sharded_random_model,
    short_train_overrides,
    tiny_args,
)

AUX = 0.01
MB, SEQ = 2, 16  # per-rank micro batch, sequence length
LR, BETAS = 3e-3, (0.9, 0.95)
MAX_NORM = 1e-6  # clipped gradient elements ~1e-9..1e-8, AdamW eps 1e-8
STEPS = 3
# bf16 is compared over two steps: by the third, Adam's sign-sized updates of bf16-noisy
# tiny gradients move the run away from fp32
BF16_STEPS = 2


def _batch(step: int, dp_rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * step + dp_rank)
    return torch.randint(0, 256, (MB, SEQ + 1), generator=gen)  # [B, S+1]


def _reference(args, dp: int, microbatches: int = 1):
    """The full model on one rank: per step the dp ranks' losses (each the mean over its
    ``microbatches`` chunks, as the pipeline's), the global norm of the gradient of their
    mean (before clipping); then the weights after STEPS clipped steps."""
    from moe_ext.deepspeed.engine import CausalLMWithAux

    model = Transformer(args)
    model.load_state_dict(init_random_full(args))
    wrapped = CausalLMWithAux(model, AUX).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=0.0)
    losses, norms = [], []
    for step in range(STEPS):
        per_rank = [
            sum(wrapped(chunk)[0] for chunk in _batch(step, r).chunk(microbatches)) / microbatches
            for r in range(dp)
        ]
        (sum(per_rank) / dp).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append([x.item() for x in per_rank])
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def _tolerances(dtype: torch.dtype, device: torch.device):
    """(loss approx kwargs, norm rtol, weight (rtol, atol) or None) against the fp32 reference.
    bf16 rounds the forward and the gradients to 8 bits of mantissa: losses and norms within
    5% (the CPU's bf16 stays within 2%), weights not compared (tiny updates vanish in bf16),
    and only BF16_STEPS steps. fp32 on CUDA: reduction order and atomics move the last bits."""
    if dtype == torch.bfloat16:
        return dict(rel=5e-2), 5e-2, None
    if device.type == "cuda":
        return dict(rel=1e-4, abs=1e-5), 1e-3, (1e-4, 1e-6)
    return dict(rel=1e-5, abs=1e-6), 1e-4, (1e-5, 2e-7)


def _check_case(args, plan, groups, zero, dtype, offload, reference, device):
    # drawn on the CPU: a CUDA generator draws other values than the reference's
    model, requests = sharded_random_model(args, plan, groups, "cpu")
    model.to(device)
    engine = deepspeed_test_engine(
        model,
        groups,
        lr=LR,
        micro_batch=MB,
        zero_stage=zero,
        grad_clip=MAX_NORM,
        aux_loss_coeff=AUX,
        dtype=dtype,
        offload_optimizer=offload,
    )
    pipeline = None
    if plan.pp > 1:
        from moe_ext.train.pipeline import PipelineSchedule

        pipeline = PipelineSchedule(engine, groups, 2)
    ref_losses, ref_norms, ref_weights = reference
    loss_tol, norm_tol, weight_tol = _tolerances(dtype, device)
    what = (
        f"{plan.strategy} tp={plan.tp} pp={plan.pp} dp={plan.dp} ep={plan.ep} zero={zero} "
        f"{dtype} offload={offload}"
    )
    for step in range(BF16_STEPS if dtype == torch.bfloat16 else STEPS):
        batch = _batch(step, groups.dp_rank).to(device)
        if pipeline is None:
            loss, _, _ = engine(batch)
            engine.backward(loss)
        else:  # 1F1B over 2 micro-batches; the engine reduces after the last
            loss, _, _ = pipeline.train_step(batch)
        engine.step()
        expected = ref_losses[step][groups.dp_rank]
        assert loss.item() == pytest.approx(expected, **loss_tol), (
            what,
            step,
            loss.item(),
            expected,
        )
        norm = engine.get_global_grad_norm()
        assert torch.is_tensor(norm), (what, norm)
        torch.testing.assert_close(
            norm.float().cpu(),
            ref_norms[step],
            rtol=norm_tol,
            atol=0,
            msg=lambda m: f"{what} step {step} norm: {m}",
        )
    if weight_tol is None:
        return  # bf16 weights cannot match fp32 ones after tiny updates; losses did above
    for name, param in model.named_parameters():
        torch.testing.assert_close(
            param.detach().cpu(),
            take_shard(ref_weights[name], requests[name]),
            rtol=weight_tol[0],
            atol=weight_tol[1],
            msg=lambda m: f"{what} {name}: {m}",
        )


def clip_body(rank, world, cases, device_type="cpu"):
    """Every case ``(strategy, degrees, zero_stage, dtype, offload)`` on this rank against
    the single-rank fp32 reference (CPU) of its data-parallel degree."""
    os.environ["LOCAL_RANK"] = str(rank)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        # fp32 against fp32 at 1e-4: keep cuBLAS and cuDNN off TF32 whatever a library set
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    args = tiny_args()
    references, cache = {}, {}
    for strategy, degrees, zero, dtype, offload in cases:
        plan = plan_of(strategy, world=world, **degrees)
        key = (plan.dp, 2 if plan.pp > 1 else 1)  # pp: 1F1B over 2 micro-batches
        if key not in references:
            references[key] = _reference(args, *key)
        groups = groups_per_layout(plan, cache, "nccl" if device.type == "cuda" else "gloo")
        _check_case(args, plan, groups, zero, dtype, offload, references[key], device)


F32, BF16 = torch.float32, torch.bfloat16
EP2 = dict(dp=2, ep=2)


def test_exact_clipping_two_ranks():
    """One case per optimizer DeepSpeed picks: client AdamW (ZeRO 0), its ZeRO optimizer
    (2, offloaded; ZeRO 1 at 4 ranks) and its bf16 optimizer (bf16 + ZeRO 1)."""
    cases = [
        ("ep_nccl", EP2, 0, F32, False),
        ("ep_allgather", EP2, 2, F32, False),
        ("ep_nccl", EP2, 2, F32, True),  # optimizer states offloaded to CPU
        ("ep_nccl", EP2, 1, BF16, False),  # DeepSpeed's BF16_Optimizer
    ]
    run_ranks(clip_body, world_size=2, args=(cases,))


@pytest.mark.slow  # 4 ranks; the 2-rank cases run by default
def test_exact_clipping_four_ranks():
    cases = [
        ("ep_nccl", dict(dp=4, ep=2), 2, F32, False),  # ep2 x edp2
        ("ep_nccl", dict(dp=4, ep=4), 1, F32, False),
    ]
    run_ranks(clip_body, world_size=4, args=(cases,))


@pytest.mark.slow
def test_exact_clipping_tensor_parallel():
    """TP-sharded tensors summed over tp, TP-replicated ones (norms, routers, kv heads)
    counted once, experts' F slices summed over etp."""
    cases = [
        ("tp_experts", dict(tp=2, etp=2), 0, F32, False),
        ("ep_nccl", dict(tp=2, ep=2), 2, F32, False),  # tokens split over tp around EP
        ("tp_experts", dict(tp=2, etp=2), 1, BF16, False),
    ]
    run_ranks(clip_body, world_size=2, args=(cases,))


@pytest.mark.slow
def test_exact_clipping_pipeline_parallel():
    """Stages summed over pp (1F1B over 2 micro-batches, the engine reducing after them)."""
    cases = [
        ("replicate", dict(pp=2), 0, F32, False),
        ("replicate", dict(pp=2), 1, F32, False),
    ]
    run_ranks(clip_body, world_size=2, args=(cases,))


@pytest.mark.slow
def test_exact_clipping_more_layouts():
    cases = [
        ("ep_nccl", EP2, 1, F32, False),
        ("ep_nccl", EP2, 2, F32, False),
        ("ep_allgather", EP2, 0, F32, False),
        ("replicate", dict(dp=2), 1, F32, False),
        ("ep_nccl", EP2, 2, BF16, False),  # DeepSpeed's ZeRO optimizer in bf16
        ("ep_nccl", EP2, 1, F32, True),
    ]
    run_ranks(clip_body, world_size=2, args=(cases,))


@pytest.mark.slow
def test_exact_clipping_four_ranks_more():
    cases = [
        ("ep_nccl", dict(dp=4, ep=2), 0, F32, False),
        ("ep_nccl", dict(dp=4, ep=2), 1, BF16, False),
        ("ep_allgather", dict(dp=4, ep=4), 2, F32, False),
    ]
    run_ranks(clip_body, world_size=4, args=(cases,))


@pytest.mark.slow
def test_launcher_clips_ep_under_zero2_with_offload(tmp_path):
    """launch/train.py on 2 ranks: ep_nccl + ZeRO 2 + optimizer offload + the default
    clipping (once refused) trains, logs the exact norm every step and resumes."""
    import json

    from tests.support import REPO, run_launcher

    def launch(run, *extra):
        result = run_launcher(
            REPO / "launch/train.py",
            [
                *short_train_overrides(tmp_path / run, steps=4, save_every=2),
                "strategy=ep_nccl",
                "train.zero_stage=2",
                "train.offload_optimizer=true",
                "train.grad_clip=0.5",
                "sample.max_new_tokens=4",
                *extra,
            ],
            nproc=2,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads((tmp_path / run / "train_log.json").read_text())["history"]

    history = launch("a")
    norms = [h["grad_norm"] for h in history]
    assert all(n is not None and 0 < n < 1e3 for n in norms), norms
    resumed = launch("b", f"resume={tmp_path / 'a/checkpoints/step_00000002'}")
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert [h["grad_norm"] for h in resumed] == pytest.approx(norms, rel=1e-5)


def _overflow_body(rank, world):
    """A NaN in one rank's expert gradient: every rank skips the step (weights unchanged)
    and reports a non-finite norm, in bf16 (DeepSpeed's overflow check, handed our norm)."""
    os.environ["LOCAL_RANK"] = str(rank)
    args = tiny_args()
    plan = plan_of("ep_nccl", world=world, **EP2)
    groups = groups_per_layout(plan, {})
    model, _ = sharded_random_model(args, plan, groups)
    engine = deepspeed_test_engine(
        model,
        groups,
        lr=LR,
        micro_batch=MB,
        zero_stage=1,
        grad_clip=1.0,
        aux_loss_coeff=AUX,
        dtype=torch.bfloat16,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, _, _ = engine(_batch(0, groups.dp_rank))
    engine.backward(loss)
    if rank == 1:  # the reduced fp32 gradient of this rank's experts
        expert = next(p for n, p in model.named_parameters() if ".mlp.experts." in n)
        expert._hp_grad.view(-1)[0] = float("nan")
    engine.step()
    assert not torch.isfinite(torch.as_tensor(engine.get_global_grad_norm()))
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name


def test_non_finite_gradient_skips_the_step():
    run_ranks(_overflow_body, world_size=2)

"""The exact global gradient norm of a parallelized model, and the clip that uses it.

# scalars only: every norm and sum of squares here is a [] fp32 tensor on the grads' device

A rank holds, for every parameter it owns a slice of, a gradient that DeepSpeed has already
reduced over the parameter's data axis: dense parameters over ``dp``, routed-expert
parameters over ``edp`` (their expert-data-parallel group). That gradient is either whole
(ZeRO 0, and DeepSpeed's bf16 optimizer of ZeRO 1) or, under ZeRO 1/2, only this rank's
partition of it along the same data axis. The global norm counts every distinct gradient
element exactly once:

  - along the data axis: the reduced gradient is equal on every replica, so only data rank
    0 counts it; under ZeRO every rank counts its own partition (partitions are disjoint);
  - along the model axes (``tp`` for attention and dense MLPs, ``etp x ep`` for experts, and
    ``pp``): a rank counts its slice unless a lower rank of the same group holds the very
    same slice (``shard_slices``): TP-sharded projections, EP blocks, expert-TP F-slices and
    pipeline stages are summed; TP-replicated tensors (norms, routers, kv heads when
    nKV < tp), expert-TP-replicated ones (down_proj_bias) and the tied embedding of the
    last stage count once.

Every rank adds the squares it counts and one all-reduce over the world gives the square of
the global norm (no per-family collectives, no division by replica counts).
``GradPlacement`` is that per-parameter, per-rank decision, made once from the plan;
``moe_ext.deepspeed.engine`` feeds DeepSpeed's optimizers' gradients through
``global_grad_norm`` for both clipping and ``engine.get_global_grad_norm()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from moe_ext.deepspeed.engine import is_expert_param
from moe_ext.errors import MoeExtError


class ClipError(MoeExtError):
    """A parameter whose gradient placement cannot be derived (one line: which and the fix)."""


@dataclass(frozen=True)
class GradPlacement:
    """Where one parameter's reduced gradient lives, seen from this rank.

    expert: reduced over ``edp`` (a routed-expert parameter) rather than ``dp``.
    first_copy: no lower rank along the model axes (tp or etp x ep, and pp) holds the same
    slice of the full tensor, so this rank's copy is the one the norm counts.
    data_rank: this rank's index in the data axis (dp or edp) the gradient is reduced over.
    """

    expert: bool
    first_copy: bool
    data_rank: int

    def counted(self, partitioned: bool) -> bool:
        """Whether this rank adds the squares of its gradient (or, ``partitioned`` by ZeRO
        over the data axis, of its partition of it)."""
        return self.first_copy and (partitioned or self.data_rank == 0)


def grad_placements(
    model: nn.Module, groups: Any, args: Optional[Any] = None
) -> dict[str, GradPlacement]:
    """Placement of every trainable parameter of a parallelized model on this rank.

    groups: moe_ext.groups.ProcessGroups of the model's plan (rank layout only: nothing is
    communicated); args: the native model's ModelArgs, whose ``shard_slices`` give the
    slices of this rank and of its peers along tp (dense), tp_ep (experts) and pp. A LoRA
    adapter is placed by the tensor it adapts (``moe_ext.train.lora.adapter_base_name``:
    held by the same ranks along ep and pp), which holds without tensor parallelism. Any
    other parameter outside ``shard_slices`` (every one when ``args`` is None, as for
    Megatron's GPTModel) counts as distinct along the model axes, which holds only with
    tp = etp = pp = 1; otherwise it raises ClipError."""
    from moe_ext.model.parallelize import RankCoords, shard_slices
    from moe_ext.train.lora import adapter_base_name

    plan = groups.plan

    def slices_of(rank: int) -> dict[str, Any]:
        return {} if args is None else shard_slices(plan, RankCoords.of(plan, rank), args)

    mine = slices_of(groups.rank)
    lower: dict[str, list[dict[str, Any]]] = {}  # family -> slices of its lower ranks

    def lower_slices(family: str) -> list[dict[str, Any]]:
        if family not in lower:
            ranks = groups.ranks_of(family)
            lower[family] = [slices_of(r) for r in ranks[: ranks.index(groups.rank)]]
        return lower[family]

    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        expert = is_expert_param(name)
        key = name
        if key not in mine and plan.tp == 1 and plan.etp == 1:
            key = adapter_base_name(name) or name  # an adapter lives where its base does
        request = mine.get(key)
        if request is None:
            if plan.tp > 1 or plan.etp > 1 or plan.pp > 1:
                raise ClipError(
                    f"parameter {name} is not one of the model's sharded tensors, so its "
                    f"gradient cannot be counted once under tp={plan.tp} etp={plan.etp} "
                    f"pp={plan.pp}; train it with parallel.tp=1 parallel.pp=1"
                )
            first = True
        else:
            peers = ("tp_ep" if expert else "tp", "pp")
            first = not any(
                other.get(key) == request for family in peers for other in lower_slices(family)
            )
        data_rank = groups.edp_rank if expert else groups.dp_rank
        out[name] = GradPlacement(expert=expert, first_copy=first, data_rank=data_rank)
    return out


def square_sum(
    pieces: Iterable[tuple[GradPlacement, torch.Tensor]],
    partitioned: bool,
    device: torch.device,
) -> torch.Tensor:
    """Sum of squares ([] fp32 on ``device``) of the gradient pieces this rank counts.

    pieces: (placement, gradient) with gradients of any shape and float dtype (whole, or
    this rank's ZeRO partition of them when ``partitioned``)."""
    norms: dict[torch.device, list[torch.Tensor]] = {}  # per-tensor norms, by grad device
    for placement, grad in pieces:
        if placement.counted(partitioned) and grad.numel():
            # no squared temporary of the gradient; bf16 is accumulated in fp32
            wide = grad.dtype in (torch.float32, torch.float64)
            norm = torch.linalg.vector_norm(grad.detach(), dtype=None if wide else torch.float32)
            norms.setdefault(grad.device, []).append(norm.float())
    total = torch.zeros((), dtype=torch.float32, device=device)
    for group in norms.values():  # one copy per device (CPU-offloaded partitions)
        total += torch.stack(group).pow(2).sum().to(device)
    return total


def global_grad_norm(
    pieces: Iterable[tuple[GradPlacement, torch.Tensor]],
    world: Optional[dist.ProcessGroup],
    partitioned: bool,
    device: torch.device,
) -> torch.Tensor:
    """The exact global 2-norm ([] fp32 on ``device``) of a model's reduced gradients.

    pieces: every (placement, gradient) pair this rank holds (see ``square_sum``); world:
    the group of all ranks (None: one rank). Collective over ``world``."""
    total = square_sum(pieces, partitioned, device)
    if world is not None and dist.get_world_size(world) > 1:
        dist.all_reduce(total, group=world)
    return total.sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale for gradients of global norm ``norm`` so theirs is at most ``max_norm``: torch's
    ``max_norm / (norm + 1e-6)`` clamped to 1 ([] fp32; stays on the device, no sync)."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def clip_(grads: Iterable[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale ``grads`` in place for global norm ``norm`` (no-op when ``max_norm`` is 0)."""
    if max_norm <= 0:
        return
    scale = clip_coefficient(norm, max_norm)
    for grad in grads:
        grad.mul_(scale.to(grad.dtype))


def clip_grad_norm_(
    model: nn.Module,
    max_norm: float,
    placements: Mapping[str, GradPlacement],
    world: Optional[dist.ProcessGroup],
) -> torch.Tensor:
    """Exact global norm of ``model``'s whole, reduced ``param.grad`` (no ZeRO partition);
    clips them to ``max_norm`` (0: measure only). Returns the norm before clipping."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if not grads:
        raise ValueError("no gradients to clip; call backward first")
    device = next(iter(grads.values())).device
    norm = global_grad_norm(
        ((placements[n], g) for n, g in grads.items()), world, partitioned=False, device=device
    )
    clip_(grads.values(), norm, max_norm)
    return norm

"""The dispatcher interface every token transport implements.

# T tokens on this rank, H hidden, k top-k, E experts, E_local experts on this rank,
# T' token-expert rows this rank computes after dispatch, C static capacity (tokens per
# rank), G ep size
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Protocol

import torch
import torch.distributed as dist

from moe_ext.errors import MoeExtError
from moe_ext.moe.dispatch.comm import group_rank, group_size


class DispatcherConfigError(MoeExtError):
    """An unknown dispatcher, or a plan (degrees, topology) a dispatcher cannot run; the
    message names the fix. ``build_plan`` re-raises it as its PlanError."""


class PlanDegrees(Protocol):
    """What ``Dispatcher.check_plan`` reads of a plan (``moe_ext.plan.ParallelPlan``)."""

    world_size: int
    tp: int
    pp: int
    dp: int
    ep: int
    etp: int


class LinkFacts(Protocol):
    """What ``Dispatcher.check_plan`` reads of a topology (``moe_ext.topology.Topology``)."""

    kind: str  # "nvlink" | "pcie" | "cpu"
    all_pairs_nvlink: bool
    all_pairs_p2p_atomics: bool


@dataclass(frozen=True)
class DispatchGroups:
    """Process groups a dispatcher communicates over; None stands for a group of one.

    ep:  expert-parallel group; rank r owns experts [r*E/ep, (r+1)*E/ep).
    etp: expert-tensor-parallel group; every rank owns all experts, each sharded on the
         FFN dimension, and sees the same tokens.
    """

    ep: Optional[dist.ProcessGroup] = None
    etp: Optional[dist.ProcessGroup] = None

    @property
    def ep_size(self) -> int:
        return group_size(self.ep)

    @property
    def ep_rank(self) -> int:
        return group_rank(self.ep)

    @property
    def etp_size(self) -> int:
        return group_size(self.etp)

    @property
    def etp_rank(self) -> int:
        return group_rank(self.etp)


class Dispatcher(ABC):
    """Moves token rows to the rank that owns their expert and back.

    ``dispatch`` returns the rows this rank must run through its local experts, sorted by
    local expert, plus a handle; ``combine`` takes the expert outputs in the same order,
    brings them home, and sums them per token weighted by the routing weights. Both are
    differentiable; backward reuses the layout stored in the handle.

    Static capacity (``set_capacity``): ``max_tokens_per_rank = None`` (the default) is the
    dynamic exchange, sized from the routing each call (the EP dispatchers read split sizes
    on the host for that). An int C switches the expert-parallel dispatchers
    (``static.ExpertParallelDispatcher``) to the exchange of
    :mod:`moe_ext.moe.dispatch.static`: no host sync, every shape a function of (C, k, H, G)
    only, so the step can be captured in a CUDA graph; T may be anything in
    [0, C] on each rank, x_local then has G*C*k rows of which the trailing ones (past
    sum(tokens_per_local_expert)) are padding. Dispatchers without an exchange whose size
    depends on routing (local, tp_sharded) never sync anyway and ignore the capacity.
    """

    # What this transport can run, stated once and checked twice: against the plan before
    # any process group exists (check_plan) and against the groups at construction.
    splits_experts_over_ep: ClassVar[bool] = True  # experts divided over groups.ep
    shards_experts_on_ffn: ClassVar[bool] = True  # each expert's F divided over groups.etp
    # whether its exchange runs asynchronously in two phases (dispatch_start/_finish,
    # combine_start/_finish), so dual-batch overlap (set_overlap) has something to hide
    overlaps_exchange: ClassVar[bool] = False

    @classmethod
    def check_plan(cls, plan: PlanDegrees, topology: Optional[LinkFacts] = None) -> None:
        """Raise DispatcherConfigError (one line, naming the fix) when this dispatcher cannot
        run ``plan`` on ``topology`` (None: unknown, only the degrees are checked).

        ``build_plan`` calls it before any process group exists, so every limit a
        dispatcher enforces at construction is stated here too. The base checks the two
        class flags above; subclasses with further needs extend it."""
        cls._check_degrees(plan.ep, plan.etp)

    @classmethod
    def _check_degrees(cls, ep: int, etp: int) -> None:
        if ep != 1 and not cls.splits_experts_over_ep:
            raise DispatcherConfigError(
                f"{cls.__name__} keeps every expert on every rank but got ep={ep}; use "
                f"strategy.dispatcher nccl_a2a or allgather_rs (ep_* strategies) for ep > 1"
            )
        if etp != 1 and not cls.shards_experts_on_ffn:
            raise DispatcherConfigError(
                f"{cls.__name__} runs whole experts but got etp={etp}; use parallel.etp=1, or "
                f"strategy=tp_experts (dispatcher tp_sharded) to shard experts on F"
            )

    def __init__(self, num_experts: int, groups: DispatchGroups = DispatchGroups()):
        type(self)._check_degrees(groups.ep_size, groups.etp_size)
        if num_experts % groups.ep_size:
            raise ValueError(
                f"{num_experts} experts cannot be split over an expert-parallel group of "
                f"{groups.ep_size}; choose parallel.ep dividing {num_experts}"
            )
        self.num_experts = num_experts
        self.groups = groups
        self.num_local_experts = num_experts // groups.ep_size
        self.local_expert_start = groups.ep_rank * self.num_local_experts
        self.max_tokens_per_rank: Optional[int] = None
        self.overlap_microbatches = 1  # set_overlap
        self.overlap_min_tokens = 1

    def set_capacity(self, max_tokens_per_rank: Optional[int]) -> None:
        """Static capacity: the most tokens any rank of the EP group passes to ``dispatch``
        (every rank must set the same value); None restores the dynamic exchange."""
        if max_tokens_per_rank is not None and (
            isinstance(max_tokens_per_rank, bool)
            or not isinstance(max_tokens_per_rank, int)
            or max_tokens_per_rank < 1
        ):
            raise ValueError(
                f"max_tokens_per_rank must be a positive int or None, got "
                f"{max_tokens_per_rank!r}; pass the largest per-rank token count"
            )
        self.max_tokens_per_rank = max_tokens_per_rank

    def set_overlap(self, microbatches: int, min_tokens: int = 1) -> None:
        """Dual-batch overlap: the MoE layer splits its tokens into ``microbatches`` parts
        and runs each one's experts while the next one's exchange is in flight (1: off).
        Under a static capacity C it splits only when ceil(C / microbatches) >=
        ``min_tokens`` (decode's few tokens gain nothing from two exchanges); the dynamic
        exchange always splits. Every rank of the EP group must set the same values."""
        if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
            raise ValueError(
                f"overlap microbatches must be a positive int, got {microbatches!r}; use 1 "
                f"(off) or 2 (dual-batch overlap)"
            )
        if microbatches > 1 and not self.overlaps_exchange:
            raise ValueError(
                f"{type(self).__name__} has no asynchronous exchange to overlap; use "
                f"overlap microbatches 1 or an expert-parallel dispatcher (ep_nccl, "
                f"ep_allgather)"
            )
        if not isinstance(min_tokens, int) or min_tokens < 1:
            raise ValueError(f"overlap min_tokens must be a positive int, got {min_tokens!r}")
        self.overlap_microbatches, self.overlap_min_tokens = microbatches, min_tokens

    def microbatches(self) -> int:
        """How many micro-batches the next MoE forward splits its tokens into: a function of
        settings every EP rank shares (never of this rank's token count), so all ranks make
        the same exchanges."""
        n = self.overlap_microbatches
        if n > 1 and self.max_tokens_per_rank is not None:
            if -(-self.max_tokens_per_rank // n) < self.overlap_min_tokens:
                return 1
        return n

    # Two-phase form of dispatch/combine (dual-batch overlap, moe.layer.routed_output):
    # *_start issues the exchange registering its async collectives with ``inflight``
    # (a comm.Inflight), *_finish completes it after ``inflight.wait()``. ``microbatches``:
    # how many parts the layer split its tokens into (a static capacity is divided by it).
    # This default runs the synchronous exchange in *_start (nothing overlaps).
    def dispatch_start(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        expert_idx: torch.Tensor,
        inflight: Any,
        microbatches: int = 1,
    ) -> Any:
        return self.dispatch(x, weights, expert_idx)

    def dispatch_start_parts(self, parts: list[tuple], inflights: list) -> list:
        """``dispatch_start`` of every micro-batch, in order: parts [(x [T_i, H], weights
        [T_i, k], expert_idx [T_i, k])], one Inflight each. A dynamic exchange learns all
        parts' sizes in one host sync here."""
        return [
            self.dispatch_start(x, w, idx, inflight, len(parts))
            for (x, w, idx), inflight in zip(parts, inflights)
        ]

    def dispatch_finish(self, pending: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        return pending

    def combine_start(self, y_local: torch.Tensor, handle: Any, inflight: Any) -> Any:
        return self.combine(y_local, handle)

    def combine_finish(self, pending: Any) -> torch.Tensor:
        return pending

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_experts={self.num_experts}, "
            f"ep={self.groups.ep_size}, etp={self.groups.etp_size}, "
            f"max_tokens_per_rank={self.max_tokens_per_rank})"
        )

    @property
    def ffn_shards(self) -> int:
        """How many ranks split each local expert's FFN dimension (1 unless the dispatcher
        shards experts on F, as TPShardedDispatcher does over ``groups.etp``)."""
        return 1

    @property
    def ffn_shard_rank(self) -> int:
        """This rank's index among the ``ffn_shards`` FFN slices."""
        return 0

    @abstractmethod
    def dispatch(
        self, x: torch.Tensor, weights: torch.Tensor, expert_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """x: [T, H] activations; weights: [T, k] float32; expert_idx: [T, k] int64 global ids.

        Returns (x_local [T', H] sorted by local expert, tokens_per_local_expert
        [E_local] int64, handle)."""

    @abstractmethod
    def combine(self, y_local: torch.Tensor, handle: Any) -> torch.Tensor:
        """y_local: [T', H] expert outputs in dispatch order. Returns y: [T, H] in x's dtype."""

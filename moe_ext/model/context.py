"""The typed state a Transformer carries besides its weights.

``ParallelContext``: what ``parallelize`` decided for this rank (frozen; set once, in
``parallelize``; a model never parallelized holds ``ParallelContext()``, one rank with the
whole model). The forward pass reads the pipeline neighbours, ``generate`` the rest.

``DecodeState``: what ``generate`` remembers between calls on one model (captured CUDA
graphs, whether a capture failed). Mutable, owned by generate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch.distributed as dist

if TYPE_CHECKING:  # the model layer reads the plan; it never builds one
    from moe_ext.plan import ParallelPlan


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in a parallel plan, as the model and ``generate`` use it.

    Ranks are global ranks; groups are None where the axis has one rank."""

    plan: Optional[ParallelPlan] = None  # None: not parallelized
    # pipeline: neighbouring stages (None at the ends), the stage group, the last stage
    # (it samples the next ids and broadcasts them over ``pp_group``)
    pp_prev: Optional[int] = None
    pp_next: Optional[int] = None
    pp_group: Optional[dist.ProcessGroup] = None
    pp_last_rank: Optional[int] = None
    # data parallel: replicas split the prompts of a generate call
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: Optional[dist.ProcessGroup] = None
    # experts split across replicas: every replica makes every MoE exchange, idle or not
    lockstep: bool = False
    # decode steps are static and sync-free without per-step pipeline traffic or a
    # split-size exchange (ep_* dispatchers learn their splits on the host)
    cuda_graph_safe: bool = True

    def __post_init__(self) -> None:
        # internal invariants of parallelize(), not user input: a bare assertion is enough
        assert 0 <= self.dp_rank < self.dp_size, (self.dp_rank, self.dp_size)
        assert self.dp_size == 1 or self.dp_group is not None, "dp_size > 1 needs dp_group"
        assert not self.lockstep or self.dp_size > 1, "lockstep needs data parallelism"
        assert (self.pp_group is None) == (self.pp_last_rank is None), (
            "pp_group and pp_last_rank go together"
        )

    @property
    def is_first_stage(self) -> bool:
        return self.pp_prev is None

    @property
    def is_last_stage(self) -> bool:
        return self.pp_next is None

    @property
    def expert_parallel(self) -> bool:
        """Experts are split across ranks (an ep_* strategy)."""
        return self.plan is not None and self.plan.is_expert_parallel


@dataclass
class DecodeState:
    """generate()'s memory on one model across calls."""

    # captured decode steps by (batch, capacity, cache shape, compiled, cache id)
    graphs: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    # a CUDA-graph capture failed once: later calls decode eagerly and uncompiled
    capture_failed: bool = False
    # pipelined generation: each micro-batch's own KV caches, one per local layer, for the
    # (micro-batch sizes, slots) in the key (pipeline_generate.MicrobatchCaches)
    stage_caches: Optional[tuple[Any, Any]] = None

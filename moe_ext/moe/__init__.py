"""Mixture-of-Experts layer built from three swappable parts: router, dispatcher, experts.

The layer is free of parallelism: the dispatcher it is given moves token rows to the ranks
that own their experts (``moe_ext.moe.dispatch``, one transport per module, named by
``DISPATCHERS``). The differentiable collectives and the TP token split are
``moe_ext.moe.dispatch.comm``; the optional Triton kernels are ``moe_ext.moe.kernels``.
"""

from moe_ext.moe.dispatch import (
    DISPATCHERS,
    Dispatcher,
    DispatcherConfigError,
    DispatchGroups,
    build_dispatcher,
    dispatcher_class,
)
from moe_ext.moe.experts import BACKENDS, GroupedExperts, grouped_mm_qualifies
from moe_ext.moe.layer import (
    MoELayer,
    SharedExpertMLP,
    add_shared_expert,
    build_moe_layer,
    expert_shard,
    load_full_expert_weights,
    routed_output,
)
from moe_ext.moe.router import RouterOutput, TopKRouter, load_balancing_loss, z_loss

__all__ = [
    # layer
    "MoELayer",
    "SharedExpertMLP",
    "build_moe_layer",
    "routed_output",
    "add_shared_expert",
    "expert_shard",
    "load_full_expert_weights",
    # router
    "TopKRouter",
    "RouterOutput",
    "load_balancing_loss",
    "z_loss",
    # experts
    "GroupedExperts",
    "BACKENDS",
    "grouped_mm_qualifies",
    # dispatchers
    "Dispatcher",
    "DispatchGroups",
    "DispatcherConfigError",
    "DISPATCHERS",
    "build_dispatcher",
    "dispatcher_class",
]

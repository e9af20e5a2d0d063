"""Token transports, one module each; strategies name them by ``_target_``."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Union

from moe_ext.moe.dispatch.base import (
    Dispatcher,
    DispatcherConfigError,
    DispatchGroups,
    LinkFacts,
    PlanDegrees,
)

DISPATCHERS = {
    "local": "moe_ext.moe.dispatch.local.LocalDispatcher",
    "tp_sharded": "moe_ext.moe.dispatch.tp_sharded.TPShardedDispatcher",
    "allgather_rs": "moe_ext.moe.dispatch.allgather_rs.AllGatherDispatcher",
    "nccl_a2a": "moe_ext.moe.dispatch.nccl_a2a.AllToAllDispatcher",
    "nvshmem": "moe_ext.moe.dispatch.nvshmem.NvshmemDispatcher",
}


def dispatcher_class(target: Union[str, Mapping[str, Any]]) -> type[Dispatcher]:
    """Resolve a short name (``nccl_a2a``), a dotted path, or a ``{_target_: ...}`` node."""
    if isinstance(target, Mapping):
        target = target["_target_"]
    path = DISPATCHERS.get(target, target)
    module_name, _, class_name = path.rpartition(".")
    unknown = DispatcherConfigError(
        f"unknown dispatcher {target!r}; use one of "
        f"{sorted(DISPATCHERS)} or the dotted path of a "
        f"Dispatcher subclass"
    )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # a missing module named by the path is a typo; a missing import inside it is not
        if err.name is None or not f"{module_name}.".startswith(f"{err.name}."):
            raise
        raise unknown from err
    except ValueError as err:  # empty module name: no dot in the path
        raise unknown from err
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Dispatcher)):
        raise unknown
    return cls


def build_dispatcher(
    target, num_experts: int, groups: DispatchGroups = DispatchGroups(), **kwargs
) -> Dispatcher:
    return dispatcher_class(target)(num_experts, groups, **kwargs)


__all__ = [
    "DISPATCHERS",
    "DispatchGroups",
    "Dispatcher",
    "DispatcherConfigError",
    "LinkFacts",
    "PlanDegrees",
    "build_dispatcher",
    "dispatcher_class",
]

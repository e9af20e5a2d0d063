"""Token transports, one module each; strategies name them by ``_target_``."""
from __future__ import annotations

import importlib
from typing import Any, Mapping, Union

from moe_ext.moe.dispatch.base import DispatchGroups, Dispatcher

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
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Dispatcher)):
        raise ValueError(f"unknown dispatcher {target!r}; use one of {sorted(DISPATCHERS)} "
                         f"or the dotted path of a Dispatcher subclass")
    return cls


def build_dispatcher(target, num_experts: int, groups: DispatchGroups = DispatchGroups(),
                     **kwargs) -> Dispatcher:
    return dispatcher_class(target)(num_experts, groups, **kwargs)


__all__ = ["DISPATCHERS", "DispatchGroups", "Dispatcher", "build_dispatcher", "dispatcher_class"]

"""Megatron-core's process-group state from moe_ext's group factory (no second set of groups).

Two ways Megatron finds its groups, both fed from one ``moe_ext.groups.ProcessGroups``:
- ``pg_collection(groups)``: the ProcessGroupCollection GPTModel / TransformerBlock /
  MoE layers take as ``pg_collection=`` (newer code paths);
- ``install_parallel_state(groups)``: points ``megatron.core.parallel_state``'s module
  globals at the same handles, for the code paths that still read the globals (the local
  attention's global memory buffer, layer offsets, default pg collections, optimizers).
  No ``new_group`` is called: every communicator is ours.
``seed_model_parallel_rng(groups, seed)`` sets up Megatron's CUDA RNG tracker streams (tensor-,
expert- and data-parallel) from our ranks, which Megatron's attention dropout and weight
init need.
"""

from __future__ import annotations

import inspect
from typing import Any

# parallel_state global -> our group family (cp = 1, one distributed-optimizer instance)
_GROUP_GLOBALS = {
    "_TENSOR_MODEL_PARALLEL_GROUP": "tp",
    "_PIPELINE_MODEL_PARALLEL_GROUP": "pp",
    "_MODEL_PARALLEL_GROUP": "mp",
    "_EMBEDDING_GROUP": "embd",
    "_POSITION_EMBEDDING_GROUP": "pos_embd",
    "_DATA_PARALLEL_GROUP": "dp",
    "_DATA_PARALLEL_GROUP_WITH_CP": "dp_cp",
    "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP": "dp_cp",
    "_TENSOR_AND_DATA_PARALLEL_GROUP": "tp_dp",
    "_TENSOR_AND_DATA_PARALLEL_GROUP_WITH_CP": "tp_dp_cp",
    "_TENSOR_AND_CONTEXT_PARALLEL_GROUP": "tp_cp",
    "_CONTEXT_PARALLEL_GROUP": "cp",
    "_EXPERT_MODEL_PARALLEL_GROUP": "ep",
    "_EXPERT_TENSOR_PARALLEL_GROUP": "etp",
    "_EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP": "tp_ep",
    "_EXPERT_TENSOR_MODEL_PIPELINE_PARALLEL_GROUP": "tp_ep_pp",
    "_EXPERT_DATA_PARALLEL_GROUP": "edp",
    "_INTRA_PARTIAL_EXPERT_DATA_PARALLEL_GROUP": "edp",
    "_INTRA_DISTRIBUTED_OPTIMIZER_INSTANCE_GROUP": "world",
    # megatron-core 0.19's weight-rematerialising TP axis (GTP_remat / EGTP): at size 1,
    # which is ours, its "WITH_*" groups are the plain ones
    "_EXPERT_TENSOR_MODEL_PIPELINE_PARALLEL_GROUP_WITH_EGTP": "tp_ep_pp",
    "_EXPERT_DATA_PARALLEL_GROUP_WITH_GTP_REMAT": "edp",
    "_INTRA_PARTIAL_EXPERT_DATA_PARALLEL_GROUP_WITH_GTP_REMAT": "edp",
    "_DATA_PARALLEL_GROUP_WITH_GTP_REMAT": "dp",
    "_DATA_PARALLEL_GROUP_WITH_CP_WITH_GTP_REMAT": "dp_cp",
    "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_WITH_GTP_REMAT": "dp_cp",
}
# parallel_state global -> the family whose member ranks it lists
_RANK_GLOBALS = {
    "_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS": "tp",
    "_PIPELINE_GLOBAL_RANKS": "pp",
    "_MODEL_PARALLEL_GLOBAL_RANKS": "mp",
    "_EMBEDDING_GLOBAL_RANKS": "embd",
    "_POSITION_EMBEDDING_GLOBAL_RANKS": "pos_embd",
    "_DATA_PARALLEL_GLOBAL_RANKS": "dp",
    "_DATA_PARALLEL_GLOBAL_RANKS_WITH_CP": "dp_cp",
    "_CONTEXT_PARALLEL_GLOBAL_RANKS": "cp",
    "_EXPERT_MODEL_PARALLEL_RANKS": "ep",
}


class ParallelStateError(RuntimeError):
    """Megatron's parallel_state already holds other groups."""


def pg_collection(groups: Any) -> Any:
    """Megatron ProcessGroupCollection holding ``groups``' handles."""
    return groups.to_megatron_pg_collection()


def install_parallel_state(groups: Any) -> list[str]:
    """Point megatron.core.parallel_state at ``groups`` (a moe_ext ProcessGroups).

    Sets only globals the installed megatron-core declares; creates Megatron's global
    memory buffer when absent. Idempotent for the same groups; refuses (ParallelStateError)
    when parallel_state was initialised with other groups. Returns the globals it set."""
    from megatron.core import parallel_state as ps

    current = getattr(ps, "_TENSOR_MODEL_PARALLEL_GROUP", None)
    if current is not None and current is not groups.tp:
        raise ParallelStateError(
            "megatron parallel_state already holds other process groups; "
            "call moe_ext.megatron.uninstall_parallel_state() (or "
            "parallel_state.destroy_model_parallel()) first"
        )
    installed = []
    for name, family in _GROUP_GLOBALS.items():
        if hasattr(ps, name):
            setattr(ps, name, groups.group(family))
            installed.append(name)
    for name, family in _RANK_GLOBALS.items():
        if hasattr(ps, name):
            ranks = groups.ranks_of(family)
            setattr(ps, name, None if ranks is None else list(ranks))
            installed.append(name)
    if getattr(ps, "_GLOBAL_MEMORY_BUFFER", None) is None and hasattr(
        ps, "_set_global_memory_buffer"
    ):
        ps._set_global_memory_buffer()
    return installed


def uninstall_parallel_state() -> None:
    """Reset the globals install_parallel_state sets (the groups themselves stay alive:
    they belong to moe_ext's ProcessGroups)."""
    from megatron.core import parallel_state as ps

    for name in list(_GROUP_GLOBALS) + list(_RANK_GLOBALS):
        if hasattr(ps, name):
            setattr(ps, name, None)
    if hasattr(ps, "destroy_global_memory_buffer"):
        ps.destroy_global_memory_buffer()


def seed_model_parallel_rng(groups: Any, seed: int) -> None:
    """Megatron's CUDA RNG tracker (data-, tensor- and expert-parallel streams) seeded from
    our ranks: ``model_parallel_cuda_manual_seed(seed, tp_rank=, ep_rank=, etp_rank=)``."""
    from megatron.core.tensor_parallel import random as mrandom

    fn = mrandom.model_parallel_cuda_manual_seed
    params = inspect.signature(fn).parameters
    ranks = {"tp_rank": groups.tp_rank, "ep_rank": groups.ep_rank, "etp_rank": groups.etp_rank}
    fn(seed, **{k: v for k, v in ranks.items() if k in params})


def install_parallel_state_and_rng(groups: Any, seed: int, device: Any) -> None:
    """``install_parallel_state(groups)``, and on a CUDA ``device`` Megatron's RNG tracker
    streams seeded with ``seed`` (``seed_model_parallel_rng``), which its layers need there."""
    install_parallel_state(groups)
    if device.type == "cuda":
        seed_model_parallel_rng(groups, seed)

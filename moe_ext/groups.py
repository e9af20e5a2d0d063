"""Process groups from a ParallelPlan: every group built once, plus Megatron/DeepSpeed adapters.

Rank layout (docs/ARCHITECTURE.md). The same ranks are read two ways:
  attention side  rank = tp_i + tp * (dp_i + dp * pp_i)                  tp fastest, pp slowest
  expert side     rank = etp_i + etp * (ep_i + ep * (edp_i + edp * pp_i))  etp fastest
Both sides share pp, so within one pipeline stage the tp*dp = etp*ep*edp ranks are simply
regrouped. This is the order Megatron-core's RankGenerator uses ("tp-cp-dp-pp" and
"tp-ep-dp-pp" with cp = 1), so Megatron sees the groups it would have built itself.

Worked example: world 8, strategy=ep_nccl, tp=2 pp=2 (dp=2 and ep=tp*dp=4 derived, edp=1):
  rank:        0  1  2  3  4  5  6  7
  pp stage:    0  0  0  0  1  1  1  1
  tp  [0,1] [2,3] [4,5] [6,7]        dp  [0,2] [1,3] [4,6] [5,7]
  pp  [0,4] [1,5] [2,6] [3,7]        mp (tp x pp)  [0,1,4,5] [2,3,6,7]
  ep  [0,1,2,3] [4,5,6,7]            edp, etp, cp  singletons
  tp_ep (etp x ep) = ep              tp_ep_pp  [0..7]
  embd (first + last stage)  [0,4] [1,5] [2,6] [3,7]    pos_embd (first stage)  [0] [1] [2] [3]
Rank 5 is tp rank 1, dp rank 0, stage 1 (previous stage: rank 1), and owns experts
[E/4, 2E/4) as ep rank 1. With strategy=tp_experts on the same 8 ranks (tp=4 pp=2 dp=1)
etp = tp: etp groups [0,1,2,3] [4,5,6,7] equal the tp groups, and ep is a singleton.

Nodes. torchrun numbers ranks node by node: with G ranks per node (LOCAL_WORLD_SIZE, the
same on every node) node n holds ranks [n*G, (n+1)*G), so rank r is on node r // G. The
order above varies tp (and etp, ep) fastest, so a TP group is tp adjacent ranks and an EP
group ep adjacent ranks (etp*ep for tp_ep): they stay inside a node exactly when their
size divides G. pp varies slowest, then dp / edp, so what does not fit a node spreads
pipeline stages across nodes first and data-parallel replicas next; their traffic is one
activation hand-off per micro-batch (pp) or none at all in inference (dp). A plan whose
TP, expert-TP or EP groups would span nodes is refused (``NodeLayoutError``) before any
group is built, naming the fix. The order is the same on one node and on many (and stays
Megatron's), so the node count changes which plans are accepted, never where a rank sits.

Worked example, 2 nodes x 2 ranks (G = 2), world 4:
  ep_nccl tp=1 pp=2 (dp=2, ep=2): node 0 = stage 0 = ranks [0,1] = one EP group, node 1 =
      stage 1 = [2,3]; pp groups [0,2] [1,3] cross the nodes.
  tp_experts tp=2 (dp=2): tp = etp groups [0,1] [2,3], one per node; dp [0,2] [1,3] across.
  ep_nccl tp=1 pp=1 ep=2 (dp=4, edp=2): ep [0,1] [2,3]; edp [0,2] [1,3] across the nodes.
  ep_nccl tp=1 pp=1 (ep = dp = 4) or tp=4: refused, the group would need both nodes.
``node_layout(plan, world_size, ranks_per_node)`` gives the groups with this check and
which families cross nodes, without creating any process group (planner, tests).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from datetime import timedelta
from typing import Any, Optional

import torch.distributed as dist

from moe_ext.errors import MoeExtError
from moe_ext.moe.dispatch.base import DispatchGroups
from moe_ext.plan import ParallelPlan

# family -> varying dims, on the attention ("attn") or expert ("expert") reading of the ranks
_ATTENTION_FAMILIES = {
    "tp": ("tp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "mp": ("tp", "pp"),
    "tp_dp": ("tp", "dp"),
    "world": ("tp", "dp", "pp"),
}
_EXPERT_FAMILIES = {
    "etp": ("etp",),
    "ep": ("ep",),
    "edp": ("edp",),
    "tp_ep": ("etp", "ep"),
    "tp_ep_pp": ("etp", "ep", "pp"),
}
# families that are the same partition as another one here (cp = 1)
_ALIASES = {"dp_cp": "dp", "tp_cp": "tp", "tp_dp_cp": "tp_dp"}
# families that cover only some ranks (Megatron's embedding groups)
PARTIAL_FAMILIES = ("embd", "pos_embd")


def _coords_groups(
    world: int, dims: list[tuple[str, int]], vary: tuple[str, ...]
) -> list[list[int]]:
    """Ranks grouped by equal coordinates on the dims not in ``vary``; dims fastest first.
    Groups come in order of their smallest rank and hold ranks in ascending order, so a
    rank's index in its group is its coordinate along the varying dims."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank in range(world):
        rest, key = rank, []
        for name, size in dims:
            coord, rest = rest % size, rest // size
            if name not in vary:
                key.append(coord)
        groups.setdefault(tuple(key), []).append(rank)
    return list(groups.values())


def rank_layout(plan: ParallelPlan) -> dict[str, list[list[int]]]:
    """Every group family as a list of rank lists (pure; no process group is created).

    Families: tp, dp, pp, mp (tp x pp), tp_dp, world, etp, ep, edp, tp_ep (etp x ep),
    tp_ep_pp, dp_cp / tp_cp / tp_dp_cp (cp = 1 aliases), cp (singletons), embd (first and
    last pipeline stage of each pp group) and pos_embd (first stage). All but embd and
    pos_embd partition the ranks.
    """
    world = plan.world_size
    attn = [("tp", plan.tp), ("dp", plan.dp), ("pp", plan.pp)]
    expert = [("etp", plan.etp), ("ep", plan.ep), ("edp", plan.edp), ("pp", plan.pp)]
    layout = {name: _coords_groups(world, attn, vary) for name, vary in _ATTENTION_FAMILIES.items()}
    layout.update(
        {name: _coords_groups(world, expert, vary) for name, vary in _EXPERT_FAMILIES.items()}
    )
    layout.update({alias: layout[name] for alias, name in _ALIASES.items()})
    layout["cp"] = [[r] for r in range(world)]
    layout["embd"] = [[g[0], g[-1]] if len(g) > 1 else [g[0]] for g in layout["pp"]]
    layout["pos_embd"] = [[g[0]] for g in layout["pp"]]
    return layout


class NodeLayoutError(MoeExtError):
    """A plan whose TP / EP groups cannot stay inside a node, or a world that is not a whole
    number of equal nodes; the message names the fix."""


# families whose collectives run every layer (TP all-reduce, EP all-to-all): one node each
NODE_LOCAL_FAMILIES = ("tp", "etp", "ep", "tp_ep")


@dataclasses.dataclass(frozen=True)
class NodeLayout:
    """The groups of a plan on ``world_size // ranks_per_node`` nodes of ``ranks_per_node``
    ranks each, node n holding ranks [n * ranks_per_node, (n + 1) * ranks_per_node)."""

    groups: dict[str, list[list[int]]]  # family -> rank lists, as ``rank_layout``
    world_size: int
    ranks_per_node: int

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def nodes_spanned(self, family: str) -> int:
        """The most nodes one group of ``family`` touches (1: the family stays intra-node)."""
        return max(len({self.node_of(r) for r in g}) for g in self.groups[family])

    def inter_node(self, family: str) -> bool:
        """Whether some group of ``family`` has ranks on two nodes (its collectives cross
        the inter-node link)."""
        return self.nodes_spanned(family) > 1

    @property
    def inter_node_families(self) -> list[str]:
        return sorted(f for f in self.groups if self.inter_node(f))

    @property
    def pp_inter_node_hops(self) -> int:
        """Stage-to-stage hand-offs of one pipeline that cross nodes (0 .. pp - 1); every
        pp group has the same count."""
        g = self.groups["pp"][0]
        return sum(self.node_of(a) != self.node_of(b) for a, b in zip(g, g[1:]))


def _node_fix(plan: ParallelPlan, family: str, size: int, ranks_per_node: int) -> str:
    fit = math.gcd(size, ranks_per_node)
    stages = plan.pp * size // fit
    if family == "tp" or (family in ("etp", "tp_ep") and plan.etp == plan.tp > 1):
        return (
            f"lower parallel.tp to {fit}, or put pipeline stages across nodes "
            f"(parallel.tp={fit} parallel.pp={stages})"
        )
    return (
        f"lower parallel.ep to {fit} (EP groups side by side, expert replicas across "
        f"nodes), or put pipeline stages across nodes (parallel.pp={stages})"
    )


def node_layout(plan: ParallelPlan, world_size: int, ranks_per_node: int) -> NodeLayout:
    """The plan's groups (``rank_layout``) on nodes of ``ranks_per_node`` ranks, refusing
    a plan whose TP / expert-TP / EP groups would span nodes. Pure: no process group is
    created, so the planner can call it for a machine it is not running on.

    Raises NodeLayoutError (one line with the fix) when the world is not a whole number of
    nodes or a node-local group does not fit; ValueError when ``world_size`` is not the
    plan's (a caller's bug)."""
    if world_size != plan.world_size:
        raise ValueError(f"plan is for {plan.world_size} ranks, not world_size={world_size}")
    if ranks_per_node < 1 or world_size % ranks_per_node:
        raise NodeLayoutError(
            f"world size {world_size} is not a whole number of nodes of {ranks_per_node} "
            f"ranks; launch the same --nproc-per-node on every node"
        )
    layout = NodeLayout(rank_layout(plan), world_size, ranks_per_node)
    for family in NODE_LOCAL_FAMILIES:
        if layout.inter_node(family):
            size = len(layout.groups[family][0])
            what = {"tp_ep": "etp*ep", "etp": "etp"}.get(family, family)
            kind = {"tp": "TP", "ep": "EP"}.get(family, "expert")
            raise NodeLayoutError(
                f"{what}={size} does not fit in a node of {ranks_per_node} ranks "
                f"({layout.num_nodes} nodes): {kind} groups must stay inside one node; "
                f"{_node_fix(plan, family, size, ranks_per_node)}"
            )
    return layout


@dataclasses.dataclass
class ProcessGroups:
    """This rank's handles into every group family of a plan.

    ``group(name)`` is this rank's group of a family (None for embd/pos_embd on ranks
    outside them); identical rank lists share one handle, so no communicator is built
    twice. ``.tp .pp .dp .ep .etp .edp`` are shortcuts.
    """

    plan: ParallelPlan
    rank: int
    layout: dict[str, list[list[int]]]
    handles: dict[str, Optional[dist.ProcessGroup]]
    member_ranks: dict[str, Optional[list[int]]]
    ranks_per_node: Optional[int] = None  # None: one node holds the whole world

    @classmethod
    def build(
        cls,
        plan: ParallelPlan,
        backend: str,
        timeout: timedelta,
        local_world_size: Optional[int] = None,
    ) -> "ProcessGroups":
        """Create every group of the plan. Collective: every rank must call it with the same
        plan; groups are created in one fixed order as torch.distributed.new_group needs.

        ``local_world_size``: ranks per node (torchrun's LOCAL_WORLD_SIZE, which the
        launcher passes in); None means one node. A plan whose TP / EP groups would span
        nodes raises NodeLayoutError here, before any group is created."""
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised; call moe_ext.dist.init_distributed first"
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != plan.world_size:
            raise ValueError(
                f"plan is for {plan.world_size} ranks but torch.distributed has "
                f"{world}; rebuild the plan with world_size={world}"
            )
        layout = node_layout(plan, world, local_world_size or world).groups
        by_ranks: dict[tuple[int, ...], dist.ProcessGroup] = {}
        handles: dict[str, Optional[dist.ProcessGroup]] = {}
        member_ranks: dict[str, Optional[list[int]]] = {}
        for name in sorted(layout):  # same order on every rank
            handles[name] = member_ranks[name] = None
            for ranks in layout[name]:
                key = tuple(ranks)
                if key not in by_ranks:
                    by_ranks[key] = dist.new_group(list(ranks), timeout=timeout, backend=backend)
                if rank in ranks:
                    handles[name], member_ranks[name] = by_ranks[key], list(ranks)
        return cls(plan, rank, layout, handles, member_ranks, local_world_size)

    # -- groups --------------------------------------------------------------------------
    def group(self, name: str) -> Optional[dist.ProcessGroup]:
        if name not in self.handles:
            raise KeyError(f"unknown group family {name!r}; one of {sorted(self.handles)}")
        return self.handles[name]

    def ranks_of(self, name: str) -> Optional[list[int]]:
        """Global ranks of this rank's group in family ``name`` (ascending)."""
        self.group(name)
        return self.member_ranks[name]

    tp = property(lambda self: self.handles["tp"])
    pp = property(lambda self: self.handles["pp"])
    dp = property(lambda self: self.handles["dp"])
    mp = property(lambda self: self.handles["mp"])
    ep = property(lambda self: self.handles["ep"])
    etp = property(lambda self: self.handles["etp"])
    edp = property(lambda self: self.handles["edp"])
    world = property(lambda self: self.handles["world"])

    def dispatch_groups(self) -> DispatchGroups:
        """The dispatcher's view: the EP and expert-TP groups, None where of size 1."""
        return DispatchGroups(
            ep=self.ep if self.plan.ep > 1 else None, etp=self.etp if self.plan.etp > 1 else None
        )

    # -- ranks (computed from the layout, no communication) ------------------------------
    def _index(self, name: str) -> int:
        return self.member_ranks[name].index(self.rank)

    tp_rank = property(lambda self: self._index("tp"))
    pp_rank = property(lambda self: self._index("pp"))
    dp_rank = property(lambda self: self._index("dp"))
    ep_rank = property(lambda self: self._index("ep"))
    etp_rank = property(lambda self: self._index("etp"))
    edp_rank = property(lambda self: self._index("edp"))

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.plan.pp - 1

    @property
    def pp_prev_rank(self) -> Optional[int]:
        """Global rank of the previous pipeline stage (None on the first stage)."""
        return None if self.is_first_stage else self.member_ranks["pp"][self.pp_rank - 1]

    @property
    def pp_next_rank(self) -> Optional[int]:
        """Global rank of the next pipeline stage (None on the last stage)."""
        return None if self.is_last_stage else self.member_ranks["pp"][self.pp_rank + 1]

    # -- Megatron-core -------------------------------------------------------------------
    def megatron_group_map(self) -> dict[str, Any]:
        """Megatron-core ProcessGroupCollection field -> our handle (0.16 and 0.19 names).

        cp = 1 and no GTP/EGTP weight rematerialisation: cp, gtp_remat and expt_gtp_remat
        are this rank's singleton group; the *_gtp_remat "full" groups equal their plain
        ones; hcp, the separate all-gather communicators and inter_dist_opt do not exist
        (None) with one distributed-optimizer instance, whose intra group is the world."""
        h = self.handles
        return {
            "tp": h["tp"],
            "pp": h["pp"],
            "mp": h["mp"],
            "embd": h["embd"],
            "pos_embd": h["pos_embd"],
            "cp": h["cp"],
            "tp_cp": h["tp_cp"],
            "hcp": None,
            "ep": h["ep"],
            "expt_tp": h["etp"],
            "tp_ep": h["tp_ep"],
            "tp_ep_pp": h["tp_ep_pp"],
            "tp_ep_pp_with_egtp_remat": h["tp_ep_pp"],
            "tp_dp_cp": h["tp_dp_cp"],
            "dp": h["dp"],
            "dp_cp": h["dp_cp"],
            "dp_cp_gtp_remat": h["dp_cp"],
            "dp_cp_ag": None,
            "gtp_remat": h["cp"],
            "expt_gtp_remat": h["cp"],
            "expt_dp": h["edp"],
            "expt_dp_gtp_remat": h["edp"],
            "expt_dp_ag": None,
            "intra_dp_cp": h["dp_cp"],
            "intra_expt_dp": h["edp"],
            "inter_dist_opt": None,
            "intra_dist_opt": h["world"],
        }

    def to_megatron_pg_collection(self):
        """megatron.core.process_groups_config.ProcessGroupCollection holding our groups.

        Only fields the installed class declares are set (0.16.1 has fewer than 0.19.x).
        A field of a newer release that we do not map stays unset (0.19+ reads unset
        fields as None) and is named in a warning."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        declared = {f.name for f in dataclasses.fields(ProcessGroupCollection)}
        known = self.megatron_group_map()
        unknown = sorted(declared - set(known))
        if unknown:
            warnings.warn(
                f"megatron-core ProcessGroupCollection fields {unknown} are not "
                f"mapped by moe_ext.groups and stay unset",
                stacklevel=2,
            )
        return ProcessGroupCollection(**{k: v for k, v in known.items() if k in declared})

    # -- DeepSpeed -----------------------------------------------------------------------
    @property
    def deepspeed_group_name(self) -> str:
        """DeepSpeed names expert groups by EP size (deepspeed.moe.layer.MoE: ep_size_{ep})."""
        return f"ep_size_{self.plan.ep}"

    def deepspeed_groups(self) -> dict[str, Any]:
        """Our expert-parallel and expert-data-parallel groups under DeepSpeed's name."""
        return {
            "name": self.deepspeed_group_name,
            "ep": self.ep,
            "ep_ranks": list(self.member_ranks["ep"]),
            "edp": self.edp,
            "edp_ranks": list(self.member_ranks["edp"]),
        }

    def register_deepspeed_groups(self) -> str:
        """Put our ep/edp groups into deepspeed.utils.groups so DeepSpeed's MoE layers
        (which look their group up by ``ep_size_{ep}`` before creating one) and its
        engine's expert-gradient all-reduce use exactly these groups. Returns the name.
        Pass ``mpu=groups.deepspeed_mpu()`` to deepspeed.initialize for the dense side."""
        import deepspeed.comm as ds_comm
        from deepspeed.utils import groups as ds_groups

        if not ds_comm.is_initialized():
            # DeepSpeed's accessors go through deepspeed.comm: let it adopt the
            # torch.distributed default group that is already up (no new rendezvous)
            ds_comm.init_distributed(
                dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False
            )
        g = self.deepspeed_groups()
        name = g["name"]
        existing = ds_groups._get_expert_parallel_group_dict().get(name)
        if existing is not None and existing is not g["ep"]:
            raise RuntimeError(
                f"DeepSpeed already has expert groups named {name!r} that are "
                f"not ours; register moe_ext groups before building "
                f"deepspeed.moe.layer.MoE modules"
            )
        ds_groups._EXPERT_PARALLEL_GROUP[name] = g["ep"]
        ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = g["ep_ranks"]
        ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = g["edp"]
        ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = g["edp_ranks"]
        # tp_experts: DeepSpeed's expert tensor parallelism is over the mpu's TP group
        ds_groups.expert_tensor_parallel_world_size = self.plan.etp
        return name

    def deepspeed_mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """The Megatron-style ``mpu`` object deepspeed.initialize(mpu=...) queries for the dense
    side (tensor/pipeline/data parallel groups), backed by our groups."""

    def __init__(self, groups: ProcessGroups):
        self._g = groups

    def get_tensor_model_parallel_group(self):
        return self._g.tp

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._g.plan.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self._g.tp_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._g.member_ranks["tp"][0]

    # DeepSpeed's "model parallel" is everything but data parallelism: tp x pp
    def get_model_parallel_group(self):
        return self._g.mp

    def get_model_parallel_world_size(self) -> int:
        return self._g.plan.tp * self._g.plan.pp

    def get_model_parallel_rank(self) -> int:
        return self._g.member_ranks["mp"].index(self._g.rank)

    def get_pipeline_model_parallel_group(self):
        return self._g.pp

    get_pipe_parallel_group = get_pipeline_model_parallel_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._g.plan.pp

    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._g.pp_rank

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank

    def get_data_parallel_group(self):
        return self._g.dp

    def get_data_parallel_world_size(self) -> int:
        return self._g.plan.dp

    def get_data_parallel_rank(self) -> int:
        return self._g.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._g.member_ranks["dp"])

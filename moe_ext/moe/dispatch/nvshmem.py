"""Expert parallelism through one-sided NVSHMEM all-to-alls (strategy ``ep_nvshmem``).

# T tokens on this rank, H hidden, k top-k, E experts, W = ep size, E_local = E / W,
# X exchange slots per rank (a block of E_local / X local experts each, X <= 16),
# N = T*k rows sent, R rows received (= T' rows computed here), C buffer rows

Transport: torch symmetric memory with the NVSHMEM backend. ``all_to_all_vdev_2d`` moves
rows from rank-major order (sender: destination rank, then slot) to slot-major order
(receiver: slot, then source rank), exchanging the split sizes on the device;
``all_to_all_vdev_2d_offset`` is its reverse and takes the receiver-side offsets, so the
combine sends expert outputs straight back into the sender's original row order. Both
kernels *pull* from the peer's symmetric buffer (``nvshmem getmem``) after an NVSHMEM
barrier, so no NCCL is involved in the data path; this module never falls back to NCCL.

One forward: sort pairs by global expert, all-gather the per-expert counts over NVSHMEM
(tiny ``[W, E]`` exchange; its one device-to-host read sizes the outputs and lets every
rank agree on buffer growth), dispatch rows, gather the received rows into local-expert
order; combine scatters expert outputs back into the receive buffer, runs the reverse
exchange and applies the routing weights on the token's home rank. Backward of dispatch is
the combine-direction exchange and vice versa.

Kernel limits (torch <= 2.13 ``nvshmem_extension.cu``): the dispatch direction handles at
most 16 slots per rank and the combine direction at most 16 ranks, so with E_local > 16
each slot carries a block of experts and the receiver regroups rows by expert on the
device (the order within a slot is already sorted by expert). An empty slot still
occupies one padding row in the receive buffer (``major_align`` rounds empty bins up to
one row); the device-returned offsets are used, so padding never reaches the experts.

Buffer reuse across calls is safe because consecutive exchanges never read the same
symmetric buffer (count exchange, dispatch and combine alternate) and every exchange
starts with an NVSHMEM barrier, which a peer passes only after finishing its previous
exchange.

NVSHMEM pins itself to one CUDA device per process on first use (torch's ``TeamManager``
raises "Detected use of TeamManager on multiple devices" otherwise): call
``torch.cuda.set_device(local_rank)`` before constructing this dispatcher and before any
other symmetric-memory call. The dispatcher uses the current device at construction and
checks at first use that no two ranks of a host share a device.

With a static capacity (``set_capacity``, CUDA-graph decode) this dispatcher uses the
all-gather + reduce-scatter exchange of :mod:`moe_ext.moe.dispatch.static` over the EP
group's NCCL communicator instead of the symmetric buffers: the NVSHMEM path sizes its
outputs from a host read of the counts, and with a fixed capacity a deduplicated exchange
moves the all-gather's bytes anyway (that module's docstring).
"""

from __future__ import annotations

import socket
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from moe_ext.errors import MoeExtError
from moe_ext.moe.dispatch._permute import gather_rows, sort_by_bucket, unpermute_weighted_sum
from moe_ext.moe.dispatch.base import DispatcherConfigError, DispatchGroups, LinkFacts, PlanDegrees
from moe_ext.moe.dispatch.comm import adjoint
from moe_ext.moe.dispatch.static import ExpertParallelDispatcher

FALLBACK = "strategy=ep_nccl"
MAX_SLOTS = 16  # allToAllV_2d: local "experts" per rank <= THREADS_PER_BLOCK / 32 tiles
MAX_RANKS = 16  # all_to_all_vdev_2d_offset: ranks <= 16 tiles


class NvshmemUnavailableError(MoeExtError):
    """The NVSHMEM transport cannot run here; the message names the fallback strategy."""


def _refuse(reason: str) -> NvshmemUnavailableError:
    return NvshmemUnavailableError(f"ep_nvshmem unavailable: {reason}; use {FALLBACK}")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def all_to_all_vdev_2d(
    input: torch.Tensor,
    out: torch.Tensor,
    in_splits: torch.Tensor,
    out_splits_offsets: torch.Tensor,
    group_name: str,
) -> None:
    """Rank-major [rank, slot] chunks -> slot-major [slot, source] chunks (NVSHMEM pull)."""
    torch.ops.symm_mem.all_to_all_vdev_2d(
        input, out, in_splits, out_splits_offsets, group_name, None
    )


def all_to_all_vdev_2d_offset(
    input: torch.Tensor,
    out: torch.Tensor,
    in_splits_offsets: torch.Tensor,
    out_splits_offsets: torch.Tensor,
    group_name: str,
) -> None:
    """Slot-major chunks at given offsets -> dense rank-major chunks (the reverse)."""
    torch.ops.symm_mem.all_to_all_vdev_2d_offset(
        input, out, in_splits_offsets, out_splits_offsets, group_name
    )


def nvshmem_available() -> bool:
    """True when this torch build has symmetric memory with NVSHMEM usable at runtime."""
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError:
        return False
    check = getattr(symm_mem, "is_nvshmem_available", None)
    return bool(check is not None and check())


_EXPECTED_ARGS = {
    "all_to_all_vdev_2d": [
        "input",
        "out",
        "in_splits",
        "out_splits_offsets",
        "group_name",
        "major_align",
    ],
    "all_to_all_vdev_2d_offset": [
        "input",
        "out",
        "in_splits_offsets",
        "out_splits_offsets",
        "group_name",
    ],
}


def _check_op_schemas() -> None:
    """The vdev ops changed signature across torch releases; accept only the one coded for."""
    ops = getattr(torch.ops, "symm_mem", None)
    for name, expected in _EXPECTED_ARGS.items():
        try:
            schema = getattr(ops, name).default._schema
        except (AttributeError, RuntimeError):
            raise _refuse(f"torch {torch.__version__} has no torch.ops.symm_mem.{name}") from None
        got = [a.name for a in schema.arguments]
        if got != expected:
            raise _refuse(
                f"torch {torch.__version__} has symm_mem.{name}({', '.join(got)}), "
                f"this module needs ({', '.join(expected)})"
            )


def _check_environment(groups: DispatchGroups) -> None:
    if not cuda_available():
        raise _refuse("CUDA is not available (torch.cuda.is_available() is False)")
    if not nvshmem_available():
        raise _refuse(
            "NVSHMEM is not available in this torch build or system "
            "(torch.distributed._symmetric_memory.is_nvshmem_available() is False)"
        )
    _check_op_schemas()
    if groups.ep is None or groups.ep_size < 2:
        raise ValueError(
            "NvshmemDispatcher needs an expert-parallel group of at least 2 "
            "ranks; with ep=1 use strategy=replicate"
        )
    backend = str(dist.get_backend(groups.ep)).lower()
    if "nccl" not in backend:
        raise _refuse(
            f"the expert-parallel process group uses backend {backend!r}, "
            f"NVSHMEM needs NCCL process groups on CUDA"
        )
    if groups.ep_size != dist.get_world_size():
        # Several torch releases address peers in the vdev kernels by global PE and use
        # world-wide NVSHMEM barriers, so a subgroup would exchange with the wrong ranks.
        raise _refuse(
            f"the expert-parallel group has {groups.ep_size} of "
            f"{dist.get_world_size()} ranks; torch's NVSHMEM all-to-all kernels "
            f"need it to span every rank (parallel.ep = world size)"
        )
    if groups.ep_size > MAX_RANKS:
        raise _refuse(
            f"ep={groups.ep_size} exceeds the {MAX_RANKS} ranks torch's "
            f"all_to_all_vdev_2d_offset kernel supports"
        )


def exchange_slots(num_local_experts: int, max_slots: int = MAX_SLOTS) -> int:
    """Largest X <= max_slots dividing E_local: each slot carries E_local / X experts."""
    return max(
        x for x in range(1, min(num_local_experts, max_slots) + 1) if num_local_experts % x == 0
    )


def _select_nvshmem_backend(device: torch.device) -> None:
    """Select NVSHMEM for symmetric memory (process-wide; only possible before the first
    symmetric allocation) and verify it took."""
    import torch.distributed._symmetric_memory as symm_mem

    get_backend = getattr(symm_mem, "get_backend", None)
    if get_backend is not None and get_backend(device) == "NVSHMEM":
        return
    set_backend = getattr(symm_mem, "set_backend", None)
    if set_backend is None:
        raise _refuse(
            f"torch {torch.__version__} cannot select the symmetric-memory backend "
            f"(no symm_mem.set_backend); torch >= 2.9 is needed"
        )
    try:
        set_backend("NVSHMEM")
    except RuntimeError as err:
        current = get_backend(device) if get_backend is not None else "unknown"
        raise _refuse(
            f"symm_mem.set_backend('NVSHMEM') failed (current backend {current!r}; "
            f"it must be chosen before any symm_mem allocation): "
            f"{str(err).splitlines()[0]}"
        ) from err
    current = get_backend(device) if get_backend is not None else None
    if current not in (None, "NVSHMEM"):
        raise _refuse(
            f"symmetric memory still uses backend {current!r} after set_backend('NVSHMEM')"
        )


def _register_group(group_name: str) -> None:
    """Older torch needs ``enable_symm_mem_for_group`` before a rendezvous; newer torch
    registers groups itself and only warns (deprecated), so the warning is silenced."""
    import torch.distributed._symmetric_memory as symm_mem

    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    enabled = getattr(symm_mem, "is_symm_mem_enabled_for_group", None)
    if enable is None or (enabled is not None and enabled(group_name)):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            enable(group_name)
        except RuntimeError as err:
            if "group_info_map" not in str(err):  # anything but "already registered"
                raise


def _check_device_pinning(group: dist.ProcessGroup, device: torch.device) -> None:
    """Two ranks of one host on the same GPU make NVSHMEM fail deep inside torch
    ("TeamManager on multiple devices" or a hang); say what to do instead."""
    mine = (socket.gethostname(), device.index)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if len(set(everyone)) != len(everyone):
        raise ValueError(
            f"ranks of the expert-parallel group share a GPU: {everyone}; call "
            f"torch.cuda.set_device(local_rank) before building NvshmemDispatcher"
        )


class _Workspace:
    """Symmetric buffers of one (group, device, E, X). Shared by every dispatcher with that
    key (all MoE layers of a model), so the memory does not scale with depth. Every
    allocation is collective: all ranks run the same code with the same global sizes."""

    def __init__(
        self, group: dist.ProcessGroup, device: torch.device, num_experts: int, num_slots: int
    ):
        _register_group(dist.group.WORLD.group_name)
        _register_group(group.group_name)
        self.group_name = group.group_name
        self.device = device
        world = dist.get_world_size(group)
        self.counts_in = self._alloc((world, num_experts), torch.int64)  # [W, E]
        self.counts_out = self._alloc((world, num_experts), torch.int64)  # [W, E]
        self.counts_splits = self._alloc((world,), torch.int64)  # [W]
        self.counts_splits.fill_(1)  # one row of E counts to every peer
        self.counts_out_so = self._alloc((2, world), torch.int64)  # [2, W]
        self.dispatch_splits = self._alloc((world * num_slots,), torch.int64)  # [W*X]
        self.dispatch_out_so = self._alloc((2, world * num_slots), torch.int64)  # [2, W*X]
        self.combine_in_so = self._alloc((2, world * num_slots), torch.int64)  # [2, X*W]
        self.combine_out_so = self._alloc((2, world * num_slots), torch.int64)  # [2, W*X]
        self.rows: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}  # [send, recv]

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        import torch.distributed._symmetric_memory as symm_mem

        with torch.cuda.device(self.device):
            tensor = symm_mem.empty(shape, dtype=dtype, device=self.device)
            symm_mem.rendezvous(tensor, self.group_name)
        return tensor

    def row_buffers(
        self, dtype: torch.dtype, hidden: int, send_rows: int, recv_rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Send [C_send, H] and receive [C_recv, H] buffers with at least the given rows.
        The arguments must be equal on all ranks (global maxima): growing is collective."""
        key = (dtype, hidden)
        buffers = self.rows.get(key)
        if (
            buffers is not None
            and buffers[0].shape[0] >= send_rows
            and buffers[1].shape[0] >= recv_rows
        ):
            return buffers[0], buffers[1]
        old_send, old_recv = (
            (0, 0) if buffers is None else (buffers[0].shape[0], buffers[1].shape[0])
        )
        self.rows.pop(key, None)  # drop the old pair before allocating the larger one
        del buffers
        send_cap = old_send if old_send >= send_rows else max(send_rows, 2 * old_send)
        recv_cap = old_recv if old_recv >= recv_rows else max(recv_rows, 2 * old_recv)
        pair = [self._alloc((send_cap, hidden), dtype), self._alloc((recv_cap, hidden), dtype)]
        self.rows[key] = pair
        return pair[0], pair[1]


_WORKSPACES: dict[tuple[str, int, int, int], _Workspace] = {}


@dataclass(eq=False)
class _ExchangePlan:
    """Layout of one dispatch, reused by combine and by both backward passes."""

    workspace: _Workspace
    send_buf: torch.Tensor  # [C_send, H] symmetric
    recv_buf: torch.Tensor  # [C_recv, H] symmetric
    send_splits: torch.Tensor  # [W*X] int64 rows to (rank, slot), rank-major
    recv_counts: torch.Tensor  # [W, E_local] int64 rows from (source rank, local expert)
    num_send: int  # N
    num_recv: int  # R
    num_slots: int  # X
    recv_pos: Optional[torch.Tensor] = None  # [R] receive-buffer row of each local row
    recv_splits_offsets: Optional[torch.Tensor] = field(default=None)  # [2, X*W]

    def dispatch_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: [N, H] sorted by global expert. Returns [R, H] sorted by local expert."""
        ws = self.workspace
        self.send_buf[: self.num_send].copy_(rows)
        ws.dispatch_splits.copy_(self.send_splits)
        all_to_all_vdev_2d(
            self.send_buf, self.recv_buf, ws.dispatch_splits, ws.dispatch_out_so, ws.group_name
        )
        if self.recv_pos is None:
            # Keep the receive layout: the reverse exchange needs its splits and offsets,
            # and the next exchange overwrites the symmetric copy.
            self.recv_splits_offsets = ws.dispatch_out_so.clone()  # [2, X*W]
            self.recv_pos = self._local_row_positions(self.recv_splits_offsets[1])
        return self.recv_buf.index_select(0, self.recv_pos)  # [R, H]

    def combine_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: [R, H] in local-expert order. Returns [N, H] in this rank's send order."""
        ws = self.workspace
        self.recv_buf.index_copy_(0, self.recv_pos, rows)
        ws.combine_in_so.copy_(self.recv_splits_offsets)
        all_to_all_vdev_2d_offset(
            self.recv_buf, self.send_buf, ws.combine_in_so, ws.combine_out_so, ws.group_name
        )
        return self.send_buf[: self.num_send].clone()  # [N, H]

    def _local_row_positions(self, slot_offsets: torch.Tensor) -> torch.Tensor:
        """slot_offsets: [X*W] start row of chunk (slot, source rank) in the receive buffer.
        Returns [R] int64: the buffer row of each row in (local expert, source rank) order.
        Inside a chunk rows are sorted by expert (the sender sorted by global expert)."""
        world, num_local = self.recv_counts.shape
        per_slot = num_local // self.num_slots
        counts = self.recv_counts.view(world, self.num_slots, per_slot)  # [W, X, E_local/X]
        within_chunk = counts.cumsum(-1) - counts  # exclusive prefix inside each chunk
        chunk_start = slot_offsets.view(self.num_slots, world).t().unsqueeze(-1)  # [W, X, 1]
        seg_start = (chunk_start + within_chunk).permute(1, 2, 0).reshape(-1)  # [E_local*W]
        seg_len = counts.permute(1, 2, 0).reshape(-1)  # [E_local*W] (expert, source) order
        seg_first_row = seg_len.cumsum(0) - seg_len
        rows = torch.arange(self.num_recv, device=seg_len.device)
        return (
            torch.repeat_interleave(seg_start - seg_first_row, seg_len, output_size=self.num_recv)
            + rows
        )  # [R]


@dataclass
class NvshmemHandle:
    order: torch.Tensor  # [N] int64 pair ids sorted by global expert (send order)
    weights: torch.Tensor  # [T, k] float32 routing weights (autograd-connected)
    plan: _ExchangePlan


class NvshmemDispatcher(ExpertParallelDispatcher):
    """Expert parallelism over NVSHMEM symmetric memory (NVLink with P2P; CUDA + NCCL groups).

    max_tokens: tokens per rank the symmetric buffers are first sized for (times k rows);
        larger batches grow them, collectively, to the largest need of any rank.
    max_exchange_slots: slots per rank of one exchange (at most 16, the kernel's limit);
        smaller values exercise the expert-block regrouping.
    Construction refuses, with a one-line error naming ``strategy=ep_nccl``, when CUDA,
    NVSHMEM or an NCCL process group is missing. It uses the current CUDA device.
    """

    # its exchange is synchronous kernels over symmetric memory: nothing for dual-batch
    # overlap to hide (set_overlap refuses it)
    overlaps_exchange = False

    @classmethod
    def check_plan(cls, plan: PlanDegrees, topology: Optional[LinkFacts] = None) -> None:
        """The plan-time half of ``_check_environment``: the link, and an EP group of
        2..MAX_RANKS ranks spanning the world (so pp = 1 and ep = tp * dp). Whether this
        torch has NVSHMEM is only known on the GPU box, at construction."""
        super().check_plan(plan, topology)
        if topology is not None and topology.kind == "cpu":
            raise DispatcherConfigError(
                "strategy=ep_nvshmem needs CUDA GPUs with NVLink; on "
                f"CPU use {FALLBACK} (runs over gloo)"
            )
        if topology is not None and not (
            topology.kind == "nvlink"
            and topology.all_pairs_nvlink
            and topology.all_pairs_p2p_atomics
        ):
            raise DispatcherConfigError(
                f"strategy=ep_nvshmem needs all-pairs NVLink with P2P atomics, topology is "
                f"{topology.kind} (nvlink={topology.all_pairs_nvlink}, "
                f"p2p_atomics={topology.all_pairs_p2p_atomics}); use {FALLBACK}"
            )
        if plan.ep < 2:
            raise DispatcherConfigError(
                f"strategy=ep_nvshmem needs an expert-parallel group of "
                f"at least 2 ranks, the plan has ep={plan.ep}; use "
                f"strategy=replicate"
            )
        if plan.ep != plan.world_size:
            # the vdev kernels address peers by global PE (_check_environment)
            raise DispatcherConfigError(
                f"strategy=ep_nvshmem needs the expert-parallel group to span all "
                f"{plan.world_size} ranks (torch's NVSHMEM all-to-all addresses global ranks), "
                f"the plan has ep={plan.ep} (tp={plan.tp} pp={plan.pp} dp={plan.dp}); set "
                f"parallel.ep={plan.world_size} with parallel.pp=1, or use {FALLBACK}"
            )
        if plan.ep > MAX_RANKS:
            raise DispatcherConfigError(
                f"strategy=ep_nvshmem supports at most {MAX_RANKS} "
                f"ranks (torch's all_to_all_vdev_2d_offset), the plan has "
                f"ep={plan.ep}; use {FALLBACK}"
            )

    def __init__(
        self,
        num_experts: int,
        groups: DispatchGroups = DispatchGroups(),
        max_tokens: int = 4096,
        max_exchange_slots: int = MAX_SLOTS,
    ):
        _check_environment(groups)
        super().__init__(num_experts, groups)
        if max_tokens < 1 or not 1 <= max_exchange_slots <= MAX_SLOTS:
            raise ValueError(
                f"max_tokens={max_tokens} must be >= 1 and max_exchange_slots="
                f"{max_exchange_slots} in [1, {MAX_SLOTS}]"
            )
        self.device = _current_device()
        self.max_tokens = max_tokens
        self.num_slots = exchange_slots(self.num_local_experts, max_exchange_slots)
        _select_nvshmem_backend(self.device)

    def __repr__(self) -> str:
        return (
            f"NvshmemDispatcher(num_experts={self.num_experts}, ep={self.groups.ep_size}, "
            f"slots={self.num_slots}, max_tokens={self.max_tokens})"
        )

    def _workspace(self) -> _Workspace:
        group = self.groups.ep
        key = (group.group_name, self.device.index, self.num_experts, self.num_slots)
        workspace = _WORKSPACES.get(key)
        if workspace is None:
            _check_device_pinning(group, self.device)
            workspace = _WORKSPACES[key] = _Workspace(
                group, self.device, self.num_experts, self.num_slots
            )
        return workspace

    def _exchange_counts(self, ws: _Workspace, counts: torch.Tensor) -> torch.Tensor:
        """counts: [E] int64 this rank's rows per global expert. Returns [W, E] int64 on the
        device: every rank's counts (an all-gather over NVSHMEM)."""
        world = self.groups.ep_size
        ws.counts_in.copy_(counts.unsqueeze(0).expand(world, -1))
        all_to_all_vdev_2d(
            ws.counts_in, ws.counts_out, ws.counts_splits, ws.counts_out_so, ws.group_name
        )
        return ws.counts_out.clone()

    def dispatch_dynamic(self, x, weights, expert_idx):
        if x.device != self.device:
            raise ValueError(
                f"x is on {x.device} but this NvshmemDispatcher was built on "
                f"{self.device}; call torch.cuda.set_device(local_rank) before "
                f"building it"
            )
        world, rank, num_local = self.groups.ep_size, self.groups.ep_rank, self.num_local_experts
        top_k = expert_idx.shape[1]
        order, counts = sort_by_bucket(expert_idx.reshape(-1), self.num_experts)  # [N], [E]
        x_send = gather_rows(x, order, top_k)  # [N, H] grouped by global expert
        ws = self._workspace()
        all_counts = self._exchange_counts(ws, counts)  # [W, E]
        # Host sync: the output sizes (rows received) must be Python ints, and every rank
        # must see the same global maxima to grow the symmetric buffers collectively.
        sizes = all_counts.cpu()
        per_rank = sizes.view(world, world, num_local)  # [src, dst, E_local]
        num_send = int(sizes[rank].sum())
        num_recv = int(per_rank[:, rank].sum())
        most_sent = int(sizes.sum(1).max())
        most_recv = int(per_rank.sum((0, 2)).max()) + self.num_slots  # + empty-slot padding
        floor = self.max_tokens * top_k
        send_buf, recv_buf = ws.row_buffers(
            x.dtype, x.shape[1], max(most_sent, floor), max(most_recv, floor + self.num_slots)
        )
        recv_counts = all_counts[:, rank * num_local : (rank + 1) * num_local]  # [W, E_local]
        plan = _ExchangePlan(
            workspace=ws,
            send_buf=send_buf,
            recv_buf=recv_buf,
            send_splits=counts.view(world, self.num_slots, -1).sum(-1).reshape(-1),  # [W*X]
            recv_counts=recv_counts.contiguous(),
            num_send=num_send,
            num_recv=num_recv,
            num_slots=self.num_slots,
        )
        # backward of the dispatch exchange is the combine-direction exchange
        x_local = adjoint(
            x_send.contiguous(),
            plan.dispatch_rows,
            lambda grad: plan.combine_rows(grad.contiguous()),
        )  # [R, H]
        tokens_per_local_expert = recv_counts.sum(0)  # [E_local]
        return x_local, tokens_per_local_expert, NvshmemHandle(order, weights, plan)

    def combine_dynamic(self, y_local, handle: NvshmemHandle):
        plan = handle.plan
        y_send = adjoint(
            y_local.contiguous(),
            plan.combine_rows,
            lambda grad: plan.dispatch_rows(grad.contiguous()),
        )  # [N, H]
        return unpermute_weighted_sum(y_send, handle.order, handle.weights)  # [T, H]

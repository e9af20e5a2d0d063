"""Preflight: a few-second check of the links a plan uses, after its process groups exist and
before any weight is built, so a broken link is one line instead of a hang or wrong tokens.

For every distinct process group of the plan this rank belongs to (size > 1), one
all-reduce of a small (4 KiB) and a medium (4 MiB) float32 tensor whose exact result is
checked (wrong values: corruption); on GPU, a device-to-device copy from this rank's GPU to
the next local GPU of its groups and back, checked. Each step runs under a deadline: the
collective is issued from a worker thread (NCCL may block inside the call while it builds
a communicator) with ``async_op=True`` and polled with ``Work.is_completed()``, so a peer
that never joins is an error after ``timeout_s`` seconds, never a hang.

A broken peer link (PCIe ACS / IOMMU on workstation boards: NCCL's P2P transport hangs or
delivers wrong bytes) is fixed by relaunching with ``NCCL_P2P_DISABLE=1``, or with
``+topology=pcie``, which sets it (``link_environment``).

Groups run in one global order (family name, then ranks), so ranks that share several
groups always meet in the same order. Test hooks (``PreflightHooks``) inject a stall or a
corruption; the launchers never pass them.

Shapes: the checked tensors are 1-D, [1024] and [1 Mi] float32 (bytes per rank: 4 KiB,
4 MiB). Times in seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Optional

import torch
import torch.distributed as dist

from moe_ext.errors import MoeExtError

log = logging.getLogger("moe_ext.preflight")

SIZES = (1024, 1 << 20)  # elements per all-reduce: 4 KiB (latency path), 4 MiB (bandwidth)
DEFAULT_TIMEOUT_S = 30.0  # per step; first use of an NCCL communicator builds it (~1 s)
FIX = "relaunch with NCCL_P2P_DISABLE=1, or with +topology=pcie, which sets it"
# families that are the same partition as another one under another name (cp = 1)
_SKIPPED_FAMILIES = ("cp", "dp_cp", "tp_cp", "tp_dp_cp")


class PreflightError(MoeExtError):
    """A link the plan uses hangs or corrupts data (one line: the group, what failed, fix)."""


@dataclass
class PreflightHooks:
    """Faults for tests. ``before(name, rank)`` runs before this rank joins group ``name``'s
    collective (sleep in it to stall; return False to never join); ``perturb(name, tensor)``
    may change the result before it is checked (corruption)."""

    before: Optional[Callable[[str, int], bool]] = None
    perturb: Optional[Callable[[str, torch.Tensor], None]] = None


@dataclass
class PreflightReport:
    groups: list[str] = field(default_factory=list)  # "ep [0, 1]" per group checked
    peer_copies: list[str] = field(default_factory=list)  # "cuda:0 -> cuda:1"
    seconds: float = 0.0

    def describe(self) -> str:
        copies = f", peer copies {', '.join(self.peer_copies)}" if self.peer_copies else ""
        return (
            f"preflight: all-reduce checked on {len(self.groups)} group(s) "
            f"({'; '.join(self.groups) or 'none: one rank'}){copies} ok in {self.seconds:.2f} s"
        )


def enabled(requested: Optional[bool], device_type: str) -> bool:
    """``preflight=`` as set (true / false), else on for GPU runs and off on CPU."""
    return requested if requested is not None else device_type == "cuda"


def link_environment(topology_conf: Any, environ: MutableMapping[str, str]) -> Optional[str]:
    """For a launcher: a forced topology without peer access (``+topology=pcie``, or
    ``topology.p2p=false``) sets ``NCCL_P2P_DISABLE=1`` unless the environment already sets
    it, so NCCL stages through host memory as the plan assumes. Returns a line saying what
    was set, or None."""
    if topology_conf is None:
        return None
    kind = getattr(topology_conf, "kind", "auto")
    p2p = getattr(topology_conf, "p2p", None)
    if not (kind == "pcie" and p2p is not True) and p2p is not False:
        return None
    if "NCCL_P2P_DISABLE" in environ:
        return None
    environ["NCCL_P2P_DISABLE"] = "1"
    return f"NCCL_P2P_DISABLE=1 (set by the forced topology, kind {kind}, no peer access)"


def plan_groups(groups: Any) -> list[tuple[str, list[int], Any]]:
    """(family, ranks, handle) of every distinct group of size > 1 holding this rank, in the
    global order every rank uses: the first family (by name) a rank list appears under."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for name in sorted(groups.handles):
        ranks = groups.member_ranks.get(name)
        if name in _SKIPPED_FAMILIES or ranks is None or len(ranks) < 2:
            continue
        key = tuple(ranks)
        if key not in seen:
            seen.add(key)
            out.append((name, list(ranks), groups.handles[name]))
    return out


def check(
    groups: Any,
    device: torch.device,
    local_world_size: int,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    peer_copy: Optional[bool] = None,
    hooks: Optional[PreflightHooks] = None,
) -> PreflightReport:
    """Check every group of ``groups`` (a moe_ext.groups.ProcessGroups, or any object with
    its ``handles``/``member_ranks``/``rank``) and, on CUDA unless ``peer_copy`` is False,
    one peer copy to the next local GPU of its groups (where this process can see it).
    Collective over every rank. Raises PreflightError within about ``timeout_s`` seconds
    per step."""
    start = time.perf_counter()
    report = PreflightReport()
    rank = groups.rank
    hooks = hooks or PreflightHooks()
    for name, ranks, handle in plan_groups(groups):
        label = f"{name} {ranks}"
        _check_all_reduce(name, label, ranks, handle, rank, device, timeout_s, hooks)
        report.groups.append(label)
    if device.type == "cuda" and peer_copy is not False:
        peer = _local_peer(groups, rank, local_world_size)
        if peer is not None and peer.index < torch.cuda.device_count():
            _check_peer_copy(device, peer, timeout_s)
            report.peer_copies.append(f"{device} -> {peer}")
    report.seconds = time.perf_counter() - start
    return report


def _expected(n: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's input (pattern times rank + 1) and the exact sum over ``size`` ranks: small
    integers, exact in float32."""
    pattern = (torch.arange(n, dtype=torch.float32, device=device) % 251) + 1  # [n]
    return pattern, pattern * (size * (size + 1) / 2)


def _check_all_reduce(
    name: str,
    label: str,
    ranks: list[int],
    handle: Any,
    rank: int,
    device: torch.device,
    timeout_s: float,
    hooks: PreflightHooks,
) -> None:
    """Every size's all-reduce first, then the checks: a rank that finds wrong data has
    let its peers finish too (they may see right data and go on to the next group)."""
    index = ranks.index(rank)
    results = []
    for n in SIZES:
        pattern, expected = _expected(n, len(ranks), device)
        tensor = pattern * (index + 1)  # [n]
        if hooks.before is not None and hooks.before(name, rank) is False:
            return  # the test's dead peer: never joins
        work = _issue(lambda t=tensor: dist.all_reduce(t, group=handle, async_op=True), device)
        _wait(work, timeout_s, label, f"all-reduce of {4 * n} bytes", ranks)
        if hooks.perturb is not None:
            hooks.perturb(name, tensor)
        results.append((tensor, expected))
    for tensor, expected in results:
        bad = int((tensor != expected).sum())  # sync: the check is on the host
        if bad:
            raise PreflightError(
                f"preflight: the all-reduce over group {label} returned wrong data "
                f"({bad} of {tensor.numel()} values; corruption on a peer link); {FIX}"
            )


def _issue(call: Callable[[], Any], device: torch.device) -> "_Pending":
    """Start ``call`` (which returns a Work) on a worker thread bound to ``device``."""
    pending = _Pending()

    def body() -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            pending.work = call()
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
            pending.error = err
        pending.issued.set()

    threading.Thread(target=body, name="moe_ext-preflight", daemon=True).start()
    return pending


class _Pending:
    def __init__(self) -> None:
        self.issued = threading.Event()
        self.work: Any = None
        self.error: Optional[BaseException] = None


def _wait(pending: _Pending, timeout_s: float, label: str, what: str, ranks: list[int]) -> None:
    deadline = time.monotonic() + timeout_s
    stalled = PreflightError(
        f"preflight: the {what} over group {label} did not finish in {timeout_s:g} s "
        f"(a peer link hangs, or rank(s) {ranks} are not all running); {FIX}"
    )
    if not pending.issued.wait(timeout_s):
        raise stalled
    if pending.error is not None:
        raise PreflightError(
            f"preflight: the {what} over group {label} failed: {_first_line(pending.error)}; {FIX}"
        ) from pending.error
    work = pending.work
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise stalled
        time.sleep(0.002)
    try:
        work.wait()
    except Exception as err:  # noqa: BLE001 - a backend error becomes the one-line diagnosis
        raise PreflightError(
            f"preflight: the {what} over group {label} failed: {_first_line(err)}; {FIX}"
        ) from err


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _local_peer(groups: Any, rank: int, local_world_size: int) -> Optional[torch.device]:
    """The GPU of the next rank on this node that shares a group of size > 1 with this one
    (ranks of a node are consecutive under torchrun), as a device of this process."""
    node = rank // local_world_size
    peers = sorted(
        {
            r
            for _, ranks, _ in plan_groups(groups)
            for r in ranks
            if r != rank and r // local_world_size == node
        }
    )
    if not peers:
        return None
    nxt = next((r for r in peers if r > rank), peers[0])
    return torch.device("cuda", nxt - node * local_world_size)  # its LOCAL_RANK


def _check_peer_copy(device: torch.device, peer: torch.device, timeout_s: float) -> None:
    """4 MiB from ``device`` to ``peer`` and back (cudaMemcpyPeer: the P2P path when peer
    access is on), compared on ``device``, on a worker thread under the deadline."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def body() -> None:
        try:
            torch.cuda.set_device(device)
            src = torch.arange(SIZES[1], dtype=torch.float32, device=device)  # [1 Mi]
            back = src.to(peer).to(device)
            torch.cuda.synchronize(peer)  # sync: the copies finish inside the deadline
            torch.cuda.synchronize(device)
            outcome["bad"] = int((back != src).sum())  # sync: the check is on the host
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
            outcome["error"] = err
        done.set()

    threading.Thread(target=body, name="moe_ext-preflight-copy", daemon=True).start()
    what = f"peer copy {device} -> {peer} -> {device}"
    if not done.wait(timeout_s):
        raise PreflightError(f"preflight: the {what} did not finish in {timeout_s:g} s; {FIX}")
    if "error" in outcome:
        raise PreflightError(
            f"preflight: the {what} failed: {_first_line(outcome['error'])}; {FIX}"
        ) from outcome["error"]
    if outcome["bad"]:
        raise PreflightError(
            f"preflight: the {what} returned wrong data ({outcome['bad']} of {SIZES[1]} "
            f"values; corruption on the peer link); {FIX}"
        )


def exit_after_failure(err: PreflightError, rank: int, debug: bool = False) -> NoReturn:
    """Print the one line and leave at once with exit 2. Unlike moe_ext.launching.exit_now
    this skips the closing NCCL barrier and the process group teardown: over the broken
    link they would hang until the group timeout."""
    from moe_ext.launching import end_child_processes, one_line

    if debug:
        import traceback

        traceback.print_exception(err, file=sys.stderr)
    print(f"error: rank {rank}: {one_line(err)}", file=sys.stderr, flush=True)
    end_child_processes()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


def run_or_exit(
    requested: Optional[bool],
    groups: Any,
    device: torch.device,
    local_world_size: int,
    timeout_s: float,
    debug: bool = False,
) -> Optional[PreflightReport]:
    """The launchers' hook: the check when ``enabled``, logged on rank 0; a failure is one
    line and exit 2 (``exit_after_failure``)."""
    if not enabled(requested, device.type):
        return None
    try:
        report = check(groups, device, local_world_size, timeout_s=timeout_s)
    except PreflightError as err:
        exit_after_failure(err, groups.rank, debug)
    if groups.rank == 0:
        log.info("%s", report.describe())
    return report

"""Pipeline-parallel generation with micro-batches in flight (pp > 1).

# B batch rows, b rows of one micro-batch, M micro-batches, P stages, L padded prompt
# length, Lc prompt positions of one prefill chunk, S query length of an item (Lc or 1),
# H hidden, V vocab, K output columns (the longest request's new tokens)

A batch's rows are split into M contiguous micro-batches. Each micro-batch goes through a
sequence of *items*, one forward each: its prompt's prefill chunks (positions [c0, c1),
attending to the cache of the earlier chunks), then its decode steps. Stage 0 issues one
item per tick from a static schedule every rank computes alike (``build_schedule``);
stage s runs the item stage 0 issued s ticks earlier, so P items are in flight. Each
micro-batch has KV caches of its own (``MicrobatchCaches``, swapped into the attention
modules before its items), so its rows are a plain view of them: no gathered copy. A decode
item needs the ids its micro-batch's previous item sampled on the last stage: it is issued
at least P ticks after that one (with M >= P micro-batches the ring is full: at tick t
stage s works on micro-batch (t - s) mod M).

Each tick, before computing, every stage posts one ``batch_isend_irecv`` with the tick's
traffic, so no stage waits on anything but its own input:
- stage s < P-1 sends the hidden states [b, S, H] it computed at the previous tick to s+1,
  which receives them now (stage s > 0's input);
- the last stage sends the ids [b] int64 it sampled at the previous tick (pad after a
  row is done) to stage 0, which receives them now, when that micro-batch has a later
  decode item (its input).
Only hidden states and ids travel between stages. The last stage keeps the output ids and
the done flags. Host syncs: every ``check_every`` rounds the last stage broadcasts (over
the pp group) whether every row is done; all stages then stop issuing items and drain
the ones in flight. At the end the last stage broadcasts the output ids [B, K], once.

On CUDA each stage's part of a decode item (embedding on the first stage, its layers, the
final norm and LM head on the last) is a CUDA graph per micro-batch
(``_StageGraph``, captured with generate's ``capture_step_graph``); the sends and
receives stay outside the graphs. Expert-parallel stages run every item on the static
exchange at the item's token count. With experts split across data-parallel replicas
(lockstep) every replica runs the same schedule (``run``'s ``peers``): an item a replica
has no rows in joins the exchanges idle, the stop flag is agreed over the replicas too,
and at a micro-batch's first decode item they agree whether any captures its graph (the
others join the capture's warm-up steps idle).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from moe_ext.model.decoder import Transformer
from moe_ext.model.generate import (
    SLOT_ROUNDING,
    DecodeGraph,
    GenerationResult,
    eos_mask,
    fence,
    finish_requests,
    holds_on_any,
    microbatch_bounds,
    sample,
)

if TYPE_CHECKING:
    from moe_ext.config import GenerateConf

log = logging.getLogger(__name__)


# ---- the static schedule -----------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One forward of one micro-batch. Prefill chunk: prompt positions [start, stop);
    decode step: the query at cache slot ``start`` (stop = start + 1). ``column``: the
    output column its sampled ids fill (None: a prefill chunk before the last)."""

    mb: int
    start: int
    stop: int
    decode: bool
    column: Optional[int]
    index: int  # position in its micro-batch's sequence of items


def _sizes(bounds: list[int]) -> list[int]:
    return [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def build_schedule(
    steps: list[int], prompt_len: int, chunk: Optional[int], stages: int
) -> list[Optional[Item]]:
    """Stage 0's item per tick (None: a bubble). ``steps[m]``: output columns micro-batch m
    needs (its longest request's new tokens). Greedy: the decode item ready the longest
    (its previous item left the last stage), else the next prefill chunk (chunk 0 of every
    micro-batch, then chunk 1, ...), else a bubble. Every rank computes the same list."""
    chunk = chunk or prompt_len
    bounds = [(c, min(prompt_len, c + chunk)) for c in range(0, prompt_len, chunk)]
    prefill: list[Item] = []  # chunk by chunk, each over every micro-batch: the decode
    for i, (c0, c1) in enumerate(bounds):  # items then follow in the ring's order
        for m in range(len(steps)):
            last = i == len(bounds) - 1
            prefill.append(Item(m, c0, c1, False, 0 if last else None, i))
    ready: dict[int, int] = {}  # micro-batch -> tick its next decode item may be issued
    next_column = [1] * len(steps)
    schedule: list[Optional[Item]] = []
    pending = sum(s - 1 for s in steps) + len(prefill)
    while pending:
        tick = len(schedule)
        due = [(t, m) for m, t in ready.items() if t <= tick]
        if due:
            _, m = min(due)
            k = next_column[m]
            item = Item(m, prompt_len + k - 1, prompt_len + k, True, k, len(bounds) + k - 1)
            next_column[m] += 1
            del ready[m]
        elif prefill:
            item = prefill.pop(0)
        else:
            schedule.append(None)
            continue
        if item.column is not None and item.column + 1 < steps[item.mb]:
            ready[item.mb] = tick + stages
        schedule.append(item)
        pending -= 1
    return schedule


# ---- CUDA graphs per stage ---------------------------------------------------------------


class _StageGraph(DecodeGraph):
    """One stage's part of a decode item of one micro-batch (``batch`` rows, its own
    caches), captured once: the embedding (first stage) or the received hidden states,
    this stage's layers, and the final norm and LM head (last stage). Static inputs: ids
    [b, 1] or hidden [b, 1, H], slot [1], kv_start [b]; static output: logits [b, 1, V]
    (last stage) or hidden [b, 1, H]."""

    def __init__(self, model: Transformer, batch: int, device: torch.device):
        super().__init__(model, batch, device)
        self.hidden = None
        if not model.is_first_stage:
            H = model.args.hidden_size
            self.hidden = torch.zeros(batch, 1, H, dtype=model.dtype, device=device)

    def _step(self) -> torch.Tensor:
        return self.model.stage_forward(
            self.tokens, self.hidden, self.slot, self.kv_start, None, True, last_only=True
        )

    def run(
        self,
        ids: Optional[torch.Tensor],
        hidden: Optional[torch.Tensor],
        slot: torch.Tensor,
        kv_start: torch.Tensor,
    ) -> torch.Tensor:
        if self.hidden is None:
            self.tokens.copy_(ids)
        else:
            self.hidden.copy_(hidden)
        self.slot.copy_(slot)
        self.kv_start.copy_(kv_start)
        return self.replay()


def _stage_graph_for(model: Transformer, batch: int, capacity: Optional[int]):
    """The captured stage step for ``batch`` rows on the caches now in the attention
    modules (a micro-batch's), captured on first use, kept in ``model.decode_state.graphs``
    beside generate's own."""
    graphs = model.decode_state.graphs
    caches_key = model.decode_state.stage_caches[0]
    cache_id = id(next(iter(model.layers.values())).self_attn.kv_cache)
    key = ("stage", batch, capacity, caches_key, model.compiled_decode_block is not None, cache_id)
    if key not in graphs:
        for stale in [k for k in graphs if k[0] == "stage" and k[3] != caches_key]:
            del graphs[stale]  # micro-batch caches reallocated: those point at freed buffers
        graphs[key] = _StageGraph(model, batch, model.device)
    return graphs[key]


class MicrobatchCaches:
    """Every micro-batch's own KV caches (one per local layer, ``batch`` = its rows), made
    by each attention module's ``setup_cache``; ``use(m)`` puts micro-batch m's into the
    modules. Kept in ``model.decode_state.stage_caches`` (keyed by the sizes and slots) so
    later calls of the same shape reuse them, and the graphs captured on them."""

    def __init__(self, model: Transformer, sizes: list[int], max_slots: int):
        self.attention = [block.self_attn for block in model.layers.values()]
        self.sets: list[list] = []
        for b in sizes:
            caches = []
            for attention in self.attention:
                attention.kv_cache = None  # a new cache, never another micro-batch's
                if b:
                    attention.setup_cache(b, max_slots, model.dtype, model.device)
                caches.append(attention.kv_cache)
            self.sets.append(caches)

    @staticmethod
    def of(model: Transformer, sizes: list[int], max_slots: int) -> MicrobatchCaches:
        key = (tuple(sizes), max_slots, model.dtype)
        state = model.decode_state
        if state.stage_caches is None or state.stage_caches[0] != key:
            state.stage_caches = None  # free the old ones first
            state.stage_caches = (key, MicrobatchCaches(model, sizes, max_slots))
        return state.stage_caches[1]

    def use(self, m: int) -> None:
        for attention, cache in zip(self.attention, self.sets[m]):
            attention.kv_cache = cache


# ---- the runner --------------------------------------------------------------------------


class PipelineRunner:
    """Generates one batch over the pipeline stages with micro-batches in flight (see the
    module docstring). Built once per generate call; ``run`` per batch."""

    def __init__(
        self,
        model: Transformer,
        conf: GenerateConf,
        eos: Optional[torch.Tensor],
        pad_id: int,
        generator: Optional[torch.Generator],
        check_every: int,
        result: GenerationResult,
        use_graphs: bool,
    ):
        context = model.context
        self.model, self.conf, self.eos, self.pad_id = model, conf, eos, pad_id
        self.generator, self.check_every, self.result = generator, check_every, result
        self.use_graphs = use_graphs
        self.graphs_ran = False  # a decode item replayed a stage graph
        # lockstep: take part in the capture agreement even where graphs are off after a
        # failed capture (the other replicas may still capture)
        self.match_captures = use_graphs or model.decode_state.capture_failed
        self.device = model.device
        self.group = context.pp_group
        self.stages = dist.get_world_size(self.group)
        self.stage = dist.get_group_rank(self.group, dist.get_rank())
        self.first_rank = dist.get_global_rank(self.group, 0)
        self.last_rank = context.pp_last_rank
        self.expert_parallel = context.expert_parallel
        # experts split across replicas: the replicas run one schedule, stopping together
        self.lockstep_group = context.dp_group if context.lockstep else None
        # the stage-to-stage sends and receives go through the pp group; its first
        # collective must involve all its ranks (NCCL), which a tick's ops need not
        dist.all_reduce(torch.zeros(1, device=self.device), group=self.group)

    # ---- one batch -----------------------------------------------------------------------

    def run(
        self,
        prompts: list[list[int]],
        max_new: list[int],
        peers: Optional[list[tuple[list[int], list[int]]]] = None,
    ) -> list[list[int]]:
        """prompts: this replica's batch (empty: an idle lockstep replica); max_new: new
        tokens per request. ``peers``: lockstep only, every replica's (prompt lengths,
        max_new) of this round, this one's included: all replicas then run the same
        schedule (common padded length, micro-batch count and steps) and make the same
        MoE calls per tick, a replica without rows in an item joining its exchanges idle
        at the item's capacity (the most rows any replica has in it). Returns the ids per
        request (the same on every stage)."""
        model, device, P, s = self.model, self.device, self.stages, self.stage
        shares = peers if peers is not None else [([len(p) for p in prompts], max_new)]
        busy = [share for share in shares if share[0]]
        B = len(prompts)
        L = max(max(lengths) for lengths, _ in busy)
        K = max(max(m) for _, m in busy)
        M = min(self.conf.pipeline_microbatches or P, max(len(lengths) for lengths, _ in busy))
        bounds = microbatch_bounds(B, M)
        rows_max = [0] * M  # the most rows any replica has in micro-batch m
        mb_steps = [1] * M
        for lengths, steps in busy:
            q_bounds = microbatch_bounds(len(lengths), M)
            for m in range(M):
                lo, hi = q_bounds[m], q_bounds[m + 1]
                rows_max[m] = max(rows_max[m], hi - lo)
                mb_steps[m] = max([mb_steps[m], *steps[lo:hi]])
        schedule = build_schedule(mb_steps, L, self.conf.prefill_chunk, P)
        ticks = {(it.mb, it.index): t for t, it in enumerate(schedule) if it is not None}
        max_slots = -(-(L + K) // SLOT_ROUNDING) * SLOT_ROUNDING
        caches = MicrobatchCaches.of(model, _sizes(bounds), max_slots)
        padded = [[self.pad_id] * (L - len(p)) + list(p) for p in prompts]
        tokens = torch.tensor(padded, dtype=torch.long, device=device).view(B, L)  # [B, L]
        kv_start = torch.tensor([L - len(p) for p in prompts], dtype=torch.long, device=device)
        limits = torch.tensor(max_new, dtype=torch.long, device=device)  # [B]
        out = torch.full((B, K), self.pad_id, dtype=torch.long, device=device)  # [B, K]
        done = torch.zeros(B, dtype=torch.bool, device=device)  # [B]
        H = model.args.hidden_size
        inputs: dict[int, torch.Tensor] = {}  # stage 0: micro-batch -> next ids [b]
        pending_send: Optional[torch.Tensor] = None  # last tick's output
        last_prefill = max(t for t, it in enumerate(schedule) if it is not None and not it.decode)
        cutoff = len(schedule) - 1  # the last tick stage 0 issues an item at
        interval = self.check_every * max(M, P)

        def rows_of(item: Optional[Item]) -> int:
            return 0 if item is None else bounds[item.mb + 1] - bounds[item.mb]

        fence(self.device)
        t0 = t_prefill = time.perf_counter()
        tick = 0
        while tick <= cutoff + P - 1:
            if tick > 0 and tick % interval == 0 and tick <= cutoff:
                if self._all_done(done if s == P - 1 else None):
                    cutoff = tick - 1
                    continue  # re-evaluate the loop bound; this tick is not run
            item = self._item(schedule, tick - s, cutoff)
            sent = self._item(schedule, tick - 1 - s, cutoff)  # computed last tick
            ids_item = self._item(schedule, tick - P, cutoff)  # sampled, to stage 0 now
            ids_needed = (
                rows_of(ids_item) > 0
                and ids_item.column is not None
                and self._has_next(ticks, ids_item, cutoff)
            )
            ops = []
            recv_h = None
            if s > 0 and rows_of(item):
                S = item.stop - item.start
                recv_h = torch.empty(rows_of(item), S, H, dtype=model.dtype, device=device)
                ops.append(dist.P2POp(dist.irecv, recv_h, model.context.pp_prev, self.group))
            if s < P - 1 and rows_of(sent):
                ops.append(dist.P2POp(dist.isend, pending_send, model.context.pp_next, self.group))
            recv_ids = None
            if ids_needed and s == 0:
                recv_ids = torch.empty(rows_of(ids_item), dtype=torch.long, device=device)
                ops.append(dist.P2POp(dist.irecv, recv_ids, self.last_rank, self.group))
            if ids_needed and s == P - 1:
                ops.append(dist.P2POp(dist.isend, pending_send, self.first_rank, self.group))
            if ops:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
            if recv_ids is not None:
                inputs[ids_item.mb] = recv_ids
            pending_send = None
            if item is not None and item.column == 1 and self.lockstep_group is not None:
                if rows_of(item):
                    caches.use(item.mb)
                self._match_captures(item, rows_of(item), rows_max[item.mb])
            if item is not None and not rows_of(item):
                self._idle(item, rows_max[item.mb])  # lockstep: another replica's rows
            elif item is not None:
                r0, r1 = bounds[item.mb], bounds[item.mb + 1]
                ids = None
                if s == 0:
                    ids = tokens[r0:r1, item.start : item.stop]  # [b, S]
                    if item.decode:
                        ids = inputs.pop(item.mb)[:, None]  # [b, 1]
                capacity = rows_max[item.mb] * (item.stop - item.start)
                caches.use(item.mb)
                output = self._compute(item, ids, recv_h, kv_start[r0:r1], capacity)
                if s < P - 1:
                    pending_send = output  # [b, S, H], sent next tick
                elif item.column is not None:
                    nxt = self._sample(output, item, out, done, limits, r0, r1)
                    if self._has_next(ticks, item, cutoff):
                        pending_send = nxt  # [b], to stage 0 next tick
            if tick == last_prefill + P - 1:
                fence(self.device)
                t_prefill = time.perf_counter()
            tick += 1
        if self.expert_parallel:
            model.set_moe_capacity(None)
        if not B:
            return []
        self._count(schedule, cutoff, bounds)
        self.result.prefill_tokens += sum(len(p) for p in prompts)
        # the last stage's ids to every stage, once per batch
        dist.broadcast(out, src=self.last_rank, group=self.group)
        fence(self.device)
        self.result.prefill_s += t_prefill - t0
        self.result.decode_s += time.perf_counter() - t_prefill
        self.result.cuda_graphs = self.graphs_ran
        return finish_requests(out, max_new, self.eos, self.result)

    # ---- pieces of run() -----------------------------------------------------------------

    @staticmethod
    def _item(schedule: list[Optional[Item]], index: int, cutoff: int) -> Optional[Item]:
        """Stage 0's item of tick ``index`` (None: before the start, a bubble, or past the
        cutoff)."""
        return schedule[index] if 0 <= index <= cutoff else None

    @staticmethod
    def _has_next(ticks: dict[tuple[int, int], int], item: Item, cutoff: int) -> bool:
        """Whether ``item``'s micro-batch has a later item issued at or before ``cutoff``
        (then stage 0 needs the ids ``item`` samples). ticks: (mb, index) -> issue tick."""
        return ticks.get((item.mb, item.index + 1), cutoff + 1) <= cutoff

    def _all_done(self, done: Optional[torch.Tensor]) -> bool:
        """The last stage's verdict (``done`` [B] bool there, None elsewhere), shared over
        the pipeline group, and with lockstep over the replicas (every one done)."""
        flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        if done is not None:
            flag.fill_(1)
            flag.mul_(done.all().to(torch.int32))
        dist.broadcast(flag, src=self.last_rank, group=self.group)
        if self.lockstep_group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.lockstep_group)
        # sync: the stages (and replicas) agree to stop issuing items, every check_every
        # rounds
        return bool(flag.item())

    def _match_captures(self, item: Item, rows: int, rows_max: int) -> None:
        """Lockstep with CUDA graphs, at a micro-batch's first decode item (where its
        stage graph is captured, if it is not yet): the replicas agree whether any of
        them captures, and those that do not join the two warm-up steps of the capture
        with idle steps (the capture itself launches no collective)."""
        if not self.match_captures:
            return
        capturing = False
        if rows and self.use_graphs:
            capacity = rows_max * (item.stop - item.start)
            capturing = _stage_graph_for(self.model, rows, capacity).graph is None
        # the replicas must make the same exchanges (a sync once per micro-batch and call)
        if holds_on_any(capturing, self.lockstep_group, self.device) and not capturing:
            for _ in range(2):
                self._idle(item, rows_max)

    def _idle(self, item: Item, rows_max: int) -> None:
        """A lockstep item this replica has no rows in: join its MoE exchanges with zero
        tokens at the item's capacity (``rows_max`` rows of the busiest replica)."""
        if self.expert_parallel:
            self.model.set_moe_capacity(rows_max * (item.stop - item.start))
        self.model.idle_forward()

    def _compute(
        self,
        item: Item,
        ids: Optional[torch.Tensor],
        hidden: Optional[torch.Tensor],
        kv_start: torch.Tensor,
        capacity: int,
    ) -> torch.Tensor:
        """This stage's forward of ``item``: logits [b, 1, V] on the last stage, else the
        hidden states [b, S, H]. ids [b, S] int64 (first stage), hidden [b, S, H];
        ``capacity``: the item's static expert-exchange capacity (its token count on the
        busiest replica), used by expert-parallel models."""
        model = self.model
        b = kv_start.shape[0]
        if not self.expert_parallel:
            capacity = None
        if capacity is not None:
            model.set_moe_capacity(capacity)  # the same on every rank of the EP group
        slots = torch.arange(item.start, item.stop, device=self.device)  # [S]
        if not item.decode:
            return model.stage_forward(
                ids, hidden, slots, kv_start, item.stop, True, last_only=True
            )
        if self.use_graphs:
            graph = _stage_graph_for(model, b, capacity)
            try:
                logits = graph.run(ids, hidden, slots, kv_start)
                self.graphs_ran = True
                return logits
            except dist.DistError:
                raise
            except RuntimeError as e:  # an op that syncs, or a failed compile
                log.warning(
                    "CUDA-graph capture of pipeline stage %d failed (%s); decoding eagerly, "
                    "uncompiled",
                    self.stage,
                    e,
                )
                model.compile_decode(False)
                model.decode_state.capture_failed = True
                model.decode_state.graphs.clear()
                self.use_graphs = False
        return model.stage_forward(ids, hidden, slots, kv_start, None, True, last_only=True)

    def _sample(
        self,
        logits: torch.Tensor,
        item: Item,
        out: torch.Tensor,
        done: torch.Tensor,
        limits: torch.Tensor,
        r0: int,
        r1: int,
    ) -> torch.Tensor:
        """Last stage: the micro-batch's next ids [b] from logits [b, 1, V], written to
        ``out[r0:r1, item.column]`` (pad once a row is done), ``done`` updated."""
        conf = self.conf
        nxt = sample(logits[:, -1], conf.temperature, conf.top_p, self.generator, conf.top_k)
        k = item.column
        if k > 0:
            nxt = torch.where(done[r0:r1], torch.full_like(nxt, self.pad_id), nxt)
        out[r0:r1, k] = nxt
        done[r0:r1] |= eos_mask(nxt, self.eos) | (limits[r0:r1] <= k + 1)
        return nxt

    def _count(self, schedule: list[Optional[Item]], cutoff: int, bounds: list[int]) -> None:
        """Decode token and step counts of the items issued (the same on every stage)."""
        issued = [it for it in schedule[: cutoff + 1] if it is not None]
        decode = [it for it in issued if it.decode]
        self.result.decode_tokens += sum(bounds[it.mb + 1] - bounds[it.mb] for it in decode)
        self.result.decode_steps += max((it.column for it in decode), default=0)

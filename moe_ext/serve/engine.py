"""The serving engine: continuous batching over per-row KV caches, on every rank in lockstep.

# B decode bucket (rows 0..B-1 of every replica), n prefill chunk length, V vocab,
# R rows per replica, S_max slots per row (max_context)

Process model: every rank runs ``ServeEngine.run()`` in its main thread. Rank 0 also owns
the request queue (``Scheduler``) and hands out ``EngineClient`` (``ServeEngine.client``)
to the HTTP server, which runs in another thread. Each step rank 0 broadcasts a
``StepPlan`` over the control group (gloo, CPU; its timeout is the collective timeout),
every rank runs it on its own replica's rows, and the sampled ids are gathered back to
rank 0 (one tensor gather; none when rank 0 samples every row itself: one replica, one
stage), which turns them into ``TokenEvent``s on the requests' streams. An idle rank 0
broadcasts an empty plan every ``heartbeat_s`` so the other ranks' waits never time out.

A step on replica r (``_execute``): new rows get their sampling state; one decode forward
over rows 0..B-1 (static shape, B a power of two covering the decoding rows, the same on
every lockstep replica; a CUDA graph per bucket on GPU where the model allows, all
captured before serving); then r's prefill chunks, batched in the scheduler's groups
(rows named by ``cache_rows``). Replicas whose experts are split across them
(``context.lockstep``) make every expert exchange together: one without decoding rows
joins the decode step with ``idle_forward`` at the same static capacity, and the replicas
pad their prefill forwards to the busiest one's count with ``idle_forward``.
Pipeline stages run the same forwards, hidden states flowing as in ``generate``; the last
stage samples. TP ranks of a replica run identical rows and sample identically (same
per-row generators).

Draining (``drain``, SIGTERM): new requests are refused (EngineUnavailable), the accepted
ones finish, then rank 0 broadcasts shutdown and every rank's ``run`` returns 0. A failed
collective (a dead rank, a timeout) ends every open stream with an error event, marks the
engine unhealthy, and ``run`` returns 1.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, record_function

from moe_ext.errors import MoeExtError
from moe_ext.model.generate import DecodeGraph, sample
from moe_ext.serve.scheduler import (
    Entry,
    PrefillChunk,
    Scheduler,
    StepPlan,
    bucket_for,
    buckets,
)

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0  # rank 0 logs throughput at most this often while it works


# ---- errors -----------------------------------------------------------------------------


class QueueFull(MoeExtError):
    """The request queue is full: retry after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: float, max_queue: int = 0):
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the server's queue is full ({max_queue} requests waiting); retry after "
            f"{retry_after_s:g} s or raise server.max_queue"
        )


class EngineUnavailable(MoeExtError):
    """The engine is draining for shutdown or lost a rank: no new requests."""


class ContextTooLong(MoeExtError):
    """prompt + max_tokens exceeds the engine's context."""


class InvalidRequest(MoeExtError):
    """A request the engine cannot run (empty prompt, ids outside the vocabulary, ...)."""


# ---- the client-facing types ------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0
    seed: Optional[int] = None  # None: the engine's shared generator
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS ids (unless ignore_eos)
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenEvent:
    """New ids of a request; the last event has ``finish_reason`` ("stop": a stop/EOS id,
    which is the event's last id; "length": max_tokens; "abort": cancelled; "error": the
    engine failed, ``error`` says how)."""

    token_ids: list[int]
    finish_reason: Optional[str] = None
    error: Optional[str] = None


@dataclass(frozen=True)
class EngineStats:
    running: int
    queued: int
    kv_rows_used: int
    kv_rows_total: int
    kv_tokens_used: int
    kv_tokens_total: int
    healthy: bool
    draining: bool


class RequestStream:
    """The events of one request, in order. ``async for event in stream`` when submitted
    from an event loop (events arrive through ``loop.call_soon_threadsafe``), else
    ``stream.events(timeout)``; iteration ends after the event with a finish_reason."""

    def __init__(
        self,
        request_id: str,
        prompt_tokens: int,
        loop: Optional[asyncio.AbstractEventLoop] = None,
    ):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.arrival_s = time.monotonic()
        self.first_token_s: Optional[float] = None
        self.completion_tokens = 0
        self.finish_reason: Optional[str] = None
        self._loop = loop
        self._async_queue: Optional[asyncio.Queue] = asyncio.Queue() if loop else None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = False  # the consumer saw the final event

    def _push(self, event: TokenEvent) -> None:
        """Engine thread: deliver ``event`` (dropped if the consumer's loop is gone)."""
        if event.token_ids and self.first_token_s is None:
            self.first_token_s = time.monotonic()
        self.completion_tokens += len(event.token_ids)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._async_queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._ended or self._async_queue is None:
            raise StopAsyncIteration
        event = await self._async_queue.get()
        self._ended = event.finish_reason is not None
        return event

    def events(self, timeout: float) -> Iterator[TokenEvent]:
        """Blocking iteration (no event loop); raises queue.Empty after ``timeout`` seconds
        without an event."""
        while not self._ended:
            event = self._queue.get(timeout=timeout)
            self._ended = event.finish_reason is not None
            yield event


class EngineClient(ABC):
    """What the HTTP server uses (rank 0 only; thread-safe)."""

    model_name: str
    max_context: int  # prompt + max_tokens limit

    @abstractmethod
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request. Raises QueueFull, EngineUnavailable, ContextTooLong,
        InvalidRequest."""

    @abstractmethod
    def cancel(self, stream: RequestStream) -> None:
        """Stop a request (its stream ends with "abort") and free its KV row."""

    @abstractmethod
    def stats(self) -> EngineStats: ...


# ---- per-row sampling ------------------------------------------------------------------


@dataclass
class _RowSampling:
    temperature: float
    top_p: float
    generator: Optional[torch.Generator]  # None: the engine's shared generator


class _BucketGraph(DecodeGraph):
    """generate's captured decode step with per-row slots: ``slot`` is [B, 1] here (each
    row at its own position) and ``kv_start`` stays 0 (rows carry no left padding). Every
    rank captures every bucket in the same order before serving, so lockstep replicas'
    warm-up collectives match; the warm-up writes land on slots that the real step
    rewrites or no request holds."""

    def __init__(self, model, bucket: int, device: torch.device):
        super().__init__(model, bucket, device)
        self.slot = torch.zeros(bucket, 1, dtype=torch.long, device=device)  # [B, 1]

    def __call__(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens, slots: [B, 1] int64. Returns logits [B, 1, V] (a static buffer)."""
        self.tokens.copy_(tokens)
        self.slot.copy_(slots)
        return self.replay()


@dataclass
class _Progress:
    """Rank 0's counts since its last progress line (``ServeEngine._log_progress``)."""

    since: float
    out: int = 0  # tokens generated
    prompt: int = 0  # prompt tokens prefilled
    steps: collections.Counter = field(default_factory=collections.Counter)
    seconds: collections.Counter = field(default_factory=collections.Counter)


@dataclass(frozen=True)
class ProfileWindow:
    """torch.profiler over engine steps ``skip + 1 .. skip + steps`` (non-empty ones) on every
    rank: ``directory/serve_rank{r}.json`` (a Chrome / Perfetto trace) and
    ``serve_rank{r}.txt`` (the ops by host and by device time). The steps carry ``serve.*`` ranges
    (schedule, decode, prefill, complete), so host gaps show between them."""

    directory: str
    steps: int = 32
    skip: int = 16


class _StepProfiler:
    """Counts non-empty steps and runs torch.profiler over ``window``'s steps on this rank."""

    def __init__(self, window: ProfileWindow, rank: int, on_cuda: bool):
        self.window, self.rank = window, rank
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
        self.steps = 0
        self.active: Optional[torch.profiler.profile] = None
        if window.skip == 0:
            self._start()

    def _start(self) -> None:
        self.active = torch.profiler.profile(activities=self.activities)
        self.active.__enter__()

    def step_done(self) -> None:
        self.steps += 1
        window = self.window
        if self.steps == window.skip:
            self._start()
        elif self.active is not None and self.steps == window.skip + window.steps:
            self.active.__exit__(None, None, None)
            self._write(self.active)
            self.active = None

    def _write(self, prof: torch.profiler.profile) -> None:
        directory = Path(self.window.directory)
        directory.mkdir(parents=True, exist_ok=True)
        trace = directory / f"serve_rank{self.rank}.json"
        ops = prof.key_averages()
        sorts = ["self_cpu_time_total"] + (
            ["self_device_time_total"] if len(self.activities) > 1 else []
        )
        table = "\n".join(f"by {sort}:\n{ops.table(sort_by=sort, row_limit=30)}" for sort in sorts)
        for target, write in (
            (trace, prof.export_chrome_trace),
            (trace.with_suffix(".txt"), lambda path: Path(path).write_text(table)),
        ):
            partial = target.with_name(f".{target.name}.tmp{os.getpid()}")
            write(str(partial))
            os.replace(partial, target)  # no half-written file under the final name
        log.info(
            "serving engine: rank %d's profile of steps %d..%d written to %s (and .txt)",
            self.rank,
            self.window.skip + 1,
            self.window.skip + self.window.steps,
            trace,
        )


# ---- the engine ------------------------------------------------------------------------


class ServeEngine:
    """Continuous batching on this rank (see the module doc).

    ``model``: this rank's parallelized Transformer (caches are set up here: ``rows`` rows
    of ``max_context`` slots). ``control_group``: a gloo group of every rank (None: one
    process, no collectives). ``stop_ids``: the model's EOS ids (generation_config.json).
    ``kv_tokens``: each replica's KV-token budget for admission (default rows·max_context).
    ``profile``: torch.profiler over a window of steps (ProfileWindow).
    """

    def __init__(
        self,
        model,
        control_group: Optional[dist.ProcessGroup],
        *,
        model_name: str,
        rows: int,
        max_context: int,
        prefill_chunk: int,
        max_queue: int,
        stop_ids: Sequence[int] = (),
        seed: int = 0,
        cuda_graphs: bool = True,
        compile_decode: bool = True,
        heartbeat_s: float = 1.0,
        kv_tokens: Optional[int] = None,
        profile: Optional[ProfileWindow] = None,
    ):
        self.model = model
        self.group = control_group
        self.multi = control_group is not None and dist.get_world_size(control_group) > 1
        self.rank = dist.get_rank(control_group) if control_group is not None else 0
        self.leader = dist.get_global_rank(control_group, 0) if self.multi else 0
        self.model_name, self.max_context, self.rows = model_name, max_context, rows
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.heartbeat_s = heartbeat_s
        context = model.context
        self.replica, self.replicas = context.dp_rank, context.dp_size
        # rank 0 samples every row itself (one replica, no later stage): no gather per step
        self.gathers_ids = self.multi and (self.replicas > 1 or context.pp_group is not None)
        self.lockstep = context.lockstep
        self.static_exchange = context.lockstep or context.expert_parallel
        self.device = model.device
        self.vocab_size = model.args.vocab_size
        if kv_tokens is not None and kv_tokens < max_context:
            raise MoeExtError(
                f"a KV-token budget of {kv_tokens} cannot hold one request of max_context "
                f"{max_context}; raise the budget or lower server.max_context"
            )
        # gpt-oss's sliding layers attend a chunk's own keys beside their ring, so a padded
        # copy of a key would count twice: chunks batch only at equal lengths there
        rings = any(
            getattr(block.self_attn, "window", None) is not None
            for block in getattr(model, "layers", {}).values()
        )
        self.scheduler = Scheduler(
            self.replicas, rows, max_context, max_queue, prefill_chunk, kv_tokens, not rings
        )
        model.eval()
        model.setup_caches(rows, max_context)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.row_sampling: dict[int, _RowSampling] = {}
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            model.compile_decode(compile_decode and not model.decode_state.capture_failed)
        self.use_graphs = (
            cuda_graphs
            and on_cuda
            and context.pp_group is None
            and not model.decode_state.capture_failed
            and (self.static_exchange or context.cuda_graph_safe)
        )
        self.graphs: dict[int, _BucketGraph] = {}
        # forwards this rank ran: decode, prefill, idle_decode, idle_prefill (tests, logs)
        self.counts: collections.Counter[str] = collections.Counter()
        # rank 0's request side (guarded by _cv)
        self._cv = threading.Condition()
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._draining = False
        self._healthy = True
        self._finished: collections.deque[float] = collections.deque(maxlen=64)  # end times
        self._progress = _Progress(time.monotonic())
        self._warned_disagree = False
        self._client = _Client(self)
        self._profiler = _StepProfiler(profile, self.rank, on_cuda) if profile else None

    @property
    def decode_buckets(self) -> list[int]:
        return buckets(self.rows)

    @property
    def client(self) -> EngineClient:
        if self.rank != 0:
            raise RuntimeError("the engine client lives on rank 0 only")
        return self._client

    def drain(self) -> None:
        """Stop admitting; finish what was accepted, then shut every rank down (thread-safe;
        a signal handler may call it)."""
        with self._cv:
            self._draining = True
            self._cv.notify_all()

    # ---- the loop ---------------------------------------------------------------------
    def run(self) -> int:
        """Serve until drained (0) or a rank fails (1)."""
        try:
            with torch.inference_mode():
                self._warm_up()
                return self._lead() if self.rank == 0 else self._follow()
        except Exception as err:  # noqa: BLE001 - a failed collective or forward
            log.error("serving engine failed on rank %d: %s", self.rank, err)
            if self.rank == 0:
                self._fail(f"the serving engine failed: {err}")
            return 1

    def _warm_up(self) -> None:
        """On a GPU, before serving and on every rank at once (so lockstep replicas'
        warm-up collectives match): one prefill forward per power-of-two chunk length up to
        ``prefill_chunk``, then every bucket's decode graph. The prefill lengths cover the
        shapes whose first call autotunes or loads kernels (the Triton experts key on the
        row count): served cold, the first prompts took 1.6-4.4 s a step where a warm step
        takes 0.2 s (qwen3_30b_a3b, one H200). The throw-away writes land on row 0, which
        no request holds yet."""
        if self.device.type != "cuda":
            return
        began = time.monotonic()
        longest = min(self.scheduler.prefill_chunk, self.max_context)
        lengths = [1 << i for i in range(longest.bit_length())]
        for length in lengths:
            chunk = PrefillChunk(self.replica, 0, (0,) * length, 0, last=True)
            self._prefill([chunk])
        log.info(
            "serving engine: prefill warmed at %s tokens in %.1f s",
            lengths,
            time.monotonic() - began,
        )
        if not self.use_graphs:
            return
        for bucket in self.decode_buckets:
            zeros = torch.zeros(bucket, 1, dtype=torch.long, device=self.device)  # [B, 1]
            self._decode(zeros, zeros)
        log.info("serving engine: decode graphs captured for batches %s", self.decode_buckets)

    def _lead(self) -> int:
        last = time.monotonic()
        while True:
            with self._cv:
                while self.scheduler.idle and not self._draining:
                    wait = self.heartbeat_s - (time.monotonic() - last)
                    if self.multi and wait <= 0:
                        break
                    self._cv.wait(timeout=max(wait, 0.01) if self.multi else self.heartbeat_s)
                if self._draining and self.scheduler.idle:
                    plan = StepPlan(shutdown=True)
                else:
                    with record_function("serve.schedule"):
                        plan = self.scheduler.schedule()
            self._broadcast(plan)
            last = time.monotonic()
            if plan.shutdown:
                log.info("serving engine: drained, shutting down")
                return 0
            if plan.empty:
                continue
            began = time.monotonic()
            sampled = self._gather(self._execute(plan))
            self._log_progress(plan, len(sampled), time.monotonic() - began)
            with self._cv, record_function("serve.complete"):
                for done in self.scheduler.complete(plan, sampled):
                    stream = self._streams.get(done.entry.request_id)
                    if stream is None:
                        continue
                    if done.finish_reason is not None:
                        del self._streams[done.entry.request_id]
                        self._finished.append(time.monotonic())
                    stream._push(TokenEvent(done.token_ids, done.finish_reason))
                if self._draining and self.scheduler.idle:
                    self._cv.notify_all()
            if self._profiler is not None:
                self._profiler.step_done()

    def _log_progress(self, plan: StepPlan, new_tokens: int, step_s: float) -> None:
        """Rank 0: a line at most every LOG_EVERY_S seconds while it works (rates over the
        time since the last line), rows and queue, and where the time went: the mean step
        (execute and gather; a step ends at its sampling sync) of decode-only steps and of
        steps that also prefill, and the share of the wall the steps took (the rest is
        scheduling, streaming and waiting for requests)."""
        progress = self._progress
        progress.out += new_tokens
        progress.prompt += sum(len(c.tokens) for chunks in plan.prefill for c in chunks)
        kind = "prefill" if any(plan.prefill) else "decode"
        progress.steps[kind] += 1
        progress.seconds[kind] += step_s
        now = time.monotonic()
        elapsed = now - progress.since
        if elapsed < LOG_EVERY_S:
            return
        s = self.scheduler

        def mean_ms(kind: str) -> str:
            n = progress.steps[kind]
            return f"{1e3 * progress.seconds[kind] / n:.1f} ms x {n}" if n else "-"

        log.info(
            "engine: %.1f tok/s out, %.1f tok/s prompt; %d running, %d queued; KV rows %d/%d; "
            "steps: decode-only %s, with prefill %s, %.0f%% of the wall",
            progress.out / elapsed,
            progress.prompt / elapsed,
            s.rows_used,
            s.queued,
            s.rows_used,
            s.rows_total,
            mean_ms("decode"),
            mean_ms("prefill"),
            100 * sum(progress.seconds.values()) / elapsed,
        )
        self._progress = _Progress(now)

    def _follow(self) -> int:
        while True:
            plan = self._broadcast(None)
            if plan.shutdown:
                return 0
            if not plan.empty:
                self._gather(self._execute(plan))
                if self._profiler is not None:
                    self._profiler.step_done()

    def _broadcast(self, plan: Optional[StepPlan]) -> StepPlan:
        """Rank 0's plan to every rank (over the control group)."""
        if not self.multi:
            return plan
        box = [plan]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return box[0]

    def _gather(self, sampled: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
        """Every rank's sampled ids to rank 0 (merged; TP ranks of a replica agree) as one
        [replicas · rows] int64 tensor per rank, -1 where a rank sampled nothing."""
        if not self.gathers_ids:
            return sampled
        ids = [-1] * (self.replicas * self.rows)
        for (replica, row), token in sampled.items():
            ids[replica * self.rows + row] = token
        mine = torch.tensor(ids, dtype=torch.long)  # [R·rows]
        world = dist.get_world_size(self.group)
        parts = [torch.empty_like(mine) for _ in range(world)] if self.rank == 0 else None
        dist.gather(mine, parts, dst=self.leader, group=self.group)
        if self.rank != 0:
            return {}
        merged: dict[tuple[int, int], int] = {}
        # CPU tensors (the gloo control group): no device sync
        for part in torch.stack(parts).tolist():  # [world][R·rows]
            for index, token in enumerate(part):
                if token < 0:
                    continue
                key = divmod(index, self.rows)  # (replica, row)
                if merged.setdefault(key, token) != token and not self._warned_disagree:
                    # TP ranks sample alike unless their logits differ in the last bit; the
                    # lowest rank's id wins and goes to every rank with the next plan
                    log.warning("ranks sampled different ids for (replica, row) %s", key)
                    self._warned_disagree = True
        return merged

    def _fail(self, message: str) -> None:
        with self._cv:
            self._healthy = False
            for stream in self._streams.values():
                stream._push(TokenEvent([], "error", message))
            self._streams.clear()
            self._cv.notify_all()

    # ---- one step on this rank -------------------------------------------------------------
    def _execute(self, plan: StepPlan) -> dict[tuple[int, int], int]:
        """Run ``plan`` on this replica's rows; returns {(replica, row): id} sampled here
        (last pipeline stage only)."""
        me = self.replica
        for new in plan.new_rows:
            if new.replica == me:
                generator = None
                if new.seed is not None and new.temperature > 0:
                    generator = torch.Generator(device=self.device)
                    generator.manual_seed(new.seed)
                self.row_sampling[new.row] = _RowSampling(new.temperature, new.top_p, generator)
        sampled: dict[tuple[int, int], int] = {}
        rows = plan.decode_rows[me] if plan.bucket else []
        if rows:
            # lockstep replicas share the plan's bucket (one static exchange capacity);
            # independent ones decode only the bucket their own rows need
            B = plan.bucket if self.lockstep else bucket_for(rows[-1] + 1, self.rows)
            tokens = torch.tensor(plan.decode_tokens[me][:B], dtype=torch.long)[:, None]  # [B, 1]
            slots = torch.tensor(plan.decode_slots[me][:B], dtype=torch.long)[:, None]  # [B, 1]
            with record_function("serve.decode"):
                logits = self._decode(tokens.to(self.device), slots.to(self.device))
            self.counts["decode"] += 1
            if logits is not None:
                ids = self._sample(logits[rows, -1], rows)
                sampled.update(((me, row), i) for row, i in zip(rows, ids))
        elif plan.bucket and self.lockstep:
            # nothing to decode here: join the other replicas' expert exchanges (at their
            # static capacity; graphs were all captured before serving, so no replica is
            # in a capture's warm-up now)
            self._idle_decode(plan.bucket)
            self.counts["idle_decode"] += 1
        groups = plan.groups[me]
        for i in range(plan.prefill_forwards):
            if i >= len(groups):
                if self.lockstep:
                    self.model.idle_forward()  # the other replicas' expert exchanges
                    self.counts["idle_prefill"] += 1
                continue
            chunks = [plan.prefill[me][j] for j in groups[i]]
            with record_function("serve.prefill"):
                logits = self._prefill(chunks)
            self.counts["prefill"] += 1
            last = [b for b, chunk in enumerate(chunks) if chunk.last]
            if logits is not None and last:
                rows = [chunks[b].row for b in last]
                ids = self._sample(logits[last, -1], rows)
                sampled.update(((me, row), i) for row, i in zip(rows, ids))
        return sampled

    def _decode(self, tokens: torch.Tensor, slots: torch.Tensor) -> Optional[torch.Tensor]:
        """tokens, slots: [B, 1] int64 for rows 0..B-1. Logits [B, 1, V] (None off the last
        stage). The expert exchange is static at B tokens where it must match across ranks."""
        B = tokens.shape[0]
        if self.static_exchange:
            self.model.set_moe_capacity(B)
        try:
            if self.use_graphs:
                try:
                    if B not in self.graphs:
                        self.graphs[B] = _BucketGraph(self.model, B, self.device)
                    return self.graphs[B](tokens, slots)
                except dist.DistError:
                    raise
                except RuntimeError as e:  # an op that syncs, or a failed compile
                    log.warning(
                        "CUDA-graph capture failed (%s); decoding eagerly", e, exc_info=True
                    )
                    self.model.compile_decode(False)
                    self.model.decode_state.capture_failed = True
                    self.use_graphs = False
                    self.graphs.clear()
            kv_start = torch.zeros(B, dtype=torch.long, device=self.device)  # [B]
            return self.model(tokens, slots, kv_start, None, last_only=True, use_cache=True)
        finally:
            if self.static_exchange:
                self.model.set_moe_capacity(None)

    def _idle_decode(self, bucket: int) -> None:
        """A lockstep replica without decoding rows: the decode step's expert exchanges with
        zero tokens."""
        self.model.set_moe_capacity(bucket)
        try:
            self.model.idle_forward()
        finally:
            self.model.set_moe_capacity(None)

    def _prefill(self, chunks: Sequence[PrefillChunk]) -> Optional[torch.Tensor]:
        """Prompt chunks of several rows in one forward, each at its slots start..start+n-1.
        Shorter chunks are right-padded with copies of their last token at their last slot:
        identical queries writing identical keys there, so padding changes nothing and the
        last position's logits are the last token's. Logits [b, 1, V] (None off the last
        stage)."""
        width = max(len(c.tokens) for c in chunks)
        tokens, slots = [], []
        for c in chunks:
            n, pad = len(c.tokens), width - len(c.tokens)
            tokens.append(list(c.tokens) + [c.tokens[-1]] * pad)
            slots.append(list(range(c.start, c.start + n)) + [c.start + n - 1] * pad)
        device = self.device
        return self.model(
            torch.tensor(tokens, dtype=torch.long, device=device),  # [b, S]
            torch.tensor(slots, dtype=torch.long, device=device),  # [b, S]
            torch.zeros(len(chunks), dtype=torch.long, device=device),  # [b]
            max(c.start + len(c.tokens) for c in chunks),
            last_only=True,
            use_cache=True,
            cache_rows=torch.tensor([c.row for c in chunks], dtype=torch.long, device=device),
        )

    def _sample(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """logits: [n, V], one per row in ``rows``. Greedy rows take the argmax; the others
        sample with their temperature/top_p: seeded rows one by one with their own
        generator, unseeded ones batched by (temperature, top_p) on the shared generator
        (the same calls in the same order on every rank of a replica)."""
        ids = logits.argmax(dim=-1)  # [n]
        shared: dict[tuple[float, float], list[int]] = {}
        for i, row in enumerate(rows):
            state = self.row_sampling.get(row)
            if state is None or state.temperature <= 0:
                continue
            if state.generator is not None:
                ids[i] = sample(logits[i : i + 1], state.temperature, state.top_p, state.generator)[
                    0
                ]
            else:
                shared.setdefault((state.temperature, state.top_p), []).append(i)
        for (temperature, top_p), batch in shared.items():
            index = torch.tensor(batch, device=logits.device)  # [m]
            ids[index] = sample(logits[index], temperature, top_p, self.generator)  # [m]
        return ids.tolist()  # sync: the step's ids to the host (rank 0 streams them)

    # ---- rank 0: the client side -----------------------------------------------------------
    def _submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise InvalidRequest("the prompt is empty; give at least one token")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequest(
                f"the prompt has token ids outside the vocabulary [0, {self.vocab_size})"
            )
        if params.max_tokens < 1:
            raise InvalidRequest(f"max_tokens={params.max_tokens}; it must be at least 1")
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise InvalidRequest("temperature must be >= 0 and top_p in (0, 1]")
        if len(prompt) + params.max_tokens > self.max_context:
            raise ContextTooLong(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) "
                f"exceeds the context of {self.max_context}; shorten the prompt or lower "
                f"max_tokens"
            )
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else self.stop_ids)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._cv:
            if not self._healthy:
                raise EngineUnavailable("the serving engine lost a rank; restart the server")
            if self._draining:
                raise EngineUnavailable("the server is shutting down; send the request elsewhere")
            request_id = f"req-{next(self._ids)}"
            entry = Entry(
                request_id,
                prompt,
                params.max_tokens,
                frozenset(stop),
                params.seed,
                params.temperature,
                params.top_p,
            )
            if not self.scheduler.add(entry):
                raise QueueFull(self._retry_after(), self.scheduler.max_queue)
            stream = RequestStream(request_id, len(prompt), loop)
            self._streams[request_id] = stream
            self._cv.notify_all()
        return stream

    def _retry_after(self) -> float:
        """Seconds until the queue has likely drained a place: the queue over the recent
        completion rate (the last 64 requests), between 1 and 60 s."""
        done = self._finished
        if len(done) < 2 or done[-1] <= done[0]:
            return 1.0
        rate = (len(done) - 1) / (done[-1] - done[0])  # requests finished per second
        return float(min(60, max(1, math.ceil(self.scheduler.queued / rate))))

    def _cancel(self, stream: RequestStream) -> None:
        with self._cv:
            if self._streams.pop(stream.request_id, None) is None:
                return  # finished already
            self.scheduler.cancel(stream.request_id)
            stream._push(TokenEvent([], "abort"))

    def _stats(self) -> EngineStats:
        with self._cv:
            s = self.scheduler
            return EngineStats(
                running=s.rows_used,
                queued=s.queued,
                kv_rows_used=s.rows_used,
                kv_rows_total=s.rows_total,
                kv_tokens_used=s.tokens_used,
                kv_tokens_total=s.tokens_total,
                healthy=self._healthy,
                draining=self._draining,
            )


class _Client(EngineClient):
    def __init__(self, engine: ServeEngine):
        self._engine = engine
        self.model_name = engine.model_name
        self.max_context = engine.max_context

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        return self._engine._submit(prompt_ids, params)

    def cancel(self, stream: RequestStream) -> None:
        self._engine._cancel(stream)

    def stats(self) -> EngineStats:
        return self._engine._stats()

"""Batched generation: left-padded prefill, then decode over a preallocated KV cache.

# B batch, L padded prompt length, V vocab, S_max cache slots (L + new tokens, rounded up)

One forward per step for the whole batch; finished sequences keep stepping (their tokens
are discarded) so shapes stay static. Host syncs are limited to: the EOS check every
``check_every`` steps, the end-of-batch copy of the output ids, and timing fences on GPU.

What generate needs of the parallel plan (replicas, lockstep, pipeline group, whether
graphs are safe) it reads from ``model.context``, the ParallelContext ``parallelize`` set;
what it remembers between calls (captured graphs, a failed capture) is ``model.decode_state``.

Data parallelism (``parallelize`` with dp > 1): each replica generates its slice of the
prompts and the results are all-gathered. When experts are split across replicas (ep_*),
every rank must make the same number of MoE calls: a replica with nothing left to do keeps
joining the expert exchanges with zero tokens until every replica is done (lockstep).

Lockstep decode runs the expert exchange at a static capacity (``set_moe_capacity``): per
round, the largest batch any replica runs in it, which every rank computes from the
request count, dp size and max_batch_size without communicating. Decode steps then make
no host sync and have fixed shapes, so on GPU the whole step, NCCL collectives included,
is one CUDA graph; prefill stays dynamic and the capacity is reset afterwards. Idle or
finished replicas keep calling ``idle_forward`` (padded to the same capacity, so the same
collectives as a graph replay). Capturing runs two warm-up steps, whose collectives the
other replicas must match: at the first decode step of a round the replicas agree
(all-reduce MAX of a flag) whether any of them captures, and those that do not run two
extra idle steps (capture itself launches no collectives). Expert parallelism without
data parallelism (EP ranks that are TP ranks of one replica) uses the same static
exchange at the batch's own size.

Expert-parallel prefill runs the same static exchange, chunk by chunk
(``conf.prefill_chunk`` prompt positions each, every chunk attending to the cache of the
earlier ones) at each chunk's capacity: the largest token count (rows x chunk length) any
replica feeds it, which every rank computes from the prompts alone, so prefill makes no
host sync either; replicas with fewer chunks (or none) join the later ones idle.

Pipeline stages (pp > 1) run micro-batches in flight (``pipeline_generate``, unless
``conf.pipeline_microbatches`` is 1: then one forward of the whole batch at a time, the
last stage broadcasting each step's ids).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.distributed as dist

from moe_ext.config import GenerateConf
from moe_ext.errors import MoeExtError
from moe_ext.model.decoder import Transformer

log = logging.getLogger(__name__)

SLOT_ROUNDING = 128  # cache length granularity: repeated calls reuse caches and CUDA graphs


class GenerateError(MoeExtError):
    """Bad generation input (one line: problem and fix)."""


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new ids per request, prompt excluded, the EOS id included
    prefill_tokens: int = 0  # real (unpadded) prompt tokens processed by this replica
    decode_tokens: int = 0  # tokens produced by decode steps (all requests, this replica)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    cuda_graphs: bool = False  # decode ran from captured CUDA graphs
    finish_reasons: list[str] = field(default_factory=list)  # "eos" | "length" per request

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def ms_per_token(self) -> float:
        """Milliseconds per decode step (one new token for every sequence in the batch)."""
        return 1000.0 * self.decode_s / self.decode_steps if self.decode_steps else 0.0


# ---- sampling ------------------------------------------------------------------------


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: Optional[torch.Generator],
    top_k: int = 0,
) -> torch.Tensor:
    """logits: [B, V] -> next ids [B] int64. temperature 0 = greedy; then, as transformers
    orders them, top-k (0: off) keeps the ``top_k`` likeliest tokens and top-p the smallest
    set of the rest whose probability reaches ``top_p``. No host sync."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature  # [B, V]
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]


# ---- CUDA-graph decode -----------------------------------------------------------------


def capture_step_graph(
    step: Callable[[], torch.Tensor], warmup_steps: int = 2
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``step()``, a decode forward that reads static input buffers and returns the logits
    (e.g. [B, V]), captured in a CUDA graph after ``warmup_steps`` runs on a side stream
    (capture needs them; their writes must land where the replayed step writes again).
    Returns (the graph, its static logits, which each ``graph.replay()`` rewrites)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_steps):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step()
    return graph, logits


class DecodeGraph:
    """One decode step captured for a fixed batch and cache; inputs are copied into static
    buffers, logits read from a static output."""

    def __init__(self, model: Transformer, batch: int, device: torch.device):
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.kv_start = torch.zeros(batch, dtype=torch.long, device=device)
        self.model = model
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None

    def _step(self) -> torch.Tensor:
        return self.model(
            self.tokens, self.slot, self.kv_start, None, last_only=True, use_cache=True
        )

    def capture(self) -> None:
        # the warm-up runs write the KV cache at the current slot, which the real step
        # overwrites
        self.graph, self.logits = capture_step_graph(self._step)

    def replay(self) -> torch.Tensor:
        """The step on the inputs now in the static buffers (captured on first use)."""
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.logits

    def __call__(self, tokens: torch.Tensor, slot: int, kv_start: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.slot.fill_(slot)
        self.kv_start.copy_(kv_start)
        return self.replay()


# ---- the loop --------------------------------------------------------------------------


def microbatch_bounds(batch: int, count: int) -> list[int]:
    """Bounds [count + 1] of ``count`` contiguous, near-equal parts of ``batch`` rows (the
    data-parallel replicas' shares of the requests, a pipeline's micro-batches)."""
    return [batch * m // count for m in range(count + 1)]


def fence(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), for a timing boundary."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: timing boundary only


def holds_on_any(local: bool, group, device: torch.device) -> bool:
    """Whether ``local`` holds on any rank of ``group`` (every rank of it must call)."""
    flag = torch.tensor([int(local)], dtype=torch.int32, device=device)
    # sync: the ranks must take the same branch (a decision about collectives)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def eos_mask(ids: torch.Tensor, eos: Optional[torch.Tensor]) -> torch.Tensor:
    """ids: [b] int64 -> [b] bool, True where an id is one of ``eos`` (None: none is)."""
    if eos is None:
        return torch.zeros_like(ids, dtype=torch.bool)
    return torch.isin(ids, eos)


def _eos_tensor(eos_id, device) -> Optional[torch.Tensor]:
    if eos_id is None:
        return None
    ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _per_request(value: Union[int, Sequence[int], None], default: int, n: int) -> list[int]:
    if value is None:
        value = default
    if isinstance(value, int):
        values = [value] * n
    else:
        values = [int(v) for v in value]
        if len(values) != n:
            raise GenerateError(
                f"max_new_tokens has {len(values)} entries for {n} prompts; "
                f"give one per prompt or a single int"
            )
    if any(v < 1 for v in values):
        raise GenerateError("max_new_tokens must be >= 1 for every request")
    return values


@dataclass
class _Batch:
    """One batch's state on the device: left-padded prompts, what decode wrote so far."""

    prompts: list[list[int]]
    max_new: list[int]
    tokens: torch.Tensor  # [B, L] int64, left-padded prompts
    kv_start: torch.Tensor  # [B] int64, first real slot per sequence
    limits: torch.Tensor  # [B] int64, max_new per sequence
    out: torch.Tensor  # [B, steps] int64, generated ids (pad after a sequence is done)
    done: torch.Tensor  # [B] bool
    graph: Optional[DecodeGraph]  # None: eager decode
    nxt: Optional[torch.Tensor] = None  # [B] int64, the ids sampled last

    @property
    def size(self) -> int:
        return len(self.prompts)

    @property
    def prompt_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def steps(self) -> int:
        """Forwards the longest request needs: prefill and max(max_new) - 1 decode steps."""
        return self.out.shape[1]

    @property
    def capturing(self) -> bool:
        """Its next graph-decoded step captures the CUDA graph."""
        return self.graph is not None and self.graph.graph is None


class _Stepper:
    """Runs one batch (or nothing, on an idle replica) in lockstep-compatible steps."""

    def __init__(
        self,
        model: Transformer,
        conf: GenerateConf,
        eos: Optional[torch.Tensor],
        pad_id: int,
        generator: Optional[torch.Generator],
        lockstep_group,
        lockstep: bool,
        check_every: int,
        result: GenerationResult,
    ):
        self.model, self.conf, self.eos, self.pad_id = model, conf, eos, pad_id
        self.generator = generator
        self.lockstep_group, self.lockstep = lockstep_group, lockstep
        self.check_every = check_every
        self.result = result
        self.device = model.device

    def _any_replica(self, local: bool) -> bool:
        """Whether ``local`` holds on any replica of the lockstep group (itself without one)."""
        if not self.lockstep:
            return local
        return holds_on_any(local, self.lockstep_group, self.device)

    def _next_tokens(self, logits: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        """Sample on the last pipeline stage and share the ids with the other stages."""
        if logits is not None:
            conf = self.conf
            nxt = sample(logits[:, -1], conf.temperature, conf.top_p, self.generator, conf.top_k)
        else:
            nxt = torch.empty(batch, dtype=torch.long, device=self.device)
        context = self.model.context
        if context.pp_group is not None:
            dist.broadcast(nxt, src=context.pp_last_rank, group=context.pp_group)
        return nxt

    def run(
        self,
        prompts: Optional[list[list[int]]],
        max_new: list[int],
        use_graphs: bool,
        capacity: Optional[int] = None,
        prefill: Optional[PrefillChunks] = None,
    ) -> list[list[int]]:
        """One batch (empty/None: an idle replica). ``capacity``: expert-parallel models
        only, the static expert-exchange capacity of this round's decode steps (equal on
        every rank of an EP group). ``prefill``: expert-parallel models only, the prefill
        chunks on the static exchange (``prefill_chunks``; None: one dynamic prefill
        forward). The caller resets the capacity if this raises."""
        batch = self._start(prompts, max_new, use_graphs, capacity) if prompts else None
        steps_total = batch.steps if batch is not None else 0
        known_done = batch is None
        step = 0  # forwards made by this call; 0 = prefill
        fence(self.device)
        t0 = t_prefill_end = time.perf_counter()
        while self.lockstep or step < steps_total:
            if step % self.check_every == 0:
                if not known_done and step > 0:
                    known_done = step >= steps_total or self._all_done(batch)
                # every replica learns whether any still generates, so all of them make
                # the same number of MoE exchanges (idle ones with zero tokens)
                if not self._any_replica(not known_done):
                    break
            active = not known_done and step < steps_total
            if step == 1 and capacity is not None:
                self._start_static_decode(capacity, capturing=active and batch.capturing)
            if not active and step == 0 and prefill:
                for cap in prefill.capacities:  # lockstep: join each chunk's exchange
                    self.model.set_moe_capacity(cap)
                    self.model.idle_forward()
            elif not active:
                self.model.idle_forward()  # lockstep only: join the expert exchanges
            elif step == 0:
                self._prefill(batch, prefill)
                fence(self.device)
                t_prefill_end = time.perf_counter()
            else:
                self._decode(batch, step)
            step += 1
        if capacity is not None:
            self.model.set_moe_capacity(None)  # the next round's prefill is dynamic again
        fence(self.device)
        if batch is None:
            return []
        self.result.prefill_s += t_prefill_end - t0
        self.result.decode_s += time.perf_counter() - t_prefill_end
        self.result.cuda_graphs = batch.graph is not None
        return finish_requests(batch.out, batch.max_new, self.eos, self.result)

    # ---- the steps of run() ----------------------------------------------------------------

    def _start(
        self,
        prompts: list[list[int]],
        max_new: list[int],
        use_graphs: bool,
        capacity: Optional[int],
    ) -> _Batch:
        """Caches sized for the batch, prompts left-padded to the longest, empty outputs."""
        B, L, steps = len(prompts), max(len(p) for p in prompts), max(max_new)
        max_slots = -(-(L + steps) // SLOT_ROUNDING) * SLOT_ROUNDING
        self.model.setup_caches(B, max_slots)
        padded = [[self.pad_id] * (L - len(p)) + list(p) for p in prompts]
        device = self.device
        return _Batch(
            prompts=prompts,
            max_new=max_new,
            tokens=torch.tensor(padded, dtype=torch.long, device=device),  # [B, L]
            kv_start=torch.tensor(
                [L - len(p) for p in prompts], dtype=torch.long, device=device
            ),  # [B]
            limits=torch.tensor(max_new, dtype=torch.long, device=device),  # [B]
            out=torch.full((B, steps), self.pad_id, dtype=torch.long, device=device),
            done=torch.zeros(B, dtype=torch.bool, device=device),
            graph=_graph_for(self.model, B, device, capacity) if use_graphs else None,
        )

    def _all_done(self, batch: _Batch) -> bool:
        # sync: EOS check, batched every check_every steps
        return not bool((~batch.done).any().item())

    def _start_static_decode(self, capacity: int, capturing: bool) -> None:
        """Decode from here on runs the static exchange at ``capacity``, the same on every
        replica. A replica that captures its CUDA graph now runs two warm-up steps; the
        others match their collectives with two idle steps."""
        self.model.set_moe_capacity(capacity)
        if self._any_replica(capturing) and not capturing:
            for _ in range(2):  # the capturing replicas' two warm-up steps
                self.model.idle_forward()

    def _prefill(self, batch: _Batch, chunks: Optional[PrefillChunks] = None) -> None:
        """The prompts through the model, filling the caches; samples the first new ids.
        ``chunks``: the static exchange's prefill chunks (chunks past this batch's prompt
        join the exchange idle); None: the whole prompt in one forward."""
        L = batch.prompt_len
        chunk = chunks.length if chunks is not None else L
        caps = chunks.capacities if chunks is not None else None
        logits = None
        for c, start in enumerate(range(0, max(L, chunk * len(caps or [])), chunk)):
            if caps is not None:
                self.model.set_moe_capacity(caps[c])
            if start >= L:
                self.model.idle_forward()  # another replica's longer prompt
                continue
            stop = min(L, start + chunk)
            logits = self.model(
                batch.tokens[:, start:stop],
                torch.arange(start, stop, device=self.device),
                batch.kv_start,
                stop,
                last_only=True,
                use_cache=True,
            )  # [B, 1, V] on the last stage
        batch.nxt = self._next_tokens(logits, batch.size)
        batch.out[:, 0] = batch.nxt
        batch.done |= eos_mask(batch.nxt, self.eos) | (batch.limits <= 1)
        self.result.prefill_tokens += sum(len(p) for p in batch.prompts)

    def _decode(self, batch: _Batch, step: int) -> None:
        """Decode step ``step`` (>= 1): the last ids in, the next ids sampled; sequences
        already done keep stepping (static shapes) and get pad ids."""
        logits = self._decode_logits(batch, slot=batch.prompt_len + step - 1)  # [B, 1, V]
        nxt = self._next_tokens(logits, batch.size)
        batch.nxt = torch.where(batch.done, torch.full_like(nxt, self.pad_id), nxt)
        batch.out[:, step] = batch.nxt
        batch.done |= eos_mask(batch.nxt, self.eos) | (batch.limits <= step + 1)
        self.result.decode_steps += 1
        self.result.decode_tokens += batch.size

    def _decode_logits(self, batch: _Batch, slot: int) -> Optional[torch.Tensor]:
        """Logits [B, 1, V] of one decode step at cache ``slot`` (None off the last stage):
        from the batch's CUDA graph (captured on first use) or eagerly. A capture that
        fails in an op (not in a collective) turns graphs and compiled decode off for
        this and later calls."""
        if batch.capturing:
            try:
                return batch.graph(batch.nxt[:, None], slot, batch.kv_start)
            except dist.DistError:
                raise  # a timed-out collective or a lost peer: no eager fallback
            except RuntimeError as e:  # an op that syncs, or a failed compile
                log.warning(
                    "CUDA-graph capture (after compiling the decode step) "
                    "failed (%s); decoding eagerly, uncompiled",
                    e,
                )
                self.model.compile_decode(False)
                self.model.decode_state.capture_failed = True  # later calls stay eager
                self.model.decode_state.graphs.clear()
                batch.graph = None
        if batch.graph is not None:
            return batch.graph(batch.nxt[:, None], slot, batch.kv_start)
        slot_t = torch.full((1,), slot, dtype=torch.long, device=self.device)
        return self.model(
            batch.nxt[:, None], slot_t, batch.kv_start, None, last_only=True, use_cache=True
        )


def finish_requests(
    out: torch.Tensor, max_new: list[int], eos: Optional[torch.Tensor], result: GenerationResult
) -> list[list[int]]:
    """out: [B, steps] generated ids. Returns each request's ids cut at its limit and after
    its first EOS (kept); appends "eos" or "length" per request to ``result``."""
    eos_ids = set() if eos is None else set(eos.tolist())
    outputs = []
    for row, limit in zip(out.tolist(), max_new):  # sync: the batch's ids to the host, once
        row = row[:limit]
        for i, t in enumerate(row):
            if t in eos_ids:
                row = row[: i + 1]
                break
        outputs.append(row)
        result.finish_reasons.append("eos" if row and row[-1] in eos_ids else "length")
    return outputs


def _graph_for(
    model: Transformer, batch: int, device: torch.device, capacity: Optional[int] = None
) -> Optional[DecodeGraph]:
    """The captured decode step for the model's current caches and expert-exchange
    capacity (captured on first use)."""
    cache_key = model.cache_shape
    graphs = model.decode_state.graphs
    key = (
        batch,
        capacity,
        cache_key,
        model.compiled_decode_block is not None,
        id(next(iter(model.layers.values())).self_attn.kv_cache),
    )
    if key not in graphs:
        graphs.clear()  # caches were reallocated: older graphs point at freed buffers
        graphs[key] = DecodeGraph(model, batch, device)
    return graphs[key]


def _graphs_usable(
    model: Transformer,
    conf: GenerateConf,
    device: torch.device,
    static_exchange: bool,
    pipelined: bool = False,
) -> bool:
    """Whether decode may run from CUDA graphs: on CUDA, and either the pipelined path
    (each stage captures its own part, the stage-to-stage traffic stays outside; its
    expert-parallel stages run the static exchange), or no pipeline stages and either a
    sync-free model (``cuda_graph_safe``) or expert-parallel decode on the static
    exchange, which is sync-free; never again after a failed capture."""
    if not (conf.cuda_graphs and device.type == "cuda"):
        return False
    if model.decode_state.capture_failed:
        return False
    if pipelined:
        return True
    if model.context.pp_group is not None:
        return False
    return static_exchange or model.context.cuda_graph_safe


@dataclass(frozen=True)
class PrefillChunks:
    """Expert-parallel prefill of one round on the static exchange, the same on every
    replica: ``length`` prompt positions per chunk, and each chunk's capacity (tokens per
    rank; 0 where no replica has that chunk)."""

    length: int
    capacities: list[int]


def prefill_chunks(
    lengths: list[list[int]], min_chunk: Optional[int], token_budget: int = 0
) -> Optional[PrefillChunks]:
    """The chunks of one round: ``lengths[q]`` holds the prompt lengths of the batch replica
    q runs in it (all replicas of the lockstep group, or only this one without data
    parallelism). A chunk is at least ``min_chunk`` positions (0 / None: the whole prompt)
    and longer while the largest replica's rows x the chunk stay within ``token_budget``
    (``GenerateConf.prefill_exchange_tokens``): fewer chunks, fewer collectives per layer.
    A replica's chunk c is its rows x the positions [c·length, (c+1)·length) of its padded
    prompt; the capacity is the largest over replicas. None: no replica has rows."""
    batches = [q for q in lengths if q]
    if not batches:
        return None
    longest = max(max(q) for q in batches)
    rows = max(len(q) for q in batches)
    length = max(min_chunk, token_budget // rows) if min_chunk else longest
    per_replica = [
        [len(q) * (min(max(q), c + length) - c) for c in range(0, max(q), length)] for q in batches
    ]
    count = max(len(caps) for caps in per_replica)
    capacities = [
        max(caps[c] if c < len(caps) else 0 for caps in per_replica) for c in range(count)
    ]
    return PrefillChunks(length, capacities)


def _round_shares(bounds: list[int], batch: int, round_index: int) -> list[range]:
    """The requests each replica runs in round ``round_index`` (replica q holds requests
    [bounds[q], bounds[q+1]) in chunks of ``batch``); empty where it has none left."""
    return [
        range(lo, hi)[round_index * batch : (round_index + 1) * batch]
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]


def _round_capacity(bounds: list[int], batch: int, round_index: int) -> int:
    """Tokens per decode step of the largest batch any replica runs in round
    ``round_index`` (replica q holds requests [bounds[q], bounds[q+1]) in chunks of
    ``batch``): the static expert-exchange capacity, the same on every rank."""
    return max(len(share) for share in _round_shares(bounds, batch, round_index))


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: list[list[int]],
    conf: GenerateConf,
    eos_id: Union[int, Sequence[int], None],
    pad_id: Optional[int] = None,
    max_new_tokens: Union[int, Sequence[int], None] = None,
    seed: int = 0,
    check_every: Optional[int] = None,
) -> GenerationResult:
    """Generate continuations of ``prompt_ids`` (every rank passes the full list).

    Returns ids per request (prompt excluded; generation stops after an EOS id, which is
    kept, or at the request's ``max_new_tokens``, default ``conf.max_new_tokens``) on every
    rank, plus timing for this replica's share. ``check_every``: decode steps between EOS
    checks (host syncs); default 1 on CPU, 8 on GPU. ``pad_id``: left padding and the
    filler after EOS (default: the model's pad_token_id, else 0; never attended to).
    """
    if pad_id is None:
        pad_id = model.args.pad_token_id if model.args.pad_token_id is not None else 0
    conf = conf.with_sampling()  # unset sampling fields: the built-in defaults (greedy)
    if any(len(p) == 0 for p in prompt_ids):
        raise GenerateError("empty prompt: every prompt needs at least one token (e.g. BOS)")
    model.eval()
    device = model.device
    n = len(prompt_ids)
    max_new = _per_request(max_new_tokens, conf.max_new_tokens, n)
    if check_every is None:
        check_every = 8 if device.type == "cuda" else 1
    context = model.context
    dp_size, dp_rank, dp_group = context.dp_size, context.dp_rank, context.dp_group
    lockstep = context.lockstep
    # this replica's contiguous share of the requests
    bounds = microbatch_bounds(n, dp_size)
    mine = list(range(bounds[dp_rank], bounds[dp_rank + 1]))
    generator = None
    if conf.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    if device.type == "cuda":
        model.compile_decode(conf.compile_decode and not model.decode_state.capture_failed)
    # Expert-parallel decode runs the static exchange (sync-free, capturable) at a capacity
    # every rank of an EP group agrees on: the round's largest batch across lockstep
    # replicas, or, without data parallelism, this batch (the EP ranks are TP ranks
    # holding the same one).
    static_exchange = lockstep or context.expert_parallel
    pipelined = context.pp_group is not None and conf.pipeline_microbatches != 1
    use_graphs = _graphs_usable(model, conf, device, static_exchange, pipelined)
    result = GenerationResult(tokens=[])
    stepper = _Stepper(
        model,
        conf,
        _eos_tensor(eos_id, device),
        pad_id,
        generator,
        dp_group,
        lockstep,
        max(1, check_every),
        result,
    )
    runner = None
    if pipelined:
        # imported here: pipeline_generate builds on this module's pieces
        from moe_ext.model.pipeline_generate import PipelineRunner

        runner = PipelineRunner(
            model,
            conf,
            stepper.eos,
            pad_id,
            generator,
            max(1, check_every),
            result,
            use_graphs,
        )
    batch = max(1, conf.max_batch_size)
    chunks = [mine[i : i + batch] for i in range(0, len(mine), batch)]
    rounds = len(chunks)
    if lockstep:
        count = torch.tensor([rounds], dtype=torch.int64, device=device)
        # sync: replicas agree on how many batches they run (once per call)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=dp_group)
        rounds = int(count.item())
    local: list[list[int]] = []
    try:
        for r in range(rounds):
            chunk = chunks[r] if r < len(chunks) else []
            # the batches of this round that must agree on shapes: every replica's with
            # lockstep, else this one's
            shares = _round_shares(bounds, batch, r) if lockstep else [chunk]
            if runner is not None:
                peers = None
                if lockstep:  # one schedule for every replica
                    peers = [
                        ([len(prompt_ids[i]) for i in s], [max_new[i] for i in s]) for s in shares
                    ]
                local += runner.run(
                    [prompt_ids[i] for i in chunk], [max_new[i] for i in chunk], peers
                )
                continue
            capacity = _round_capacity(bounds, batch, r) if lockstep else len(chunk)
            prefill = None
            if static_exchange:
                lengths = [[len(prompt_ids[i]) for i in s] for s in shares]
                prefill = prefill_chunks(lengths, conf.prefill_chunk, conf.prefill_exchange_tokens)
            local += stepper.run(
                [prompt_ids[i] for i in chunk],
                [max_new[i] for i in chunk],
                use_graphs,
                capacity if static_exchange else None,
                prefill,
            )
    finally:
        if static_exchange:
            model.set_moe_capacity(None)
    if dp_size > 1:
        gathered: list = [None] * dp_size
        dist.all_gather_object(gathered, (local, result.finish_reasons), group=dp_group)
        result.tokens = [row for part, _ in gathered for row in part]
        result.finish_reasons = [f for _, reasons in gathered for f in reasons]
    else:
        result.tokens = local
    return result

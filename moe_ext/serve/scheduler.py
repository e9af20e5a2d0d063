"""The serving scheduler: pure Python, no torch, no process group (rank 0 only).

It owns the request queue and the KV rows and decides, step by step, what every replica
runs. Each data-parallel replica has ``rows`` KV-cache rows of ``max_context`` slots; a
request holds one row from admission until it finishes or is cancelled, and writes its
prompt to slots 0..P-1 and its generated tokens after it (kv_start = 0 for every row).

One step (``schedule`` -> the engine runs the plan -> ``complete``):

- **admission**: queued requests, first come first served, take the lowest free row of the
  replica with the fewest busy rows, while that replica's KV-token budget holds their
  reservation (prompt + max_tokens). A request that does not fit waits (no overtaking).
- **decode**: one forward over the first ``bucket`` rows of a replica (a power of two
  covering the highest decoding row of any replica, capped at ``rows``; replicas that
  are not in lockstep trim it to their own rows), so decode shapes come from a handful of
  sizes (CUDA graphs). Rows in the bucket that do
  not decode (free, or still in prefill) run too and write a throw-away key at their next
  unwritten slot, which their own next write overwrites before anything reads it.
- **chunked prefill**: after the decode, each replica spends up to ``prefill_chunk`` prompt
  tokens on its prefilling rows (oldest first); a prompt's last chunk samples its first
  token. Long prompts thus share steps with running decodes. Chunks run batched: longest
  first, a forward takes chunks while rows x its longest chunk stays within
  ``prefill_chunk`` (``groups``); the engine right-pads shorter chunks by repeating their
  last token at their last slot, so padding writes nothing new and its outputs are the
  last token's (``pad_chunks`` False: only equal lengths batch).
- **completion**: sampled ids go to their requests; a request finishes on a stop id
  ("stop") or at max_tokens ("length") and frees its row at once; ``cancel`` frees a row
  (or drops a queued request) at the next step boundary.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Entry:
    """The scheduler's view of one request."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    stop_ids: frozenset[int] = frozenset()
    seed: Optional[int] = None
    temperature: float = 0.0
    top_p: float = 1.0
    replica: int = -1  # -1 while queued
    row: int = -1
    prefilled: int = 0  # prompt tokens written to the cache
    generated: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    seq: int = -1  # arrival order, set by Scheduler.add

    @property
    def reserve(self) -> int:
        """KV tokens reserved at admission: the most this request can write."""
        return len(self.prompt) + self.max_tokens

    @property
    def cached(self) -> int:
        """Slots written so far (the last sampled id is not in the cache yet)."""
        return self.prefilled + max(0, len(self.generated) - 1)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt) and len(self.generated) > 0


# ---- the plan every rank executes (pickled to the other ranks) --------------------------


@dataclass(frozen=True)
class NewRow:
    """A request took ``row`` of ``replica``: its sampling state starts fresh there."""

    replica: int
    row: int
    seed: Optional[int]
    temperature: float
    top_p: float


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens written to ``row`` of ``replica`` at slots start..start+len-1; the
    prompt's last chunk (``last``) samples the request's first id."""

    replica: int
    row: int
    tokens: tuple[int, ...]
    start: int
    last: bool


@dataclass
class StepPlan:
    """One engine step. ``bucket`` 0: no decode forward. ``decode_tokens[r]`` and
    ``decode_slots[r]`` (length ``bucket``): replica r's input id and write slot per row;
    ``decode_rows[r]``: the rows whose sampled id counts. ``prefill[r]``: replica r's chunks;
    ``groups[r]``: its prefill forwards, each a list of indices into ``prefill[r]``. An empty
    plan is a heartbeat (keeps the other ranks' collectives alive)."""

    new_rows: list[NewRow] = field(default_factory=list)
    bucket: int = 0
    decode_tokens: list[list[int]] = field(default_factory=list)
    decode_slots: list[list[int]] = field(default_factory=list)
    decode_rows: list[list[int]] = field(default_factory=list)
    prefill: list[list[PrefillChunk]] = field(default_factory=list)
    groups: list[list[list[int]]] = field(default_factory=list)
    shutdown: bool = False

    @property
    def empty(self) -> bool:
        return self.bucket == 0 and not any(self.prefill)

    @property
    def prefill_forwards(self) -> int:
        """Prefill forwards of the busiest replica (lockstep replicas pad to it)."""
        return max((len(groups) for groups in self.groups), default=0)


@dataclass(frozen=True)
class Completion:
    """What one step did to one request: new ids (may be empty) and how it ended."""

    entry: Entry
    token_ids: list[int]
    finish_reason: Optional[str]


def bucket_for(rows_needed: int, max_rows: int) -> int:
    """The decode batch for rows 0..rows_needed-1: the next power of two, capped at max_rows."""
    if rows_needed <= 0:
        return 0
    bucket = 1
    while bucket < rows_needed:
        bucket *= 2
    return min(bucket, max_rows)


def buckets(max_rows: int) -> list[int]:
    """Every decode batch size the scheduler uses: powers of two below max_rows, max_rows."""
    sizes, b = [], 1
    while b < max_rows:
        sizes.append(b)
        b *= 2
    return sizes + [max_rows]


class Scheduler:
    """Queue, KV rows and step plans for ``replicas`` replicas of ``rows`` rows each.

    ``kv_tokens``: each replica's KV-token budget for admission (default rows·max_context,
    so rows are the bound). ``pad_chunks`` False: only chunks of equal length share a
    prefill forward (models whose chunk attention counts a padded key once per copy:
    gpt-oss's sliding rings). Not thread-safe: the engine serialises calls."""

    def __init__(
        self,
        replicas: int,
        rows: int,
        max_context: int,
        max_queue: int,
        prefill_chunk: int,
        kv_tokens: Optional[int] = None,
        pad_chunks: bool = True,
    ):
        if min(replicas, rows, max_context, prefill_chunk) < 1 or max_queue < 0:
            raise ValueError("replicas, rows, max_context and prefill_chunk must be >= 1")
        self.replicas, self.rows, self.max_context = replicas, rows, max_context
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.kv_tokens = kv_tokens if kv_tokens is not None else rows * max_context
        self.pad_chunks = pad_chunks
        self.queue: collections.deque[Entry] = collections.deque()
        # table[replica][row]: the request holding the row, None when free
        self.table: list[list[Optional[Entry]]] = [[None] * rows for _ in range(replicas)]
        self.by_id: dict[str, Entry] = {}
        self._pending_new: list[NewRow] = []
        self._arrivals = 0

    # ---- requests in and out ------------------------------------------------------------
    def queue_full(self) -> bool:
        return len(self.queue) >= self.max_queue

    def add(self, entry: Entry) -> bool:
        """Queue ``entry``; False (nothing queued) when the queue is full."""
        if self.queue_full():
            return False
        entry.seq = self._arrivals
        self._arrivals += 1
        self.queue.append(entry)
        self.by_id[entry.request_id] = entry
        return True

    def cancel(self, request_id: str) -> Optional[Entry]:
        """Drop a queued request or free a running one's row; None if it is gone already."""
        entry = self.by_id.pop(request_id, None)
        if entry is None:
            return None
        entry.finish_reason = entry.finish_reason or "abort"
        if entry.row < 0:
            self.queue.remove(entry)
        else:
            self._free(entry)
        return entry

    def _free(self, entry: Entry) -> None:
        self.table[entry.replica][entry.row] = None
        self.by_id.pop(entry.request_id, None)

    # ---- accounting ----------------------------------------------------------------------
    def running(self) -> list[Entry]:
        return [e for rows in self.table for e in rows if e is not None]

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def rows_used(self) -> int:
        return sum(e is not None for rows in self.table for e in rows)

    @property
    def rows_total(self) -> int:
        return self.replicas * self.rows

    @property
    def tokens_used(self) -> int:
        """KV slots written by the running requests."""
        return sum(e.cached for e in self.running())

    @property
    def tokens_total(self) -> int:
        return self.replicas * self.kv_tokens

    def _reserved(self, replica: int) -> int:
        return sum(e.reserve for e in self.table[replica] if e is not None)

    @property
    def idle(self) -> bool:
        return not self.queue and self.rows_used == 0

    # ---- one step ------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.queue:
            entry = self.queue[0]
            replica = self._replica_for(entry)
            if replica is None:
                return
            self.queue.popleft()
            row = self.table[replica].index(None)  # lowest free row
            self.table[replica][row] = entry
            entry.replica, entry.row = replica, row
            self._pending_new.append(
                NewRow(replica, row, entry.seed, entry.temperature, entry.top_p)
            )

    def _replica_for(self, entry: Entry) -> Optional[int]:
        """The replica with the fewest busy rows that has a free row and room for the
        request's reservation (lowest index on ties); None if none has."""
        best = None
        for r in range(self.replicas):
            busy = sum(e is not None for e in self.table[r])
            if busy == self.rows or self._reserved(r) + entry.reserve > self.kv_tokens:
                continue
            if best is None or busy < best[0]:
                best = (busy, r)
        return None if best is None else best[1]

    def schedule(self) -> StepPlan:
        """Admit what fits, then plan this step's decode bucket and prefill chunks."""
        self._admit()
        plan = StepPlan(new_rows=self._pending_new)
        self._pending_new = []
        needed = 0
        for rows in self.table:
            for row, e in enumerate(rows):
                if e is not None and e.decoding:
                    needed = max(needed, row + 1)
        plan.bucket = bucket_for(needed, self.rows)
        for rows in self.table:
            tokens, slots, decoding = [], [], []
            for row in range(plan.bucket):
                e = rows[row]
                if e is not None and e.decoding:
                    tokens.append(e.generated[-1])
                    slots.append(e.cached)
                    decoding.append(row)
                else:  # a throw-away write at the next unwritten slot (see module doc)
                    tokens.append(0)
                    slots.append(e.prefilled if e is not None else 0)
            plan.decode_tokens.append(tokens)
            plan.decode_slots.append(slots)
            plan.decode_rows.append(decoding)
            chunks = self._chunks(rows)
            plan.prefill.append(chunks)
            plan.groups.append(self._groups(chunks))
        return plan

    def _chunks(self, rows: list[Optional[Entry]]) -> list[PrefillChunk]:
        """One replica's prefill chunks within the per-step budget, oldest request first."""
        budget = self.prefill_chunk
        waiting = [e for e in rows if e is not None and e.prefilled < len(e.prompt)]
        chunks = []
        for e in sorted(waiting, key=lambda e: e.seq):
            if budget <= 0:
                break
            n = min(budget, len(e.prompt) - e.prefilled)
            end = e.prefilled + n
            chunks.append(
                PrefillChunk(
                    e.replica,
                    e.row,
                    tuple(e.prompt[e.prefilled : end]),
                    e.prefilled,
                    end == len(e.prompt),
                )
            )
            budget -= n
        return chunks

    def _groups(self, chunks: list[PrefillChunk]) -> list[list[int]]:
        """Chunks into batched forwards: longest first, while rows x the longest chunk of
        the forward stays within ``prefill_chunk`` (a lone chunk always fits); without
        ``pad_chunks`` only equal lengths share one."""
        order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i].tokens))
        groups: list[list[int]] = []
        for i in order:
            width = len(chunks[groups[-1][0]].tokens) if groups else 0
            fits = (len(groups[-1]) + 1) * width <= self.prefill_chunk if groups else False
            if fits and (self.pad_chunks or len(chunks[i].tokens) == width):
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def complete(self, plan: StepPlan, sampled: dict[tuple[int, int], int]) -> list[Completion]:
        """Apply a finished step: prompt progress, ``sampled`` ids ((replica, row) -> id) to
        their requests, finished requests' rows freed. A row cancelled during the step is
        skipped (its id is dropped)."""
        touched: dict[int, Entry] = {}
        for r, rows in enumerate(self.table):
            for chunk in plan.prefill[r] if r < len(plan.prefill) else []:
                e = rows[chunk.row]
                if e is not None and e.prefilled == chunk.start:
                    e.prefilled += len(chunk.tokens)
        out = []
        for (replica, row), token in sorted(sampled.items()):
            e = self.table[replica][row]
            if e is None or id(e) in touched:
                continue
            touched[id(e)] = e
            e.generated.append(token)
            reason = None
            if token in e.stop_ids:
                reason = "stop"
            elif len(e.generated) >= e.max_tokens:
                reason = "length"
            if reason is not None:
                e.finish_reason = reason
                self._free(e)
            out.append(Completion(e, [token], reason))
        return out

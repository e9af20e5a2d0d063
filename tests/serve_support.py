"""Fakes for the serving tests: a model implementing the per-row KV-cache contract
(moe_ext.serve.engine's Transformer.forward with [B, S] slots and cache_rows) over a cache
of token ids, whose logits hash each query's whole cached history, and its greedy
reference for one sequence alone."""

from __future__ import annotations

import threading
import time
from typing import Optional

import torch

from moe_ext.model.context import DecodeState, ParallelContext

V = 97


def history_logits(history: torch.Tensor) -> torch.Tensor:
    """The fake model's logits [V] after ``history`` (ids): a hash of the whole sequence."""
    h = 0
    for t in history.tolist():
        h = (h * 31 + t + 1) % 1_000_003
    g = torch.Generator().manual_seed(h)
    return torch.randn(V, generator=g)


class FakeModel(torch.nn.Module):
    """Contract 1 with a cache of token ids [R, S_max]: each query's logits hash the
    cached ids at slots kv_start..its slot of its row (so a misplaced or clobbered write
    changes them)."""

    def __init__(self, context: Optional[ParallelContext] = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.args = type("Args", (), {"vocab_size": V})()
        self.context = context or ParallelContext()
        self.decode_state = DecodeState()
        self.cache: Optional[torch.Tensor] = None
        self.forwards = 0
        self.idle_forwards = 0
        self.delay_s = 0.0  # a slower model, for tests that act while requests run

    @property
    def device(self):
        return torch.device("cpu")

    def setup_caches(self, batch, max_slots, dtype=None):
        self.cache = torch.full((batch, max_slots), -1, dtype=torch.long)

    def set_moe_capacity(self, n):
        pass

    def idle_forward(self):
        self.idle_forwards += 1

    def forward(
        self,
        tokens,
        slots,
        kv_start,
        kv_len=None,
        last_only=False,
        use_cache=False,
        cache_rows=None,
    ):
        B, S = tokens.shape
        assert slots.shape == (B, S) and use_cache and last_only
        rows = torch.arange(B) if cache_rows is None else cache_rows
        self.forwards += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for b in range(B):
            row = int(rows[b])
            self.cache[row, slots[b]] = tokens[b]
            last = int(slots[b, -1])
            if kv_len is not None:
                assert last < kv_len
            out.append(history_logits(self.cache[row, int(kv_start[b]) : last + 1]))
        return torch.stack(out)[:, None]  # [B, 1, V]


def greedy_alone(prompt: list[int], max_tokens: int, stop: set[int]) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(max_tokens):
        t = int(history_logits(torch.tensor(seq)).argmax())
        out.append(t)
        seq.append(t)
        if t in stop:
            break
    return out


def collect(stream, timeout: float = 30) -> tuple[list[int], Optional[str]]:
    """A RequestStream's ids and finish reason (blocking)."""
    ids, reason = [], None
    for event in stream.events(timeout=timeout):
        ids += event.token_ids
        reason = event.finish_reason
    return ids, reason


def random_requests(
    n: int,
    seed: int,
    prompt_lengths: tuple[int, int],
    new_tokens: tuple[int, int],
    ids: tuple[int, int],
) -> list[tuple[list[int], int]]:
    """``n`` (prompt ids, max_tokens) requests drawn from a generator seeded with ``seed``:
    prompt lengths, max_tokens and token ids uniform in the half-open ranges given."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(*prompt_lengths, (n,), generator=g).tolist()
    new = torch.randint(*new_tokens, (n,), generator=g).tolist()
    return [(torch.randint(*ids, (k,), generator=g).tolist(), m) for k, m in zip(lengths, new)]


def serve_greedy(
    engine, requests: list[tuple[list[int], int]], collect_s: float = 300, join_s: float = 60
) -> list[list[int]]:
    """``engine.run()`` (one process, no control group) on this thread while a client
    thread submits every (prompt ids, max_tokens) request at once, collects each stream's ids
    (``collect_s`` at most each) and drains the engine. Returns each request's ids, in order;
    the engine must exit 0."""
    from moe_ext.serve.engine import SamplingParams

    out: list = []

    def client_side():
        try:
            streams = [engine.client.submit(p, SamplingParams(max_tokens=m)) for p, m in requests]
            out.extend(collect(s, collect_s)[0] for s in streams)
        finally:
            engine.drain()

    thread = threading.Thread(target=client_side)
    thread.start()
    assert engine.run() == 0
    thread.join(join_s)
    return out


class DyingModel(FakeModel):
    """A FakeModel whose process exits (status 0, as a killed rank leaves no error behind)
    at its ``die_after``-th forward."""

    def __init__(self, context: Optional[ParallelContext] = None, die_after: int = 5):
        super().__init__(context)
        self.die_after = die_after

    def forward(self, *args, **kwargs):
        if self.forwards + 1 >= self.die_after:
            import os

            os._exit(0)
        return super().forward(*args, **kwargs)

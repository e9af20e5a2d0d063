"""The serving scheduler (pure Python) and the engine's step loop on one process.

The scheduler: admission bounded by KV rows and KV tokens, the queue bound, chunked
prefill interleaved with decodes, lowest-first rows and buckets, cancellation and row
reuse. The engine: a fake model implementing the per-row cache contract (a cache of token
ids; each logit row is a hash of the query's whole cached history) runs many requests
through ``ServeEngine`` with small rows, chunks and buckets, so every throw-away write,
chunk boundary and row reuse is checked against the same function over each sequence
alone.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from moe_ext.serve.engine import (
    ContextTooLong,
    EngineUnavailable,
    InvalidRequest,
    QueueFull,
    SamplingParams,
    ServeEngine,
)
from moe_ext.serve.scheduler import Entry, Scheduler, bucket_for, buckets
from tests.serve_support import FakeModel, V, collect, greedy_alone


def entry(i: int, prompt_len: int, max_tokens: int = 4, stop=()) -> Entry:
    return Entry(f"r{i}", list(range(1, prompt_len + 1)), max_tokens, frozenset(stop))


def run_step(s: Scheduler, token: int = 7):
    """schedule + complete, sampling ``token`` for every row that samples."""
    plan = s.schedule()
    sampled = {}
    for r in range(s.replicas):
        for row in plan.decode_rows[r]:
            sampled[(r, row)] = token
        for chunk in plan.prefill[r]:
            if chunk.last:
                sampled[(r, chunk.row)] = token
    return plan, s.complete(plan, sampled)


def test_buckets():
    assert [bucket_for(n, 8) for n in range(10)] == [0, 1, 2, 4, 4, 8, 8, 8, 8, 8]
    assert bucket_for(5, 6) == 6
    assert buckets(8) == [1, 2, 4, 8] and buckets(6) == [1, 2, 4, 6] and buckets(1) == [1]


def test_queue_bound_and_row_admission():
    s = Scheduler(replicas=1, rows=2, max_context=64, max_queue=3, prefill_chunk=64)
    assert all(s.add(entry(i, 3)) for i in range(3))
    assert s.queue_full() and not s.add(entry(3, 3))
    plan = s.schedule()
    # two rows: r0 -> row 0, r1 -> row 1, r2 waits
    assert [(n.row, n.replica) for n in plan.new_rows] == [(0, 0), (1, 0)]
    assert s.queued == 1 and s.rows_used == 2 and not s.queue_full()
    assert s.add(entry(3, 3))


def test_token_budget_bounds_admission():
    # each replica may reserve 20 tokens: 10 + 4 fits, a second 10 + 4 does not
    s = Scheduler(replicas=1, rows=4, max_context=16, max_queue=8, prefill_chunk=64, kv_tokens=20)
    s.add(entry(0, 10))
    s.add(entry(1, 10))
    s.add(entry(2, 2))  # would fit, but does not overtake r1
    s.schedule()
    assert s.rows_used == 1 and s.queued == 2
    for _ in range(4):  # r0: last chunk samples 1 id, 3 decodes -> length 4
        run_step(s)
    assert s.rows_used == 0 and s.queued == 2  # r0 done; its reservation is free again
    s.schedule()
    assert s.table[0][0].request_id == "r1" and s.table[0][1].request_id == "r2"


def test_replicas_share_the_load_lowest_rows_first():
    s = Scheduler(replicas=2, rows=4, max_context=64, max_queue=16, prefill_chunk=64)
    for i in range(5):
        s.add(entry(i, 2))
    plan = s.schedule()
    assert [(n.replica, n.row) for n in plan.new_rows] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]


def test_chunked_prefill_interleaves_with_decode():
    s = Scheduler(replicas=1, rows=4, max_context=64, max_queue=8, prefill_chunk=4)
    s.add(entry(0, 2, max_tokens=10))
    plan, done = run_step(s)  # r0 prefilled whole (2 tokens), first id sampled
    assert plan.bucket == 0 and [c.tokens for c in plan.prefill[0]] == [(1, 2)]
    assert done[0].token_ids == [7]
    s.add(entry(1, 10, max_tokens=3))
    plan, _ = run_step(s)
    # r0 decodes (row 0, slot 2, its last id) while r1 prefills its first 4 tokens
    assert plan.bucket == 1 and plan.decode_rows == [[0]]
    assert plan.decode_tokens == [[7]] and plan.decode_slots == [[2]]
    assert [(c.row, c.start, c.tokens, c.last) for c in plan.prefill[0]] == [
        (1, 0, (1, 2, 3, 4), False)
    ]
    plan, _ = run_step(s)
    assert [(c.start, c.last) for c in plan.prefill[0]] == [(4, False)]
    assert plan.decode_slots == [[3]]
    plan, done = run_step(s)
    assert [(c.start, len(c.tokens), c.last) for c in plan.prefill[0]] == [(8, 2, True)]
    assert {d.entry.request_id for d in done} == {"r0", "r1"}
    plan, _ = run_step(s)
    # both decode now: bucket 2; r1's first decode writes slot 10
    assert plan.bucket == 2 and plan.decode_rows == [[0, 1]] and plan.decode_slots == [[5, 10]]


def test_budget_is_shared_oldest_first_and_throwaway_slots():
    s = Scheduler(replicas=1, rows=4, max_context=64, max_queue=8, prefill_chunk=5)
    s.add(entry(0, 1, max_tokens=9))
    run_step(s)
    s.add(entry(1, 3))
    s.add(entry(2, 6))
    plan, _ = run_step(s)
    # r0 decodes on row 0; r1 takes 3 of the 5 tokens, r2 the other 2
    assert [(c.row, c.start, len(c.tokens)) for c in plan.prefill[0]] == [(1, 0, 3), (2, 0, 2)]
    plan, _ = run_step(s)
    # rows 1 (decoding now) and 2 (prefilling at slot 2) are in the bucket of 4; row 2's
    # throw-away write goes to its next unwritten slot, row 3 (free) to slot 0
    assert plan.bucket == 2 and plan.decode_rows == [[0, 1]]
    plan, _ = run_step(s)
    assert plan.decode_rows == [[0, 1, 2]] and plan.bucket == 4
    assert plan.decode_slots[0][3] == 0


def test_prefill_groups_stay_within_the_chunk_budget():
    s = Scheduler(replicas=1, rows=4, max_context=64, max_queue=8, prefill_chunk=8)
    for i, n in enumerate([1, 3, 2]):
        s.add(entry(i, n))
    plan = s.schedule()
    lengths = [[len(plan.prefill[0][i].tokens) for i in group] for group in plan.groups[0]]
    # longest first; 2 rows x 3 <= 8 batch together, a third row would pad to 9
    assert lengths == [[3, 2], [1]] and plan.prefill_forwards == 2
    assert all(c.last for c in plan.prefill[0])


def test_throwaway_slot_of_a_prefilling_row():
    s = Scheduler(replicas=1, rows=2, max_context=64, max_queue=8, prefill_chunk=3)
    s.add(entry(0, 1, max_tokens=1))  # row 0, done after its prefill
    s.add(entry(1, 1, max_tokens=9))  # row 1, decodes from the next step on
    run_step(s)
    s.add(entry(2, 7))  # reuses row 0
    plan, _ = run_step(s)
    assert plan.bucket == 2 and plan.decode_rows == [[1]] and plan.decode_slots[0][0] == 0
    plan, _ = run_step(s)  # decode first (row 0 at its next slot 3), then its chunk from 3
    assert plan.decode_rows == [[1]] and plan.decode_slots == [[3, 2]]
    assert plan.prefill[0][0].start == 3


def test_stop_and_length_free_rows_for_reuse():
    s = Scheduler(replicas=1, rows=1, max_context=64, max_queue=8, prefill_chunk=64)
    s.add(entry(0, 3, max_tokens=5, stop=[9]))
    s.add(entry(1, 2, max_tokens=2))
    _, done = run_step(s, token=4)
    assert done[0].finish_reason is None
    _, done = run_step(s, token=9)  # a stop id: kept, row freed
    assert done[0].token_ids == [9] and done[0].finish_reason == "stop"
    assert s.rows_used == 0
    plan, done = run_step(s, token=4)  # r1 reuses row 0
    assert plan.new_rows[0].row == 0 and done[0].entry.request_id == "r1"
    _, done = run_step(s, token=4)
    assert done[0].finish_reason == "length" and done[0].entry.generated == [4, 4]
    assert s.idle


def test_cancel_queued_and_running():
    s = Scheduler(replicas=1, rows=1, max_context=64, max_queue=8, prefill_chunk=64)
    s.add(entry(0, 3, max_tokens=50))
    s.add(entry(1, 3))
    s.add(entry(2, 3))
    run_step(s)
    assert s.cancel("r1").finish_reason == "abort" and s.queued == 1  # queued: dropped
    plan = s.schedule()  # r0 decodes
    assert s.cancel("r0") is not None and s.rows_used == 0  # cancelled during the step
    assert s.complete(plan, {(0, 0): 5}) == []  # its id is dropped
    assert s.cancel("r0") is None
    plan = s.schedule()
    assert plan.new_rows[0].row == 0 and s.table[0][0].request_id == "r2"


# ---- the engine on one process with a fake per-row-cache model --------------------------


def start_engine(**kw):
    options = dict(
        model_name="fake", rows=4, max_context=40, prefill_chunk=5, max_queue=64, stop_ids=[3]
    )
    options.update(kw)
    engine = ServeEngine(FakeModel(), None, **options)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    return engine, thread


def test_engine_equals_each_sequence_alone():
    engine, thread = start_engine()
    client = engine.client
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(4, V, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 17, (24,), generator=g)
    ]
    max_tokens = [int(n) for n in torch.randint(1, 12, (24,), generator=g)]
    streams = [client.submit(p, SamplingParams(max_tokens=m)) for p, m in zip(prompts, max_tokens)]
    for p, m, stream in zip(prompts, max_tokens, streams):
        ids, reason = collect(stream)
        expected = greedy_alone(p, m, {3})
        assert ids == expected, (p, m)
        assert reason == ("stop" if expected[-1] == 3 and len(expected) <= m else "length")
        assert stream.first_token_s is not None and stream.completion_tokens == len(ids)
    stats = client.stats()
    assert (stats.running, stats.queued, stats.kv_rows_used) == (0, 0, 0)
    assert stats.kv_rows_total == 4 and stats.kv_tokens_total == 160
    engine.drain()
    thread.join(10)
    assert not thread.is_alive()


def test_engine_errors_cancel_and_drain():
    engine, thread = start_engine(max_queue=2, rows=1)
    engine.model.delay_s = 0.05  # the long request runs for seconds: time to act meanwhile
    client = engine.client
    with pytest.raises(ContextTooLong):
        client.submit([5] * 35, SamplingParams(max_tokens=6))
    with pytest.raises(InvalidRequest):
        client.submit([], SamplingParams())
    with pytest.raises(InvalidRequest):
        client.submit([V], SamplingParams())
    long = client.submit([5, 6], SamplingParams(max_tokens=36, ignore_eos=True))
    first = next(long.events(timeout=30))
    assert len(first.token_ids) == 1
    queued = [client.submit([7], SamplingParams(max_tokens=2)) for _ in range(2)]
    with pytest.raises(QueueFull) as err:
        client.submit([7], SamplingParams(max_tokens=2))
    assert 1 <= err.value.retry_after_s <= 60
    client.cancel(long)  # frees the only row for the queued ones
    rest = [e for e in long.events(timeout=30)]
    assert rest[-1].finish_reason == "abort" and len(rest) < 36
    for stream in queued:
        ids, _ = collect(stream)
        assert ids == greedy_alone([7], 2, {3})
    engine.drain()
    with pytest.raises(EngineUnavailable):
        client.submit([7], SamplingParams(max_tokens=2))
    thread.join(10)
    assert not thread.is_alive()


def test_seeded_sampling_repeats_unseeded_varies():
    engine, thread = start_engine(rows=8)
    client = engine.client
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)
    prompt = [9, 10, 11]
    seeded = [client.submit(prompt, params) for _ in range(2)]
    unseeded = [client.submit(prompt, replace(params, seed=None)) for _ in range(3)]
    # top_p that keeps only the likeliest id: sampling equals greedy
    narrow = client.submit(prompt, replace(params, seed=None, top_p=1e-6))
    ids = [collect(s)[0] for s in seeded + unseeded]
    assert ids[0] == ids[1] and all(len(i) == 8 for i in ids)
    assert len({tuple(i) for i in ids[1:]}) == 4  # 1 seeded + 3 unseeded, all different
    assert collect(narrow)[0] == greedy_alone(prompt, 8, set())
    engine.drain()
    thread.join(10)

"""Per-row KV caches (serving): sequences of different lengths prefilled in chunks into
arbitrary cache rows, then decoded together with per-row slots, give each sequence's own
full forward (no cache), for every family's attention kind (GQA with windows / q-k norms /
partial rotary, MLA's latent cache, gpt-oss sinks with sliding ring buffers).

# B batch rows of a call, S query length, L a sequence's length, V vocab
"""

from __future__ import annotations

import pytest
import torch

from moe_ext.model import init_random_full
from moe_ext.model.args import ModelArgs
from moe_ext.model.decoder import Transformer
from tests.unit.test_families import CONFIGS, hf

ROWS, MAX_SLOTS = 6, 40
# prompt lengths: longer and shorter than gpt_oss's window of 8 and mixtral's of 16
PROMPT_LENS = (13, 4, 19, 9)
DECODE_STEPS = 10  # gpt_oss's rings wrap; mixtral's window slides past the first slots
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request) -> Transformer:
    args = ModelArgs.from_hf_config(hf(request.param, vocab_size=64))
    model = Transformer(args)
    model.load_state_dict(init_random_full(args, seed=5), strict=False)
    return model.float().eval()


def sequences() -> list[torch.Tensor]:
    """Prompt + decode tokens of each sequence: [L] int64 (fixed, not sampled, so the
    comparison never depends on an argmax tie)."""
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(2, 64, (n + DECODE_STEPS,), generator=gen) for n in PROMPT_LENS]


def reference(model: Transformer, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each sequence's logits [L, V] from its own full forward, no cache, no padding."""
    with torch.no_grad():
        return [model(seq[None])[0].float() for seq in seqs]


def noisy_caches(model: Transformer) -> None:
    """Fresh caches filled with noise: a read of any slot a sequence did not write shows."""
    model.setup_caches(ROWS, MAX_SLOTS)
    gen = torch.Generator().manual_seed(0)
    for name, buf in model.named_buffers():
        if "kv_cache" in name:
            buf.copy_(torch.randn(buf.shape, generator=gen))


def prefill_in_chunks(
    model: Transformer,
    seqs: list[torch.Tensor],
    rows: list[int],
    offsets: list[int],
    expected: list[torch.Tensor],
    chunk: int,
    kv_len_none: bool = False,
) -> None:
    """Prefill every prompt in chunks, sequence i starting at round i (so rows of one call
    sit at different slots); the rows of a round with the same chunk length run as one
    call with per-row slots [B, S] and cache_rows. Sequence i's tokens go to slots
    offsets[i].. of cache row rows[i] (kv_start = offsets[i]). Checks every chunk's logits."""
    done = [0] * len(seqs)
    for round_ in range(64):
        todo = [
            i for i in range(len(seqs)) if i <= round_ and done[i] < PROMPT_LENS[i]
        ]  # sequences still prefilling
        if not todo:
            return
        by_len: dict[int, list[int]] = {}
        for i in todo:
            by_len.setdefault(min(chunk, PROMPT_LENS[i] - done[i]), []).append(i)
        for n, group in by_len.items():
            ids = torch.stack([seqs[i][done[i] : done[i] + n] for i in group])  # [B, n]
            slots = torch.stack([torch.arange(n) + offsets[i] + done[i] for i in group])  # [B, n]
            kv_start = torch.tensor([offsets[i] for i in group])  # [B]
            kv_len = None if kv_len_none else int(slots.max()) + 1
            with torch.no_grad():
                logits = model(
                    ids,
                    slots,
                    kv_start,
                    kv_len,
                    use_cache=True,
                    cache_rows=torch.tensor([rows[i] for i in group]),
                )  # [B, n, V]
            for b, i in enumerate(group):
                torch.testing.assert_close(
                    logits[b].float(), expected[i][done[i] : done[i] + n], **TOL
                )
                done[i] += n
    raise AssertionError("prefill did not finish")


def decode_together(
    model: Transformer,
    seqs: list[torch.Tensor],
    rows: list[int],
    offsets: list[int],
    expected: list[torch.Tensor],
    view_bucket: int = 0,
) -> None:
    """DECODE_STEPS steps of every sequence at once, each row at its own slot, over the
    whole cache (kv_len None, the static decode shape). ``view_bucket`` > 0: cache_rows
    None over rows 0..view_bucket-1 (the CUDA-graph view), rows without a sequence fed a
    dummy token at slot 0 whose output is ignored; else cache_rows = rows."""
    for step in range(DECODE_STEPS):
        pos = [PROMPT_LENS[i] + step for i in range(len(seqs))]  # each one's position
        if view_bucket:
            B = view_bucket
            ids = torch.full((B, 1), 3, dtype=torch.long)
            slots = torch.zeros(B, 1, dtype=torch.long)
            kv_start = torch.zeros(B, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[row, 0], slots[row, 0], kv_start[row] = (
                    seqs[i][pos[i]],
                    offsets[i] + pos[i],
                    offsets[i],
                )
            cache_rows, out_rows = None, rows
        else:
            ids = torch.stack([seqs[i][pos[i] : pos[i] + 1] for i in range(len(seqs))])  # [B, 1]
            slots = torch.tensor([[offsets[i] + pos[i]] for i in range(len(seqs))])  # [B, 1]
            kv_start = torch.tensor(offsets)
            cache_rows, out_rows = torch.tensor(rows), list(range(len(seqs)))
        with torch.no_grad():
            logits = model(
                ids, slots, kv_start, None, last_only=True, use_cache=True, cache_rows=cache_rows
            )  # [B, 1, V]
        for i, b in enumerate(out_rows):
            torch.testing.assert_close(logits[b, 0].float(), expected[i][pos[i]], **TOL)


def test_chunked_prefill_then_decode_in_arbitrary_rows(model):
    """Rows out of order with gaps, chunks of 3 (per-row slots at different offsets) with
    kv_len bounded, decode with explicit cache_rows."""
    seqs = sequences()
    expected = reference(model, seqs)
    rows, offsets = [4, 1, 5, 2], [0, 0, 0, 0]
    noisy_caches(model)
    prefill_in_chunks(model, seqs, rows, offsets, expected, chunk=3)
    decode_together(model, seqs, rows, offsets, expected)


def test_left_padded_rows_long_chunks_and_the_view_path(model):
    """Rows 0..3 of a bucket of 5 (cache_rows None in decode: the first rows' view, a
    spare row decoding a dummy), sequences starting at different slots (kv_start > 0, the
    noise below never attended), chunks of 10 (longer than gpt_oss's ring of 8), kv_len
    None."""
    seqs = sequences()
    expected = reference(model, seqs)
    rows, offsets = [2, 0, 3, 1], [3, 0, 1, 5]
    noisy_caches(model)
    prefill_in_chunks(model, seqs, rows, offsets, expected, chunk=10, kv_len_none=True)
    decode_together(model, seqs, rows, offsets, expected, view_bucket=5)


def test_per_row_slots_equal_the_shared_slot_path(model):
    """Per-row slots that happen to be equal in every row give the [S] path's logits, and
    that path still writes the whole batch's rows (generate's left-padded layout)."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 64, (3, 7), generator=gen)  # [3, 7]
    kv_start = torch.tensor([0, 2, 1])
    outs = []
    for per_row in (False, True):
        model.setup_caches(3, 16)
        slots = torch.arange(6)
        step_slot = torch.tensor([6])
        if per_row:
            slots, step_slot = slots.expand(3, 6), step_slot.expand(3, 1)
        with torch.no_grad():
            first = model(ids[:, :6], slots, kv_start, 6, use_cache=True)
            nxt = model(ids[:, 6:], step_slot, kv_start, None, last_only=True, use_cache=True)
        outs.append((first, nxt))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-6, atol=1e-6)


def build(family: str, **changes) -> Transformer:
    args = ModelArgs.from_hf_config(hf(family, vocab_size=64, **changes))
    model = Transformer(args)
    model.load_state_dict(init_random_full(args, seed=5), strict=False)
    return model.float().eval()


def test_gpt_oss_window_wider_than_the_cache():
    """A sliding window beyond the cache (ring = all MAX_SLOTS slots, never wrapping) in
    per-row rows: the ring's entries are the slots themselves."""
    model = build("gpt_oss", sliding_window=64)
    assert model.layers["0"].self_attn.cache_slots(MAX_SLOTS) == MAX_SLOTS
    seqs = sequences()
    expected = reference(model, seqs)
    rows, offsets = [3, 0, 5, 1], [2, 0, 1, 0]
    noisy_caches(model)
    prefill_in_chunks(model, seqs, rows, offsets, expected, chunk=4)
    decode_together(model, seqs, rows, offsets, expected, view_bucket=6)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_compiled_decode_with_per_row_slots(family):
    """compile_decode's block (aot_eager: dynamo and AOT autograd, no C compiler) traces the
    per-row write and masks of the view path (cache_rows None, what CUDA graphs capture)
    and gives eager's logits."""
    model = build(family)
    seqs = sequences()
    expected = reference(model, seqs)
    rows, offsets = [0, 1, 2, 3], [0, 0, 0, 0]
    model.compile_decode(backend="aot_eager")
    try:
        noisy_caches(model)
        prefill_in_chunks(model, seqs, rows, offsets, expected, chunk=6)
        decode_together(model, seqs, rows, offsets, expected, view_bucket=4)
    finally:
        model.compile_decode(False)

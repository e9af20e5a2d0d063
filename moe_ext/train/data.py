"""Training data: a text file or JSONL corpus as one token stream, and batches that are a
pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.

# N tokens in the stream, B sequences, S sequence length, dp data-parallel ranks

Documents are ``[bos] + tokens + [eos]`` one after the other (bos/eos where the tokenizer
has them). A plain text file is one document; a JSONL file has one ``{"text": ...}``
document per line. The last ``val_fraction`` of the stream is held out for evaluation.
Step ``s`` draws ``dp * B`` random windows of ``S + 1`` tokens from the training part with
a generator seeded by ``(seed, s)``; data-parallel rank ``r`` takes rows ``[r*B, (r+1)*B)``,
so the global batch does not depend on how the ranks are laid out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch

from moe_ext.errors import MoeExtError

SHIPPED_CORPUS = "shakespeare.txt"


class DataError(MoeExtError):
    """A corpus that cannot be used (one line: problem and fix)."""


def shipped_corpus_path() -> Path:
    """The corpus shipped as package data (moe_ext/data/corpus/shakespeare.txt)."""
    return Path(str(resources.files("moe_ext").joinpath("data", "corpus", SHIPPED_CORPUS)))


def read_documents(path: Path) -> list[str]:
    """Documents of a text file (one) or a JSONL file (``{"text": ...}`` per line)."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass data=<text file or .jsonl>")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8"
        ) from err
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        return [text]
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f'{path}:{number}: not valid JSON ({err.msg}); each line must be {{"text": "..."}}'
            ) from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}:{number}: expected {{"text": "..."}}')
        docs.append(record["text"])
    if not docs:
        raise DataError(f"{path} holds no documents")
    return docs


def tokenize_documents(docs: list[str], tokenizer: Any) -> torch.Tensor:
    """One int64 stream [N]: every document as [bos] + ids + [eos]."""
    ids: list[int] = []
    bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
    for doc in docs:
        if bos is not None:
            ids.append(bos)
        ids.extend(tokenizer.encode(doc, add_bos=False))
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


@dataclass
class TokenData:
    """The token stream split into a training part and a held-out tail."""

    train: torch.Tensor  # [N_train] int64
    val: torch.Tensor  # [N_val] int64
    source: str

    @classmethod
    def load(
        cls, path: Optional[str], tokenizer: Any, vocab_size: int, seq_len: int, val_fraction: float
    ) -> "TokenData":
        file = shipped_corpus_path() if path is None else Path(path)
        stream = tokenize_documents(read_documents(file), tokenizer)  # [N]
        if stream.numel() and int(stream.max()) >= vocab_size:
            raise DataError(
                f"{file} tokenizes to id {int(stream.max())}, outside the model's "
                f"vocabulary of {vocab_size}; use the model's tokenizer"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"train.val_fraction={val_fraction}; use a value in [0, 1)")
        n_val = int(stream.numel() * val_fraction)
        if n_val and n_val < seq_len + 1:
            raise DataError(
                f"the held-out tail of {file} ({n_val} tokens) is shorter than one "
                f"sequence of train.seq_len + 1 = {seq_len + 1}; raise "
                f"train.val_fraction or lower train.seq_len"
            )
        train = stream[: stream.numel() - n_val]
        if train.numel() < seq_len + 1:
            raise DataError(
                f"{file} has {train.numel()} training tokens, fewer than one "
                f"sequence of train.seq_len + 1 = {seq_len + 1}; use more text or "
                f"a smaller train.seq_len"
            )
        return cls(train=train, val=stream[stream.numel() - n_val :], source=str(file))


def _windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Rows stream[start : start + seq_len + 1] for each start: [len(starts), S+1]."""
    offsets = torch.arange(seq_len + 1)
    return stream[starts[:, None] + offsets[None, :]]  # [B, S+1]


def train_batch(
    data: TokenData, step: int, seed: int, micro_batch: int, seq_len: int, dp: int, dp_rank: int
) -> torch.Tensor:
    """This rank's share [B, S+1] int64 of step ``step``'s global batch (dp·B windows)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    high = data.train.numel() - seq_len  # window starts in [0, N_train - S - 1]
    starts = torch.randint(0, high, (dp * micro_batch,), generator=gen)  # [dp·B]
    mine = starts[dp_rank * micro_batch : (dp_rank + 1) * micro_batch]  # [B]
    return _windows(data.train, mine, seq_len)


def eval_batches(
    data: TokenData, num_batches: int, micro_batch: int, seq_len: int, dp: int, dp_rank: int
) -> list[torch.Tensor]:
    """Fixed held-out batches [B, S+1]: evenly spaced windows of the held-out tail, split
    over the data-parallel ranks like training batches. Empty without a held-out tail."""
    if data.val.numel() < seq_len + 1 or num_batches <= 0:
        return []
    count = num_batches * dp * micro_batch
    starts = torch.linspace(0, data.val.numel() - seq_len - 1, count).long()  # [count]
    starts = starts.view(num_batches, dp, micro_batch)[:, dp_rank]  # [num_batches, B]
    return [_windows(data.val, row, seq_len) for row in starts]

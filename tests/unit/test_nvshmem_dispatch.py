"""NvshmemDispatcher in one process: one-line refusals on machines without CUDA or NVSHMEM,
and the number of exchange slots. On ranks: tests/multirank/test_nvshmem_dispatch.py."""

from __future__ import annotations

import pytest

from moe_ext.moe.dispatch import build_dispatcher, nvshmem
from tests.support import E, assert_nvshmem_refusal


def test_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(nvshmem, "cuda_available", lambda: False)
    with pytest.raises(ValueError) as err:
        nvshmem.NvshmemDispatcher(E)
    assert_nvshmem_refusal(err.value, "CUDA")
    with pytest.raises(nvshmem.NvshmemUnavailableError) as err:
        build_dispatcher("nvshmem", E)
    assert_nvshmem_refusal(err.value, "CUDA")


def test_refuses_without_nvshmem(monkeypatch):
    monkeypatch.setattr(nvshmem, "cuda_available", lambda: True)
    monkeypatch.setattr(nvshmem, "nvshmem_available", lambda: False)
    with pytest.raises(nvshmem.NvshmemUnavailableError) as err:
        nvshmem.NvshmemDispatcher(E)
    assert_nvshmem_refusal(err.value, "NVSHMEM")


def test_exchange_slots():
    assert nvshmem.exchange_slots(4) == 4
    assert nvshmem.exchange_slots(64) == 16  # Qwen3 at ep=2: 16 slots of 4 experts
    assert nvshmem.exchange_slots(24) == 12
    assert nvshmem.exchange_slots(17) == 1
    assert nvshmem.exchange_slots(4, max_slots=3) == 2

"""Shared hooks: markers from the directory (tests/multirank/ -> multirank, tests/gpu/ ->
gpu), test files outside those and tests/unit/ refused, gpu tests skipped without CUDA, the
multirank guard of tests.support, and a prompt exit after a CUDA run."""

import os
import sys
from pathlib import Path

import pytest
import torch

from tests import support

_exit_status = {}
_DIRECTORY_MARKERS = {"multirank": pytest.mark.multirank, "gpu": pytest.mark.gpu}
_TESTS = Path(__file__).resolve().parent


def _directory(item) -> str | None:
    """unit, multirank or gpu for a test under tests/; "" for a file in tests/ itself."""
    try:
        parts = item.path.resolve().relative_to(_TESTS).parts
    except ValueError:  # not under tests/
        return None
    return parts[0] if len(parts) > 1 else ""


def pytest_itemcollected(item):
    """Every test under tests/multirank/ is marked multirank, under tests/gpu/ gpu (at
    collection, so ``-m`` selects them)."""
    directory = _directory(item)
    if directory in _DIRECTORY_MARKERS:
        item.add_marker(_DIRECTORY_MARKERS[directory])


def pytest_runtest_setup(item):
    if _directory(item) == "":
        pytest.fail(
            f"{item.path.name}: test files live in tests/unit/ (one process), "
            "tests/multirank/ (starts ranks) or tests/gpu/ (CUDA only); shared helpers "
            "in tests/support.py",
            pytrace=False,
        )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """While a test runs (fixtures included), tests.support.run_ranks and torchrun know
    whether it is marked multirank and fail it if not."""
    support.current_test_is_multirank = item.get_closest_marker("multirank") is not None
    try:
        yield
    finally:
        support.current_test_is_multirank = None


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


def pytest_unconfigure(config):
    """After a run that used CUDA, leave as soon as pytest has reported: on 2xH200 a GPU
    test process (CUDA graphs, inductor, NCCL) once stayed alive after its last test passed
    until an outer timeout killed it, so the whole run read as a failure."""
    if torch.cuda.is_available() and torch.cuda.is_initialized() and "code" in _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["code"])

import os
import sys

import pytest
import torch

_exit_status = {}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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

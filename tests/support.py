"""Run a test body on several ranks (gloo on CPU) and surface the first failure.

Usage inside a test::

    run_ranks(_body, world_size=4, args=(seed,))

``_body(rank, world_size, *args)`` must be a module-level function (it is pickled into
spawned processes); torch.distributed is initialised before it runs and destroyed after.
"""
from __future__ import annotations

import datetime
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_ext.launching import end_child_processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, store_path, backend, fn, args, errors):
    # MASTER_* for code under test that reads them; the ranks meet through a file store:
    # a TCP store on a port picked in advance can lose it to another process (EADDRINUSE
    # seen on the GPU machine)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = 0
    try:
        extra = {}
        if backend == "nccl":  # one GPU per rank, bound before NCCL or NVSHMEM start
            torch.cuda.set_device(rank)
            extra["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=120), **extra)
        fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent test
        tb = traceback.format_exc()
        # printed at once as well: a peer left waiting in a collective turns the run into a
        # timeout, and this may then be the only trace of the cause
        print(f"rank {rank} failed:\n{tb}", file=sys.stderr, flush=True)
        errors.put((rank, tb))
        code = 1
    # NCCL groups are not destroyed: after CUDA-graph-captured NCCL collectives
    # destroy_process_group blocked on 2xH200 (see moe_ext.launching.exit_now).
    if dist.is_initialized() and backend != "nccl":
        dist.destroy_process_group()
    end_child_processes()  # os._exit would orphan them (Megatron's checkpoint writer)
    # Skip interpreter teardown: a C++ worker thread left joinable by a library (seen with
    # DeepSpeed on gloo, about 1 run in 10) aborts the process there with "terminate called
    # without an active exception", after every check has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(fn, world_size: int, args: tuple = (), backend: str = "gloo") -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    store_dir = tempfile.mkdtemp(prefix="moe_ext_ranks_")
    store_path = os.path.join(store_dir, "store")
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, store_path, backend, fn,
                                              args, errors))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 600
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            time.sleep(2)  # a rank failed; its peers may wait in a collective for good
            break
        time.sleep(0.1)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    shutil.rmtree(store_dir, ignore_errors=True)
    if not errors.empty():
        rank, tb = errors.get()
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    assert not bad, f"ranks exited abnormally (rank, exitcode): {bad}"

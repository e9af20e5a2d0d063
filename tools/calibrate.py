"""Measure this machine into a MachineProfile (JSON) for the planner's cost model.

    torchrun --nproc-per-node 2 tools/calibrate.py --out profile.json
    NCCL_P2P_DISABLE=1 torchrun --nproc-per-node 2 tools/calibrate.py --out p2p_off.json
    torchrun --nproc-per-node 2 tools/calibrate.py --device cpu --quick --out cpu.json

One rank per GPU (NCCL), or CPU ranks (gloo) without GPUs or with ``--device cpu``. What it
measures and how: moe_ext/calibrate.py. Collectives run on every group size the world
allows (2, 4, ..., world; contiguous ranks), over per-rank sizes 4 KiB .. 256 MiB on GPU
(``--quick``: .. 64 MiB, fewer iterations) and 4 KiB .. 4 MiB on CPU (``--quick``: 1 MiB);
then each rank's device kernels (HBM copy, bf16 matmul, GEMV, grouped experts, launch).
Rank 0 shows progress, prints a summary (per op and group: latency at the smallest size,
bus bandwidth at the largest) and writes ``--out`` atomically (a temporary file renamed).

Hangs: every collective group is created with ``--timeout-s`` (default 60 s). On NCCL a
collective that does not finish by then is aborted by torch's NCCL watchdog, which ends
the process (torchrun then stops the others); on gloo the call raises. Either way the run
ends with an error naming the timeout instead of hanging, and no profile is written. The
default group, which only lines the ranks up between phases and gathers the results, waits
up to 300 s (the kernel phase compiles Triton kernels on first use).
A broken peer-to-peer link (PCIe ACS/IOMMU) usually shows up this way: re-run with
``NCCL_P2P_DISABLE=1``.

The environment is read here only: torchrun's variables and NCCL_P2P_DISABLE (recorded as
``p2p: false``, link ``pcie``: NCCL stages the bytes through host memory).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moe_ext.calibrate import calibrate, calibration_steps, format_summary  # noqa: E402
from moe_ext.dist import DistEnv, init_distributed  # noqa: E402
from moe_ext.errors import MoeExtError  # noqa: E402
from moe_ext.topology import probe  # noqa: E402

WORLD_TIMEOUT_S = 300.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="profile JSON to write (rank 0)")
    p.add_argument("--name", help="profile name (default: from device, count and link)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer iterations")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per-collective timeout (seconds)")
    return p.parse_args(argv)


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = DistEnv.from_environ(os.environ)
    device_type = args.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # probe before the process group: it initialises the CUDA driver in this process only
    topology = probe(cuda=device_type == "cuda")
    if device_type == "cuda" and topology.num_gpus > env.local_world_size:
        topology = topology.subset(env.local_world_size)  # the GPUs this launch uses
    # the default group only lines ranks up between phases (kernel measurements compile
    # Triton kernels on first use): it waits longer than the measured groups
    device = init_distributed(env, device_type, max(args.timeout_s, WORLD_TIMEOUT_S))
    p2p_disabled = device_type == "cuda" and os.environ.get("NCCL_P2P_DISABLE", "0") not in (
        "",
        "0",
    )
    # the command as a reader would type it: env first, the output file by its name only
    # (a profile records no path of the machine it was measured on)
    argv = [Path(a).name if a.endswith(".json") else a for a in sys.argv[1:]]
    command = " ".join(shlex.quote(a) for a in ["tools/calibrate.py", *argv])
    command = f"torchrun --nproc-per-node {env.local_world_size} {command}"
    if p2p_disabled:
        command = f"NCCL_P2P_DISABLE={os.environ['NCCL_P2P_DISABLE']} " + command
    notes = [f"command: {command}"]
    bar = None
    if env.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=calibration_steps(env.world_size, device_type, args.quick), desc="calibrate"
        )

    def on_step(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

    started = time.perf_counter()
    try:
        profile = calibrate(
            dist.group.WORLD,
            env.rank,
            env.world_size,
            device,
            topology=topology,
            p2p_disabled=p2p_disabled,
            quick=args.quick,
            name=args.name,
            timeout_s=args.timeout_s,
            notes=notes,
            on_step=on_step,
        )
    except MoeExtError as err:  # the same on every rank: rank 0 says it
        if env.rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except dist.DistBackendError as err:  # gloo: a collective past its timeout
        first = (str(err).splitlines() or [type(err).__name__])[0]
        print(
            f"error: rank {env.rank}: a collective failed or did not finish within "
            f"--timeout-s {args.timeout_s:g} ({first}); a link that hangs is often broken "
            "peer-to-peer: on GPUs re-run with NCCL_P2P_DISABLE=1",
            file=sys.stderr,
            flush=True,
        )
        return 3
    finally:
        if bar is not None:
            bar.close()
    if env.rank == 0:
        write_atomically(args.out, profile.to_json() + "\n")
        print(format_summary(profile))
        print(f"wrote {args.out} in {time.perf_counter() - started:.1f} s")
    return 0


def exit_now(code: int) -> None:
    """Leave without interpreter teardown, as moe_ext.launching.exit_now does (not imported:
    it costs seconds of start-up): NCCL ranks first agree that all are done."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())

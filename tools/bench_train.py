"""Training throughput per strategy and engine, against peers in the same run: tokens/s,
MFU, time per step and peak memory per rank (moe_ext.bench.train).

    torchrun --nproc-per-node 2 tools/bench_train.py --model qwen3_30b_a3b --layers 4 \\
        --json train.json --png train.png                      # defaults: B 8 x S 2048, bf16
    torchrun --nproc-per-node 2 tools/bench_train.py --model mixtral_8x7b --layers 2 \\
        --systems deepspeed --strategies replicate,ep_nccl --json train.json
    NCCL_P2P_DISABLE=1 torchrun --nproc-per-node 2 tools/bench_train.py ...   # link p2p_off
    python tools/bench_train.py --nproc 2 --json train.json ...   # each case in fresh ranks
    python tools/bench_train.py --report train.json --png train.png          # table + chart

# B micro-batch per data-parallel rank, S sequence length, W world size

Systems (``--systems``): ``deepspeed`` (native model, engine=deepspeed) and ``megatron``
(GPTModel with our MoE layer, engine=megatron) each run every ``--strategies`` entry;
the peers ``mcore_a2a`` / ``mcore_ag`` (GPTModel with Megatron-core's own MoELayer, local
spec, alltoall / allgather dispatcher) and ``ds_moe`` (the native model with DeepSpeed's
``MoE`` layer) run EP over all ranks. Same shape, batch, dtype, optimizer, aux-loss
weight and clipping everywhere. A failing case becomes an ``error: ...`` row and the run
goes on. ``--json`` merges rows into a file shared by several runs (link settings, world
sizes; a later row of the same case replaces the earlier one), written after every case;
``--png`` draws tokens/s with MFU per panel (model, world, link, dtype). Run one system
per invocation, or pass ``--nproc N`` (without torchrun): every case then runs in its
own ``torchrun --nproc-per-node N`` (fresh processes: a clean allocator and peak-memory
count, and a crash or hang of one case costs only that case; ``--case-timeout-s``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from moe_ext.bench.train import (  # noqa: E402
    DTYPES,
    NATIVE_STRATEGIES,
    PEER_STRATEGY,
    PEER_SYSTEMS,
    SYSTEMS,
    TrainCase,
    format_table,
    load_rows,
    merge_rows,
    plot,
    run_case,
)
from moe_ext.dist import DistEnv, destroy, init_distributed  # noqa: E402

DEFAULT_SYSTEMS = ("deepspeed", "megatron", "mcore_a2a", "mcore_ag", "ds_moe")
DEFAULT_STRATEGIES = ("replicate", "ep_allgather", "ep_nccl")


def _names(text: str, allowed: tuple, what: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        parser.error(f"--{what} {text!r}: choose from {', '.join(allowed)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="qwen3_30b_a3b", help="conf/model name")
    p.add_argument("--layers", type=int, help="cut the model to its first N layers")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=", ".join(SYSTEMS))
    p.add_argument(
        "--strategies",
        default=",".join(DEFAULT_STRATEGIES),
        help=f"for deepspeed and megatron: {', '.join(NATIVE_STRATEGIES)}",
    )
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per dp rank")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2))
    p.add_argument("--grad-clip", type=float, default=1.0, help="0: off")
    p.add_argument("--aux-loss-coeff", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense peak per device")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--link", help="label (default: p2p_off with NCCL_P2P_DISABLE=1, cpu, default)")
    p.add_argument("--json", type=Path, help="merge result rows into this JSON file")
    p.add_argument("--png", type=Path, help="draw the chart of the JSON rows (or this run's)")
    p.add_argument("--report", type=Path, help="only print this JSON file's table (and --png)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="collective timeout")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--nproc",
        type=int,
        help="run without torchrun: each case in its own torchrun of N ranks (needs --json)",
    )
    p.add_argument("--case-timeout-s", type=float, default=1800.0, help="with --nproc")
    args = p.parse_args(argv)
    args.systems = _names(args.systems, SYSTEMS, "systems", p)
    args.strategies = _names(args.strategies, NATIVE_STRATEGIES, "strategies", p)
    if args.nproc is not None and (args.nproc < 1 or args.json is None):
        p.error("--nproc N needs N >= 1 and --json (the cases write their rows there)")
    return args


def case_command(argv: list[str], case: TrainCase, nproc: int) -> list[str]:
    """The torchrun command that runs only ``case`` with the rest of ``argv``."""
    drop = {"--nproc", "--case-timeout-s", "--systems", "--strategies", "--png"}
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in drop:
            skip = "=" not in arg
            continue
        rest.append(arg)
    # a peer ignores --strategies (it runs EP over all ranks); any valid name will do
    strategy = NATIVE_STRATEGIES[0] if case.system in PEER_SYSTEMS else case.strategy
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(Path(__file__).resolve()),
        *rest,
        "--systems",
        case.system,
        "--strategies",
        strategy,
    ]


def run_isolated(args: argparse.Namespace, argv: list[str]) -> int:
    """--nproc: every case in fresh ranks, one after another; rows merge into --json."""
    import subprocess

    failed = False
    for case in cases(args):
        cmd = case_command(argv, case, args.nproc)
        print(f"== {case.system}/{case.strategy}: {' '.join(cmd[4:])}", flush=True)
        try:
            code = subprocess.run(cmd, timeout=args.case_timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        if code != 0:
            failed = True
            print(f"== {case.system}/{case.strategy} exited {code}", flush=True)
    rows = load_rows(args.json) if args.json.is_file() else []
    print("\n" + format_table(rows), flush=True)
    if args.png:
        plot(rows, args.png)
    return 1 if failed else 0


def cases(args: argparse.Namespace) -> list[TrainCase]:
    """Every (system, strategy) of the command line, in order; peers once each."""
    common = dict(
        model=args.model,
        layers=args.layers,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        dtype=args.dtype,
        zero_stage=args.zero_stage,
        grad_clip=args.grad_clip,
        aux_loss_coeff=args.aux_loss_coeff,
        lr=args.lr,
        peak_tflops=args.peak_tflops,
        activation_checkpointing=args.activation_checkpointing,
    )
    out = []
    for system in args.systems:
        strategies = [PEER_STRATEGY] if system in PEER_SYSTEMS else args.strategies
        out += [TrainCase(system=system, strategy=s, **common) for s in strategies]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.nproc is not None and args.report is None:
        return run_isolated(args, argv)
    if args.report is not None:
        rows = load_rows(args.report)
        print(format_table(rows))
        if args.png:
            plot(rows, args.png)
        return 0
    env = DistEnv.from_environ(os.environ)
    device_type = args.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = init_distributed(env, device_type, args.timeout_s)
    link = args.link or (
        "cpu"
        if device_type == "cpu"
        else "p2p_off"
        if os.environ.get("NCCL_P2P_DISABLE") == "1"
        else "default"
    )
    rows = []
    for case in cases(args):
        row = run_case(case, device, link, progress=env.rank == 0 and not args.no_progress)
        if row is None:
            continue
        rows.append(row)
        print(format_table([row]), flush=True)
        if args.json:  # after every case: a later crash keeps these
            merge_rows(args.json, [row])
    failed = False
    if env.rank == 0:
        print("\n" + format_table(rows), flush=True)
        if args.png:
            plot(load_rows(args.json) if args.json else rows, args.png)
        failed = any(r.status != "ok" for r in rows)
    destroy()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

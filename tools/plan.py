"""Explain a parallel plan without starting any process.

    python tools/plan.py --world-size 4 --model qwen3_30b_a3b --strategy auto --topology pcie
    python tools/plan.py --world-size 8 --model mixtral_8x7b --strategy ep_nccl parallel.tp=2

Composes conf/config.yaml with Hydra (extra arguments are Hydra overrides), resolves the
topology (``--topology auto`` probes this machine; pcie/nvlink/cpu force a kind), builds
the plan as the launcher would, and prints it with the reason, the quantization of the
weights and the bytes per rank (weights as stored, fp8 / mxfp4 scales included; see
docs/QUANT.md). Exit status 2 with a one-line message for a plan that cannot run.

    python tools/plan.py --world-size 4 --model qwen3_235b_a22b_fp8 --topology pcie \
        --gpu-memory-gib 96
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import HydraException  # noqa: E402

from moe_ext.config import register_configs  # noqa: E402
from moe_ext.errors import MoeExtError  # noqa: E402
from moe_ext.model.args import ModelArgs  # noqa: E402
from moe_ext.plan import (  # noqa: E402
    PlanError,
    build_plan,
    estimate_memory,
    exchange_seconds,
    model_param_counts,
    model_weight_bytes,
)
from moe_ext.topology import resolve_topology  # noqa: E402

GIB = 2**30


def compose_config(
    model: str,
    strategy: str,
    topology: str,
    overrides: Sequence[str],
    config_dir: Path = REPO / "conf",
):
    """conf/config.yaml with the model/strategy/topology groups chosen and ``overrides``."""
    register_configs()
    groups = [f"model={model}", f"strategy={strategy}"]
    if topology != "auto":
        groups.append(f"+topology={topology}")
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name="config", overrides=groups + list(overrides))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--world-size", type=int, required=True, help="number of ranks")
    p.add_argument("--model", default="tiny", help="conf/model/<name>.yaml")
    p.add_argument(
        "--strategy",
        default="auto",
        help="auto | replicate | tp_experts | ep_allgather | ep_nccl | ep_nvshmem",
    )
    p.add_argument(
        "--topology",
        default="auto",
        choices=("auto", "pcie", "nvlink", "cpu"),
        help="auto probes this machine; the others force a kind",
    )
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        help="per-GPU memory of a forced topology (default: probe, else 24/80)",
    )
    p.add_argument(
        "--dtype-bytes",
        type=int,
        default=2,
        help="bytes per unquantized weight, the model dtype (bf16: 2); quantized weights "
        "count their stored bytes",
    )
    p.add_argument(
        "--tokens-per-step",
        type=int,
        default=None,
        help="tokens per rank entering each MoE layer per step (auto's choice)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens per sequence for the KV-cache figure (default: the model's maximum)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. parallel.tp=2")
    return p


def explain(args: argparse.Namespace) -> dict:
    overrides = list(args.overrides)
    if args.gpu_memory_gib is not None:
        if args.topology not in ("pcie", "nvlink"):
            raise PlanError(
                "--gpu-memory-gib applies to a forced GPU topology; add "
                "--topology pcie or --topology nvlink"
            )
        overrides.append(f"topology.gpu_memory_gib={args.gpu_memory_gib}")
    cfg = compose_config(args.model, args.strategy, args.topology, overrides)
    topology = resolve_topology(cfg.topology, args.world_size)
    model = ModelArgs.from_model_conf(cfg.model)
    plan = build_plan(
        cfg.strategy,
        cfg.parallel,
        args.world_size,
        topology,
        model,
        dtype_bytes=args.dtype_bytes,
        tokens_per_step=args.tokens_per_step,
    )
    mem = estimate_memory(plan, model, topology, args.dtype_bytes, args.context)
    total_params, expert_params = model_param_counts(model)
    weights = model_weight_bytes(model, args.dtype_bytes)
    quant = model.quantization
    out = {
        "plan": {
            k: getattr(plan, k)
            for k in ("strategy", "world_size", "tp", "pp", "dp", "ep", "etp", "edp", "dispatcher")
        },
        "reason": plan.reason,
        "model": {
            "name": cfg.model.name,
            "params": total_params,
            "expert_params": expert_params,
            "weight_bytes": weights.dense + weights.experts,
            "quantization": quant.describe() if quant is not None else None,
        },
        "topology": {
            "kind": topology.kind,
            "source": topology.source,
            "num_gpus": topology.num_gpus,
        },
        "memory_per_rank": mem._asdict(),
        "dtype_bytes": args.dtype_bytes,
    }
    if plan.is_expert_parallel and plan.ep > 1 and args.tokens_per_step:
        link = topology.min_pair_bandwidth_gbps
        out["exchange_us_per_layer"] = {
            s: round(
                1e6
                * exchange_seconds(s, args.tokens_per_step, model, plan.ep, args.dtype_bytes, link),
                1,
            )
            for s in ("ep_nccl", "ep_allgather")
        }
    return out


def _format(out: dict) -> str:
    p, m, mem = out["plan"], out["model"], out["memory_per_rank"]
    lines = [
        f"plan       {p['strategy']}  (dispatcher {p['dispatcher']})",
        f"degrees    world {p['world_size']} = tp {p['tp']} x dp {p['dp']} x pp {p['pp']};"
        f" experts: ep {p['ep']} x etp {p['etp']} x edp {p['edp']} per stage",
        f"reason     {out['reason']}",
        f"model      {m['name']}: {m['params'] / 1e9:.2f}B parameters, "
        f"{m['expert_params'] / 1e9:.2f}B in routed experts, {m['weight_bytes'] / GIB:.2f} GiB "
        f"stored",
        "weights    "
        + (
            f"{m['quantization']}; quantized tensors counted with their scales, the rest "
            f"at {out['dtype_bytes']} bytes per parameter"
            if m["quantization"]
            else f"not quantized ({out['dtype_bytes']} bytes per parameter)"
        ),
        f"topology   {out['topology']['kind']} ({out['topology']['source']}, "
        f"{out['topology']['num_gpus']} GPUs)",
        f"memory     per rank: {mem['dense_bytes'] / GIB:.2f} GiB dense + "
        f"{mem['expert_bytes'] / GIB:.2f} GiB experts = {mem['total_bytes'] / GIB:.2f} GiB "
        f"weights, {mem['needed_bytes'] / GIB:.2f} GiB with 20% headroom",
    ]
    if mem["scale_bytes"]:
        lines.append(
            f"           bytes per rank: {mem['total_bytes']:,} (weights incl. "
            f"{mem['scale_bytes']:,} bytes of scales)"
        )
    else:
        lines.append(f"           bytes per rank: {mem['total_bytes']:,} (weights)")
    avail = mem["available_bytes"]
    if avail is not None:
        verdict = "fits" if mem["needed_bytes"] <= avail else "DOES NOT FIT"
        lines.append(f"           available {avail / GIB:.2f} GiB per rank: {verdict}")
    kv = mem["kv_bytes_per_sequence"]
    kv_line = f"kv cache   {kv / 2**20:.1f} MiB per sequence of {mem['context']} tokens per rank"
    if avail is not None and avail > mem["total_bytes"] and kv:
        kv_line += f"; {(avail - mem['total_bytes']) // kv} such sequences fit beside the weights"
    lines.append(kv_line)
    if "exchange_us_per_layer" in out:
        ex = out["exchange_us_per_layer"]
        lines.append(
            f"exchange   modelled per MoE layer: all-to-all {ex['ep_nccl']} us, "
            f"all-gather {ex['ep_allgather']} us"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        out = explain(args)
    except (MoeExtError, HydraException) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2) if args.json else _format(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

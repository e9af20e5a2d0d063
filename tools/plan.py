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

``--rank`` lists the top plans under the cost model (moe_ext.cost) instead: predicted decode
ms/step and tok/s, prefill ms, memory per rank, whether it fits, and why each loses to the
best. The profile is ``--profile FILE`` (plan.profile), else the shipped one closest to the
topology. ``--nodes N --gpus-per-node G`` plans N nodes of G GPUs: TP and EP stay inside a
node, PP and DP cross nodes over ``--inter-node-profile`` (default: an estimate for
100 Gb/s Ethernet, moe_ext.cost.ETHERNET_100G).

    python tools/plan.py --rank --world-size 2 --model mixtral_8x7b --topology pcie \
        --profile conf/profiles/h200x2_p2p_off.json --batch 16 --prompt-len 512
    python tools/plan.py --rank --nodes 2 --gpus-per-node 4 --model qwen3_30b_a3b \
        --topology nvlink --profile my_node.json
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
from moe_ext.cost import (  # noqa: E402
    DEFAULT_BATCH,
    DEFAULT_PROMPT_LEN,
    ETHERNET_100G,
    plan_label,
    rank_plans,
    select_profile,
)
from moe_ext.errors import MoeExtError  # noqa: E402
from moe_ext.model.args import ModelArgs  # noqa: E402
from moe_ext.plan import (  # noqa: E402
    PlanError,
    _given,
    available_memory_per_rank,
    build_plan,
    estimate_memory,
    exchange_seconds,
    model_param_counts,
    model_weight_bytes,
)
from moe_ext.profile import MachineProfile  # noqa: E402
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
    p.add_argument("--world-size", type=int, default=None, help="number of ranks")
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
    p.add_argument("--rank", action="store_true", help="rank every valid plan (cost model)")
    p.add_argument("--top", type=int, default=8, help="--rank: plans to print")
    p.add_argument("--batch", type=int, default=None, help="sequences per step, all replicas")
    p.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt")
    p.add_argument("--profile", default=None, help="machine profile JSON (plan.profile)")
    p.add_argument("--objective", default="decode", choices=("decode", "prefill"))
    p.add_argument("--nodes", type=int, default=None, help="--rank: number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=None, help="--rank: GPUs per node")
    p.add_argument(
        "--inter-node-profile",
        default=None,
        help="profile of the link between nodes (default: 100 Gb/s Ethernet estimate)",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. parallel.tp=2")
    return p


def _world(args: argparse.Namespace) -> int:
    if args.nodes is not None or args.gpus_per_node is not None:
        if not (args.nodes and args.gpus_per_node):
            raise PlanError("--nodes and --gpus-per-node go together; give both (>= 1)")
        world = args.nodes * args.gpus_per_node
        if args.world_size not in (None, world):
            raise PlanError(
                f"--world-size {args.world_size} != --nodes x --gpus-per-node = {world}; "
                f"drop --world-size"
            )
        return world
    if not args.world_size:
        raise PlanError("give --world-size N (or --nodes and --gpus-per-node)")
    return args.world_size


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.gpu_memory_gib is not None:
        if args.topology not in ("pcie", "nvlink"):
            raise PlanError(
                "--gpu-memory-gib applies to a forced GPU topology; add "
                "--topology pcie or --topology nvlink"
            )
        overrides.append(f"topology.gpu_memory_gib={args.gpu_memory_gib}")
    if args.profile is not None:
        overrides.append(f"plan.profile={args.profile}")
    return overrides


def explain(args: argparse.Namespace) -> dict:
    world = _world(args)
    cfg = compose_config(args.model, args.strategy, args.topology, _overrides(args))
    topology = resolve_topology(cfg.topology, world)
    model = ModelArgs.from_model_conf(cfg.model)
    plan = build_plan(
        cfg.strategy,
        cfg.parallel,
        world,
        topology,
        model,
        dtype_bytes=args.dtype_bytes,
        tokens_per_step=args.tokens_per_step,
        batch=args.batch,
        prompt_len=args.prompt_len,
        profile=select_profile(cfg.plan.profile, topology),
        objective=args.objective,
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


def rank(args: argparse.Namespace) -> dict:
    """Every valid plan ranked by the cost model (``--rank``)."""
    world = _world(args)
    cfg = compose_config(args.model, "auto", args.topology, _overrides(args))
    per_node = args.gpus_per_node or world
    topology = resolve_topology(cfg.topology, per_node)
    choice = select_profile(cfg.plan.profile, topology)
    if choice.profile is None:
        raise PlanError(
            f"--rank needs a machine profile ({choice.why}); give --profile FILE "
            f"(tools/calibrate.py writes one)"
        )
    inter = MachineProfile.load(args.inter_node_profile) if args.inter_node_profile else None
    model = ModelArgs.from_model_conf(cfg.model)
    avail = available_memory_per_rank(topology, per_node)
    batch = args.batch or DEFAULT_BATCH
    prompt_len = args.prompt_len or DEFAULT_PROMPT_LEN
    given = {k: _given(cfg.parallel, k) for k in ("tp", "pp", "dp", "ep", "etp")}
    ranked = rank_plans(
        model,
        choice.profile,
        world,
        batch,
        prompt_len,
        args.dtype_bytes,
        avail,
        topology=topology,
        gpus_per_node=args.gpus_per_node,
        inter_node=inter or (ETHERNET_100G if args.nodes and args.nodes > 1 else None),
        objective=args.objective,
        given=given,
    )
    if not ranked:
        raise PlanError(f"no valid plan of {world} ranks for {cfg.model.name} with {given}")
    rows = []
    for r in ranked[: args.top]:
        p = r.prediction
        rows.append(
            {
                "plan": plan_label(r.plan),
                "strategy": r.plan.strategy,
                "degrees": {k: getattr(r.plan, k) for k in ("tp", "pp", "dp", "ep", "etp", "edp")},
                "decode_ms": round(p.decode_ms, 3),
                "decode_tok_s": round(p.decode_tok_s, 1),
                "prefill_ms": round(p.prefill_ms, 2),
                "memory_bytes": p.memory_bytes,
                "fits": p.fits,
                "why_slower": r.why_slower,
                "terms_ms": {k: round(v, 3) for k, v in p.terms.items()},
            }
        )
    return {
        "model": cfg.model.name,
        "world_size": world,
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "profile": choice.why,
        "inter_node_profile": (inter or ETHERNET_100G).name if args.nodes else None,
        "batch": batch,
        "prompt_len": prompt_len,
        "objective": args.objective,
        "available_bytes": avail,
        "plans_valid": len(ranked),
        "rows": rows,
    }


def _format_rank(out: dict) -> str:
    where = f"{out['world_size']} ranks" + (
        f" ({out['nodes']} nodes x {out['gpus_per_node']} GPUs, between nodes: "
        f"{out['inter_node_profile']})"
        if out["nodes"]
        else ""
    )
    avail = out["available_bytes"]
    lines = [
        f"{out['model']} on {where}; {out['profile']}",
        f"batch {out['batch']} sequences, prompt {out['prompt_len']} tokens; ranked by "
        f"{out['objective']}; {out['plans_valid']} valid plans, top {len(out['rows'])}; "
        f"memory per rank " + (f"{avail / GIB:.1f} GiB" if avail is not None else "unknown"),
        f"{'#':>2}  {'plan':<30} {'decode ms':>9} {'tok/s':>9} {'prefill ms':>10} "
        f"{'GiB/rank':>8} {'fits':>4}  why not first",
    ]
    for i, r in enumerate(out["rows"], 1):
        fits = {True: "yes", False: "NO", None: "?"}[r["fits"]]
        lines.append(
            f"{i:>2}  {r['plan']:<30} {r['decode_ms']:>9.2f} {r['decode_tok_s']:>9.1f} "
            f"{r['prefill_ms']:>10.1f} {r['memory_bytes'] / GIB:>8.1f} {fits:>4}  "
            f"{r['why_slower'] or 'fastest that fits'}"
        )
    return "\n".join(lines)


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
        out = rank(args) if args.rank else explain(args)
    except (MoeExtError, HydraException) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    text = _format_rank(out) if args.rank else _format(out)
    print(json.dumps(out, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

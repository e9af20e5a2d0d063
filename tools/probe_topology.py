"""Print this machine's GPU topology as the planner sees it.

    python tools/probe_topology.py                     # tables: GPUs, pair matrix, summary
    python tools/probe_topology.py --json              # the parsed Topology as JSON
    python tools/probe_topology.py --record box.json   # also save the raw NVML/CUDA answers
    python tools/probe_topology.py --from-record box.json   # parse a saved record instead

A ``--record`` file is what to send us when the planner misjudges a machine: it holds the
driver's answers unparsed, and ``--from-record`` replays them anywhere. Works without
GPUs (a ``cpu`` topology).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from moe_ext.topology import GIB, Topology, TopologyError, parse_record, probe_record  # noqa: E402


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def gpu_rows(topo: Topology) -> list[list[str]]:
    rows = [["GPU", "name", "memory", "PCI bus id", "PCIe now/max", "NUMA", "CC"]]
    for g in topo.gpus:
        pcie = (
            f"Gen{g.pcie_gen or '?'}x{g.pcie_width or '?'} / "
            f"Gen{g.pcie_max_gen or '?'}x{g.pcie_max_width or '?'}"
        )
        cc = ".".join(map(str, g.compute_capability)) if g.compute_capability else "?"
        numa = "?" if g.numa_node is None else str(g.numa_node)
        rows.append(
            [
                str(g.index),
                g.name,
                f"{g.memory_bytes / GIB:.1f} GiB",
                g.pci_bus_id or "?",
                pcie,
                numa,
                cc,
            ]
        )
    return rows


def bandwidth_rows(topo: Topology) -> list[list[str]]:
    rows = [[""] + [f"GPU{g.index}" for g in topo.gpus]]
    for i in range(topo.num_gpus):
        rows.append(
            [f"GPU{i}"]
            + [
                "X" if i == j else f"{topo.pair_bandwidth_gbps(i, j):.0f}"
                for j in range(topo.num_gpus)
            ]
        )
    return rows


def render(topo: Topology) -> str:
    parts = []
    if topo.gpus:
        parts.append(format_table(gpu_rows(topo)))
    if topo.num_gpus >= 2:
        parts.append(format_table(topo.pair_matrix()))
        parts.append(
            "Legend: NV# = # NVLink links, PIX = at most one PCIe switch, "
            "PXB = several PCIe switches,\n"
            "PHB = through a PCIe host bridge, NODE = across host bridges of one NUMA "
            "node,\n"
            "SYS = across sockets; flags: p = P2P access, a = P2P native atomics, "
            "- = not supported."
        )
        parts.append(
            "Estimated copy bandwidth, GB/s per direction:\n" + format_table(bandwidth_rows(topo))
        )
    parts.append(format_table([[k, v] for k, v in topo.summary_rows()]))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the parsed topology as JSON")
    parser.add_argument("--record", metavar="FILE", help="write the raw NVML/CUDA answers to FILE")
    parser.add_argument(
        "--from-record", metavar="FILE", help="parse a saved raw record instead of probing"
    )
    parser.add_argument("--no-cuda", action="store_true", help="ask NVML only, not the CUDA driver")
    args = parser.parse_args(argv)
    if args.from_record and args.record:
        parser.error("--record writes a fresh probe; it cannot be combined with --from-record")

    try:
        if args.from_record:
            try:
                record = json.loads(Path(args.from_record).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise TopologyError(f"cannot read record {args.from_record}: {e}") from e
        else:
            record = probe_record(cuda=not args.no_cuda)
        if args.record:
            Path(args.record).write_text(json.dumps(record, indent=1) + "\n")
        topo = parse_record(record)
    except TopologyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(topo.to_json() if args.json else render(topo))
    if args.record and not args.json:
        print(f"\nraw record written to {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

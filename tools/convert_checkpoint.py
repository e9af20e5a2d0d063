#!/usr/bin/env python
"""Convert and check checkpoints: Hugging Face <-> moe_ext, and quantize.

  convert_checkpoint.py import-hf SRC DST [--dtype bf16|fp16|fp32] [--force] [--max-shard-size 5GB]
  convert_checkpoint.py export-hf SRC DST [--layout per-expert|fused] [--force]
                        [--max-shard-size 5GB]
  convert_checkpoint.py quantize SRC DST --format fp8|mxfp4 [--block 128 | --block 128 128]
                        [--layout per-expert|fused] [--force] [--max-shard-size 5GB]
  convert_checkpoint.py verify DIR
  convert_checkpoint.py export-megatron SRC DST [--force]
  convert_checkpoint.py import-megatron SRC DST [--dtype bf16|fp16|fp32] [--force]
                        [--max-shard-size 5GB]

export-megatron writes a Megatron-core distributed checkpoint (torch_dist) of GPTModel with
moe_ext's MoE layer, plus config.json and a manifest of the source tensors; import-megatron
reads it back into the moe_ext format and checks every tensor (bit-exact at the same dtype).
A torch_dist checkpoint contains pickles (.metadata, common.pt, objects in the .distcp
files); import-megatron unpickles only tensors and plain data from them and refuses
anything else. --trust-checkpoint lifts that and lets Megatron and torch unpickle the
files their own way, which can run code from them: only for a checkpoint you made
yourself, e.g. one whose objects hold Transformer Engine's FP8 recipe.

quantize reads a bf16/fp32 checkpoint (HF or moe_ext) and writes a Hugging Face checkpoint
of quantized weights: fp8 block-scaled (every linear but embeddings, lm_head, norms and
routers; --block gives the [rows, columns] of weight per scale, one number for square
blocks) or mxfp4 (routed experts only, the gpt-oss layout), with quantization_config in
config.json. export-hf and import-hf keep quantized tensors as they are; verify checks
scale shapes against their weights and block size, and the sha256 digests a conversion
wrote (moe_ext.json, or moe_ext.digests.json in a Hugging Face directory).

Hugging Face and moe_ext checkpoints are read as safetensors only, and every file name a
checkpoint gives (index, manifest, Megatron metadata) must lie inside its directory.
Writes into a temporary directory .DST.tmp-<pid> next to DST and renames it at the end: on
any error, Ctrl-C or SIGTERM nothing is left at DST; a temporary directory left by a
killed run (kill -9) is removed by the next run. --force replaces an existing DST
directory (never a file), and only once the new one is complete. Exit status 0 on
success, 1 on any problem (one line per problem on stderr), 128+N on signal N.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout without installing

from moe_ext.checkpoint.convert import (  # noqa: E402
    DEFAULT_MAX_SHARD_BYTES,
    export_hf,
    import_hf,
    parse_size,
    quantize,
    verify,
)
from moe_ext.checkpoint.errors import CheckpointError  # noqa: E402
from moe_ext.checkpoint.format import CAST_DTYPES  # noqa: E402
from moe_ext.checkpoint.hf_maps import LAYOUTS  # noqa: E402
from moe_ext.errors import MoeExtError  # noqa: E402


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the staged output directory is removed on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the clean-up
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    # library notices (stale temporary directories removed) as plain stderr lines
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        return _main(argv)
    except KeyboardInterrupt as e:
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        print(f"error: interrupted by {name}; the partial output was removed", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="Hugging Face directory -> moe_ext directory")
    imp.add_argument("src", type=Path)
    imp.add_argument("dst", type=Path)
    imp.add_argument(
        "--dtype", choices=CAST_DTYPES, default=None, help="cast floating tensors (default: keep)"
    )
    exp = sub.add_parser("export-hf", help="moe_ext (or HF) directory -> Hugging Face directory")
    exp.add_argument("src", type=Path)
    exp.add_argument("dst", type=Path)
    exp.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="per-expert",
        help="per-expert: what transformers save_pretrained writes; fused: stacked expert "
        "tensors (gpt_oss checkpoints have one expert layout, written either way)",
    )
    qua = sub.add_parser(
        "quantize", help="bf16/fp32 checkpoint -> quantized Hugging Face directory"
    )
    qua.add_argument("src", type=Path)
    qua.add_argument("dst", type=Path)
    qua.add_argument("--format", dest="method", choices=("fp8", "mxfp4"), required=True)
    qua.add_argument(
        "--block",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="fp8 weight_block_size: one size (N x N) or rows and columns (default 128)",
    )
    qua.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="per-expert",
        help="expert layout of the output (per-expert, as the published fp8 checkpoints; "
        "mxfp4 experts and gpt_oss are always fused)",
    )
    for p in (imp, exp, qua):
        p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
        p.add_argument(
            "--max-shard-size", default=str(DEFAULT_MAX_SHARD_BYTES), help="e.g. 5GB, 500MB"
        )
        p.add_argument("--no-progress", action="store_true")
    ver = sub.add_parser(
        "verify", help="check a moe_ext (shapes + checksums) or HF (shapes) directory"
    )
    ver.add_argument("dir", type=Path)
    ver.add_argument("--no-progress", action="store_true")
    _add_megatron_commands(sub)
    args = parser.parse_args(argv)
    if args.command in ("export-megatron", "import-megatron"):
        return _run_megatron_command(args)
    progress = not args.no_progress
    try:
        if args.command == "import-hf":
            entries = import_hf(
                args.src,
                args.dst,
                dtype=args.dtype,
                force=args.force,
                max_shard_bytes=parse_size(args.max_shard_size),
                progress=progress,
            )
            print(f"wrote {len(entries)} tensors to {args.dst}")
        elif args.command == "export-hf":
            entries = export_hf(
                args.src,
                args.dst,
                layout=args.layout,
                force=args.force,
                max_shard_bytes=parse_size(args.max_shard_size),
                progress=progress,
            )
            print(f"wrote {len(entries)} tensors to {args.dst} ({args.layout} layout)")
        elif args.command == "quantize":
            entries = quantize(
                args.src,
                args.dst,
                args.method,
                block=args.block,
                layout=args.layout,
                force=args.force,
                max_shard_bytes=parse_size(args.max_shard_size),
                progress=progress,
            )
            print(f"wrote {len(entries)} tensors to {args.dst} ({args.method})")
        else:
            problems = verify(args.dir, progress=progress)
            if problems:
                for line in problems:
                    print(f"error: {line}", file=sys.stderr)
                print(f"{args.dir}: {len(problems)} problem(s)", file=sys.stderr)
                return 1
            print(f"{args.dir}: OK")
    except MoeExtError as e:  # CheckpointError, QuantizationError: one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


# ---- Megatron-core distributed checkpoints (moe_ext.megatron.dist_ckpt) ---------------------


def _add_megatron_commands(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser(
        "export-megatron", help="moe_ext (or HF) directory -> Megatron distributed checkpoint"
    )
    exp.add_argument("src", type=Path)
    exp.add_argument("dst", type=Path)
    imp = sub.add_parser(
        "import-megatron", help="Megatron distributed checkpoint -> moe_ext directory"
    )
    imp.add_argument("src", type=Path)
    imp.add_argument("dst", type=Path)
    imp.add_argument(
        "--dtype", choices=CAST_DTYPES, default=None, help="cast floating tensors (default: keep)"
    )
    imp.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_BYTES), help="e.g. 5GB")
    imp.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="let Megatron and torch unpickle SRC's files their own way, which "
        "can run code from them (default: tensors and plain data only); "
        "only for checkpoints you made yourself",
    )
    for p in (exp, imp):
        p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
        p.add_argument("--no-progress", action="store_true")


def _run_megatron_command(args: argparse.Namespace) -> int:
    import logging
    import warnings

    # keep stderr to our one-line errors: megatron-core warns about Transformer Engine / Apex
    # it does not need here, deprecations, and layer specs it does not know (ours)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    warnings.filterwarnings("ignore", module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    progress = not args.no_progress
    try:
        from moe_ext.megatron.dist_ckpt import export_megatron, import_megatron

        if args.command == "export-megatron":
            entries = export_megatron(args.src, args.dst, force=args.force, progress=progress)
            print(f"wrote a Megatron checkpoint of {len(entries)} source tensors to {args.dst}")
        else:
            entries = import_megatron(
                args.src,
                args.dst,
                dtype=args.dtype,
                force=args.force,
                max_shard_bytes=parse_size(args.max_shard_size),
                progress=progress,
                trust_checkpoint=args.trust_checkpoint,
            )
            print(f"wrote {len(entries)} tensors to {args.dst}")
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(
            f"error: {args.command} needs megatron-core ({e}); pip install megatron-core",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

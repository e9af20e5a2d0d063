"""Generate text with a MoE model on N ranks (GPUs with NCCL, CPU processes with gloo).

    torchrun --nproc-per-node 2 launch/infer.py +topology=pcie
    torchrun --nproc-per-node 2 launch/infer.py strategy=ep_nccl generate.max_new_tokens=64
    python launch/infer.py checkpoint=/models/Qwen3-30B-A3B prompts=in.jsonl output=out.jsonl

An error is one line and exit 2; MOE_EXT_DEBUG=1 (or debug=true) adds its traceback. The
job itself is moe_ext.cli.infer; this entry point only hands it the environment.
"""

import os
import sys
from pathlib import Path

import hydra

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from moe_ext.cli import infer  # noqa: E402
from moe_ext.config import register_configs  # noqa: E402
from moe_ext.launching import check_command_line  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg) -> None:
    infer.main(cfg, os.environ)


if __name__ == "__main__":
    register_configs()
    check_command_line(sys.argv[1:], os.environ, REPO / "conf")
    main()

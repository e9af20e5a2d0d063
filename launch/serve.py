"""Serve a MoE model over the OpenAI HTTP API on N ranks (GPUs with NCCL, CPU processes with
gloo): rank 0 answers HTTP, every rank runs the continuous-batching engine in lockstep.

    torchrun --nproc-per-node 2 launch/serve.py +topology=pcie checkpoint=/models/Qwen3-30B-A3B
    torchrun --nproc-per-node 2 launch/serve.py strategy=ep_nccl server.port=8001
    python launch/serve.py server.host=0.0.0.0 server.max_batch_size=16

An error is one line and exit 2; MOE_EXT_DEBUG=1 (or debug=true) adds its traceback. SIGTERM
drains (in-flight requests finish, exit 0). The job itself is moe_ext.cli.serve; this entry
point only hands it the environment.
"""

import os
import sys
from pathlib import Path

import hydra

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from moe_ext.cli import serve  # noqa: E402
from moe_ext.config import register_configs  # noqa: E402
from moe_ext.launching import check_command_line  # noqa: E402


@hydra.main(config_path="../conf", config_name="serve", version_base=None)
def main(cfg) -> None:
    serve.main(cfg, os.environ)


if __name__ == "__main__":
    register_configs()
    check_command_line(sys.argv[1:], os.environ, REPO / "conf")
    main()

"""Train (or fine-tune) a MoE model on N ranks with the same model/strategy/parallel/topology
configs as inference: DeepSpeed (`engine=deepspeed`, GPUs with NCCL or CPU processes with
gloo) or Megatron-core's GPTModel with our MoE layer (`engine=megatron`, GPUs).

    python launch/train.py                                   # tiny model, shipped corpus, CPU
    torchrun --nproc-per-node 2 launch/train.py strategy=ep_nccl train.steps=200
    torchrun --nproc-per-node 2 launch/train.py strategy=replicate train.zero_stage=2
    python launch/train.py data=my.jsonl checkpoint=/models/tiny-moe train.lr=1e-4
    python launch/train.py resume=outputs/train/<date>/<time>/checkpoints train.steps=2000

The shipped ``moe_ext/data/checkpoints/tiny`` was made by (about 6 minutes on 2 idle CPU
cores):

    python launch/train.py export=moe_ext/data/checkpoints/tiny train.overwrite_export=true

An error is one line and exit 2; MOE_EXT_DEBUG=1 (or debug=true) adds its traceback. The
run itself is moe_ext.cli.train; this entry point only hands it the environment.
"""

import os
import sys
from pathlib import Path

import hydra

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from moe_ext.cli import train  # noqa: E402
from moe_ext.launching import check_command_line  # noqa: E402
from moe_ext.train.config import register_train_configs  # noqa: E402


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    train.main(cfg, os.environ, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    register_train_configs()
    check_command_line(sys.argv[1:], os.environ, REPO / "conf")
    main()

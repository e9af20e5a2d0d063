"""Launcher configs for tests, built without Hydra's command line."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_conf(schema, **overrides):
    """``schema`` (InferConf / TrainConf) for the tiny model with dotted-key overrides,
    e.g. ``tiny_conf(TrainConf, **{"train.steps": 3})``."""
    from omegaconf import OmegaConf

    from moe_ext.config import ParallelConf, StrategyConf

    model = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny.yaml"))
    cfg = schema(model=model, strategy=StrategyConf(name="auto"),
                 parallel=ParallelConf())
    for key, value in overrides.items():
        target = cfg
        *path, leaf = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return cfg

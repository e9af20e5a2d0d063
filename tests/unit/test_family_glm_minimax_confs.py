"""The shipped conf/model shapes of GLM-4.5-Air, MiniMax-M2 and Qwen3-235B-A22B: the
planner's parameter count (from param_shapes) equals transformers' model built from the
same config on the meta device, and matches the published size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from moe_ext.model.args import ModelArgs
from moe_ext.plan import model_param_counts

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]

# name -> (published total parameters in billions, our exact count in billions); the
# published figures leave out the MTP layers the checkpoints also store
SIZES = {
    "glm_4_5_air": (106.0, 106.85),  # "106B total, 12B active" (GLM-4.5 report)
    "minimax_m2": (230.0, 228.69),  # "230B total, 10B active" (MiniMax-M2 model card)
    "qwen3_235b_a22b": (235.0, 235.09),  # "235B total, 22B active"
}


def _args(name: str) -> ModelArgs:
    return ModelArgs.from_model_conf(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))


@pytest.mark.parametrize("name", sorted(SIZES))
def test_conf_has_its_published_size(name):
    published, exact = SIZES[name]
    total, experts = model_param_counts(_args(name))
    assert abs(total / 1e9 - exact) < 0.01
    assert abs(total / 1e9 - published) / published < 0.01
    assert experts < total


@pytest.mark.parametrize("name", sorted(SIZES))
def test_param_count_equals_transformers_model_of_the_same_config(name):
    """transformers builds the model from our exported config.json (meta device, no
    memory): its state dict (parameters and the routers' correction biases) has exactly the
    tensors and sizes param_shapes lists, under the HF names."""
    args = _args(name)
    config = args.family.hf_config(args)
    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    theirs = sum(t.numel() for t in model.state_dict().values())
    total, _ = model_param_counts(args)
    assert total == theirs

"""The model family registry: one ``Family`` per Hugging Face ``model_type``.

Adding a family is one module here (a ``Family`` subclass: config keys, HF names, and
block builders where it differs) plus one line in ``_FAMILIES``; the decoder, the planner's
memory count and the checkpoint maps all go through it (docs/ARCHITECTURE.md, "Adding a
model family").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moe_ext.model.args import ModelArgs, ModelArgsError
from moe_ext.model.families.base import DOWN, GATE_UP, LAUNCH_KEYS, Family, expert_param
from moe_ext.model.families.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from moe_ext.model.families.fields import ConfigFields, ModelConfigError
from moe_ext.model.families.glm import FAMILY as GLM4_MOE
from moe_ext.model.families.gpt_oss import FAMILY as GPT_OSS
from moe_ext.model.families.minimax import FAMILY as MINIMAX_M2
from moe_ext.model.families.mixtral import FAMILY as MIXTRAL
from moe_ext.model.families.qwen_moe import QWEN2_MOE, QWEN3_MOE

_FAMILIES: tuple[Family, ...] = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, DEEPSEEK_V2, DEEPSEEK_V3)
_FAMILIES += (GLM4_MOE, MINIMAX_M2)
_FAMILIES += (GPT_OSS,)
REGISTRY: dict[str, Family] = {name: f for f in _FAMILIES for name in (f.model_type, *f.aliases)}
MODEL_TYPES: tuple[str, ...] = tuple(f.model_type for f in _FAMILIES)


def get_family(model_type: Any, source: str = "config") -> Family:
    family = REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ModelArgsError(
            f"{source}: unknown model_type {model_type!r}; supported "
            f"families: {', '.join(sorted(REGISTRY))}"
        )
    return family


def args_from_hf_config(config: Mapping[str, Any], source: str = "config.json") -> ModelArgs:
    """ModelArgs of a Hugging Face ``config.json`` dict; keys no family reads are ignored
    (HF configs carry many: architectures, torch_dtype, ...)."""
    if not isinstance(config, Mapping):
        raise ModelConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
    family = get_family(config.get("model_type"), source)
    return family.args_from_config(ConfigFields(config, source))


def args_from_model_conf(conf: Mapping[str, Any], source: str = "model config") -> ModelArgs:
    """ModelArgs of a ``conf/model`` entry (Hugging Face keys plus the launch keys name,
    tokenizer, weights, init_seed). A key no family reads is a typo and an error."""
    family = get_family(conf.get("model_type"), source)
    fields = ConfigFields(conf, source)
    args = family.args_from_config(fields)
    for key in ("model_type", *LAUNCH_KEYS):
        fields.raw(key)
    unknown = fields.unread()
    if unknown:
        raise ModelConfigError(
            f"{source}: unknown field(s) {', '.join(unknown)} for model_type "
            f"{family.model_type}; check the spelling against the model's "
            f"Hugging Face config.json"
        )
    return args


__all__ = [
    "DOWN",
    "GATE_UP",
    "MODEL_TYPES",
    "REGISTRY",
    "ConfigFields",
    "Family",
    "ModelConfigError",
    "args_from_hf_config",
    "args_from_model_conf",
    "expert_param",
    "get_family",
]

"""Name maps between Hugging Face checkpoints and native (moe_ext) names.

Native names are those of docs/ARCHITECTURE.md "Parameter names" (no ``model.`` prefix,
stacked experts); each family's ``param_shapes`` (moe_ext.model.families) lists them.
Hugging Face stores experts in one of two layouts:
  per-expert (legacy; what transformers 5 ``save_pretrained`` still writes):
    model.layers.{i}.<moe block>.experts.{j}.<gate|up|down part>.weight
    model.layers.{i}.<moe block>.gate.weight                            (router)
    where the family names the block and parts (mixtral: block_sparse_moe, w1/w3/w2;
    qwen*_moe: mlp, gate_proj/up_proj/down_proj)
  fused (transformers 5 in-memory names, loadable as they are):
    model.layers.{i}.mlp.experts.gate_up_proj [E, 2F, H], .down_proj [E, H, F],
    model.layers.{i}.mlp.gate.weight
Every other tensor is ``model.<native name>`` (``lm_head.weight`` has no prefix).

A family may store some expert tensors in another layout than the native one
(``Family.hf_expert_transforms``; gpt_oss, whose router is ``mlp.router.weight`` / ``.bias``):
  transposed:             stored [E, F, H]  <-> native down_proj [E, H, F]
  interleaved:            stored [E, 2F], column 2j gate j, 2j+1 up j
                          <-> native [E, 2F], gate columns then up columns
  interleaved_transposed: stored [E, H, 2F] interleaved so <-> native [E, 2F, H]
Such a family has that one expert layout: it is read and written in it whatever the
``layout`` argument says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from moe_ext.checkpoint.errors import CheckpointError
from moe_ext.errors import MoeExtError
from moe_ext.model.args import ModelArgs
from moe_ext.model.families import (
    DOWN,
    GATE_UP,
    REGISTRY,
    Family,
    args_from_hf_config,
    expert_param,
    get_family,
)

LAYOUTS = ("per-expert", "fused")
STORED_TRANSFORMS = ("transposed", "interleaved", "interleaved_transposed")
__all__ = [
    "STORED_TRANSFORMS",
    "DOWN",
    "GATE_UP",
    "LAYOUTS",
    "HFKey",
    "config_args",
    "expert_tensor",
    "family_of",
    "hf_expert_keys",
    "hf_key",
    "is_ignored_hf_key",
    "native_shapes",
    "parse_hf_key",
    "stored_shape",
    "stored_transform",
    "to_stored",
]


def _family(model_type: Any) -> Family:
    try:
        return get_family(model_type, "config.json")
    except MoeExtError as err:
        raise CheckpointError(str(err)) from err


def family_of(config: dict[str, Any]) -> str:
    """The canonical model_type of a checkpoint's config (aliases resolved)."""
    return _family(config.get("model_type")).model_type


def config_args(config: dict[str, Any]) -> ModelArgs:
    """The ModelArgs a checkpoint's ``config.json`` describes (CheckpointError if bad)."""
    _family(config.get("model_type"))
    try:
        return args_from_hf_config(config)
    except MoeExtError as err:
        raise CheckpointError(str(err)) from err


def native_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every native tensor name the config implies, with its unsharded shape, in model order."""
    args = config_args(config)
    return args.family.param_shapes(args)


expert_tensor = expert_param


# ---- Hugging Face -> native ------------------------------------------------------------


def _alternatives(names: set[str]) -> str:
    return "|".join(sorted(map(re.escape, names)))


_BLOCKS = _alternatives({f.hf_moe_block for f in REGISTRY.values()} | {"mlp"})
_PARTS = {
    name: kind
    for f in REGISTRY.values()
    for name, kind in zip(f.hf_expert_parts, ("gate", "up", "down"))
}
_HF_PER_EXPERT = re.compile(
    rf"^layers\.(\d+)\.(?:{_BLOCKS})\.experts\.(\d+)\."
    rf"({_alternatives(set(_PARTS))})\.weight$"
)
_HF_FUSED = re.compile(rf"^layers\.(\d+)\.(?:{_BLOCKS})\.experts\.(gate_up_proj|down_proj)$")
_HF_ROUTER = re.compile(rf"^layers\.(\d+)\.(?:{_BLOCKS})\.gate\.weight$")
_ROUTER_NATIVE = re.compile(r"^layers\.(\d+)\.mlp\.router\.weight$")

# Tensors some HF checkpoints carry that no model parameter corresponds to.
_HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class HFKey:
    """Where an HF tensor goes: a native name, plus expert index and part for per-expert keys."""

    native: str
    expert: Optional[int] = None  # per-expert layout only
    part: Optional[str] = None  # "gate" | "up" | "down" (per-expert layout only)


def is_ignored_hf_key(key: str) -> bool:
    return bool(_HF_IGNORED.search(key))


def parse_hf_key(key: str, family: Optional[str] = None) -> HFKey:
    """Native destination of one Hugging Face tensor name (any supported layout) of a
    checkpoint of ``family`` (its ``hf_renames`` undone; None: no renames)."""
    name = key[len("model.") :] if key.startswith("model.") else key
    if family is not None:
        for native, hf in _family(family).hf_renames:
            name = name.replace(hf, native)
    m = _HF_PER_EXPERT.match(name)
    if m:
        part = _PARTS[m.group(3)]
        stacked = DOWN if part == "down" else GATE_UP
        return HFKey(f"layers.{m.group(1)}.mlp.experts.{stacked}", int(m.group(2)), part)
    m = _HF_FUSED.match(name)
    if m:
        return HFKey(f"layers.{m.group(1)}.mlp.experts.{m.group(2)}")
    m = _HF_ROUTER.match(name)
    if m:
        return HFKey(f"layers.{m.group(1)}.mlp.router.weight")
    return HFKey(name)


# ---- native -> Hugging Face ------------------------------------------------------------


def hf_key(native: str, family: str, layout: str) -> str:
    """HF name of a non-expert tensor, or of a stacked expert tensor in the fused layout."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if native == "lm_head.weight":
        return native
    m = _ROUTER_NATIVE.match(native)
    if m:
        fam = _family(family)
        return fam.hf_moe_prefix(int(m.group(1)), layout) + f"{fam.hf_router}.weight"
    if expert_param(native) and layout == "per-expert":
        raise CheckpointError(
            f"{native} is stored per expert in the per-expert layout; use hf_expert_keys"
        )
    for native_part, hf_part in _family(family).hf_renames_for(layout):
        native = native.replace(native_part, hf_part)
    return "model." + native


def hf_expert_keys(native: str, family: str, expert: int) -> list[str]:
    """Per-expert HF names holding expert ``expert`` of a stacked tensor, in row order of
    ``native[expert]``: [gate, up] for gate_up_proj, [down] for down_proj."""
    found = expert_param(native)
    if found is None:
        raise CheckpointError(f"{native} is not a stacked expert tensor")
    layer, stacked = found
    return _family(family).hf_expert_keys(layer, stacked, expert)


# ---- expert tensors stored in another layout (gpt_oss) ---------------------------------


def stored_transform(native: str, family: str) -> Optional[str]:
    """How ``family``'s checkpoints store native tensor ``native`` (one of
    STORED_TRANSFORMS), None when stored as it is."""
    for suffix, transform in _family(family).hf_expert_transforms:
        if native.endswith(".mlp." + suffix):
            return transform
    return None


def stored_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape of a native tensor of ``shape`` under ``transform``."""
    if transform == "interleaved":
        return shape
    return (shape[0], shape[2], shape[1])  # the last two dims swapped


def to_stored(transform: str, native: torch.Tensor) -> torch.Tensor:
    """Native -> stored layout (contiguous). native: [E, 2F] / [E, 2F, H] / [E, H, F]."""
    t = native
    if transform != "interleaved":
        t = t.transpose(1, 2)  # [E, H, 2F] / [E, F, H]
    if transform != "transposed":
        gate, up = t.chunk(2, dim=-1)  # [..., F] each
        t = torch.stack((gate, up), dim=-1).flatten(-2)  # [..., 2F]: gate j, up j pairs
    return t.contiguous()

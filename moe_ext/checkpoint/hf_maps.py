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

Quantized checkpoints (``moe_ext.quant.layout``) hold *stored* tensors: a quantized weight
``P`` comes with ``P_scale_inv`` (fp8) or is ``P_blocks`` + ``P_scales`` (mxfp4). Their HF
names follow the weight's: ``q_proj.weight`` -> ``q_proj.weight_scale_inv``; per expert
``experts.{j}.gate_proj.weight_scale_inv`` (scale rows stacked gate then up, like the
weight's rows); fused ``experts.gate_up_proj_scale_inv`` / ``_blocks`` / ``_scales``. MXFP4
parts keep the native [out, in] orientation; a family whose gate_up_proj is stored
interleaved (gpt_oss) stores their rows interleaved gate/up (``interleaved_rows``):
  interleaved_rows:       stored [E, 2F, ...], row 2j gate j, 2j+1 up j
                          <-> native [E, 2F, ...], gate rows then up rows
MXFP4 experts have no per-expert HF layout: they are read and written fused.
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
from moe_ext.quant.layout import StoredTensor, stored_tensors

LAYOUTS = ("per-expert", "fused")
STORED_TRANSFORMS = ("transposed", "interleaved", "interleaved_transposed", "interleaved_rows")
QUANT_SUFFIXES = ("_scale_inv", "_blocks", "_scales")  # stored parts of a quantized weight
MXFP4_PARTS = ("_blocks", "_scales")
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
    "split_stored",
    "stored_specs",
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
    """The ModelArgs a checkpoint's ``config.json`` describes (CheckpointError if bad, a
    bad ``quantization_config`` included)."""
    _family(config.get("model_type"))
    try:
        return args_from_hf_config(config)
    except MoeExtError as err:
        raise CheckpointError(str(err)) from err


def stored_specs(config: dict[str, Any]) -> dict[str, StoredTensor]:
    """Every tensor a checkpoint of ``config`` holds, by native stored name (the quantized
    model's ``state_dict`` names; the logical names for an unquantized one), in model order."""
    return stored_tensors(config_args(config))


def split_stored(name: str) -> tuple[str, str]:
    """(logical name, quant suffix or "") of a stored name:
    ``layers.0.mlp.experts.gate_up_proj_scale_inv`` -> (``...gate_up_proj``, ``_scale_inv``)."""
    for suffix in QUANT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def stored_expert(name: str) -> Optional[tuple[int, str]]:
    """``(layer, "gate_up_proj" | "down_proj")`` for a stored routed-expert tensor (the
    weight or one of its quantized parts), else None."""
    return expert_param(split_stored(name)[0])


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
    rf"({_alternatives(set(_PARTS))})\.weight(_scale_inv)?$"
)
_HF_FUSED = re.compile(
    rf"^layers\.(\d+)\.(?:{_BLOCKS})\.experts\.(gate_up_proj|down_proj)"
    rf"(_scale_inv|_blocks|_scales)?$"
)
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
        native = f"layers.{m.group(1)}.mlp.experts.{stacked}{m.group(4) or ''}"
        return HFKey(native, int(m.group(2)), part)
    m = _HF_FUSED.match(name)
    if m:
        return HFKey(f"layers.{m.group(1)}.mlp.experts.{m.group(2)}{m.group(3) or ''}")
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
    if stored_expert(native) and native.endswith(MXFP4_PARTS):
        layout = "fused"  # MXFP4 experts have no per-expert layout
    if stored_expert(native) and layout == "per-expert":
        raise CheckpointError(
            f"{native} is stored per expert in the per-expert layout; use hf_expert_keys"
        )
    for native_part, hf_part in _family(family).hf_renames_for(layout):
        native = native.replace(native_part, hf_part)
    return "model." + native


def hf_expert_keys(native: str, family: str, expert: int) -> list[str]:
    """Per-expert HF names holding expert ``expert`` of a stacked tensor (or its fp8
    ``_scale_inv``), in row order of ``native[expert]``: [gate, up] for gate_up_proj,
    [down] for down_proj."""
    logical, suffix = split_stored(native)
    found = expert_param(logical)
    if found is None or suffix not in ("", "_scale_inv"):
        raise CheckpointError(f"{native} is not a stacked expert tensor of a per-expert layout")
    layer, stacked = found
    return [key + suffix for key in _family(family).hf_expert_keys(layer, stacked, expert)]


def per_expert_layout(native: str) -> bool:
    """Whether stacked expert tensor ``native`` has a per-expert HF layout (MXFP4 parts
    are only ever stored fused)."""
    return stored_expert(native) is not None and not native.endswith(MXFP4_PARTS)


# ---- expert tensors stored in another layout (gpt_oss) ---------------------------------


def stored_transform(native: str, family: str) -> Optional[str]:
    """How ``family``'s checkpoints store native tensor ``native`` (one of
    STORED_TRANSFORMS), None when stored as it is. MXFP4 parts of a weight stored
    ``interleaved_transposed`` are ``interleaved_rows`` (never transposed); fp8 never
    reaches a transformed weight (``moe_ext.quant.layout.check_args`` refuses it)."""
    logical, suffix = split_stored(native)
    for name, transform in _family(family).hf_expert_transforms:
        if not logical.endswith(".mlp." + name):
            continue
        if not suffix:
            return transform
        return "interleaved_rows" if transform == "interleaved_transposed" else None
    return None


def stored_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape of a native tensor of ``shape`` under ``transform``."""
    if transform in ("interleaved", "interleaved_rows"):
        return shape
    return (shape[0], shape[2], shape[1])  # the last two dims swapped


def to_stored(transform: str, native: torch.Tensor) -> torch.Tensor:
    """Native -> stored layout (contiguous). native: [E, 2F] / [E, 2F, H] / [E, H, F] /
    (interleaved_rows) [E, 2F, ...]."""
    t = native
    if transform == "interleaved_rows":
        gate, up = t.chunk(2, dim=1)  # [E, F, ...] each
        return torch.stack((gate, up), dim=2).flatten(1, 2).contiguous()  # rows gate j, up j
    if transform != "interleaved":
        t = t.transpose(1, 2)  # [E, H, 2F] / [E, F, H]
    if transform != "transposed":
        gate, up = t.chunk(2, dim=-1)  # [..., F] each
        t = torch.stack((gate, up), dim=-1).flatten(-2)  # [..., 2F]: gate j, up j pairs
    return t.contiguous()

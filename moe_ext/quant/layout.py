"""Which tensors a quantized model stores, their shapes and dtypes, and the parts of them a
rank reads.

A model description (``ModelArgs``) names *logical* tensors (``Family.param_shapes``: the
weights as the model computes with them). With ``args.quantization`` set, each quantized
logical weight ``P`` [..., R, C] is stored as

- fp8:   ``P`` float8_e4m3fn [..., R, C] and ``P_scale_inv`` float32 [..., ceil(R/bo), ceil(C/bi)]
- mxfp4: ``P_blocks`` uint8 [..., R, C/32, 16] and ``P_scales`` uint8 [..., R, C/32]

(Hugging Face's names: ``q_proj.weight`` -> ``q_proj.weight_scale_inv``;
``experts.gate_up_proj`` -> ``experts.gate_up_proj_blocks``). Everything else is stored as
it is computed with, in the model dtype. ``stored_tensors`` is that list, and the model's
``state_dict``, the checkpoint maps, the random init and the planner's byte count all read it.

A rank's slice of a quantized weight (``shard_slices`` gives it on the logical shape) maps
to slices of the stored tensors; a slice edge inside a scale block cannot be read, and
``stored_requests`` refuses it naming the tensor (the planner calls it for every rank, so
such a plan is refused before any weight is read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from moe_ext.quant.config import MXFP4_GROUP, QuantConfig, QuantizationError
from moe_ext.quant.formats import (
    FP8_DTYPE,
    FP8_SCALE,
    MXFP4_BLOCKS,
    MXFP4_SCALES,
    fp8_scale_shape,
    mxfp4_shapes,
)

if TYPE_CHECKING:
    from moe_ext.checkpoint.shard import ShardRequest
    from moe_ext.model.args import ModelArgs

_EXPERT = re.compile(r"^layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")
# 2-D ``.weight`` tensors that are not linear projections, or that checkpoints keep in
# the model dtype: embeddings, the output head, norms, routers and gates.
_NEVER = re.compile(
    r"(^embed_tokens\.|^lm_head\.|norm\.weight$|\.mlp\.router\.|\.mlp\.gate\.|shared_expert_gate\.)"
)


@dataclass(frozen=True)
class StoredTensor:
    """One tensor a checkpoint and the model's state_dict hold.

    shape: full (unsharded) shape; dtype: None = the model dtype; logical: the weight it
    belongs to (itself when not quantized); role: weight | scale_inv | blocks | scales."""

    shape: tuple[int, ...]
    dtype: Optional[torch.dtype]
    logical: str
    role: str = "weight"


def is_expert_weight(name: str) -> bool:
    return _EXPERT.match(name) is not None


def _hf_module(name: str, args: "ModelArgs") -> str:
    """The HF module path of logical tensor ``name`` (for modules_to_not_convert)."""
    from moe_ext.checkpoint.hf_maps import hf_key

    return hf_key(name, args.model_type, "fused").rsplit(".", 1)[0]


def quantized_weights(args: "ModelArgs") -> dict[str, tuple[int, ...]]:
    """Logical weights ``args.quantization`` stores quantized, with their full shapes."""
    quant = args.quantization
    if quant is None:
        return {}
    out = {}
    for name, shape in args.family.param_shapes(args).items():
        if is_expert_weight(name):
            wanted = True
        elif quant.method == "fp8":
            wanted = name.endswith(".weight") and len(shape) == 2 and not _NEVER.search(name)
        else:
            wanted = False  # mxfp4 checkpoints quantize routed experts only
        if wanted and quant.converts(_hf_module(name, args)):
            out[name] = shape
    return out


def stored_tensors(args: "ModelArgs") -> dict[str, StoredTensor]:
    """Every tensor the model and its checkpoints hold, in state_dict order."""
    quantized = quantized_weights(args)
    out: dict[str, StoredTensor] = {}
    for name, shape in args.family.param_shapes(args).items():
        if name not in quantized:
            out[name] = StoredTensor(shape, None, name)
        elif args.quantization.method == "fp8":
            out[name] = StoredTensor(shape, FP8_DTYPE, name)
            scale = fp8_scale_shape(shape, args.quantization.block)
            out[name + FP8_SCALE] = StoredTensor(scale, torch.float32, name, "scale_inv")
        else:
            blocks, scales = mxfp4_shapes(shape)
            out[name + MXFP4_BLOCKS] = StoredTensor(blocks, torch.uint8, name, "blocks")
            out[name + MXFP4_SCALES] = StoredTensor(scales, torch.uint8, name, "scales")
    return out


def check_args(args: "ModelArgs") -> None:
    """Shape facts a quantized model needs, as one line naming the field."""
    quant = args.quantization
    if quant is None:
        return
    F = args.moe_intermediate_size
    # weights a family's checkpoints store transposed or interleaved: fp8 blocks of the
    # stored layout are not blocks of the native one (the checkpoint maps rely on this)
    transformed = [
        (name, transform)
        for name, transform in args.family.hf_expert_transforms
        if name in ("experts.gate_up_proj", "experts.down_proj")
    ]
    if quant.method == "fp8" and transformed:
        name, transform = transformed[0]
        raise QuantizationError(
            f"fp8 {args.model_type}: its checkpoints store {name} {transform}, across fp8's "
            f"scale blocks; use mxfp4 (the format {args.model_type} ships in)"
        )
    if quant.method == "fp8" and F % quant.block[0]:
        raise QuantizationError(
            f"fp8 experts: moe_intermediate_size {F} is not a multiple of the block rows "
            f"{quant.block[0]} (gate and up rows are scaled in separate blocks); use "
            f"weight_block_size rows that divide {F}"
        )
    if quant.method == "mxfp4":
        for name, shape in quantized_weights(args).items():
            if shape[-1] % MXFP4_GROUP:
                raise QuantizationError(
                    f"mxfp4: {name} has {shape[-1]} input columns, not a multiple of "
                    f"{MXFP4_GROUP}; such a model cannot be stored in mxfp4"
                )


def _scale_bounds(name: str, bounds, shape, block: tuple[int, int], what: str):
    """Map one box's (start, stop) bounds on the last two dims to scale-grid bounds."""
    out = list(bounds[:-2])
    for (a, b), size, step, dim in zip(bounds[-2:], shape[-2:], block, ("rows", "columns")):
        if a % step or (b % step and b != size):
            raise QuantizationError(
                f"{name}: this rank's {dim} [{a}, {b}) cut {what} blocks of {step}; "
                f"choose a parallel degree whose slices are multiples of {step}"
            )
        out.append((a // step, -(-b // step)))
    return tuple(out)


def _mapped(request: "ShardRequest", name, shape, block, what, tail=0) -> "ShardRequest":
    from moe_ext.checkpoint.shard import ShardRequest

    boxes = []
    for bounds in request.bounds(shape):
        mapped = _scale_bounds(name, bounds, shape, block, what)
        boxes.append(tuple(slice(a, b) for a, b in mapped) + (slice(None),) * tail)
    return ShardRequest(boxes=tuple(boxes), cat_dim=request.cat_dim)


def stored_requests(
    requests: dict[str, "ShardRequest"], args: "ModelArgs"
) -> dict[str, "ShardRequest"]:
    """``shard_slices``' requests (logical names) -> requests on the stored tensors.
    QuantizationError names a weight whose slice cuts a scale block."""
    quant: Optional[QuantConfig] = args.quantization
    quantized = quantized_weights(args)
    out: dict[str, "ShardRequest"] = {}
    for name, request in requests.items():
        shape = quantized.get(name)
        if shape is None:
            out[name] = request
        elif quant.method == "fp8":
            out[name] = request
            out[name + FP8_SCALE] = _mapped(request, name, shape, quant.block, "fp8 scale")
        else:
            out[name + MXFP4_BLOCKS] = _mapped(request, name, shape, quant.block, "mxfp4", 1)
            out[name + MXFP4_SCALES] = _mapped(request, name, shape, quant.block, "mxfp4")
    return out


def quantize_state(state: dict[str, torch.Tensor], args: "ModelArgs") -> dict[str, torch.Tensor]:
    """Logical tensors (full or one rank's aligned slices) -> the stored tensors."""
    from moe_ext.quant.formats import quantize_fp8, quantize_mxfp4

    quant = args.quantization
    quantized = quantized_weights(args)
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name not in quantized:
            out[name] = value
        elif quant.method == "fp8":
            out[name], out[name + FP8_SCALE] = quantize_fp8(value, quant.block)
        else:
            out[name + MXFP4_BLOCKS], out[name + MXFP4_SCALES] = quantize_mxfp4(value)
    return out


def dequantize_state(
    state: dict[str, torch.Tensor], args: "ModelArgs", dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """Stored tensors -> logical tensors (quantized ones dequantized to ``dtype``)."""
    from moe_ext.quant.formats import dequantize_fp8, dequantize_mxfp4

    quant = args.quantization
    out: dict[str, torch.Tensor] = {}
    for name, spec in stored_tensors(args).items():
        if name not in state:
            continue
        if spec.role == "weight" and spec.dtype is None:
            out[name] = state[name]
        elif spec.role == "weight":
            out[name] = dequantize_fp8(state[name], state[name + FP8_SCALE], quant.block, dtype)
        elif spec.role == "blocks":
            out[spec.logical] = dequantize_mxfp4(
                state[name], state[spec.logical + MXFP4_SCALES], dtype
            )
    return out

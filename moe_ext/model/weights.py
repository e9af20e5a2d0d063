"""Deterministic random weights: the same model at every world size and strategy.

Every full tensor is a concatenation of *chunks* (one expert, one attention head, a block
of vocabulary rows, or the whole tensor), and chunk c of tensor ``name`` is drawn from its
own generator seeded with ``seed`` and a hash of ``(name, c)``. A rank that holds only a
slice generates just the chunks its slice touches, directly on its device, so a sharded
model equals the slices of the full one (on the same device type: CPU and CUDA generators
draw different numbers).

# E experts, H hidden, F FFN size, D head dim, V vocab
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch
from torch import nn

from moe_ext.checkpoint.shard import ShardRequest
from moe_ext.model.args import ModelArgs
from moe_ext.quant.layout import quantize_state, stored_tensors

VOCAB_CHUNK_ROWS = 4096
EXPERTS_PER_DRAW = 8  # random init of stacked expert tensors, this many experts at a time


def _chunk_rule(name: str, args: ModelArgs) -> tuple[int, int]:
    """(dim, chunk length along it); length 0 = the whole tensor is one chunk."""
    if ".mlp.experts." in name:
        return 0, 1  # one expert
    if ".self_attn." in name and name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
        return 0, args.head_dim  # one head (weight rows and bias)
    if name.endswith("self_attn.o_proj.weight"):
        return 1, args.head_dim
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return 0, VOCAB_CHUNK_ROWS
    return 0, 0


def _kind(name: str) -> str:
    if name.endswith("norm.weight"):
        return "ones"
    if name.endswith(".bias"):
        return "bias"
    return "normal"


def _seed(seed: int, name: str, chunk: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}#{chunk}".encode())) % (2**63)


def _std(name: str, shape: tuple[int, ...]) -> float:
    if name in ("embed_tokens.weight",):
        return 1.0  # unit-scale embeddings: RMSNorm follows
    fan_in = shape[-1]
    return fan_in**-0.5


def _chunk(
    name: str, shape: tuple[int, ...], dim: int, index: int, length: int, seed: int, device
) -> torch.Tensor:
    """Chunk ``index`` (rows [index·length, ...) of dim ``dim``) of full tensor ``name``."""
    kind = _kind(name)
    chunk_shape = list(shape)
    if length:
        chunk_shape[dim] = min(length, shape[dim] - index * length)
    if kind == "ones":
        return torch.ones(chunk_shape, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed(seed, name, index))
    std = 0.02 if kind == "bias" else _std(name, shape)
    return torch.randn(chunk_shape, generator=gen, dtype=torch.float32, device=device) * std


def random_tensor(
    name: str,
    shape: tuple[int, ...],
    args: ModelArgs,
    seed: int,
    request: Optional[ShardRequest] = None,
    device="cpu",
) -> torch.Tensor:
    """The (slice ``request`` of the) full random tensor ``name`` of ``shape``, fp32. The
    values are those of ``device``'s generator type: every plan on CUDA draws the same
    weights, but not the CPU's (compare GPU shards with a CPU reference drawn on the CPU)."""
    request = request or ShardRequest.full()
    dim, length = _chunk_rule(name, args)
    pieces = []
    for box in request.bounds(shape):
        a, b = box[dim] if box else (0, shape[dim])
        if not length:
            first, last = 0, 0
        else:
            first, last = a // length, (b - 1) // length if b > a else a // length - 1
        chunks = [_chunk(name, shape, dim, c, length, seed, device) for c in range(first, last + 1)]
        if not chunks:
            empty = list(shape)
            empty[dim] = 0
            block = torch.empty(empty, dtype=torch.float32, device=device)
        else:
            block = torch.cat(chunks, dim=dim) if len(chunks) > 1 else chunks[0]
        offset = first * length if length else 0
        index = [slice(x0, x1) for x0, x1 in box] if box else [slice(None)] * len(shape)
        index[dim] = slice(a - offset, b - offset)
        pieces.append(block[tuple(index)])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=request.cat_dim)


def init_random_full(args: ModelArgs, seed: Optional[int] = None) -> dict[str, torch.Tensor]:
    """All full logical tensors (quantized weights before quantization), fp32 on CPU (fine
    for small shapes; big ones use init_random_). ``quantize_state`` gives what a
    quantized model stores."""
    seed = args.init_seed if seed is None else seed
    return {
        name: random_tensor(name, shape, args, seed)
        for name, shape in args.family.param_shapes(args).items()
    }


@torch.no_grad()
def init_random_(
    model: nn.Module,
    seed: Optional[int] = None,
    requests: Optional[dict[str, ShardRequest]] = None,
    device=None,
) -> nn.Module:
    """Fill ``model``'s parameters (this rank's slices, per ``requests`` from
    ``shard_slices``; None = unsharded) with the deterministic random weights, generating
    only the chunks they touch, on ``device`` (default: the parameters' device; a meta
    model is materialised there first)."""
    args: ModelArgs = model.args
    seed = args.init_seed if seed is None else seed
    tensors = model.state_dict(keep_vars=True)  # parameters and quantized-weight buffers
    params = dict(model.named_parameters())
    device = torch.device(device) if device is not None else next(iter(params.values())).device
    if any(t.device.type == "meta" for t in tensors.values()):
        if device.type == "meta":
            raise ValueError("init_random_ needs a real device for a meta model; pass device=")
        materialize_(model, device)
        tensors = model.state_dict(keep_vars=True)
    logical = args.family.param_shapes(args)
    stored = stored_tensors(args)
    # parameters and quantized storage; other buffers (the router's correction bias) keep
    # what materialize_ gave them
    drawn = [n for n, spec in stored.items() if n in params or (n in tensors and spec.dtype)]
    for name in dict.fromkeys(stored[n].logical for n in drawn):
        request = requests[name] if requests is not None else ShardRequest.full()
        shape = logical[name]
        # expert tensors a few experts at a time: a whole shard in float32 (4 GB for one
        # gpt-oss-120b layer) next to a nearly full GPU would not fit
        parts = [(slice(None), request)]
        if _chunk_rule(name, args) == (0, 1):
            e0, e1 = request.bounds(shape)[0][0]
            parts = [
                (
                    slice(e - e0, min(e + EXPERTS_PER_DRAW, e1) - e0),
                    _leading_range(request, e, min(e + EXPERTS_PER_DRAW, e1)),
                )
                for e in range(e0, e1, EXPERTS_PER_DRAW)
            ]
        for rows, part in parts:
            value = random_tensor(name, shape, args, seed, part, device)
            # quantized weights: the slice quantized (plans keep slices aligned to scale
            # blocks, so it equals the slice of the quantized full tensor)
            for key, piece in quantize_state({name: value}, args).items():
                target = tensors[key].data[rows]
                if piece.shape != target.shape:
                    raise ValueError(
                        f"{key}: generated shard {tuple(piece.shape)} does not match the "
                        f"model's {tuple(target.shape)}; pass this rank's shard_slices"
                    )
                target.copy_(piece)
    return model


def _leading_range(request: ShardRequest, start: int, stop: int) -> ShardRequest:
    """``request`` restricted to [start, stop) of dim 0 (every box takes the same dim-0
    range: shard_slices' expert requests split rows, never experts, into boxes)."""
    boxes = tuple((slice(start, stop), *box[1:]) for box in request.boxes)
    return ShardRequest(boxes=boxes, cat_dim=request.cat_dim)


def materialize_(model: nn.Module, device) -> nn.Module:
    """Allocate a meta model's tensors on ``device`` (uninitialised parameters, to be
    loaded or initialised next) and recompute its buffers (rotary tables, router counters)."""
    model.to_empty(device=device)
    _reset_buffers(model)
    return model


def _reset_buffers(model: nn.Module) -> None:
    from moe_ext.model.layers import RotaryEmbedding, rope_inv_freq

    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            inv_freq, _ = rope_inv_freq(model.args, device=module.inv_freq.device)
            module.inv_freq.copy_(inv_freq)
        elif hasattr(module, "expert_load"):
            module.expert_load.zero_()
            if getattr(module, "e_score_correction_bias", None) is not None:
                # a checkpoint buffer, not a parameter: random weights start it at zero (as
                # transformers does) instead of whatever to_empty left there
                module.e_score_correction_bias.zero_()

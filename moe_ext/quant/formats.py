"""Quantize and dequantize weights in the two checkpoint formats (reference, in torch).

# R rows (out features), C columns (in features), leading dims (experts) pass through;
# bo, bi: fp8 block rows and columns; G = C / 32 MXFP4 groups per row

fp8:   weight float8_e4m3fn [..., R, C] and scale_inv float32 [..., ceil(R/bo), ceil(C/bi)];
       w = float(weight) * scale_inv[r // bo, c // bi].
mxfp4: blocks uint8 [..., R, G, 16] (element 2j in the low nibble of byte j, 2j+1 in the
       high one) and scales uint8 [..., R, G]; w = e2m1(nibble) * 2^(scale - 127).

Dequantization is exact in float32 (every fp8 / e2m1 value times a power of two or a
float32 scale is one float32 product), so a model computing in float32 on dequantized
weights equals ``transformers`` on a dequantized copy bit for bit. The quantizers round to
nearest and are what ``tools/convert_checkpoint.py quantize`` and the synthetic
(random-init) quantized models use.
"""

from __future__ import annotations

import torch

from moe_ext.quant.config import MXFP4_GROUP, QuantizationError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# e2m1 code -> value (sign in bit 3), the order transformers' gpt-oss integration uses
E2M1_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # rounding thresholds of |v|
E8M0_BIAS = 127
# Stored names of quantized weight P: fp8 keeps P (float8) plus P + FP8_SCALE; mxfp4 stores
# P + MXFP4_BLOCKS and P + MXFP4_SCALES (Hugging Face's spellings)
FP8_SCALE = "_scale_inv"
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"


def apply_keeping_dtypes(module, fn, names: tuple[str, ...], apply_rest) -> None:
    """A module's ``_apply(fn)`` in which buffers ``names`` are moved by ``fn`` but keep
    their dtype; ``apply_rest(fn)`` (the parent class's ``_apply``) handles everything
    else. ``model.to(torch.bfloat16)`` must move quantized tensors, never cast them (float8
    counts as floating point, and a float32 scale cast to bf16 would lose digits)."""
    stored = {name: module._buffers.pop(name) for name in names}
    apply_rest(fn)
    for name, old in stored.items():
        moved = fn(old)
        if moved.dtype != old.dtype:
            moved = old.to(device=moved.device)  # re-move from the original: no rounding
        module._buffers[name] = moved


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """scale_inv shape of an fp8 weight of ``shape`` [..., R, C]."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def mxfp4_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(blocks, scales) shapes of an MXFP4 weight of ``shape`` [..., R, C]; C % 32 == 0."""
    *lead, rows, cols = shape
    groups = cols // MXFP4_GROUP
    return (*lead, rows, groups, MXFP4_GROUP // 2), (*lead, rows, groups)


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]):
    """scale [..., ceil(R/bo), ceil(C/bi)] -> [..., R, C] (each block's value repeated)."""
    return scale.repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[
        ..., :cols
    ]


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., R, C] (any float) -> (float8_e4m3fn [..., R, C], float32 scale_inv)."""
    *lead, rows, cols = weight.shape
    bo, bi = block
    w = weight.float()
    pad_r, pad_c = -rows % bo, -cols % bi
    padded = torch.nn.functional.pad(w, (0, pad_c, 0, pad_r))  # [..., R', C']
    tiles = padded.unflatten(-1, (-1, bi)).unflatten(-3, (-1, bo))  # [..., R'/bo, bo, C'/bi, bi]
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., R'/bo, C'/bi]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand_blocks(scale, rows, cols, block)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(FP8_DTYPE), scale


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype=torch.float32
) -> torch.Tensor:
    """(float8 [..., R, C], float32 [..., ceil(R/bo), ceil(C/bi)]) -> ``dtype`` [..., R, C]."""
    *_, rows, cols = weight.shape
    expected = fp8_scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise QuantizationError(
            f"fp8 scale_inv {list(scale_inv.shape)} does not match weight "
            f"{list(weight.shape)} with blocks {list(block)} (expected {list(expected)})"
        )
    w = weight.float() * _expand_blocks(scale_inv.float(), rows, cols, block)
    return w.to(dtype)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., R, C] (C % 32 == 0) -> (uint8 blocks [..., R, G, 16], uint8 scales)."""
    *lead, rows, cols = weight.shape
    if cols % MXFP4_GROUP:
        raise QuantizationError(
            f"mxfp4 needs the input dim to be a multiple of {MXFP4_GROUP}, got {cols}"
        )
    groups = weight.float().unflatten(-1, (-1, MXFP4_GROUP))  # [..., R, G, 32]
    amax = groups.abs().amax(-1)  # [..., R, G]
    # shared exponent: the largest e2m1 magnitude (6 = 1.5 * 2^2) covers amax when
    # amax / 2^e <= 6; floor(log2(amax)) - 2 as in the OCP MX recipe
    exponent = torch.floor(torch.log2(amax.clamp(min=2.0**-126))) - 2
    exponent = exponent.clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = groups / torch.exp2(exponent)[..., None]  # [..., R, G, 32]
    magnitude = torch.bucketize(
        scaled.abs().clamp(max=6.0), torch.tensor(_E2M1_MIDPOINTS, device=weight.device)
    )  # [..., R, G, 32] codes 0..7
    codes = (magnitude | ((scaled < 0).to(torch.int64) << 3)).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., R, G, 16]
    scales = (exponent + E8M0_BIAS).to(torch.uint8)  # [..., R, G]
    return packed, scales


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.float32
) -> torch.Tensor:
    """(uint8 [..., R, G, 16], uint8 [..., R, G]) -> ``dtype`` [..., R, G * 32]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise QuantizationError(
            f"mxfp4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}"
        )
    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != MXFP4_GROUP // 2:
        raise QuantizationError(
            f"mxfp4 scales {list(scales.shape)} do not match blocks {list(blocks.shape)} "
            f"(expected blocks [..., R, G, 16] and scales [..., R, G])"
        )
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    low = lut[(blocks & 0x0F).long()]  # [..., R, G, 16]
    high = lut[(blocks >> 4).long()]
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., R, G, 32]
    exponent = scales.to(torch.int32) - E8M0_BIAS  # [..., R, G]
    return torch.ldexp(values, exponent[..., None].float()).flatten(-2).to(dtype)

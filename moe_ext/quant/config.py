"""QuantConfig: how a checkpoint's linear weights are quantized, read from (and written
back to) the ``quantization_config`` entry of a Hugging Face ``config.json``.

Two formats, as the public checkpoints store them:

- ``fp8`` (DeepSeek-V3, Qwen3-*-FP8, GLM-4.5-FP8): ``{"quant_method": "fp8", "fmt": "e4m3",
  "activation_scheme": "dynamic", "weight_block_size": [bo, bi]}``. Each quantized linear
  stores ``weight`` float8_e4m3fn [out, in] and ``weight_scale_inv`` float32
  [ceil(out/bo), ceil(in/bi)]; dequantized, weight = fp8 value x its block's scale.
  Every linear weight is quantized (attention, dense MLP, shared and routed experts)
  except embeddings, ``lm_head``, norms and routers.
- ``mxfp4`` (gpt-oss): ``{"quant_method": "mxfp4"}``. Routed experts only: ``*_blocks``
  uint8 [..., out, in/32, 16] (two e2m1 values per byte, low nibble first) and
  ``*_scales`` uint8 [..., out, in/32] (e8m0 exponents, bias 127), one per 32 values.

``modules_to_not_convert`` / ``ignored_layers`` (Hugging Face module paths, ``*``
wildcards allowed) keep the modules they name in the model dtype.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Optional

from moe_ext.errors import MoeExtError

METHODS = ("fp8", "mxfp4")
MXFP4_GROUP = 32  # values per e8m0 scale (OCP MX)


class QuantizationError(MoeExtError):
    """A quantized checkpoint or config the engine cannot read (one line: tensor or field,
    and the fix)."""


@dataclass(frozen=True)
class QuantConfig:
    """method: fp8 | mxfp4; weight_block_size: fp8's (rows, columns) per scale;
    not_converted: HF module paths (fnmatch patterns) left unquantized."""

    method: str
    weight_block_size: tuple[int, int] = (128, 128)
    not_converted: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(
                f"quant_method {self.method!r} is not supported; use one of {', '.join(METHODS)}"
            )
        if len(self.weight_block_size) != 2 or min(self.weight_block_size) < 1:
            raise QuantizationError(
                f"weight_block_size {list(self.weight_block_size)} must be two positive "
                f"integers [rows, columns]"
            )

    @property
    def block(self) -> tuple[int, int]:
        """(rows, columns) of weight covered by one scale."""
        return tuple(self.weight_block_size) if self.method == "fp8" else (1, MXFP4_GROUP)

    def converts(self, hf_module: str) -> bool:
        """Whether the module at HF path ``hf_module`` (``model.layers.0.self_attn.q_proj``)
        may be quantized, per modules_to_not_convert; a pattern names a module or a parent."""
        parts = hf_module.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return not any(
            fnmatch.fnmatchcase(prefix, pattern)
            for pattern in self.not_converted
            for prefix in prefixes
        )

    @classmethod
    def from_hf(cls, entry: Any, source: str = "config.json") -> "QuantConfig":
        """From a ``quantization_config`` mapping (QuantizationError naming the field)."""
        if not isinstance(entry, dict):
            raise QuantizationError(
                f"{source}: quantization_config must be a mapping, got {entry!r}"
            )
        method = entry.get("quant_method")
        if method not in METHODS:
            raise QuantizationError(
                f"{source}: quantization_config.quant_method {method!r} is not supported; "
                f"supported: {', '.join(METHODS)} (or load a dequantized checkpoint)"
            )
        not_converted = tuple(
            str(p)
            for key in ("modules_to_not_convert", "ignored_layers")
            for p in (entry.get(key) or ())
        )
        if method == "mxfp4":
            return cls("mxfp4", not_converted=not_converted)
        fmt = entry.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise QuantizationError(
                f"{source}: quantization_config.fmt {fmt!r} is not supported; fp8 needs e4m3"
            )
        scheme = entry.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise QuantizationError(
                f"{source}: quantization_config.activation_scheme {scheme!r} is not "
                f"supported; weight-only fp8 reads 'dynamic' checkpoints"
            )
        block = entry.get("weight_block_size")
        if (
            not isinstance(block, (list, tuple))
            or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise QuantizationError(
                f"{source}: quantization_config.weight_block_size must be [rows, columns] "
                f"(positive integers; per-tensor fp8 is not supported), got {block!r}"
            )
        return cls(
            "fp8", weight_block_size=(int(block[0]), int(block[1])), not_converted=not_converted
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json."""
        out: dict[str, Any] = {"quant_method": self.method}
        if self.method == "fp8":
            out.update(
                fmt="e4m3",
                activation_scheme="dynamic",
                weight_block_size=list(self.weight_block_size),
            )
        if self.not_converted:
            out["modules_to_not_convert"] = list(self.not_converted)
        return out

    def describe(self) -> str:
        if self.method == "fp8":
            return f"fp8 e4m3, {self.weight_block_size[0]}x{self.weight_block_size[1]} blocks"
        return "mxfp4 (e2m1, e8m0 scale per 32)"


def parse_quantization(entry: Any, source: str) -> Optional[QuantConfig]:
    """``quantization_config`` of a config (None when absent)."""
    return None if entry is None else QuantConfig.from_hf(entry, source)

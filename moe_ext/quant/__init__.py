"""Quantized weights: FP8 block-scaled and MXFP4, as Hugging Face checkpoints store them.

``config`` (QuantConfig, read from ``quantization_config``), ``formats`` (quantize /
dequantize in torch), ``layout`` (which tensors a quantized model stores and which part of
them a rank reads), ``linear`` (the FP8 linear layer).
"""

from moe_ext.quant.config import METHODS, QuantConfig, QuantizationError, parse_quantization

__all__ = ["METHODS", "QuantConfig", "QuantizationError", "parse_quantization"]

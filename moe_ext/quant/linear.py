"""The FP8 linear layer, the pass that puts quantized modules into a model, and the
projection helpers the model's layers call.

# T rows, N out features, K in features

``Fp8Linear`` holds what an FP8 checkpoint stores for one ``nn.Linear``: ``weight``
float8_e4m3fn [N, K] and ``weight_scale_inv`` float32 [ceil(N/bo), ceil(K/bi)] (buffers:
nothing here trains), plus an optional ``bias`` [N] in the model dtype. At decode sizes on
CUDA it runs the Triton weight-streaming kernel, which reads the FP8 bytes and applies the
scales in registers; elsewhere (prefill, CPU) it dequantizes to the input's dtype and runs
``F.linear``, which on CPU in float32 equals a model built from dequantized weights exactly.

``quantize_modules_`` swaps the modules whose weights ``args.quantization`` stores
quantized (``moe_ext.quant.layout.quantized_weights``) for their quantized versions, on
whatever device they are (meta included); the model is otherwise built as usual.

``project_many`` / ``dense_linear`` / ``project_without_bias`` are the layers' projections:
at decode sizes on CUDA, dense weights stream through the GEMV kernel
(``moe_ext.moe.kernels.gemv``; q, k and v in one launch), elsewhere ``F.linear``.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe_ext.moe.kernels import kernels_for
from moe_ext.quant.config import QuantConfig
from moe_ext.quant.formats import (
    FP8_DTYPE,
    apply_keeping_dtypes,
    dequantize_fp8,
    fp8_scale_shape,
)
from moe_ext.quant.layout import quantized_weights

# Up to this many rows the Triton kernel (a weight read) beats dequantize-then-GEMM.
KERNEL_MAX_ROWS = 256
# Up to this many rows dense projections stream their weights through the GEMV kernel
# rather than cuBLAS: faster at every row count up to the kernel's 64 on every model shape
# measured (tools/bench_gemv.py; docs/PERF.md, "Single stream and full batches").
GEMV_MAX_ROWS = 64
# Smaller weight sets (all of one launch together) stay on cuBLAS: they cost a few µs
# either way, and each new shape would cost the GEMV kernel an autotuning run at warm-up.
# The smallest projection set of the supported models is ~2 MB.
GEMV_MIN_BYTES = 1 << 20


class Fp8Linear(nn.Module):
    """y = x @ dequant(weight)^T (+ bias); weight-only FP8 with block scales."""

    STORED = ("weight", "weight_scale_inv")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block: tuple[int, int],
        bias: bool = False,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        self.block = block  # the sizes are the weight's: parallelize replaces it by a TP slice
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device)
        )
        scale_shape = fp8_scale_shape((out_features, in_features), block)
        self.register_buffer(
            "weight_scale_inv", torch.ones(scale_shape, dtype=torch.float32, device=device)
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        )

    def _apply(self, fn, recurse: bool = True):
        apply_keeping_dtypes(
            self, fn, self.STORED, lambda f: super(Fp8Linear, self)._apply(f, recurse)
        )
        return self

    def extra_repr(self) -> str:
        return (
            f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, "
            f"fp8 blocks {list(self.block)}, "
            f"bias={self.bias is not None}"
        )

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight [N, K] in ``dtype``."""
        return dequantize_fp8(self.weight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N] in x's dtype."""
        return self.project(x, add_bias=True)

    def project(self, x: torch.Tensor, add_bias: bool) -> torch.Tensor:
        """x: [..., K] -> [..., N] in x's dtype, with or without the bias (TP partial sums
        add it once, after their reduction)."""
        bias = self.bias if add_bias else None
        rows = x.numel() // max(x.shape[-1], 1)
        if (
            x.device.type == "cuda"
            and x.dtype in (torch.bfloat16, torch.float16)
            and rows <= KERNEL_MAX_ROWS
            and not (torch.is_grad_enabled() and x.requires_grad)
        ):
            kernels = kernels_for("grouped_gemm", x.device)
            if kernels is not None:
                flat = x.reshape(rows, x.shape[-1])  # [T, K]
                y = kernels.quantized_linear(
                    flat,
                    self.weight,
                    self.weight_scale_inv,
                    weight_format="fp8",
                    fp8_block=self.block,
                    bias=bias,
                )  # [T, N]
                return y.view(*x.shape[:-1], y.shape[-1])
        return F.linear(x, self.dense_weight(x.dtype), bias)


def project_without_bias(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T of an ``nn.Linear`` or ``Fp8Linear``, its bias left out, plus its LoRA
    adapter's term when it has one (``moe_ext.train.lora``). x: [..., K] -> [..., N]."""
    if isinstance(linear, Fp8Linear):
        y = linear.project(x, add_bias=False)
    else:
        y = dense_linear(x, linear.weight)
    lora = getattr(linear, "lora", None)
    return y if lora is None else y + lora(x)


def _gemv_kernels(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> Optional[ModuleType]:
    """The weight-streaming GEMV kernels (``moe_ext.moe.kernels.gemv``) when they should
    run x [..., K] against these dense [N_i, K] weights: CUDA bf16/fp16, at most
    GEMV_MAX_ROWS rows, at least GEMV_MIN_BYTES of weights, contiguous weights in x's
    dtype, no gradient wanted (the op has no backward); else None."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not (
        x.device.type == "cuda"
        and x.dtype in (torch.bfloat16, torch.float16)
        and 0 < rows <= GEMV_MAX_ROWS
        and sum(w.numel() * w.element_size() for w in weights) >= GEMV_MIN_BYTES
        and all(w.dtype == x.dtype and w.is_contiguous() for w in weights)
        and not (
            torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
        )
    ):
        return None
    return kernels_for("gemv", x.device)


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T (``F.linear`` without bias); at decode sizes through the GEMV kernel.
    x: [..., K]; weight: [N, K] -> [..., N]."""
    kernels = _gemv_kernels(x, (weight,))
    if kernels is None:
        return F.linear(x, weight)
    return _stream(kernels, x, [weight])[0]


def project_many(x: torch.Tensor, linears: Sequence[nn.Module]) -> list[torch.Tensor]:
    """``[linear(x) for linear in linears]`` (biases and LoRA terms included): at decode
    sizes, plain ``nn.Linear`` sharing x (q, k and v) run as one weight-streaming launch.
    x: [..., K] -> one [..., N_i] per linear."""
    plain = all(type(m) is nn.Linear and getattr(m, "lora", None) is None for m in linears)
    weights = [m.weight for m in linears]
    kernels = _gemv_kernels(x, weights) if plain else None
    if kernels is None:
        return [m(x) for m in linears]
    parts = _stream(kernels, x, weights)
    return [part if m.bias is None else part + m.bias for part, m in zip(parts, linears)]


def _stream(kernels: ModuleType, x: torch.Tensor, weights: list[torch.Tensor]) -> list:
    """x [..., K] against weights [N_i, K] in one GEMV launch: one [..., N_i] view each."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # [T, K]
    y = kernels.fused_gemv(flat, weights)  # [T, N_0 + N_1 + ...]
    # the weights' own rows: under TP they are this rank's slice (out_features is not)
    widths = [w.shape[0] for w in weights]
    return [
        part.view(*x.shape[:-1], width)  # [..., N_i]
        for part, width in zip(y.split(widths, dim=-1), widths)
    ]


def linear_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight of an ``nn.Linear`` or ``Fp8Linear`` in ``dtype`` (for code that
    uses a projection's weight directly, as MLA's absorbed attention does); with a LoRA
    adapter, the adapted weight W + scale * B @ A (differentiable in the adapter)."""
    if isinstance(linear, Fp8Linear):
        weight = linear.dense_weight(dtype)
    else:
        weight = linear.weight.to(dtype)
    lora = getattr(linear, "lora", None)
    return weight if lora is None else weight + lora.delta().to(dtype)


def quantize_modules_(module: nn.Module, args, prefix: str = "") -> nn.Module:
    """Swap, in place, the submodules of ``module`` (whose names are ``prefix`` + their
    path in the full model) that ``args.quantization`` stores quantized: ``nn.Linear`` ->
    ``Fp8Linear``, ``GroupedExperts`` -> the same experts holding quantized storage.
    New tensors are uninitialised, on the replaced module's device: load or init next."""
    from moe_ext.moe.experts import GroupedExperts

    quant: Optional[QuantConfig] = args.quantization
    if quant is None:
        return module
    wanted = quantized_weights(args)
    for name, child in list(module.named_modules())[1:]:  # submodules: the root stays
        path = prefix + name + "."
        if isinstance(child, nn.Linear) and path + "weight" in wanted:
            if quant.method != "fp8":
                raise NotImplementedError(f"{quant.method} dense linears ({path}weight)")
            new = Fp8Linear(
                child.in_features,
                child.out_features,
                quant.block,
                bias=child.bias is not None,
                dtype=child.weight.dtype,
                device=child.weight.device,
            )
        elif isinstance(child, GroupedExperts) and path + "gate_up_proj" in wanted:
            new = child.quantized(quant)
        else:
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent_name), leaf, new)
    return module

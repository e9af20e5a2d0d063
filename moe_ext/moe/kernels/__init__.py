"""Hand-written kernels for the MoE layer and decode's projections (Triton; optional:
import guarded by callers).

Modules (each imports triton, so import them only through :func:`kernels_for` or lazily):
``grouped_gemm`` (SwiGLU experts, op ``moe_ext::swiglu_experts``), ``routing`` (fused
softmax top-k router, op ``moe_ext::softmax_topk_router``), ``permute`` (stable sort of
token-expert pairs by expert, op ``moe_ext::sort_pairs``), ``gemv`` (dense projections of
a few rows, up to three weights in one launch, op ``moe_ext::fused_gemv``). Every kernel is
launched from a ``torch.library.custom_op``, so ``torch.compile`` sees one opaque node per
kernel (shapes from its fake implementation) and never traces into Triton's launcher or
autotuner.

This package's ``__init__`` does not import triton: the router and the dispatchers ask
:func:`kernels_for` on every call, and plain CPU runs (the test suite) must not pay for, or
depend on, importing triton.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Optional

import torch

KERNEL_MODULES = ("grouped_gemm", "routing", "permute", "gemv")
_loaded: dict[str, object] = {}  # name -> module, or False when triton does not import


def load_kernels(name: str) -> Optional[ModuleType]:
    """The kernels module ``name`` (one of ``KERNEL_MODULES``), imported on first use, or
    None when triton does not import. Whether its kernels can run on given tensors is
    :func:`kernels_for`'s question."""
    module = _loaded.get(name)
    if module is None:
        try:
            if name == "routing":
                from moe_ext.moe.kernels import routing as module
            elif name == "permute":
                from moe_ext.moe.kernels import permute as module
            elif name == "gemv":
                from moe_ext.moe.kernels import gemv as module
            else:
                from moe_ext.moe.kernels import grouped_gemm as module
        except ImportError:
            module = False
        _loaded[name] = module
    return module or None


def kernels_for(name: str, device: torch.device) -> Optional[ModuleType]:
    """The kernels module ``name`` (one of ``KERNEL_MODULES``) when its kernels can run on
    tensors of ``device``, else None.

    CUDA: when triton imports. CPU: only when triton is already imported *and* runs its
    interpreter (TRITON_INTERPRET=1 when triton was first imported; the kernel tests do
    this): this never imports triton on CPU, so plain CPU runs keep their torch paths."""
    if name not in KERNEL_MODULES:
        raise ValueError(f"unknown kernels module {name!r}; use one of {KERNEL_MODULES}")
    if device.type == "cuda":
        return load_kernels(name)
    if device.type == "cpu" and "triton" in sys.modules:
        module = load_kernels(name)
        if module is not None and module.INTERPRETED:
            return module
    return None


def check_kernel_device(op: str, device: torch.device, interpreted: bool, fallback: str) -> None:
    """One-line ValueError unless ``op``'s Triton kernel can run on ``device``: CUDA, or CPU
    when Triton runs its interpreter (tests). ``fallback`` names the torch path to use."""
    if device.type == "cpu" and not interpreted:
        raise ValueError(
            f"{op}: CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 "
            f"set before triton is imported); use CUDA tensors or {fallback}"
        )
    if device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"{op}: device {device} unsupported; use CUDA (or CPU under the interpreter, for tests)"
        )


def check_kernel_inputs(
    op: str, x: torch.Tensor, devices: set, interpreted: bool, fallback: str
) -> None:
    """One-line ValueError unless a tensor-core kernel ``op`` can take rows ``x`` with
    operands on ``devices``: one device, x a float type (bf16/fp16 on CUDA), and a device
    the kernels run on (``check_kernel_device``)."""
    if len(devices) != 1:
        raise ValueError(f"{op}: operands on {devices}; move them to one device")
    if not x.dtype.is_floating_point or (
        x.device.type == "cuda" and x.dtype not in (torch.bfloat16, torch.float16)
    ):
        raise ValueError(
            f"{op}: x {x.dtype} on {x.device.type} is not supported (tensor cores "
            f"would round float32 to tf32); use bf16/fp16 or {fallback}"
        )
    check_kernel_device(op, x.device, interpreted, fallback)

"""Grouped SwiGLU experts with stacked weights: one grouped GEMM per projection.

# T' rows (sorted by local expert), H hidden, F FFN size of this rank's slice,
# E local experts

Parameters use the Hugging Face transformers-5 fused layout: ``gate_up_proj`` [E, 2F, H]
(gate rows, then up rows) and ``down_proj`` [E, H, F]; y = down(silu(gate(x)) * up(x)).

gpt-oss experts (``ExpertOptions``) add biases, ``gate_up_proj_bias`` [E, 2F] (gate, then
up) and ``down_proj_bias`` [E, H], and replace silu(gate) * up by the clamped SwiGLU
``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)``, g = clamp(gate, max=l), computed in
transformers' order (projection, then bias; the activation in the weights' dtype). Under
expert TP (F split over ranks) every rank holds the whole down bias of its experts and only
F-shard 0 adds it, as the shards' outputs are summed. Every backend runs them; the
Triton kernels add the biases and apply the clamp in their float32 epilogues.

Backends: ``grouped_mm`` (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``: one
kernel per projection, cumulative int32 offsets built on device, no host sync) when the
inputs qualify; ``loop`` (one matmul pair per expert; needs the split sizes on the host)
everywhere else; ``triton`` (:mod:`moe_ext.moe.kernels.grouped_gemm`: weight-streaming
kernels for few rows, forward only, CUDA bf16/fp16). ``auto`` picks triton for inference
(no gradient needed) on CUDA bf16/fp16 with at most ``triton_max_rows`` rows when Triton
imports, else grouped_mm when it qualifies, else loop.

LoRA (``ExpertLora``, attached by ``moe_ext.train.lora``): per-expert low-rank adapters
grouped like the experts, gate_up_A [E, r, H], gate_up_B [E, 2F, r], down_A [E, r, F],
down_B [E, H, r]; each projection adds ``scale * B_e (A_e x)`` on the same permuted rows
(two more grouped GEMMs when the adapters' rows are 16-byte multiples, e.g. r % 8 == 0 in
bf16, else two small matmuls per expert), so the frozen base (bf16 or quantized) is never
copied and keeps its grouped GEMMs. Triton (forward-only) is not used while adapters are on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_ext.moe.kernels import load_kernels
from moe_ext.quant.config import QuantConfig
from moe_ext.quant.formats import (
    FP8_DTYPE,
    FP8_SCALE,
    MXFP4_BLOCKS,
    MXFP4_SCALES,
    apply_keeping_dtypes,
    dequantize_fp8,
    dequantize_mxfp4,
    fp8_scale_shape,
    mxfp4_shapes,
)

GATE_UP, DOWN = "gate_up_proj", "down_proj"  # the stacked weights' names
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
BACKENDS = ("auto", "grouped_mm", "loop", "triton")
# ``auto`` uses the Triton kernels up to TRITON_MAX_ROWS rows (T'), or more while an
# average expert gets at most TRITON_ROWS_PER_EXPERT rows: there the layer is a weight
# read and torch's grouped GEMM reaches 25-60% of HBM bandwidth (H200, bf16). With more
# rows per expert the GEMMs gain arithmetic intensity, which grouped_mm's large tiles are
# built for. tools/bench_experts.py measures both sides of this threshold (docs/PERF.md).
TRITON_MAX_ROWS = 256
TRITON_ROWS_PER_EXPERT = 32


def grouped_mm_qualifies(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM runs these operands: present in this torch; on CUDA
    bf16 on SM >= 8.0 (the kernels' contract); on CPU float32/bf16/fp16; every row stride
    a multiple of 16 bytes (the CPU kernel rejects others, CUDA kernels need it for TMA)."""
    if _GROUPED_MM is None or any(w.dtype != x.dtype or w.device != x.device for w in weights):
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    elif x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False  # torch.compile's shape function of grouped_mm accepts bf16 only
    item = x.element_size()
    return all(w.shape[-1] * item % 16 == 0 and w.shape[-2] * item % 16 == 0 for w in weights)


@dataclass(frozen=True)
class ExpertOptions:
    """What an expert computes beyond plain bias-free SwiGLU (the defaults)."""

    bias: bool = False  # gate_up_proj_bias [E, 2F] and down_proj_bias [E, H]
    swiglu_limit: Optional[float] = None  # clamped SwiGLU with this limit; None: plain
    swiglu_alpha: float = 1.702  # the clamped SwiGLU's sigmoid gain
    add_down_bias: bool = True  # False on expert-TP shards other than the first


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float):
    """gpt-oss' activation, in transformers' order. gate, up: [..., F] -> [..., F]."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def row_experts(tokens_per_expert: torch.Tensor, rows: int) -> torch.Tensor:
    """Local expert of each of ``rows`` rows sorted by expert, without host sync; padding
    rows past sum(tokens_per_expert) get the last expert. tokens_per_expert: [E] int64.
    Returns [rows] int64."""
    ends = torch.cumsum(tokens_per_expert, 0)  # [E]
    positions = torch.arange(rows, device=tokens_per_expert.device)
    found = torch.searchsorted(ends, positions, right=True)  # [rows]
    return found.clamp(max=tokens_per_expert.shape[0] - 1)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's
    backward rejects expanded gradients such as the one ``y.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class ExpertLora(nn.Module):
    """Per-expert LoRA adapters of E local experts (rank r, H hidden, F this rank's FFN).

    delta gate_up_e = scale * gate_up_B[e] @ gate_up_A[e]  ([2F, H]), likewise down ([H, F]),
    scale = alpha / r. B starts at zero (the adapted model equals the base at init); A is
    filled by the caller (``moe_ext.train.lora`` draws it per full tensor so every plan
    gets the same adapters)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_size: int,
        rank: int,
        alpha: float,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        E, H, F_ = num_experts, hidden_size, ffn_size

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device))

        self.gate_up_A = zeros(E, rank, H)
        self.gate_up_B = zeros(E, 2 * F_, rank)
        self.down_A = zeros(E, rank, F_)
        self.down_B = zeros(E, H, rank)

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [E, r, in], B [E, out, r]) of projection ``name`` (GATE_UP or DOWN)."""
        prefix = "gate_up" if name == GATE_UP else "down"
        return getattr(self, prefix + "_A"), getattr(self, prefix + "_B")

    def delta(self, name: str) -> torch.Tensor:
        """scale * B @ A of projection ``name``: [E, out, in] (for merging)."""
        a, b = self.pair(name)
        return self.scale * torch.bmm(b, a)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class GroupedExperts(nn.Module):
    """E local SwiGLU experts of FFN size F (this rank's slice) over hidden size H."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_size: int,
        *,
        options: ExpertOptions = ExpertOptions(),
        backend: str = "auto",
        quant: Optional[QuantConfig] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown experts backend {backend!r}; use one of {BACKENDS}")
        self.num_experts, self.hidden_size, self.ffn_size = num_experts, hidden_size, ffn_size
        self.backend = backend
        self.options = options
        self.quant = quant
        self.lora: Optional[ExpertLora] = None  # set by add_lora (moe_ext.train.lora)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))

        # names = moe_ext.quant.layout.stored_tensors names (quantized ones are buffers)
        shapes = {GATE_UP: (num_experts, 2 * ffn_size, hidden_size)}
        shapes[DOWN] = (num_experts, hidden_size, ffn_size)
        if quant is None:
            self.gate_up_proj = param(*shapes[GATE_UP])
        else:
            self._register_quantized(GATE_UP, shapes[GATE_UP], device)
        self.gate_up_proj_bias = param(num_experts, 2 * ffn_size) if options.bias else None
        if quant is None:
            self.down_proj = param(*shapes[DOWN])
        else:
            self._register_quantized(DOWN, shapes[DOWN], device)
        self.down_proj_bias = param(num_experts, hidden_size) if options.bias else None
        if quant is None:
            nn.init.normal_(self.gate_up_proj, std=hidden_size**-0.5)
            nn.init.normal_(self.down_proj, std=max(ffn_size, 1) ** -0.5)
        for bias in (self.gate_up_proj_bias, self.down_proj_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    # ---- quantized storage (moe_ext.quant) ----------------------------------------------
    def _register_quantized(self, name: str, shape: tuple[int, ...], device) -> None:
        """Buffers of quantized weight ``name`` [E, R, C] as checkpoints store them: fp8
        ``name`` + ``name_scale_inv``; mxfp4 ``name_blocks`` + ``name_scales``."""
        if self.quant.method == "fp8":
            stored = {
                name: (shape, FP8_DTYPE),
                name + FP8_SCALE: (fp8_scale_shape(shape, self.quant.block), torch.float32),
            }
        else:
            blocks, scales = mxfp4_shapes(shape)
            stored = {name + MXFP4_BLOCKS: (blocks, torch.uint8)}
            stored[name + MXFP4_SCALES] = (scales, torch.uint8)
        for key, (stored_shape, dtype) in stored.items():
            self.register_buffer(key, torch.zeros(stored_shape, dtype=dtype, device=device))

    @property
    def _stored_names(self) -> tuple[str, ...]:
        if self.quant is None:
            return ()
        if self.quant.method == "fp8":
            return (GATE_UP, GATE_UP + FP8_SCALE, DOWN, DOWN + FP8_SCALE)
        return tuple(w + part for w in (GATE_UP, DOWN) for part in (MXFP4_BLOCKS, MXFP4_SCALES))

    def _apply(self, fn, recurse: bool = True):
        apply_keeping_dtypes(  # quantized storage moved, never cast
            self, fn, self._stored_names, lambda f: super(GroupedExperts, self)._apply(f, recurse)
        )
        return self

    # ---- LoRA (moe_ext.train.lora) --------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, dtype: torch.dtype) -> ExpertLora:
        """Attach zero-initialised per-expert adapters (B = 0: outputs unchanged) in
        ``dtype`` (the model's compute dtype) on this module's device; returns them (the
        caller fills A)."""
        device = next(iter(self._buffers.values()), None) if self.quant else self.gate_up_proj
        self.lora = ExpertLora(
            self.num_experts, self.hidden_size, self.ffn_size, rank, alpha, dtype, device.device
        )
        return self.lora

    @torch.no_grad()
    def merge_lora_(self) -> None:
        """Fold the adapters into the (unquantized) base weights and drop them."""
        if self.lora is None:
            return
        if self.quant is not None:
            raise ValueError(
                "cannot merge LoRA adapters into quantized experts; export the adapters "
                "(PEFT format) instead"
            )
        for name in (GATE_UP, DOWN):
            weight = getattr(self, name)
            weight.add_(self.lora.delta(name).to(weight.dtype))  # [E, out, in]
        self.lora = None

    def quantized(self, quant: QuantConfig) -> "GroupedExperts":
        """These experts with ``quant`` storage (uninitialised, on this module's device)."""
        ref = next(iter(self.parameters()), None)
        device = self.gate_up_proj.device if ref is None else ref.device
        dtype = None if ref is None else ref.dtype
        return GroupedExperts(
            self.num_experts,
            self.hidden_size,
            self.ffn_size,
            options=self.options,
            backend=self.backend,
            quant=quant,
            dtype=dtype,
            device=device,
        )

    def _quantized_operands(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight or blocks, scales) of quantized weight ``name``."""
        if self.quant.method == "fp8":
            return getattr(self, name), getattr(self, name + FP8_SCALE)
        return getattr(self, name + MXFP4_BLOCKS), getattr(self, name + MXFP4_SCALES)

    def dense_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj [E, 2F, H], down_proj [E, H, F]) in ``dtype``; quantized weights are
        dequantized (exactly, in float32)."""
        if self.quant is None:
            return self.gate_up_proj, self.down_proj
        if self.quant.method == "fp8":
            return tuple(
                dequantize_fp8(*self._quantized_operands(w), self.quant.block, dtype)
                for w in (GATE_UP, DOWN)
            )
        return tuple(dequantize_mxfp4(*self._quantized_operands(w), dtype) for w in (GATE_UP, DOWN))

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden_size}, ffn={self.ffn_size}, "
            f"backend={self.backend}, {self.options}"
            + (f", {self.quant.describe()}" if self.quant else "")
        )

    def uses_grouped_mm(self, x: torch.Tensor, weights=None) -> bool:
        """Whether this forward runs torch's grouped GEMM (when it does not run Triton):
        backend 'grouped_mm' or 'auto' and x [T', H] qualifies (``grouped_mm_qualifies``)
        with ``weights`` (gate_up, down; default: this module's, dequantized ones for
        quantized experts)."""
        if self.backend not in ("auto", "grouped_mm"):
            return False
        return grouped_mm_qualifies(x, *(weights or self.dense_weights(x.dtype)))

    def _params(self) -> tuple[nn.Parameter, ...]:
        return tuple(p for p in self.parameters(recurse=False))

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self._params())
        )

    def uses_triton(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> bool:
        """Whether this forward runs the Triton kernels: forward only, so never when a
        gradient is needed, and only when Triton imports; then always for backend 'triton',
        and for 'auto' on CUDA bf16/fp16 with at most ``triton_max_rows`` rows. x: [T', H] in
        the weights' dtype; tokens_per_expert: [E] int64."""
        if self.backend == "auto":
            if not (
                x.device.type == "cuda"
                and x.dtype in (torch.bfloat16, torch.float16)
                and x.shape[0] <= self.triton_max_rows
                and tokens_per_expert.dtype == torch.int64
                and tokens_per_expert.device == x.device
            ):
                return False  # decided before load_kernels: CPU runs never import triton
        elif self.backend != "triton":
            return False
        if self.lora is not None:
            return False  # the kernels have no adapter path
        return not self._needs_grad(x) and load_kernels("grouped_gemm") is not None

    @property
    def triton_max_rows(self) -> int:
        """Most rows ``auto`` gives the Triton kernels. Quantized experts: while the rows
        of an average expert fit one 64-row chunk (weights streamed once), since the
        alternative dequantizes every local expert on each call."""
        per_expert = TRITON_ROWS_PER_EXPERT if self.quant is None else 64
        return max(TRITON_MAX_ROWS, per_expert * self.num_experts)

    def _refuse_unrunnable_backend(self, x: torch.Tensor) -> None:
        """A backend asked for by name ('triton', 'grouped_mm') that cannot run x: say why
        instead of falling back silently to the loop."""
        if self.backend == "triton":
            if self._needs_grad(x):
                raise ValueError(
                    "experts backend 'triton' is forward-only; run under "
                    "torch.no_grad()/torch.inference_mode() or use backend 'auto'"
                )
            raise ValueError(
                "experts backend 'triton' needs the triton package (it comes "
                "with CUDA builds of torch); use backend 'auto'"
            )
        if self.backend == "grouped_mm":
            raise ValueError(
                f"experts backend 'grouped_mm' cannot run {x.dtype} on {x.device} "
                f"with H={self.hidden_size}, F={self.ffn_size} (needs bf16 on CUDA, "
                f"16-byte-aligned rows); use backend 'auto' or 'loop'"
            )

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x: [T', H] rows sorted by local expert; tokens_per_expert: [E] int64 on x's
        device, summing to at most T'. Returns y: [T', H] in x's dtype.

        Rows past sum(tokens_per_expert) are padding (a static-capacity dispatch hands over
        a fixed number of rows, the real ones first): their outputs are unspecified (the
        triton backend leaves them unwritten, grouped_mm leaves them undefined; ``loop``
        returns zeros there) and their gradients too, so callers mask them (device-side,
        with ``torch.where``: they may hold NaN) and never read them."""
        if x.dim() != 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"experts expect [T', {self.hidden_size}], got {tuple(x.shape)}")
        if tokens_per_expert.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert must have shape [{self.num_experts}], got "
                f"{tuple(tokens_per_expert.shape)}; the dispatcher and experts "
                f"disagree on the number of local experts"
            )
        in_dtype = x.dtype
        if self.quant is None:
            x = x.to(self.gate_up_proj.dtype)
        elif self.gate_up_proj_bias is not None:
            x = x.to(self.gate_up_proj_bias.dtype)  # quantized: compute in the model dtype
        if self.uses_triton(x, tokens_per_expert):
            y = self._forward_triton(x, tokens_per_expert)
        else:
            weights = self.dense_weights(x.dtype)  # quantized: dequantized (weight-only)
            if self.uses_grouped_mm(x, weights):
                y = self._forward_grouped_mm(x, tokens_per_expert, *weights)
            else:
                self._refuse_unrunnable_backend(x)
                y = self._forward_loop(x, tokens_per_expert, *weights)
        return y.to(in_dtype)

    def _forward_triton(self, x, tokens_per_expert):
        kernels = load_kernels("grouped_gemm")
        down_bias = self.down_proj_bias if self.options.add_down_bias else None
        biases = (self.gate_up_proj_bias, down_bias)
        if self.quant is None:
            gate_up, down = self.gate_up_proj, self.down_proj
            quantized = {}
        else:
            (gate_up, gate_up_scale), (down, down_scale) = (
                self._quantized_operands(w) for w in (GATE_UP, DOWN)
            )
            quantized = dict(
                weight_format=self.quant.method,
                gate_up_scale=gate_up_scale,
                down_scale=down_scale,
                fp8_block=self.quant.block if self.quant.method == "fp8" else (128, 128),
            )
        if self.backend == "triton" and self.quant is None:  # auto picks operands it takes
            kernels.check_operands(x, gate_up, down, tokens_per_expert, *biases)
        return kernels.swiglu_experts_forward(
            x,
            gate_up,
            down,
            tokens_per_expert,
            gate_up_bias=biases[0],
            down_bias=biases[1],
            swiglu_limit=self.options.swiglu_limit,
            swiglu_alpha=self.options.swiglu_alpha,
            **quantized,
        )

    def _forward_grouped_mm(self, x, tokens_per_expert, gate_up_proj, down_proj):
        offsets = torch.cumsum(tokens_per_expert, 0).to(torch.int32)  # [E] group ends
        gate_up = _GROUPED_MM(x, gate_up_proj.transpose(1, 2), offs=offsets)  # [T', 2F]
        gate_up = _ContiguousGrad.apply(gate_up)
        if self.lora is not None:
            gate_up = gate_up + self._grouped_low_rank(x, GATE_UP, offsets, tokens_per_expert)
        bias_rows = None
        if self.options.bias:
            bias_rows = row_experts(tokens_per_expert, x.shape[0])  # [T']
            gate_up = gate_up + self.gate_up_proj_bias[bias_rows]  # [T', 2F]
        hidden = self._activation(gate_up)  # [T', F]
        y = _GROUPED_MM(hidden, down_proj.transpose(1, 2), offs=offsets)  # [T', H]
        y = _ContiguousGrad.apply(y)
        if self.lora is not None:
            y = y + self._grouped_low_rank(hidden, DOWN, offsets, tokens_per_expert)  # [T', H]
        if bias_rows is not None and self.options.add_down_bias:
            y = y + self.down_proj_bias[bias_rows]
        return y

    def _grouped_low_rank(
        self, x: torch.Tensor, name: str, offsets: torch.Tensor, tokens_per_expert: torch.Tensor
    ) -> torch.Tensor:
        """scale * B_e (A_e x) of projection ``name`` on rows sorted by expert, as two grouped
        GEMMs; per expert (a host sync) when the adapters' rows do not qualify (a rank whose
        rows are not 16-byte multiples). x: [T', in]; offsets: [E] int32 group ends;
        tokens_per_expert: [E] int64. Returns [T', out]."""
        a, b = self.lora.pair(name)  # [E, r, in], [E, out, r]
        if not grouped_mm_qualifies(x, a, b):
            splits = tokens_per_expert.tolist()  # sync: row counts for the per-expert slices
            outputs, start = [], 0
            for expert, rows in enumerate(splits):
                outputs.append(self._low_rank(x[start : start + rows], expert, name))
                start += rows
            if start < x.shape[0]:  # padding rows (static-capacity dispatch)
                outputs.append(x.new_zeros(x.shape[0] - start, b.shape[1]))
            return torch.cat(outputs, dim=0)  # [T', out]
        low = _ContiguousGrad.apply(_GROUPED_MM(x, a.transpose(1, 2), offs=offsets))  # [T', r]
        out = _ContiguousGrad.apply(_GROUPED_MM(low, b.transpose(1, 2), offs=offsets))
        return self.lora.scale * out  # [T', out]

    def _activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: [rows, 2F] (gate columns, then up) -> [rows, F]."""
        gate, up = gate_up.chunk(2, dim=-1)  # [rows, F] each
        limit = self.options.swiglu_limit
        if limit is None:
            return F.silu(gate) * up
        return clamped_swiglu(gate, up, self.options.swiglu_alpha, limit)

    def _expert_forward(self, xe, expert: int, gate_up_proj, down_proj) -> torch.Tensor:
        """One expert on its rows. xe: [rows, H] -> [rows, H]."""
        gate_up = F.linear(xe, gate_up_proj[expert])  # [rows, 2F]
        if self.lora is not None:
            gate_up = gate_up + self._low_rank(xe, expert, GATE_UP)
        if self.gate_up_proj_bias is not None:
            gate_up = gate_up + self.gate_up_proj_bias[expert]
        hidden = self._activation(gate_up)  # [rows, F]
        y = F.linear(hidden, down_proj[expert])  # [rows, H]
        if self.lora is not None:
            y = y + self._low_rank(hidden, expert, DOWN)
        if self.down_proj_bias is not None and self.options.add_down_bias:
            y = y + self.down_proj_bias[expert]
        return y

    def _low_rank(self, xe: torch.Tensor, expert: int, name: str) -> torch.Tensor:
        """scale * B_e (A_e xe) for one expert's rows. xe: [rows, in] -> [rows, out]."""
        a, b = self.lora.pair(name)  # [E, r, in], [E, out, r]
        return self.lora.scale * F.linear(F.linear(xe, a[expert]), b[expert])

    @torch.compiler.disable  # data-dependent Python loop: tracing it would recompile per split
    def _forward_loop(self, x, tokens_per_expert, gate_up_proj, down_proj):
        # Host sync: slicing rows per expert needs the split sizes as Python ints.
        splits = tokens_per_expert.tolist()
        outputs, start = [], 0
        for expert, rows in enumerate(splits):
            # Empty experts still run (on zero rows) so every weight gets a (zero) gradient.
            xe = x[start : start + rows]
            outputs.append(self._expert_forward(xe, expert, gate_up_proj, down_proj))  # [rows, H]
            start += rows
        if start < x.shape[0]:  # trailing padding rows (static-capacity dispatch)
            outputs.append(x.new_zeros(x.shape[0] - start, self.hidden_size))  # [pad, H]
        if not outputs:
            return x.new_zeros(x.shape)
        return torch.cat(outputs, dim=0)  # [T', H]

"""LoRA fine-tuning of the native model (``train.lora.rank``, ``alpha``, ``targets``).

# r adapter rank, K in features, N out features, E experts (local: this rank's), H hidden,
# F expert FFN size

A target is the leaf name of modules inside the decoder layers: a projection
(``nn.Linear`` or ``Fp8Linear``: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, a dense
MLP's ``gate_proj``/``up_proj``/``down_proj``, ...) or ``experts`` (the routed experts:
per-expert adapters grouped like the experts, ``moe_ext.moe.experts.ExpertLora``).

A projection gets a ``LowRank`` child ``lora`` (A [r, K], B [N, r], scale alpha / r) whose
output ``scale * B (A x)`` is added after the projection (a forward hook for calls of the
module, ``moe_ext.quant.linear.project_without_bias`` / ``linear_weight`` for code that
uses the projection's weight directly). Parameter names stay the base's
(``layers.0.self_attn.q_proj.weight``) plus ``...q_proj.lora.A`` / ``.lora.B`` and
``...mlp.experts.lora.gate_up_A`` ...; expert adapters contain ``.mlp.experts.``, so the
DeepSpeed glue marks them as expert parameters (sharded with their experts over EP, their
gradients reduced over the expert-data-parallel group).

B starts at zero, so the adapted model equals the base at init; A is drawn from
(``seed``, the full tensor's name) over the full tensor and sliced to this rank's experts,
so every plan holds the same adapters as the single-rank model. Every base parameter is
frozen (``requires_grad=False``: out of the optimizer); the base may be FP8/MXFP4.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe_ext.dist import peak_memory_bytes
from moe_ext.errors import MoeExtError

log = logging.getLogger("moe_ext.train")

EXPERTS = "experts"
LORA_MARK = ".lora."  # in every adapter parameter's name


@dataclass
class LoraConf:
    """``train.lora.*``: rank 0 trains every weight (no LoRA)."""

    # adapter rank r; 0 = off (full-parameter training). A multiple of 8 keeps the expert
    # adapters' own GEMMs grouped in bf16 (16-byte rows); other ranks run them per expert
    rank: int = 0
    alpha: float = 16.0  # scale = alpha / rank
    # leaf module names inside the decoder layers (projections) or "experts"
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", EXPERTS]
    )
    seed: int = 0  # draws the adapters' A matrices


class LoraError(MoeExtError):
    """A LoRA setting that cannot run (one line: problem and fix)."""


def _projection_types() -> tuple[type, ...]:
    from moe_ext.quant.linear import Fp8Linear

    return (nn.Linear, Fp8Linear)


def adaptable_modules(args: Any) -> dict[str, str]:
    """Leaf name -> kind ("projection" or "experts") of every module inside the decoder
    layers that LoRA can adapt, from a model built on meta (no weight is allocated)."""
    from moe_ext.model import Transformer
    from moe_ext.moe.experts import GroupedExperts

    with torch.device("meta"):
        model = Transformer(args)
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name.startswith("layers."):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, GroupedExperts):
            found[leaf] = EXPERTS
        elif isinstance(module, _projection_types()):
            found.setdefault(leaf, "projection")
    return found


def check_lora(conf: LoraConf, args: Any, plan: Any, zero_stage: int) -> None:
    """Refuse, in one line, a LoRA setting that cannot run; before any weight exists
    (builds the model on meta only). Nothing to check when ``conf.rank`` is 0."""
    if conf.rank == 0:
        return
    if conf.rank < 0 or conf.alpha <= 0:
        raise LoraError(
            f"train.lora.rank={conf.rank}, train.lora.alpha={conf.alpha}: the rank must be "
            f">= 1 (0: no LoRA) and alpha > 0"
        )
    if zero_stage == 3:
        raise LoraError(
            "train.lora with train.zero_stage=3: ZeRO-3 partitions the frozen base too; "
            "use train.zero_stage=1 or 2 (the adapters' optimizer state is small)"
        )
    if plan.tp > 1 or plan.etp > 1:
        raise LoraError(
            f"train.lora with tp={plan.tp}, etp={plan.etp}: adapters on tensor-parallel "
            f"shards are not supported; use parallel.tp=1 (strategy replicate or ep_*)"
        )
    if not conf.targets:
        raise LoraError("train.lora.targets is empty; name modules, e.g. [q_proj,v_proj,experts]")
    from moe_ext.train.export import PEFT_EXPERT_FAMILIES

    if args.quantization is not None and EXPERTS in conf.targets:
        if args.model_type not in PEFT_EXPERT_FAMILIES:
            raise LoraError(
                f"train.lora on quantized {args.model_type} experts: their adapters can "
                f"neither merge into the quantized base nor load in PEFT; drop 'experts' "
                f"from train.lora.targets"
            )
    known = adaptable_modules(args)
    for target in conf.targets:
        if target not in known:
            raise LoraError(
                f"train.lora.targets: {target!r} names no adaptable module of "
                f"{args.model_type}; choose from {sorted(known)}"
            )


def lora_key(conf: LoraConf) -> Optional[dict[str, Any]]:
    """What a training checkpoint records of the LoRA setting (None: full training)."""
    if conf.rank == 0:
        return None
    return {
        "rank": conf.rank,
        "alpha": conf.alpha,
        "targets": list(conf.targets),
        "seed": conf.seed,
    }


def check_resume_lora(saved: Optional[dict[str, Any]], conf: LoraConf, where: str) -> None:
    """Refuse, in one line, resuming a checkpoint saved under another LoRA setting (its
    module and optimizer state hold other tensors). saved: its ``lora_key``."""
    if saved == lora_key(conf):
        return
    if saved is None:
        raise LoraError(
            f"{where} was saved by full-parameter training; resume without train.lora "
            f"(or start the LoRA run from its weights with checkpoint=)"
        )
    raise LoraError(
        f"{where} was saved with train.lora rank={saved['rank']} alpha={saved['alpha']} "
        f"targets={saved['targets']} seed={saved['seed']}; resume with the same train.lora"
    )


class LowRank(nn.Module):
    """The adapter of one projection: ``scale * B (A x)``, A [r, K], B [N, r]."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dtype, device):
        super().__init__()
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.A = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N] in x's dtype."""
        low = F.linear(x, self.A.to(x.dtype))  # [..., r]
        return self.scale * F.linear(low, self.B.to(x.dtype))

    def delta(self) -> torch.Tensor:
        """scale * B @ A: [N, K] (for merging)."""
        return self.scale * (self.B @ self.A)

    def attach(self, projection: nn.Module) -> None:
        """Become ``projection.lora`` and add this term to its outputs (a forward hook)."""
        projection.lora = self
        self._hook = projection.register_forward_hook(_add_low_rank)

    def detach(self, projection: nn.Module) -> None:
        """Undo ``attach`` (the projection computes its base output again)."""
        self._hook.remove()
        del projection.lora

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _add_low_rank(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted projection: output [..., N] + its adapter's term."""
    return output + module.lora(inputs[0])


def _draw_a(seed: int, name: str, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    """A full A tensor, uniform in +-1/sqrt(fan_in) (PEFT's default bound), as a pure
    function of (seed, name): equal on every rank and under every plan (float32, CPU)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


@dataclass
class LoraSummary:
    """What ``apply_lora`` did on this rank."""

    adapted: list[str]  # module names that got adapters
    trainable: int  # parameters (elements) the optimizer updates
    frozen: int  # frozen parameter and buffer elements (quantized storage counted as stored)
    trainable_bytes: int
    frozen_bytes: int

    def describe(self) -> str:
        return (
            f"LoRA: {len(self.adapted)} modules adapted, trainable {self.trainable:,} params "
            f"({_size(self.trainable_bytes)}), frozen {self.frozen:,} "
            f"({_size(self.frozen_bytes)})"
        )


def _size(nbytes: float) -> str:
    """Bytes as MiB below a GiB, else GiB."""
    if nbytes < 2**30:
        return f"{nbytes / 2**20:.2f} MiB"
    return f"{nbytes / 2**30:.2f} GiB"


def apply_lora(
    model: nn.Module, conf: LoraConf, ep_rank: int = 0, dtype: Optional[torch.dtype] = None
) -> LoraSummary:
    """Attach adapters to this rank's parallelized ``model`` (a native Transformer with real
    weights, tp = etp = 1) and freeze everything else; returns what it did.

    ep_rank: this rank's expert-parallel coordinate (its experts are the ep_rank-th block of
    the layer's experts); dtype: the adapters' dtype (default: the embedding's, else fp32)."""
    from moe_ext.moe.experts import DOWN, GATE_UP, GroupedExperts

    if dtype is None:
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = torch.float32 if ref is None else ref.dtype
    targets = set(conf.targets)
    for param in model.parameters():
        param.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if not name.startswith("layers.") or leaf not in targets:
            continue
        if isinstance(module, GroupedExperts):
            lora = module.add_lora(conf.rank, conf.alpha, dtype)
            e_local, e_total = module.num_experts, model.args.num_experts
            local = slice(ep_rank * e_local, (ep_rank + 1) * e_local)
            for proj, fan_in in ((GATE_UP, module.hidden_size), (DOWN, module.ffn_size)):
                a, _ = lora.pair(proj)
                full = _draw_a(
                    conf.seed, f"{name}.lora.{proj}", (e_total, *a.shape[1:]), fan_in
                )  # [E, r, in]
                with torch.no_grad():
                    a.copy_(full[local])
        elif isinstance(module, _projection_types()):
            n_out, n_in = module.weight.shape
            lora = LowRank(n_in, n_out, conf.rank, conf.alpha, dtype, module.weight.device)
            with torch.no_grad():
                lora.A.copy_(_draw_a(conf.seed, f"{name}.lora.A", (conf.rank, n_in), n_in))
            lora.attach(module)
        else:
            raise LoraError(
                f"train.lora.targets: {name} is a {type(module).__name__}, not a projection "
                f"or experts; remove {leaf!r} from the targets"
            )
        adapted.append(name)
    return summarize(model, adapted)


def summarize(model: nn.Module, adapted: list[str]) -> LoraSummary:
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return LoraSummary(
        adapted=adapted,
        trainable=sum(p.numel() for p in trainable),
        frozen=sum(t.numel() for t in frozen),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        frozen_bytes=sum(t.numel() * t.element_size() for t in frozen),
    )


def adapter_base_name(name: str) -> Optional[str]:
    """The base tensor an adapter parameter ``name`` adapts (None: not an adapter): a
    projection's ``...q_proj.lora.A`` -> ``...q_proj.weight``; an expert adapter
    ``...experts.lora.gate_up_A`` -> ``...experts.gate_up_proj`` (held by the same ranks:
    the base's ``shard_slices`` request places the adapter along ep and pp too)."""
    module, mark, leaf = name.partition(LORA_MARK)
    if not mark:
        return None
    if module.endswith("." + EXPERTS):
        return f"{module}.{'gate_up_proj' if leaf.startswith('gate_up') else 'down_proj'}"
    return f"{module}.weight"


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Adapted modules by name: projections (``.lora`` is a LowRank) and experts."""
    return {n: m for n, m in model.named_modules() if getattr(m, "lora", None) is not None}


@torch.no_grad()
def merge_lora_(model: nn.Module) -> None:
    """Fold every adapter into its (unquantized) base weight and remove it: the model then
    computes what the adapted one did, with the base's parameter names only."""
    from moe_ext.moe.experts import GroupedExperts

    for name, module in lora_modules(model).items():
        if isinstance(module, GroupedExperts):
            module.merge_lora_()
            continue
        if not isinstance(module, nn.Linear):
            raise LoraError(
                f"cannot merge the adapter of {name} into its quantized weight; export the "
                f"adapters (PEFT format) instead"
            )
        module.weight.add_(module.lora.delta().to(module.weight.dtype))  # [N, K]
        module.lora.detach(module)


def memory_line(summary: LoraSummary, device: torch.device, rank: int) -> str:
    """One log line: this rank's trainable/frozen parameters and its memory (peak allocated
    on CUDA, resident set size on CPU)."""
    kind = "peak GPU memory" if device.type == "cuda" else "peak RSS"
    return f"rank {rank}: {summary.describe()}; {kind} {_size(peak_memory_bytes(device))}"


def memory_lines(summary: LoraSummary, device: torch.device, rank: int, world: int) -> list[str]:
    """Every rank's ``memory_line``, gathered (collective; torch.distributed must be up when
    world > 1). Rank 0 logs them; all ranks get the list."""
    line = memory_line(summary, device, rank)
    if world == 1:
        return [line]
    import torch.distributed as dist

    lines: list[Optional[str]] = [None] * world
    dist.all_gather_object(lines, line)
    return [str(x) for x in lines]

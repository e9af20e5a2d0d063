"""ParallelPlan: which strategy, which degrees, and why.

``build_plan`` turns the strategy and parallel configs, the world size, the topology and
the model shape into a validated ``ParallelPlan`` before any process group exists, so a
bad combination is a one-line ``PlanError`` naming the fix instead of a hang or a shape
error deep inside a collective.

Degrees (see docs/ARCHITECTURE.md, "Rank layout"):
  attention side  world = pp * dp * tp      (tp fastest-varying, pp slowest)
  expert side     world = pp * edp * ep * etp  (etp fastest), so ep * etp * edp = tp * dp
Degrees the user leaves out (None) are derived: tp and pp default to 1 and the strategy's
own axis takes the remaining ranks: dp for replicate, tp for tp_experts (etp = tp), and
for ep_* dp fills and ep = tp * dp.

``strategy=auto`` with a machine profile (``build_plan(profile=...)``; the launchers pass
``moe_ext.cost.select_profile``: ``plan.profile=<file>``, else the shipped profile closest
to the topology) ranks every valid plan with the cost model (``moe_ext.cost``) and takes
the fastest that fits: decode ms per step for inference at the job's batch and prompt
length, prefill ms for training; ``plan.reason`` names the profile and the predicted
ms/step of the pick and the runner-up. Degrees the user gives (``parallel.tp=2``) restrict
the candidates. Without a profile (none given, none shipped for the link kind, or a cpu
topology) auto is rule-based; the rule that fired is written into ``plan.reason``:
  world 1                              -> replicate
  NVLink + P2P atomics                 -> ep_nvshmem when EP pays off (ep_nccl where the
                                          NVSHMEM dispatcher's check_plan refuses the
                                          degrees), else replicate
  NVLink without P2P atomics           -> ep_nccl when EP pays off, else replicate
  PCIe / CPU                           -> replicate when the whole model (+20% headroom)
                                          fits one rank, else the cheaper of ep_allgather
                                          and ep_nccl under a latency + bandwidth model
EP "pays off" when the experts do not fit one rank, or when there are many experts
(>= MANY_EXPERTS) to spread over several ranks. A given parallel.ep > 1 keeps auto on an
ep_* strategy, a given parallel.etp > 1 picks tp_experts. Auto's ep is the largest divisor
of tp*dp that divides the expert count, except on PCIe / CPU with known memory: there it is
the smallest such divisor whose weights fit (fewer bytes per exchange; EP groups side by
side).

Batch below the replicas: an ep_* plan whose job batch (``batch``: sequences per step over
all replicas) is smaller than its dp would leave replicas without a sequence, their ranks
only joining the busy replicas' expert exchanges. The rules then take the smallest tp the
heads allow with dp <= batch, keeping ep (attention tensor-parallel, experts over the same
ranks, tokens split over TP for the exchange); the cost-model path takes the fastest fitting
plan with dp <= batch over such an ep_* plan. Given parallel.tp / parallel.dp are kept; an
unknown batch changes nothing. docs/PLANNER.md, "Batch smaller than the replicas".

Memory counts the bytes the weights are stored in (``moe_ext.quant.layout.stored_tensors``):
fp8 weights 1 byte + a float32 scale per block, MXFP4 experts 0.5 byte + a 1-byte scale per
32 values, everything else at ``dtype_bytes`` (the model dtype). Auto refuses a model whose
weights exceed the memory of all ranks together, naming the fix. With a quantized model, a
TP / expert-TP degree whose slices cut a scale block is refused (``check_quantized_split``),
naming the degrees that keep whole blocks; auto skips such candidates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from moe_ext.config import ParallelConf, StrategyConf
from moe_ext.errors import MoeExtError
from moe_ext.model.args import ModelArgs
from moe_ext.model.families import expert_param
from moe_ext.moe.dispatch import DISPATCHERS, DispatcherConfigError, dispatcher_class
from moe_ext.quant.config import QuantizationError
from moe_ext.quant.layout import stored_tensors

if TYPE_CHECKING:  # plan depends on topology only through these attributes
    from moe_ext.topology import Topology

STRATEGIES = ("replicate", "tp_experts", "ep_allgather", "ep_nccl", "ep_nvshmem")
EP_STRATEGIES = ("ep_allgather", "ep_nccl", "ep_nvshmem")
DEFAULT_DISPATCHER = {
    "replicate": "local",
    "tp_experts": "tp_sharded",
    "ep_allgather": "allgather_rs",
    "ep_nccl": "nccl_a2a",
    "ep_nvshmem": "nvshmem",
}

HEADROOM = 1.2  # weights * 1.2 must fit: KV cache and activations take the rest
MANY_EXPERTS = 16  # fine-grained MoE (Qwen 60-128 experts) is worth spreading over NVLink
# Cost model constants for the PCIe choice between all-gather and all-to-all, from the
# 2xH200 measurements in docs/PERF.md ("Link floors"): ~40 us per collective whatever the link, and
# ~24 GB/s all_to_all bus bandwidth through host memory (PCIe stand-in).
COLLECTIVE_LATENCY_S = 40e-6
DEFAULT_LINK_GBPS = {"pcie": 24.0, "nvlink": 280.0, "cpu": 10.0}


class PlanError(MoeExtError):
    """A strategy/degree/topology combination that cannot run; the message names the fix."""


@dataclass(frozen=True)
class ParallelPlan:
    strategy: str  # one of STRATEGIES (never "auto": auto is resolved here)
    world_size: int
    tp: int
    pp: int
    dp: int
    ep: int
    etp: int
    edp: int
    dispatcher: str  # dotted path of the Dispatcher class
    reason: str  # one line: why this strategy and these degrees
    # dual-batch overlap in each MoE layer (Dispatcher.set_overlap); 1: off
    overlap_microbatches: int = 1

    @property
    def is_expert_parallel(self) -> bool:
        """Experts are split across ranks (an ep_* strategy), whatever ep is."""
        return self.strategy in EP_STRATEGIES

    @property
    def tokens_split_over_tp(self) -> bool:
        """ep_* with tp > 1: each TP rank sends only its 1/tp slice of the (identical)
        tokens into the dispatcher and all-gathers the result after combine."""
        return self.is_expert_parallel and self.tp > 1

    def describe(self) -> str:
        return (
            f"{self.strategy}: world={self.world_size} tp={self.tp} pp={self.pp} "
            f"dp={self.dp} | ep={self.ep} etp={self.etp} edp={self.edp} | "
            f"dispatcher={self.dispatcher.rpartition('.')[2]}"
            + (f" overlap={self.overlap_microbatches}" if self.overlap_microbatches > 1 else "")
            + f" | {self.reason}"
        )


# ---------------------------------------------------------------------------------------
# Model memory
# ---------------------------------------------------------------------------------------


def _is_expert(name: str) -> bool:
    """A routed-expert tensor (weights and biases), by its logical name."""
    return bool(expert_param(name)) or ".mlp.experts." in name


def model_param_counts(model: ModelArgs) -> tuple[int, int]:
    """(total parameters, routed-expert parameters), from the same tensor list the model
    and the checkpoint maps use (``Family.param_shapes``)."""
    total = experts = 0
    for name, shape in model.family.param_shapes(model).items():
        n = math.prod(shape)
        total += n
        if _is_expert(name):
            experts += n
    return total, experts


class WeightBytes(NamedTuple):
    """Bytes of stored weights, split the way ranks split them. Each figure includes its
    quantization scales; ``*_scales`` says how much of it they are."""

    dense: int  # everything but routed experts: attention, dense MLPs, embeddings, norms
    experts: int  # routed experts (weights, biases)
    dense_scales: int  # fp8 scale_inv of quantized dense weights (part of ``dense``)
    expert_scales: int  # fp8 scale_inv / mxfp4 scales of the experts (part of ``experts``)


def model_weight_bytes(model: ModelArgs, dtype_bytes: int = 2) -> WeightBytes:
    """Bytes of every tensor the model stores (``moe_ext.quant.layout.stored_tensors``):
    quantized weights at their stored dtype (fp8: 1 byte, mxfp4 blocks: 0.5 byte per value)
    plus their scales (fp8: float32 per block, mxfp4: 1 byte per 32 values), every other
    tensor at ``dtype_bytes``."""
    dense = experts = dense_scales = expert_scales = 0
    for spec in stored_tensors(model).values():
        itemsize = dtype_bytes if spec.dtype is None else spec.dtype.itemsize
        n = math.prod(spec.shape) * itemsize
        scale = n if spec.role in ("scale_inv", "scales") else 0
        if _is_expert(spec.logical):
            experts, expert_scales = experts + n, expert_scales + scale
        else:
            dense, dense_scales = dense + n, dense_scales + scale
    return WeightBytes(dense, experts, dense_scales, expert_scales)


def model_memory_bytes(model: ModelArgs, dtype_bytes: int = 2) -> tuple[int, int]:
    """(all weights, routed-expert weights) in bytes as stored: quantized weights with their
    scales, the rest at ``dtype_bytes`` per parameter (``model_weight_bytes``)."""
    w = model_weight_bytes(model, dtype_bytes)
    return w.dense + w.experts, w.experts


class MemoryEstimate(NamedTuple):
    dense_bytes: int  # non-expert weights held by one rank
    expert_bytes: int  # routed-expert weights held by one rank
    total_bytes: int  # dense + experts
    needed_bytes: int  # total * HEADROOM (KV cache, activations)
    available_bytes: Optional[int]  # per rank; None when the topology does not say
    # KV cache of one sequence of ``context`` tokens on the busiest rank: the attention
    # kind's own layout (GQA K/V of the rank's heads, MLA's replicated latent, sliding
    # windows bounded), for the layers of one pipeline stage
    kv_bytes_per_sequence: int
    context: int  # tokens per sequence the KV figure is for
    scale_bytes: int = 0  # of total_bytes: quantization scales (fp8 scale_inv, mxfp4 scales)


def rank_weight_bytes(
    model: ModelArgs, tp: int, pp: int, ep: int, etp: int, dtype_bytes: int = 2
) -> WeightBytes:
    """``model_weight_bytes`` on the busiest rank: non-expert weights (and their scales) are
    split by tp (heads, vocab) and pp (layers); experts by ep (whole experts), etp (FFN)
    and pp."""
    w = model_weight_bytes(model, dtype_bytes)
    return WeightBytes(
        math.ceil(w.dense / (tp * pp)),
        math.ceil(w.experts / (ep * etp * pp)),
        math.ceil(w.dense_scales / (tp * pp)),
        math.ceil(w.expert_scales / (ep * etp * pp)),
    )


def rank_memory_bytes(
    model: ModelArgs, tp: int, pp: int, ep: int, etp: int, dtype_bytes: int = 2
) -> tuple[int, int]:
    """(non-expert, expert) stored weight bytes on the busiest rank (``rank_weight_bytes``)."""
    w = rank_weight_bytes(model, tp, pp, ep, etp, dtype_bytes)
    return w.dense, w.experts


def available_memory_per_rank(topology: "Topology", world_size: int) -> Optional[int]:
    """Bytes one rank may use: the smallest GPU's memory, or on a CPU topology the host
    memory shared by all ranks of the box."""
    if topology.kind == "cpu":
        host = getattr(topology, "host_memory_bytes", None) or topology.min_gpu_memory_bytes
        return None if not host else int(host) // max(1, world_size)
    mem = topology.min_gpu_memory_bytes
    return int(mem) if mem else None


def estimate_memory(
    plan: ParallelPlan,
    model: ModelArgs,
    topology: "Topology",
    dtype_bytes: int = 2,
    context: Optional[int] = None,
) -> MemoryEstimate:
    """Weights (as stored, scales included) and KV cache on the busiest rank;
    ``dtype_bytes``: the model dtype's (unquantized tensors, KV cache); ``context``
    (default: the model's max_position_embeddings) sizes the KV figure of one sequence."""
    w = rank_weight_bytes(model, plan.tp, plan.pp, plan.ep, plan.etp, dtype_bytes)
    dense, experts = w.dense, w.experts
    total = dense + experts
    context = context or model.max_position_embeddings
    kv_all_layers = model.family.kv_cache_bytes(model, plan.tp, context, dtype_bytes)
    stage_layers = math.ceil(model.num_hidden_layers / plan.pp)
    return MemoryEstimate(
        dense,
        experts,
        total,
        math.ceil(total * HEADROOM),
        available_memory_per_rank(topology, plan.world_size),
        math.ceil(kv_all_layers * stage_layers / model.num_hidden_layers),
        context,
        w.dense_scales + w.expert_scales,
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------
# Degrees
# ---------------------------------------------------------------------------------------


def _given(parallel: ParallelConf, name: str) -> Optional[int]:
    value = getattr(parallel, name, None)
    if value is None:
        return None
    value = int(value)
    if value < 1:
        raise PlanError(
            f"parallel.{name}={value} must be >= 1; set it to a positive degree "
            f"or leave it out to derive it"
        )
    return value


def _fill(world_size: int, used: int, what: str, axis: str) -> int:
    if world_size % used:
        raise PlanError(
            f"world size {world_size} is not divisible by {what}={used}; "
            f"choose degrees whose product divides {world_size} so {axis} can "
            f"fill the remaining ranks"
        )
    return world_size // used


def _derive_degrees(
    strategy: str, parallel: ParallelConf, world_size: int, num_experts: int, auto: bool
) -> tuple[int, int, int, int, int, int]:
    """(tp, pp, dp, ep, etp, edp) with the user's degrees kept and the rest derived."""
    tp, pp, dp = _given(parallel, "tp"), _given(parallel, "pp") or 1, _given(parallel, "dp")
    ep, etp = _given(parallel, "ep"), _given(parallel, "etp")

    if strategy == "tp_experts" and tp is None:
        dp = dp or 1
        tp = _fill(world_size, pp * dp, "pp*dp", "tp")
    tp = tp or 1
    if dp is None:
        dp = _fill(world_size, tp * pp, "tp*pp", "dp")
    if tp * pp * dp != world_size:
        raise PlanError(
            f"tp*pp*dp = {tp}*{pp}*{dp} = {tp * pp * dp} != world size "
            f"{world_size}; change parallel.tp/pp/dp so their product is "
            f"{world_size} (or leave parallel.dp out to derive it)"
        )

    if strategy == "replicate":
        if (ep or 1) > 1 or (etp or 1) > 1:
            raise PlanError(
                f"strategy=replicate keeps all experts whole on every rank but "
                f"parallel.ep={ep} etp={etp}; drop parallel.ep/etp or use "
                f"strategy=ep_nccl (ep) / strategy=tp_experts (etp)"
            )
        return tp, pp, dp, 1, 1, tp * dp
    if strategy == "tp_experts":
        if ep not in (None, 1):
            raise PlanError(
                f"strategy=tp_experts keeps every expert on every rank but "
                f"parallel.ep={ep}; drop parallel.ep or use strategy=ep_nccl"
            )
        if etp not in (None, tp):
            raise PlanError(
                f"strategy=tp_experts shards experts over the TP group "
                f"(etp = tp = {tp}) but parallel.etp={etp}; drop parallel.etp "
                f"or set it to {tp}"
            )
        return tp, pp, dp, 1, tp, dp
    # ep_*: experts split over ep ranks taken from the tp*dp ranks of one stage
    if etp not in (None, 1):
        raise PlanError(
            f"strategy={strategy} runs whole experts (etp=1) but parallel.etp="
            f"{etp}; drop parallel.etp or use strategy=tp_experts"
        )
    if ep is None:
        # auto may shrink ep to a divisor of the expert count; an explicit ep_* strategy
        # takes all tp*dp ranks and reports a bad expert count as an error below
        ep = math.gcd(num_experts, tp * dp) if auto else tp * dp
    if (tp * dp) % ep:
        raise PlanError(
            f"parallel.ep={ep} does not divide tp*dp = {tp * dp}; choose ep "
            f"from the divisors of {tp * dp}"
        )
    return tp, pp, dp, ep, 1, tp * dp // ep


def _validate(
    strategy: str, world_size: int, tp: int, pp: int, ep: int, etp: int, model: ModelArgs
) -> None:
    """The model's shape against the degrees. What a dispatcher needs of the degrees and the
    topology is its own ``check_plan`` (``_check_dispatcher``)."""
    nH, nKV, L, E = (
        model.num_attention_heads,
        model.num_key_value_heads,
        model.num_hidden_layers,
        model.num_experts,
    )
    if E % ep:
        raise PlanError(
            f"{E} experts cannot be split over ep={ep}; set parallel.ep to a "
            f"divisor of {E} that divides tp*dp"
        )
    if nH % tp:
        raise PlanError(
            f"{nH} attention heads cannot be split over tp={tp}; set parallel.tp "
            f"to a divisor of {nH}"
        )
    if nKV % tp and tp % nKV:
        raise PlanError(
            f"{nKV} kv heads neither split over tp={tp} nor replicate evenly "
            f"into it; set parallel.tp to a divisor or multiple of {nKV}"
        )
    if L < pp:
        raise PlanError(f"pp={pp} pipeline stages but only {L} layers; set parallel.pp <= {L}")
    F = model.moe_intermediate_size
    if F % etp:
        raise PlanError(
            f"expert FFN size {F} cannot be split over etp={etp}; choose "
            f"parallel.tp dividing {F} with strategy=tp_experts"
        )
    if strategy == "tp_experts" and tp == 1 and world_size > 1:
        raise PlanError(
            "strategy=tp_experts with tp=1 shards nothing; set parallel.tp > 1 "
            "or use strategy=replicate"
        )


# ---------------------------------------------------------------------------------------
# Quantized weights: TP / expert-TP slices must hold whole scale blocks
# ---------------------------------------------------------------------------------------


def _block_cut(plan: ParallelPlan, model: ModelArgs) -> Optional[QuantizationError]:
    """The first quantized weight some rank's slice would cut mid scale block, else None.

    Every rank's ``shard_slices`` (names and boxes only, no tensors) goes through
    ``stored_requests``, the same mapping the checkpoint reader uses, so the planner and
    the loader cannot disagree about what a rank reads."""
    if model.quantization is None:
        return None
    # the model package imports the planner's dependencies, not the other way round
    from moe_ext.model.parallelize import ParallelizeError, RankCoords, shard_slices
    from moe_ext.quant.layout import stored_requests

    seen = set()
    for rank in range(plan.world_size):
        coords = RankCoords.of(plan, rank)
        key = (coords.tp_rank, coords.pp_rank, coords.ep_rank, coords.etp_rank)
        if key in seen:  # dp / edp replicas read the same slices
            continue
        seen.add(key)
        try:
            stored_requests(shard_slices(plan, coords, model), model)
        except QuantizationError as err:
            return err
        except ParallelizeError as err:  # plan_with_degrees skips _validate's shape checks
            raise PlanError(str(err)) from err
    return None


def _with_tp(plan: ParallelPlan, tp: int) -> ParallelPlan:
    """``plan`` with TP degree ``tp`` and dp filling the rest of each stage (tp_experts:
    etp = tp); ep and edp keep their values, as ep * etp * edp = tp * dp stays the same."""
    per_stage = plan.world_size // plan.pp
    dp = per_stage // tp
    if plan.strategy == "tp_experts":
        return replace(plan, tp=tp, dp=dp, etp=tp, edp=dp)
    return replace(plan, tp=tp, dp=dp)


def check_quantized_split(plan: ParallelPlan, model: ModelArgs) -> None:
    """PlanError (one line) when a rank's TP or expert-TP slice of a quantized weight cuts a
    scale block (fp8: bo x bi, mxfp4: 32 columns): such a slice cannot be read without
    dequantizing on the host. Names the TP degrees of this world that keep whole blocks."""
    err = _block_cut(plan, model)
    if err is None:
        return
    per_stage = plan.world_size // plan.pp
    working = []
    for tp in range(1, per_stage + 1):
        if per_stage % tp or tp == plan.tp:
            continue
        candidate = _with_tp(plan, tp)
        try:
            _validate(
                candidate.strategy, plan.world_size, tp, plan.pp, plan.ep, candidate.etp, model
            )
        except PlanError:
            continue
        if _block_cut(candidate, model) is None:
            working.append(f"parallel.tp={tp}")
    degree = f"tp={plan.tp}" + (f" (etp={plan.etp})" if plan.etp > 1 else "")
    fix = (
        f"{' or '.join(working)} {'keeps' if len(working) == 1 else 'keep'} whole blocks"
        if working
        else "no TP degree of this world keeps whole blocks; use an ep_* strategy or "
        "replicate (whole experts) with parallel.tp=1"
    )
    raise PlanError(
        f"strategy={plan.strategy} {degree} cuts a quantization scale block "
        f"({model.quantization.describe()}): {err}; {fix}"
    ) from err


# ---------------------------------------------------------------------------------------
# Auto
# ---------------------------------------------------------------------------------------


def _link_gbps(topology: "Topology") -> float:
    bw = getattr(topology, "min_pair_bandwidth_gbps", None)
    return float(bw) if bw else DEFAULT_LINK_GBPS.get(topology.kind, 24.0)


def exchange_seconds(
    strategy: str, tokens: int, model: ModelArgs, ep: int, dtype_bytes: int, link_gbps: float
) -> float:
    """Modelled time of one MoE layer's token exchange per rank (forward).

    ep_nccl: a split-size exchange + host sync, then two all_to_all_single, each moving
    the T*k routed rows that leave the rank: 2 * T*k*H*(ep-1)/ep elements.
    ep_allgather: all-gather of tokens and routing, reduce-scatter of outputs; every rank
    sends its T rows to ep-1 peers twice: 2 * T*H*(ep-1) elements, no host sync.
    So all-gather moves ep/k times the bytes of all-to-all with one round fewer.
    """
    H, k = model.hidden_size, model.num_experts_per_tok
    bw = link_gbps * 1e9
    if strategy == "ep_nccl":
        rows, rounds = 2 * tokens * k * (ep - 1) / ep, 4
    else:
        rows, rounds = 2 * tokens * (ep - 1), 3
    return rounds * COLLECTIVE_LATENCY_S + rows * H * dtype_bytes / bw


def _smallest_fitting_ep(
    model: ModelArgs,
    world_size: int,
    tp: int,
    pp: int,
    largest: int,
    dtype_bytes: int,
    avail: int,
) -> int:
    """The smallest EP degree > 1 that divides ``largest`` (itself a divisor of the expert
    count and of tp*dp) whose weights fit ``avail`` per rank with headroom and whose slices
    keep quantization blocks whole; ``largest`` when none does."""
    dp = world_size // (tp * pp)
    for ep in range(2, largest):
        if largest % ep == 0:
            dense, experts = rank_memory_bytes(model, tp, pp, ep, 1, dtype_bytes)
            if math.ceil((dense + experts) * HEADROOM) > avail:
                continue
            candidate = ParallelPlan(
                "ep_nccl", world_size, tp, pp, dp, ep, 1, tp * dp // ep, "", "candidate"
            )
            if _block_cut(candidate, model) is None:
                return ep
    return largest


def _refuse_unless_weights_fit(
    model: ModelArgs, world_size: int, avail: int, dtype_bytes: int
) -> None:
    """PlanError when the stored weights exceed the memory of all ranks together: no
    split of this world (EP, TP or PP) can hold them."""
    total, _ = model_memory_bytes(model, dtype_bytes)
    if total <= world_size * avail:
        return
    quant = model.quantization
    stored = (
        f"{quant.describe()}, other tensors at {dtype_bytes} bytes"
        if quant is not None
        else f"{dtype_bytes} bytes per parameter"
    )
    fix = "add ranks" + (
        "" if quant is not None else ", or use a quantized checkpoint (fp8 / mxfp4, docs/QUANT.md)"
    )
    raise PlanError(
        f"auto: the weights take {_gib(total)} ({stored}), more than the {world_size} ranks "
        f"hold together ({world_size} x {_gib(avail)}); no split fits; {fix}"
    )


def _profile_of(profile: Any) -> Any:
    """The MachineProfile inside a ``ProfileChoice`` (or the profile itself); None."""
    return getattr(profile, "profile", profile) if profile is not None else None


def _choose_by_cost(
    parallel: ParallelConf,
    world_size: int,
    topology: "Topology",
    model: ModelArgs,
    dtype_bytes: int,
    batch: Optional[int],
    prompt_len: Optional[int],
    profile: Any,
    objective: str,
    ranks_per_node: Optional[int] = None,
) -> Optional[tuple[str, str, ParallelConf]]:
    """(strategy, reason, degrees) of the fastest fitting plan under the cost model; None
    when no enumerated plan has the degrees the user gave (the rules then say why)."""
    from moe_ext.cost import (
        DEFAULT_BATCH,
        DEFAULT_PROMPT_LEN,
        plan_label,
        rank_plans,
        why_slower,
    )

    machine = _profile_of(profile)
    why = getattr(profile, "why", None) or f"profile {machine.name}"
    given = {f.name: _given(parallel, f.name) for f in fields(ParallelConf)}
    avail = available_memory_per_rank(topology, world_size)
    if avail is not None:
        _refuse_unless_weights_fit(model, world_size, avail, dtype_bytes)
    job = []
    if batch is None:
        job.append(f"batch unknown, assumed {DEFAULT_BATCH}")
    if prompt_len is None:
        job.append(f"prompt length unknown, assumed {DEFAULT_PROMPT_LEN}")
    B, S = batch or DEFAULT_BATCH, prompt_len or DEFAULT_PROMPT_LEN
    ranked = rank_plans(
        model,
        machine,
        world_size,
        B,
        S,
        dtype_bytes,
        avail,
        topology=topology,
        gpus_per_node=ranks_per_node,
        objective=objective,
        given=given,
    )
    if not ranked:
        return None

    def ms(r) -> float:
        p = r.prediction
        return p.decode_ms if objective == "decode" else p.prefill_ms

    unit = "ms/step decode" if objective == "decode" else "ms prefill"
    best = ranked[0]
    warn = idle = ""
    if best.prediction.fits is False:  # nothing fits: the least memory per rank
        best = min(ranked, key=lambda r: (r.prediction.memory_bytes, ms(r)))
        warn = (
            f"; WARNING: no plan fits, the smallest needs "
            f"{_gib(best.prediction.memory_bytes)} per rank, {_gib(avail)} available: "
            f"add ranks or use a quantized checkpoint"
        )
    elif batch is not None and best.plan.is_expert_parallel and best.plan.dp > batch:
        # an EP replica without a sequence still joins every expert exchange of the busy
        # ones (lockstep) while its attention does nothing: take the fastest plan whose
        # replicas all have a sequence (tp x ep over the same ranks, tp_experts, ...), as
        # the rules do. Replicate / tp_experts replicas are independent: an idle one
        # slows nobody, and the prediction (one replica's step) already prices it.
        busy = [r for r in ranked if r.plan.dp <= batch and r.prediction.fits is not False]
        if busy:
            idle = (
                f"; {plan_label(best.plan)} ({ms(best):.2f} {unit}) not taken: batch {batch} "
                f"< its {best.plan.dp} attention replicas leaves {best.plan.dp - batch} idle"
            )
            best, ranked = busy[0], busy
    runner = next((r for r in ranked if r is not best), None)
    text = (
        f"{why}: {plan_label(best.plan)} predicted {ms(best):.2f} {unit} at batch {B}, "
        f"prompt {S}" + (f" ({'; '.join(job)})" if job else "")
    )
    if runner is not None:
        slower = why_slower(best.prediction, runner.prediction, objective) or "ties"
        text += f"; runner-up {plan_label(runner.plan)} {ms(runner):.2f} {unit} ({slower})"
    text += idle
    plan = best.plan
    degrees = ParallelConf(
        tp=plan.tp,
        pp=plan.pp,
        dp=plan.dp,
        ep=plan.ep if plan.is_expert_parallel else None,
        etp=plan.etp if plan.strategy == "tp_experts" else None,
    )
    return plan.strategy, text + warn, degrees


def _choose(
    parallel: ParallelConf,
    world_size: int,
    topology: "Topology",
    model: ModelArgs,
    dtype_bytes: int,
    tokens_per_step: Optional[int],
) -> tuple[str, str, Optional[int]]:
    """(strategy, reason, ep) for strategy=auto; ep None: derived as for an explicit
    strategy."""
    if world_size == 1:
        return "replicate", "world size 1: all experts local, no communication", None
    if (_given(parallel, "etp") or 1) > 1:
        return ("tp_experts", f"parallel.etp={parallel.etp} given: experts sharded over TP", None)

    tp, pp, dp, ep, _, _ = _derive_degrees(
        "ep_nccl", parallel, world_size, model.num_experts, auto=True
    )
    ep_requested = (_given(parallel, "ep") or 1) > 1  # the user asked for EP: no replicate
    dense, experts = rank_memory_bytes(model, tp, pp, 1, 1, dtype_bytes)
    needed = math.ceil((dense + experts) * HEADROOM)
    avail = available_memory_per_rank(topology, world_size)
    if avail is not None:
        _refuse_unless_weights_fit(model, world_size, avail, dtype_bytes)
    fits = avail is None or needed <= avail
    mem = f"replicated weights need {_gib(needed)} per rank with 20% headroom" + (
        f", {_gib(avail)} available" if avail is not None else ", memory unknown (assumed to fit)"
    )
    ep_possible = ep > 1

    if topology.kind == "nvlink":
        ep_pays = ep_possible and (ep_requested or not fits or model.num_experts >= MANY_EXPERTS)
        why_ep = (
            f"experts do not fit one GPU ({mem})"
            if not fits
            else f"parallel.ep={ep} given"
            if ep_requested
            else f"{model.num_experts} experts spread over ep={ep}"
        )
        if not ep_pays:
            why = (
                f"ep={ep} impossible with {model.num_experts} experts on tp*dp={tp * dp}"
                if not ep_possible
                else f"only {model.num_experts} experts and {mem}"
            )
            return "replicate", f"nvlink: {why}; replicate avoids all token exchange", None
        warn = _still_too_big(model, tp, pp, ep, dtype_bytes, avail)
        if topology.all_pairs_nvlink and topology.all_pairs_p2p_atomics:
            return (
                "ep_nvshmem",
                (f"nvlink with P2P atomics: {why_ep}; one-sided NVSHMEM dispatch{warn}"),
                None,
            )
        return "ep_nccl", f"nvlink without P2P atomics: {why_ep}; NCCL all-to-all{warn}", None

    # pcie / cpu: every token exchange is expensive, avoid it while memory allows
    if (fits and not ep_requested) or not ep_possible:
        why = (
            mem
            if fits
            else (
                f"{mem}, but {model.num_experts} experts cannot be split over "
                f"tp*dp={tp * dp} ranks (add ranks or pipeline stages)"
            )
        )
        return ("replicate", f"{topology.kind}: {why}; replicate avoids all token exchange", None)
    smallest = ""
    if not ep_requested and avail is not None:
        # Each rank's exchange bytes grow with (ep-1)/ep, and the EP groups of a smaller
        # degree run side by side: on 4 GPUs with P2P off, EP 2 x 2 decoded batch 64 at
        # 4635 tok/s against 4043 for EP 4 (docs/PERF.md). Use the least EP that fits.
        largest = ep
        ep = _smallest_fitting_ep(model, world_size, tp, pp, largest, dtype_bytes, avail)
        if ep < largest:
            smallest = ", the smallest EP degree that fits (each exchange moves fewer bytes)"
    link = _link_gbps(topology)
    if tokens_per_step is None:
        # unknown batch: compare bandwidth terms only (the large-batch regime)
        ag_cheaper = ep <= model.num_experts_per_tok
        basis = (
            f"tokens/step unknown, all-gather moves ep/k = {ep}/"
            f"{model.num_experts_per_tok} of all-to-all's bytes"
        )
    else:
        t_a2a = exchange_seconds("ep_nccl", tokens_per_step, model, ep, dtype_bytes, link)
        t_ag = exchange_seconds("ep_allgather", tokens_per_step, model, ep, dtype_bytes, link)
        ag_cheaper = t_ag <= t_a2a
        basis = (
            f"{tokens_per_step} tokens/step at {link:.1f} GB/s: all-gather "
            f"{t_ag * 1e6:.0f} us vs all-to-all {t_a2a * 1e6:.0f} us per layer"
        )
    choice = "ep_allgather" if ag_cheaper else "ep_nccl"
    why = f"parallel.ep={ep} given" if fits else f"experts do not fit one rank ({mem})"
    return (
        choice,
        (
            f"{topology.kind}: {why}; ep={ep}{smallest}; {basis}"
            + _still_too_big(model, tp, pp, ep, dtype_bytes, avail)
        ),
        ep,
    )


def _attention_tp_for_batch(
    strategy: str,
    parallel: ParallelConf,
    world_size: int,
    batch: Optional[int],
    model: ModelArgs,
) -> tuple[ParallelConf, str]:
    """An ep_* plan whose ``batch`` (sequences per step, all replicas) is smaller than its
    attention data-parallel degree would leave replicas without a sequence: take the
    smallest tp (a divisor of the stage's ranks the heads allow) with dp <= batch, keeping
    the EP degree, so attention runs tensor-parallel and the experts stay split over the
    same ranks (the plan splits tokens over TP for the exchange). Degrees the user gave
    (parallel.tp / parallel.dp) are kept. Returns (degrees, clause for plan.reason)."""
    if batch is None or _given(parallel, "tp") is not None or _given(parallel, "dp") is not None:
        return parallel, ""
    tp, pp, dp, ep, _, _ = _derive_degrees(strategy, parallel, world_size, model.num_experts, True)
    if dp <= batch:
        return parallel, ""
    per_stage = world_size // pp
    idle = f"batch {batch} < {dp} attention replicas"
    for wider in range(tp + 1, per_stage + 1):
        rest = per_stage // wider
        if per_stage % wider or rest > batch:
            continue
        try:
            _validate(strategy, world_size, wider, pp, ep, 1, model)
        except PlanError:
            continue
        candidate = ParallelPlan(
            strategy, world_size, wider, pp, rest, ep, 1, wider * rest // ep, "", "candidate"
        )
        if _block_cut(candidate, model) is not None:
            continue
        changed = {f.name: getattr(parallel, f.name, None) for f in fields(ParallelConf)}
        changed |= {"tp": wider, "dp": rest, "ep": ep}
        return ParallelConf(**changed), (
            f"; {idle}: attention tp={wider} with ep={ep} over the same ranks (no replica idle)"
        )
    return parallel, (
        f"; {idle}, but no tp the model's heads allow brings dp to <= {batch}: "
        f"{dp - batch} replica(s) idle per step"
    )


def _still_too_big(
    model: ModelArgs, tp: int, pp: int, ep: int, dtype_bytes: int, avail: Optional[int]
) -> str:
    """A warning clause when even the expert-parallel plan does not fit."""
    dense, experts = rank_memory_bytes(model, tp, pp, ep, 1, dtype_bytes)
    needed = math.ceil((dense + experts) * HEADROOM)
    if avail is None or needed <= avail:
        return ""
    return (
        f"; WARNING: still {_gib(needed)} per rank at ep={ep}, more than {_gib(avail)}: "
        f"add ranks or pipeline stages (parallel.pp)"
    )


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def plan_with_degrees(
    strategy: str,
    world_size: int,
    tp: int = 1,
    pp: int = 1,
    ep: Optional[int] = None,
    reason: str = "degrees given",
    model: Optional[ModelArgs] = None,
) -> ParallelPlan:
    """The plan ``build_plan`` derives for an explicit strategy and tp/pp (and ep, derived
    when None), without its topology and model checks: for tests, benchmarks and callers
    that own the model. The dispatcher's own limits on the degrees still apply, and so, for
    a quantized ``model``, does ``check_quantized_split``."""
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    degrees = _derive_degrees(
        strategy, ParallelConf(tp=tp, pp=pp, ep=ep), world_size, num_experts=0, auto=False
    )  # num_experts only matters for auto
    plan = ParallelPlan(
        strategy, world_size, *degrees, DISPATCHERS[DEFAULT_DISPATCHER[strategy]], reason
    )
    _check_dispatcher(plan, None)
    if model is not None:
        check_quantized_split(plan, model)
    return plan


def _dispatcher_path(strategy_conf: StrategyConf, strategy: str, auto: bool) -> str:
    node = None if auto else getattr(strategy_conf, "dispatcher", None)
    if node is None:
        target = DEFAULT_DISPATCHER[strategy]
    elif isinstance(node, str):
        target = node
    elif isinstance(node, Mapping) or hasattr(node, "get"):
        target = node.get("_target_")
        if not target:
            raise PlanError(
                f"strategy.dispatcher has no _target_ ({node}); set "
                f"strategy.dispatcher._target_ to one of {sorted(DISPATCHERS)} "
                f"or a dotted Dispatcher class path"
            )
    else:
        raise PlanError(
            f"strategy.dispatcher must be a name or {{_target_: ...}}, got "
            f"{node!r}; use one of {sorted(DISPATCHERS)}"
        )
    return DISPATCHERS.get(target, target)


def _check_dispatcher(plan: ParallelPlan, topology: "Topology") -> None:
    """The plan's dispatcher class states what it needs (``Dispatcher.check_plan``); its
    refusal becomes a PlanError before any process group exists."""
    try:
        dispatcher_class(plan.dispatcher).check_plan(plan, topology)
    except DispatcherConfigError as err:
        raise PlanError(str(err)) from err


def build_plan(
    strategy: StrategyConf,
    parallel: ParallelConf,
    world_size: int,
    topology: "Topology",
    model: ModelArgs,
    dtype_bytes: int = 2,
    tokens_per_step: Optional[int] = None,
    batch: Optional[int] = None,
    prompt_len: Optional[int] = None,
    profile: Any = None,
    objective: str = "decode",
    ranks_per_node: Optional[int] = None,
) -> ParallelPlan:
    """Validated plan for ``world_size`` ranks; raises PlanError with the fix named.

    tokens_per_step: tokens one rank feeds into each MoE layer per step (decode batch, or
    micro-batch * sequence in training); only used by strategy=auto's rules.
    batch (sequences per step over all replicas), prompt_len (tokens), profile (a
    ``moe_ext.cost.ProfileChoice`` or ``MachineProfile``; None: the rules) and objective
    ("decode" | "prefill": what auto minimises) are only used by strategy=auto;
    ranks_per_node (the launch's local world size): auto with a profile keeps TP and EP
    groups inside a node.
    """
    if world_size < 1:
        raise PlanError(f"world size {world_size} < 1; launch at least one rank")
    name = str(strategy.name)
    auto = name == "auto"
    if not auto and name not in STRATEGIES:
        raise PlanError(
            f"unknown strategy {name!r}; use strategy= one of {', '.join(STRATEGIES)} or auto"
        )
    chosen = None
    if auto and world_size > 1 and _profile_of(profile) is not None:
        chosen = _choose_by_cost(
            parallel,
            world_size,
            topology,
            model,
            dtype_bytes,
            batch or tokens_per_step,
            prompt_len,
            profile,
            objective,
            ranks_per_node,
        )
    if chosen is not None:
        name, reason, parallel = chosen
        reason = f"auto: {reason}"
    elif auto:
        name, reason, ep = _choose(
            parallel, world_size, topology, model, dtype_bytes, tokens_per_step
        )
        if ep is not None:
            parallel = ParallelConf(
                **{f.name: getattr(parallel, f.name, None) for f in fields(ParallelConf)}
                | {"ep": ep}
            )
        if name in EP_STRATEGIES:
            parallel, spread = _attention_tp_for_batch(name, parallel, world_size, batch, model)
            reason += spread
        note = getattr(profile, "why", "") if world_size > 1 else ""
        reason = f"auto: {reason}" + (f" ({note})" if note else "")
    else:
        reason = f"strategy={name} requested"
    tp, pp, dp, ep, etp, edp = _derive_degrees(name, parallel, world_size, model.num_experts, auto)
    _validate(name, world_size, tp, pp, ep, etp, model)
    plan = ParallelPlan(
        strategy=name,
        world_size=world_size,
        tp=tp,
        pp=pp,
        dp=dp,
        ep=ep,
        etp=etp,
        edp=edp,
        dispatcher=_dispatcher_path(strategy, name, auto),
        reason=reason,
    )
    check_quantized_split(plan, model)
    try:
        _check_dispatcher(plan, topology)
    except PlanError as err:
        if not (auto and name == "ep_nvshmem"):
            raise
        # auto picks NVSHMEM from the link; where the degrees rule it out (EP narrower than
        # the world, pp > 1), NCCL's all-to-all serves the same link
        plan = replace(
            plan,
            strategy="ep_nccl",
            dispatcher=_dispatcher_path(strategy, "ep_nccl", auto),
            reason=f"{reason}; ep_nccl, not ep_nvshmem: {err}",
        )
        _check_dispatcher(plan, topology)
    return _with_overlap(plan, strategy, auto)


def _with_overlap(plan: ParallelPlan, strategy: StrategyConf, auto: bool) -> ParallelPlan:
    """``strategy.overlap_microbatches`` on the plan, if its dispatcher can overlap an
    exchange with the experts (``Dispatcher.overlaps_exchange``). An explicit strategy
    whose dispatcher cannot is refused; auto's pick without an exchange to hide (replicate,
    tp_experts, NVSHMEM) runs without it and says so."""
    parts = getattr(strategy, "overlap_microbatches", 1)
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise PlanError(
            f"strategy.overlap_microbatches={parts!r}; use 1 (off) or 2 (dual-batch overlap)"
        )
    if parts == 1:
        return plan
    if not dispatcher_class(plan.dispatcher).overlaps_exchange:
        why = f"{plan.strategy} has no asynchronous expert exchange to overlap"
        if auto:
            return replace(plan, reason=f"{plan.reason}; overlap off: {why}")
        raise PlanError(
            f"strategy.overlap_microbatches={parts} but {why}; use strategy=ep_nccl or "
            f"ep_allgather, or strategy.overlap_microbatches=1"
        )
    return replace(plan, overlap_microbatches=parts)

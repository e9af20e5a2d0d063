"""Cost model: every valid plan of a world, its predicted decode and prefill time, its memory.

# B sequences per step, all replicas together; S prompt tokens per sequence; L layers,
# Ls = ceil(L/pp) layers of the busiest stage, Lm of them MoE; H hidden size; k top-k;
# E experts; b dtype bytes; Br = ceil(B/dp) sequences of one replica (a TP group);
# Te tokens reaching one rank's experts; bytes are per rank; times are seconds inside,
# milliseconds in ``Prediction``; "ar/ag/rs/a2a/sr(g, n)" is ``profile.seconds(op, g, n)``:
# all_reduce / all_gather / reduce_scatter / all_to_all / send_recv over g ranks, n bytes
# each rank passes in.

``enumerate_plans`` lists every plan ``build_plan`` would accept for a world size:
strategy x tp x pp x ep (x etp = tp for tp_experts), dp derived, each one re-derived by
``plan_with_degrees`` (the dispatcher's ``check_plan``, ``check_quantized_split``) and
checked against the model shape (``_validate``). ep_* plans have ep >= 2 (ep_* with ep = 1
is replicate with a dispatcher in the way).

``predict`` models one step of the busiest rank from a ``MachineProfile`` (moe_ext.profile):

Decode (one new token per sequence). Per stage:
  weights   dense bytes read / (hbm * gemv_efficiency)
            + expert bytes * P(touched) / (hbm * grouped_efficiency),
            each term at least its FLOPs / matmul_tflops (2 FLOPs per weight and token).
            Dense: the rank's non-expert weights as stored (``rank_weight_bytes``), without
            an untied embedding table (a step reads B rows of it). P(touched) = 1 - (1 -
            k/E)^Te, the chance one of the Te tokens reaching the rank routes to a given
            expert under uniform routing (tools/bench_infer.py ``expert_touch_probability``).
            Te = ceil(B/edp) for ep_* (the EP group gathers its replicas' tokens), Br for
            replicate and tp_experts.
  kv        Br * KV bytes of one sequence of S tokens for the stage's layers (the family's
            own cache layout, ``kv_cache_bytes``) / (hbm * grouped_efficiency).
  kernels   Ls * KERNELS_PER_LAYER * graph_kernel_us: each kernel's own minimum time on
            the GPU (the profile's graph_kernel_us; 0 when it was not measured)
            Host launches cost nothing here: the step is one CUDA graph (generate() graphs
            EP decode too, on the static exchange of dispatch/static.py), or one per stage
            and micro-batch under pp.
  collectives, per layer of the stage (each replayed inside the step's CUDA graph: the
            profile's graph_collectives time when it has the op, else its eager time less
            its host dispatch, kernel_overhead_us, and at least graph_kernel_us):
    tp > 1       ar(tp, Br*H*b) after attention, and after each dense MLP that is TP-sharded
    tp_experts   ar(tp, Br*H*b) after each MoE layer
    ep_* (decode: every EP dispatcher runs the static exchange, dispatch/static.py) per MoE
                 layer ag(ep, C*(H*b + 8k)) + rs(ep, ep*C*H*b), C = ceil(Br/tp) tokens per
                 rank (ep_* with tp > 1 splits the tokens over tp), then ag(tp, C*H*b)
    replicate    nothing for the MoE layer
  pipeline  generate's pipelined decode (model/pipeline_generate.py): M = min(pp, Br)
            micro-batches of Bm = ceil(Br/M) rows in flight, each stage a CUDA graph per
            micro-batch. Every term above is one stage's work on Bm rows (Te/M tokens for
            the experts: each micro-batch reads the weights it touches again); a tick is
            that plus one stage-to-stage send sr(2, Bm*H*b), and a step takes max(M, pp)
            ticks (below pp micro-batches a row waits for its own trip through the stages).
            pp = 1: one tick, no send.

Prefill (Br*S tokens per replica, eager: no graph). Per stage:
  dense     max(FLOPs / matmul_tflops, dense bytes / hbm); FLOPs = 2 * dense params * Br*S
            + causal attention 2 * Br * S^2 * (heads/tp) * head_dim per layer
  experts   max(2 * Te*S * k * (expert params / (E * ep * etp * pp)) / matmul_tflops,
            expert bytes / hbm)
  launches  max(0, Ls * KERNELS_PER_LAYER * kernel_overhead_us - (dense + experts))
  collectives as in decode at T = Br*S tokens, except the EP exchange, which is dynamic:
    ep_nccl, ep_nvshmem  per MoE layer a2a(ep, 8*ep) (split sizes) + 2 * a2a(ep, C*k*H*b)
    ep_allgather         per MoE layer ag(ep, C*(H*b + 8k)) + rs(ep, ep*C*H*b)
  pipeline  pp * stage + (pp - 1) * sr(2, Br*S*H*b)

Memory per rank: the weights as stored (``moe_ext.plan.rank_weight_bytes``) with 20%
headroom (``HEADROOM``), or the weights plus the KV cache of the rank's Br sequences of S
tokens when that is more; ``fits`` compares it with the memory a rank has.

Nodes: ``gpus_per_node`` G keeps TP and EP inside a node: a plan is kept when its TP,
expert-TP and EP groups each sit inside one node of G consecutive ranks
(``moe_ext.groups.node_layout``, the rule the launchers enforce), so PP and DP are what
crosses nodes. Inference moves nothing between DP replicas; a pipeline
boundary whose ranks sit on different nodes is costed with the inter-node profile
(default ``ETHERNET_100G``: an estimate for 100 Gb/s Ethernet, ~12 GB/s and ~20 us).

Constants come from the profile; the one fixed number here, KERNELS_PER_LAYER, is the
count of kernels of a compiled decode block (docs/PERF.md: 1176 kernels per qwen3_30b_a3b
step of 48 layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Optional, Union

from moe_ext.groups import NodeLayoutError, node_layout
from moe_ext.model.args import ModelArgs
from moe_ext.plan import (
    HEADROOM,
    STRATEGIES,
    ParallelPlan,
    PlanError,
    _check_dispatcher,
    _validate,
    model_param_counts,
    plan_with_degrees,
    rank_weight_bytes,
)
from moe_ext.profile import MachineProfile, shipped_profiles

if TYPE_CHECKING:
    from moe_ext.topology import Topology

NO_PROFILE = ("none", "rules")  # plan.profile values that keep auto on its rules
KERNELS_PER_LAYER = 25  # compiled decode block, docs/PERF.md: 1176 kernels / 48 layers
DEFAULT_BATCH = 16  # sequences, when the job does not say (bench_infer's middle batch)
DEFAULT_PROMPT_LEN = 512  # tokens, when the job does not say (bench_infer's default)


def _ethernet_100g() -> MachineProfile:
    """100 Gb/s Ethernet between nodes, estimated: 12.5 GB/s line rate, ~12 GB/s achieved
    for large messages, ~20 us per message (NCCL over TCP/RoCE)."""
    sizes = [2.0**p for p in range(10, 31, 2)]
    samples = [[s, 20e-6 + s / 12e9] for s in sizes]
    return MachineProfile(
        name="ethernet_100g",
        source="estimate",
        date="2026-11-30",
        device="network",
        gpus=2,
        link="ethernet",
        p2p=False,
        hbm_gbps=0.0,
        matmul_tflops=0.0,
        gemv_efficiency=1.0,
        grouped_efficiency=1.0,
        kernel_overhead_us=0.0,
        collectives={"send_recv": {"2": samples}, "all_reduce": {"2": samples}},
        notes=("estimate: 100 Gb/s Ethernet, 12 GB/s achieved, 20 us per message",),
    )


ETHERNET_100G = _ethernet_100g()


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One plan's predicted step on its busiest rank."""

    decode_ms: float  # one decode step (one token for each of the B sequences)
    prefill_ms: float  # the prefill of B sequences of S tokens
    memory_bytes: int  # needed per rank: weights with headroom, or weights + KV cache
    fits: Optional[bool]  # memory_bytes <= the rank's memory; None: memory unknown
    batch: int  # B, sequences per step over all replicas
    prompt_len: int  # S
    # ms per term, summing to decode_ms: weights, kv, kernels, collectives, pipeline; to
    # prefill_ms: dense, experts, launches, collectives, pipeline
    terms: dict[str, float] = field(default_factory=dict)
    prefill_terms: dict[str, float] = field(default_factory=dict)

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second over all replicas."""
        return self.batch / self.decode_ms * 1e3 if self.decode_ms > 0 else float("inf")


@dataclass(frozen=True)
class RankedPlan:
    plan: ParallelPlan
    prediction: Prediction
    why_slower: str  # one phrase against the best plan; "" for the best


# ---------------------------------------------------------------------------------------
# Enumeration
# ---------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def link_facts(profile: Optional[MachineProfile]) -> Optional[Any]:
    """The ``LinkFacts`` a dispatcher's ``check_plan`` reads, from a profile's link."""
    if profile is None:
        return None
    nvlink = profile.link == "nvlink"
    kind = profile.link if profile.link in ("nvlink", "pcie", "cpu") else "pcie"
    return SimpleNamespace(
        kind=kind, all_pairs_nvlink=nvlink, all_pairs_p2p_atomics=nvlink and profile.p2p
    )


def plan_label(plan: ParallelPlan) -> str:
    """``ep_nccl tp1 pp1 dp2 ep2``: strategy and degrees, short."""
    extra = f" ep{plan.ep}" if plan.is_expert_parallel else ""
    return f"{plan.strategy} tp{plan.tp} pp{plan.pp} dp{plan.dp}{extra}"


def enumerate_plans(
    world_size: int,
    model: ModelArgs,
    topology: Optional[Any] = None,
    gpus_per_node: Optional[int] = None,
    given: Optional[dict[str, Optional[int]]] = None,
) -> list[ParallelPlan]:
    """Every plan ``build_plan`` accepts for ``world_size`` ranks and ``model``.

    topology: a Topology or LinkFacts (``link_facts(profile)``) for the dispatchers' link
    checks (ep_nvshmem); None checks the degrees only. gpus_per_node: keep TP and EP inside
    a node (see the module docstring). given: degrees the user fixed (tp, pp, dp, ep, etp;
    None entries are free); only plans with those degrees are listed."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    plans = []
    for strategy in STRATEGIES:
        for tp in _divisors(world_size):
            for pp in _divisors(world_size // tp):
                per_stage = world_size // pp
                eps = [None]
                if strategy in ("ep_allgather", "ep_nccl", "ep_nvshmem"):
                    eps = [e for e in _divisors(per_stage) if e > 1]
                for ep in eps:
                    try:
                        plan = plan_with_degrees(
                            strategy, world_size, tp, pp, ep, reason="enumerated", model=model
                        )
                        _validate(strategy, world_size, tp, pp, plan.ep, plan.etp, model)
                        if topology is not None:
                            _check_dispatcher(plan, topology)
                    except PlanError:
                        continue
                    if strategy == "tp_experts" and tp == 1:
                        continue
                    if any(getattr(plan, k) != v for k, v in given.items()):
                        continue
                    if gpus_per_node and gpus_per_node < world_size:
                        try:  # the launcher's own rule (moe_ext.groups.node_layout)
                            node_layout(plan, world_size, gpus_per_node)
                        except NodeLayoutError:
                            continue
                    plans.append(plan)
    return plans


# ---------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------


def expert_touch_probability(tokens: float, num_experts: int, top_k: int) -> float:
    """Chance that a given expert receives at least one of ``tokens`` tokens under uniform
    top-k routing (tools/bench_infer.py has the same formula for its floor)."""
    if num_experts <= 0 or tokens <= 0:
        return 0.0
    return 1.0 - (1.0 - min(1.0, top_k / num_experts)) ** tokens


@dataclass(frozen=True)
class _Shape:
    """What the model contributes to the cost of a plan, independent of the plan."""

    dense_params: int  # logical non-expert parameters except an untied embedding table
    expert_params: int  # logical routed-expert parameters (all layers)
    embed_bytes: int  # stored bytes of an untied embedding table (not read by decode)
    moe_layers: tuple[bool, ...]  # per layer: has routed experts


def _shape(model: ModelArgs, dtype_bytes: int) -> _Shape:
    from moe_ext.quant.layout import stored_tensors

    total, experts = model_param_counts(model)
    embed = model.vocab_size * model.hidden_size
    untied = not model.tie_word_embeddings
    embed_bytes = 0
    if untied:
        for spec in stored_tensors(model).values():
            if spec.logical == "embed_tokens.weight":
                size = dtype_bytes if spec.dtype is None else spec.dtype.itemsize
                embed_bytes += math.prod(spec.shape) * size
    moe = tuple(model.is_moe_layer(i) for i in range(model.num_hidden_layers))
    return _Shape(total - experts - (embed if untied else 0), experts, embed_bytes, moe)


def _stage_layers(model: ModelArgs, pp: int, shape: _Shape) -> tuple[int, int]:
    """(layers, MoE layers) of the busiest stage: the first (it takes the remainder)."""
    n = math.ceil(model.num_hidden_layers / pp)
    return n, sum(shape.moe_layers[:n])


class _Link:
    """Collective times over the intra-node profile; pipeline hops that cross nodes over
    the inter-node one."""

    def __init__(self, profile, inter_node, gpus_per_node, plan):
        self.p, self.inter, self.g, self.plan = profile, inter_node, gpus_per_node, plan

    def __call__(self, op: str, group: int, nbytes: float, in_graph: bool = False) -> float:
        return self.p.seconds(op, group, nbytes, in_graph)

    def has_graph_samples(self, op: str) -> bool:
        """Whether the profile timed ``op`` inside CUDA graphs."""
        return self.p.has_graph_samples(op)

    def hops(self, nbytes: float) -> float:
        """The (pp - 1) stage-to-stage sends of one step, one after another."""
        plan, total = self.plan, 0.0
        stage = plan.world_size // plan.pp
        for i in range(plan.pp - 1):
            ranks = range(i * stage, (i + 1) * stage)
            cross = self.g and any(r // self.g != (r + stage) // self.g for r in ranks)
            prof = self.inter if cross else self.p
            total += prof.seconds("send_recv", 2, nbytes)
        return total


def predict(
    plan: ParallelPlan,
    model: ModelArgs,
    profile: MachineProfile,
    batch: int = DEFAULT_BATCH,
    prompt_len: int = DEFAULT_PROMPT_LEN,
    dtype_bytes: int = 2,
    available_bytes: Optional[int] = None,
    gpus_per_node: Optional[int] = None,
    inter_node: Optional[MachineProfile] = None,
    _shape_cache: Optional[_Shape] = None,
) -> Prediction:
    """Predicted decode step, prefill and memory of ``plan`` (module docstring: formulas).

    batch: sequences per step over all replicas; prompt_len: tokens per prompt;
    available_bytes: memory of one rank (None: unknown, ``fits`` is None)."""
    shape = _shape_cache or _shape(model, dtype_bytes)
    link = _Link(profile, inter_node or ETHERNET_100G, gpus_per_node, plan)
    H, k, E, b = model.hidden_size, model.num_experts_per_tok, model.num_experts, dtype_bytes
    tp, pp, ep, etp = plan.tp, plan.pp, plan.ep, plan.etp
    hbm = profile.hbm_gbps * 1e9
    flops = profile.matmul_tflops * 1e12
    Ls, Lm = _stage_layers(model, pp, shape)
    Ld = Ls - Lm
    Br = math.ceil(batch / plan.dp)
    ep_side = plan.is_expert_parallel
    Te = math.ceil(batch / plan.edp) if ep_side else Br
    M = min(pp, Br)  # decode micro-batches in flight (one without pipeline stages)
    ticks = max(M, pp)
    w = rank_weight_bytes(model, tp, pp, ep, etp, dtype_bytes)
    dense_read = max(0, w.dense - shape.embed_bytes / (tp * pp))
    dense_params = shape.dense_params / (tp * pp)
    expert_flops_per_token = 2 * k * shape.expert_params / (E * ep * etp * pp) if E else 0.0
    kv_seq = model.family.kv_cache_bytes(model, tp, prompt_len, b) * Ls / model.num_hidden_layers
    dense_mlp_tp = tp > 1 and model.intermediate_size % tp == 0
    per_kernel_graph = (profile.graph_kernel_us or 0.0) * 1e-6
    launch = Ls * KERNELS_PER_LAYER * profile.kernel_overhead_us * 1e-6

    def collectives(tokens: int, decode: bool) -> float:
        """One stage's collectives for ``tokens`` tokens per replica. Decode replays them
        inside its CUDA graph: the profile's in-graph time where it has one, else the eager
        time less its host dispatch (``kernel_overhead_us``, never below a graph kernel's
        own time)."""

        def seconds(op: str, group: int, nbytes: float) -> float:
            if decode and link.has_graph_samples(op):
                return link(op, group, nbytes, in_graph=True)
            eager = link(op, group, nbytes)
            if not decode or eager == 0.0:
                return eager
            return max(eager - profile.kernel_overhead_us * 1e-6, per_kernel_graph)

        t = Ls * seconds("all_reduce", tp, tokens * H * b)
        if dense_mlp_tp:
            t += Ld * seconds("all_reduce", tp, tokens * H * b)
        if plan.strategy == "tp_experts":
            t += Lm * seconds("all_reduce", tp, tokens * H * b)
        elif ep_side:
            C = math.ceil(tokens / tp)
            if decode or plan.strategy == "ep_allgather":
                ex = seconds("all_gather", ep, C * (H * b + 8 * k))
                ex += seconds("reduce_scatter", ep, ep * C * H * b)
            else:  # ep_nccl, ep_nvshmem: split sizes, then tokens out and back
                ex = seconds("all_to_all", ep, 8 * ep) + 2 * seconds(
                    "all_to_all", ep, C * k * H * b
                )
            t += Lm * (ex + seconds("all_gather", tp, C * H * b))
        return t

    # ---- decode: one stage's work on one micro-batch of Bm rows, ``ticks`` times a step
    Bm, Tm = math.ceil(Br / M), math.ceil(Te / M)
    t_dense = max(dense_read / (hbm * profile.gemv_efficiency), 2 * dense_params * Bm / flops)
    p_touch = expert_touch_probability(Tm, E, k)
    t_exp = max(
        w.experts * p_touch / (hbm * profile.grouped_efficiency),
        expert_flops_per_token * Tm / flops,
    )
    t_kv = Bm * kv_seq / (hbm * profile.grouped_efficiency)
    kernels = Ls * KERNELS_PER_LAYER * per_kernel_graph
    gpu = t_dense + t_exp + t_kv + kernels
    coll = collectives(Bm, decode=True)
    hop = link.hops(Bm * H * b) / (pp - 1) if pp > 1 else 0.0
    decode_s = ticks * (gpu + coll + hop)
    terms = {
        "weights": ticks * (t_dense + t_exp) * 1e3,
        "kv": ticks * t_kv * 1e3,
        "kernels": ticks * kernels * 1e3,
        "collectives": ticks * coll * 1e3,
        "pipeline": ticks * hop * 1e3,
    }

    # ---- prefill
    T = Br * prompt_len
    Dh = model.head_dim or H // model.num_attention_heads
    attn_flops = 2 * Br * prompt_len**2 * (model.num_attention_heads / tp) * Dh * Ls
    p_dense = max((2 * dense_params * T + attn_flops) / flops, w.dense / hbm)
    p_exp = max(expert_flops_per_token * Te * prompt_len / flops, w.experts / hbm)
    p_coll = collectives(T, decode=False)
    p_stall = max(0.0, launch - (p_dense + p_exp))
    p_pipe = link.hops(T * H * b)
    prefill_s = pp * (p_dense + p_exp + p_stall + p_coll) + p_pipe
    prefill_terms = {
        "dense": pp * p_dense * 1e3,
        "experts": pp * p_exp * 1e3,
        "launches": pp * p_stall * 1e3,
        "collectives": pp * p_coll * 1e3,
        "pipeline": p_pipe * 1e3,
    }

    weights = w.dense + w.experts
    memory = max(math.ceil(weights * HEADROOM), math.ceil(weights + Br * kv_seq))
    fits = None if available_bytes is None else memory <= available_bytes
    return Prediction(
        decode_s * 1e3, prefill_s * 1e3, memory, fits, batch, prompt_len, terms, prefill_terms
    )


# ---------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------


def why_slower(best: Prediction, other: Prediction, objective: str) -> str:
    """One phrase saying why ``other`` loses to ``best`` (or does not fit)."""
    if other.fits is False:
        return f"does not fit: needs {other.memory_bytes / 2**30:.1f} GiB per rank"
    if objective == "prefill":
        a, b, ta, tb = best.prefill_ms, other.prefill_ms, best.prefill_terms, other.prefill_terms
    else:
        a, b, ta, tb = best.decode_ms, other.decode_ms, best.terms, other.terms
    if b <= a:
        return "ties the best; ranked after it by prefill or strategy order"
    term = max(tb, key=lambda n: tb[n] - ta.get(n, 0.0))
    return f"slower by {100 * (b - a) / a:.0f}%: {term} {tb[term] - ta.get(term, 0.0):+.2f} ms"


def rank_plans(
    model: ModelArgs,
    profile: MachineProfile,
    world_size: int,
    batch: int = DEFAULT_BATCH,
    prompt_len: int = DEFAULT_PROMPT_LEN,
    dtype_bytes: int = 2,
    available_bytes: Optional[int] = None,
    topology: Optional[Any] = None,
    gpus_per_node: Optional[int] = None,
    inter_node: Optional[MachineProfile] = None,
    objective: str = "decode",
    given: Optional[dict[str, Optional[int]]] = None,
    plans: Optional[list[ParallelPlan]] = None,
) -> list[RankedPlan]:
    """Every valid plan (``enumerate_plans``, or ``plans``), fastest fitting first:
    by ``objective`` ("decode": ms per decode step; "prefill"), then the other time, then
    the order of STRATEGIES; plans that do not fit come last. topology: a Topology or
    LinkFacts for the dispatchers' link checks; None uses the profile's link."""
    if objective not in ("decode", "prefill"):
        raise PlanError(f"objective {objective!r}; use decode or prefill")
    if plans is None:
        facts = topology if topology is not None else link_facts(profile)
        plans = enumerate_plans(world_size, model, facts, gpus_per_node, given)
    shape = _shape(model, dtype_bytes)
    scored = []
    for plan in plans:
        pred = predict(
            plan,
            model,
            profile,
            batch,
            prompt_len,
            dtype_bytes,
            available_bytes,
            gpus_per_node,
            inter_node,
            _shape_cache=shape,
        )
        main, other = (
            (pred.decode_ms, pred.prefill_ms)
            if objective == "decode"
            else (pred.prefill_ms, pred.decode_ms)
        )
        key = (pred.fits is False, main, other, STRATEGIES.index(plan.strategy))
        scored.append((key, plan, pred))
    scored.sort(key=lambda s: s[0])
    if not scored:
        return []
    best = scored[0][2]
    return [
        RankedPlan(plan, pred, "" if i == 0 else why_slower(best, pred, objective))
        for i, (_, plan, pred) in enumerate(scored)
    ]


# ---------------------------------------------------------------------------------------
# Which profile
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileChoice:
    profile: Optional[MachineProfile]  # None: no profile, auto keeps its rules
    why: str  # one phrase for plan.reason: which profile and why


def select_profile(
    path: Union[str, Path, None], topology: "Topology", shipped: Optional[dict] = None
) -> ProfileChoice:
    """The profile auto uses: ``path`` (plan.profile) when given ("none": no profile, the
    rules), else the shipped profile
    (conf/profiles) closest to ``topology``: the same link kind, then the same peer access,
    then the nearest GPU count. None on a cpu topology or without a shipped profile of the
    link kind."""
    if path is not None and str(path).lower() in NO_PROFILE:
        return ProfileChoice(None, f"plan.profile={path}: rule-based choice")
    if path:
        profile = MachineProfile.load(path)
        return ProfileChoice(profile, f"profile {profile.name} (plan.profile={path})")
    if topology.kind == "cpu":
        return ProfileChoice(None, "cpu topology: no machine profile, rule-based choice")
    shipped = shipped_profiles() if shipped is None else shipped
    candidates = []
    for file in shipped.values():
        profile = file if isinstance(file, MachineProfile) else MachineProfile.load(file)
        if profile.link == topology.kind:
            candidates.append(profile)
    if not candidates:
        return ProfileChoice(
            None, f"no shipped profile for {topology.kind} (conf/profiles), rule-based choice"
        )
    p2p, gpus = topology.all_pairs_p2p, topology.num_gpus
    best = min(candidates, key=lambda p: (p.p2p != p2p, abs(p.gpus - gpus), p.name))
    return ProfileChoice(
        best,
        f"shipped profile {best.name} (closest to {topology.kind}, "
        f"p2p {'on' if p2p else 'off'}, {gpus} GPUs)",
    )


# Training FLOPs
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainFlops:
    """Model FLOPs of one training token (forward + backward), the MFU numerator.

    matmul: 6 x the matrix parameters one token multiplies by (``active_params``): every
    tensor of ``Family.param_shapes`` with 2+ dims except the embedding table (a lookup;
    the LM head counts, tied or not), routed experts at k/E of their size (a token runs k
    of E experts); 2 FLOPs per weight forward, 4 backward (input and weight gradients).
    attention: the score and value products, 6 x S x nH x (D_qk + D_v) per token and
    layer (= the usual 12·L·H·S with nH·D = H), S capped at the sliding window on sliding
    layers; not halved for the causal mask (the PaLM / Megatron convention, so MFU figures
    compare with published ones). Norms, softmax, activations and the router's top-k are
    not counted."""

    active_params: int  # matrix parameters one token multiplies by
    matmul: float  # FLOPs per token
    attention: float  # FLOPs per token

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def train_flops_per_token(model: ModelArgs, seq_len: int) -> TrainFlops:
    """Model FLOPs per trained token of ``model`` at sequence length ``seq_len`` (see
    ``TrainFlops``), from the tensor list of ``Family.param_shapes``."""
    from moe_ext.plan import _is_expert

    k_over_e = model.num_experts_per_tok / model.num_experts
    active = 0.0
    for name, shape in model.family.param_shapes(model).items():
        if len(shape) < 2 or name == "embed_tokens.weight":
            continue
        active += math.prod(shape) * (k_over_e if _is_expert(name) else 1.0)
    if model.tie_word_embeddings:
        active += model.vocab_size * model.hidden_size  # the head multiplies by the table
    if model.kv_lora_rank is not None:  # MLA: query/key heads of nope + rope dims
        d_qk, d_v = model.qk_nope_head_dim + model.head_dim, model.v_head_dim
    else:
        d_qk = d_v = model.head_dim
    attention = 0.0
    for layer in range(model.num_hidden_layers):
        span = seq_len
        sliding = (
            model.layer_types[layer] == "sliding_attention"
            if model.layer_types is not None
            else model.sliding_window is not None
        )
        if sliding and model.sliding_window is not None:
            span = min(seq_len, model.sliding_window)
        attention += 6 * span * model.num_attention_heads * (d_qk + d_v)
    return TrainFlops(int(round(active)), 6 * active, attention)

"""MoELayer = router + dispatcher + grouped experts (+ shared expert), and its factory.

# B batch, S sequence, T = B*S tokens, H hidden, E experts, k top-k, F expert FFN size,
# E_local / F_local this rank's share of experts / of each expert's FFN dimension

The layer is free of parallelism: the dispatcher object it is given decides where rows
go, and ``build_moe_layer`` creates only this rank's expert shard. Weights are initialised
or loaded by the caller (``load_full_expert_weights`` slices full tensors by the plan).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_ext.moe.dispatch import Dispatcher, DispatchGroups, build_dispatcher
from moe_ext.moe.experts import ExpertOptions, GroupedExperts
from moe_ext.moe.router import TopKRouter


class SharedExpertMLP(nn.Module):
    """Dense SwiGLU MLP every token goes through (Qwen2-MoE ``shared_expert``).
    Parameters ``{gate,up}_proj.weight`` [F_s, H], ``down_proj.weight`` [H, F_s]."""

    def __init__(self, hidden_size: int, ffn_size: int, *, dtype=None, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoELayer(nn.Module):
    """Routed experts plus an optional (sigmoid-gated) shared expert.

    After each forward, ``aux_loss`` and ``z_loss`` hold the router's losses (zero scalars
    outside training); the caller weighs and adds them to its loss."""

    def __init__(
        self,
        router: TopKRouter,
        experts: GroupedExperts,
        dispatcher: Dispatcher,
        shared_expert: Optional[nn.Module] = None,
        shared_expert_gate: Optional[nn.Module] = None,
    ):
        super().__init__()
        if experts.num_experts != dispatcher.num_local_experts:
            raise ValueError(
                f"experts hold {experts.num_experts} experts but the dispatcher "
                f"routes to {dispatcher.num_local_experts} local experts; build "
                f"the experts with dispatcher.num_local_experts"
            )
        if router.num_experts != dispatcher.num_experts:
            raise ValueError(
                f"router scores {router.num_experts} experts, dispatcher expects "
                f"{dispatcher.num_experts}"
            )
        if shared_expert_gate is not None and shared_expert is None:
            raise ValueError("shared_expert_gate given without a shared_expert")
        self.router = router
        self.experts = experts
        self.dispatcher = dispatcher
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.aux_loss: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., H] (e.g. [B, S, H]). Returns y with x's shape and dtype."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # [T, H]
        routing = self.router(tokens)
        y = routed_output(
            self.dispatcher, self.experts, tokens, routing.weights, routing.expert_idx
        )  # [T, H]
        y = add_shared_expert(y, tokens, self.shared_expert, self.shared_expert_gate)
        self.aux_loss, self.z_loss = routing.aux_loss, routing.z_loss
        return y.reshape(shape)


# The forward's pieces, shared with the Megatron layer (moe_ext.megatron.layer), which wraps
# the routed part in its TP token split.


def routed_output(
    dispatcher: Dispatcher,
    experts: GroupedExperts,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    expert_idx: torch.Tensor,
) -> torch.Tensor:
    """tokens: [T, H]; weights: [T, k] float32; expert_idx: [T, k] int64 global ids.
    Returns [T, H] in tokens' dtype: each token's experts' outputs summed with its routing
    weights, wherever the dispatcher runs them. With dual-batch overlap on
    (``dispatcher.set_overlap``) the tokens go through ``overlapped_routed_output``."""
    microbatches = dispatcher.microbatches()
    if microbatches > 1:
        return overlapped_routed_output(
            dispatcher, experts, tokens, weights, expert_idx, microbatches
        )
    x_local, tokens_per_expert, handle = dispatcher.dispatch(
        tokens, weights, expert_idx
    )  # [T', H], [E_local]
    y_local = experts(x_local, tokens_per_expert)  # [T', H]
    return dispatcher.combine(y_local, handle)  # [T, H]


def microbatch_sizes(num_tokens: int, microbatches: int) -> list[int]:
    """Rows of each of ``microbatches`` consecutive parts of ``num_tokens`` tokens: the
    first ones ceil(T/n), the rest what is left (zero included), always n parts, so every
    rank makes the same number of exchanges whatever its T."""
    per = -(-num_tokens // microbatches)
    return [max(0, min(per, num_tokens - i * per)) for i in range(microbatches)]


def overlapped_routed_output(
    dispatcher: Dispatcher,
    experts: GroupedExperts,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    expert_idx: torch.Tensor,
    microbatches: int,
) -> torch.Tensor:
    """``routed_output`` in dual-batch overlap: the tokens split into ``microbatches``
    consecutive parts; every part's dispatch is issued up front (async collectives), then
    each part's experts run as soon as its rows land while the later parts' exchanges are
    in flight, and each part's combine is issued before the next part's experts run.
    Dispatchers with a synchronous exchange run it in order (same result, no overlap).
    The dynamic exchanges learn every part's split sizes in one host sync, before any
    part's rows are issued.

    tokens: [T, H]; weights: [T, k] float32; expert_idx: [T, k] int64. Returns [T, H],
    equal to the unsplit layer's up to floating-point summation order; differentiable
    (backward runs the adjoint exchanges synchronously)."""
    from moe_ext.moe.dispatch.comm import Inflight

    sizes = microbatch_sizes(tokens.shape[0], microbatches)
    parts = list(zip(tokens.split(sizes), weights.split(sizes), expert_idx.split(sizes)))
    inflights = [Inflight() for _ in parts]
    dispatched = zip(inflights, dispatcher.dispatch_start_parts(parts, inflights))
    combined = []  # (Inflight, pending combine) per part
    for inflight, pending in dispatched:
        inflight.wait()  # this part's rows; the later parts' stay in flight
        x_local, tokens_per_expert, handle = dispatcher.dispatch_finish(pending)
        y_local = experts(x_local, tokens_per_expert)  # [T'_i, H]
        done = Inflight()
        combined.append((done, dispatcher.combine_start(y_local, handle, done)))
    outputs = []
    for done, pending in combined:
        done.wait()
        outputs.append(dispatcher.combine_finish(pending))  # [T_i, H]
    return torch.cat(outputs)  # [T, H]


def add_shared_expert(
    y: torch.Tensor,
    tokens: torch.Tensor,
    shared_expert: Optional[nn.Module],
    shared_expert_gate: Optional[nn.Module],
) -> torch.Tensor:
    """y: [T, H] routed output; tokens: [T, H]. Returns y plus the shared expert's output
    (sigmoid-gated when there is a gate), in y's dtype; y itself without a shared expert."""
    if shared_expert is None:
        return y
    shared = shared_expert(tokens)  # [T, H]
    if shared_expert_gate is not None:
        shared = torch.sigmoid(shared_expert_gate(tokens)) * shared  # [T, 1] * [T, H]
    return y + shared.to(y.dtype)


def build_moe_layer(
    hidden_size: int,
    ffn_size: int,
    num_experts: int,
    top_k: int,
    *,
    score_func: str = "softmax",
    norm_topk_prob: bool = True,
    n_group: Optional[int] = None,
    topk_group: Optional[int] = None,
    group_score: str = "top2_sum",
    routed_scaling_factor: float = 1.0,
    correction_bias: bool = False,
    router_bias: bool = False,
    expert_bias: bool = False,
    swiglu_limit: Optional[float] = None,
    swiglu_alpha: float = 1.702,
    shared_expert_size: Optional[int] = None,
    shared_expert_gate: bool = False,
    dispatcher: Union[str, Any, Dispatcher] = "local",
    groups: DispatchGroups = DispatchGroups(),
    experts_backend: str = "auto",
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> MoELayer:
    """Build a MoE layer holding only this rank's expert shard.

    ``dispatcher``: a Dispatcher instance, or a short name / dotted path / ``{_target_}``
    node built with ``(num_experts, groups)``. E_local comes from the dispatcher (EP), and
    F_local = ffn_size / dispatcher.ffn_shards (expert TP). ``router_bias``: a logit bias
    [E] on the router; ``expert_bias``, ``swiglu_limit``, ``swiglu_alpha``: gpt-oss experts
    (``moe_ext.moe.experts.ExpertOptions``). Parameters are randomly initialised; load real
    ones with ``load_full_expert_weights`` and ``load_state_dict``."""
    if not isinstance(dispatcher, Dispatcher):
        dispatcher = build_dispatcher(dispatcher, num_experts, groups)
    if dispatcher.num_experts != num_experts:
        raise ValueError(
            f"dispatcher was built for {dispatcher.num_experts} experts, layer has {num_experts}"
        )
    if ffn_size % dispatcher.ffn_shards:
        raise ValueError(
            f"expert FFN size {ffn_size} cannot be split over "
            f"{dispatcher.ffn_shards} expert-TP ranks; choose parallel.etp "
            f"dividing {ffn_size}"
        )
    router = TopKRouter(
        hidden_size,
        num_experts,
        top_k,
        score_func=score_func,
        norm_topk_prob=norm_topk_prob,
        n_group=n_group,
        topk_group=topk_group,
        group_score=group_score,
        routed_scaling_factor=routed_scaling_factor,
        correction_bias=correction_bias,
        bias=router_bias,
        dtype=dtype,
        device=device,
    )
    options = ExpertOptions(
        bias=expert_bias,
        swiglu_limit=swiglu_limit,
        swiglu_alpha=swiglu_alpha,
        # the F shards' outputs are summed: one of them adds the down bias
        add_down_bias=dispatcher.ffn_shard_rank == 0,
    )
    experts = GroupedExperts(
        dispatcher.num_local_experts,
        hidden_size,
        ffn_size // dispatcher.ffn_shards,
        options=options,
        backend=experts_backend,
        dtype=dtype,
        device=device,
    )
    shared = gate = None
    if shared_expert_size:
        shared = SharedExpertMLP(hidden_size, shared_expert_size, dtype=dtype, device=device)
        if shared_expert_gate:
            gate = nn.Linear(hidden_size, 1, bias=False, dtype=dtype, device=device)
    elif shared_expert_gate:
        raise ValueError("shared_expert_gate=True needs shared_expert_size")
    return MoELayer(router, experts, dispatcher, shared, gate)


def expert_shard(
    gate_up_full: torch.Tensor, down_full: torch.Tensor, dispatcher: Dispatcher
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice full expert tensors to this rank's shard (views, no copies).

    gate_up_full: [E, 2F, H]; down_full: [E, H, F]. Returns (gate_up [E_local, 2F_local, H],
    down [E_local, H, F_local]): experts [start, start+E_local) of the EP group, and the
    ``ffn_shard_rank``-th F slice of both gate and up rows and of down's columns."""
    num_experts, two_ffn, _ = gate_up_full.shape
    if num_experts != dispatcher.num_experts or down_full.shape[0] != num_experts:
        raise ValueError(
            f"full expert tensors hold {num_experts} experts, dispatcher expects "
            f"{dispatcher.num_experts}"
        )
    ffn = two_ffn // 2
    if down_full.shape[-1] != ffn or ffn % dispatcher.ffn_shards:
        raise ValueError(
            f"expert FFN sizes disagree or do not split: gate_up rows {two_ffn}, "
            f"down columns {down_full.shape[-1]}, ffn shards {dispatcher.ffn_shards}"
        )
    experts = slice(
        dispatcher.local_expert_start, dispatcher.local_expert_start + dispatcher.num_local_experts
    )
    ffn_local = ffn // dispatcher.ffn_shards
    lo = dispatcher.ffn_shard_rank * ffn_local
    gate_up = torch.cat(
        [
            gate_up_full[experts, lo : lo + ffn_local],
            gate_up_full[experts, ffn + lo : ffn + lo + ffn_local],
        ],
        dim=1,
    )
    down = down_full[experts, :, lo : lo + ffn_local]
    return gate_up, down


def expert_bias_shard(
    gate_up_bias_full: torch.Tensor, down_bias_full: torch.Tensor, dispatcher: Dispatcher
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of full expert biases, like ``expert_shard``'s of the weights:
    gate_up_bias_full [E, 2F] -> [E_local, 2F_local] (gate slice, then up slice);
    down_bias_full [E, H] -> [E_local, H] (whole on every F shard; shard 0 adds it)."""
    num_experts, two_ffn = gate_up_bias_full.shape
    if num_experts != dispatcher.num_experts or down_bias_full.shape[0] != num_experts:
        raise ValueError(
            f"full expert biases hold {num_experts} experts, dispatcher expects "
            f"{dispatcher.num_experts}"
        )
    ffn = two_ffn // 2
    ffn_local = ffn // dispatcher.ffn_shards
    lo = dispatcher.ffn_shard_rank * ffn_local
    experts = slice(
        dispatcher.local_expert_start, dispatcher.local_expert_start + dispatcher.num_local_experts
    )
    gate_up = torch.cat(
        [
            gate_up_bias_full[experts, lo : lo + ffn_local],
            gate_up_bias_full[experts, ffn + lo : ffn + lo + ffn_local],
        ],
        dim=1,
    )
    return gate_up, down_bias_full[experts]


@torch.no_grad()
def load_full_expert_weights(
    layer: MoELayer,
    gate_up_full: torch.Tensor,
    down_full: torch.Tensor,
    gate_up_bias_full: Optional[torch.Tensor] = None,
    down_bias_full: Optional[torch.Tensor] = None,
) -> None:
    """Copy this rank's shard of full expert weights (and biases, for experts built with
    them) into ``layer.experts``.

    gate_up_full: [E, 2F, H]; down_full: [E, H, F]; gate_up_bias_full: [E, 2F];
    down_bias_full: [E, H] (any device/dtype; converted)."""
    gate_up, down = expert_shard(gate_up_full, down_full, layer.dispatcher)
    pairs = [(layer.experts.gate_up_proj, gate_up), (layer.experts.down_proj, down)]
    if (layer.experts.gate_up_proj_bias is None) != (gate_up_bias_full is None):
        raise ValueError(
            "expert biases given for experts built without them, or missing for "
            "experts built with them; pass both biases iff the layer has expert_bias"
        )
    if gate_up_bias_full is not None:
        gate_up_b, down_b = expert_bias_shard(gate_up_bias_full, down_bias_full, layer.dispatcher)
        pairs += [
            (layer.experts.gate_up_proj_bias, gate_up_b),
            (layer.experts.down_proj_bias, down_b),
        ]
    for param, value in pairs:
        if param.shape != value.shape:
            raise ValueError(
                f"expert shard shape {tuple(value.shape)} does not match the "
                f"layer's {tuple(param.shape)}; build the layer with the same "
                f"hidden/ffn sizes and dispatcher"
            )
        param.copy_(value)

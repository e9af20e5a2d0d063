"""Other implementations as benchmark peers, on the same shapes, groups and dtype as ours.

- Megatron-core's own ``MoELayer``: local spec (no Transformer Engine, ``SequentialMLP``
  experts), its ``alltoall`` or ``allgather`` token dispatcher, EP = world size, groups from
  our ``ProcessGroups`` (pg_collection and parallel_state, moe_ext.megatron.state);
- DeepSpeed's ``deepspeed.moe.layer.MoE``: our EP groups registered as DeepSpeed's, SwiGLU
  experts of (H, F), top-k gating without token dropping (capacity = the largest expert
  load over the EP group, as DeepSpeed computes it with ``drop_tokens=False``);
- Hugging Face transformers ``generate`` on one device, random weights, for end-to-end runs.

Random weights everywhere: every parameter ~ N(0, 1/fan_in), generated on the device from
the torch seed the caller sets. ``library_versions()`` names what ran.

MoE peers take and return ``x[T, H]`` like our MoELayer, offer ``router(x) -> RouterOutput``
(the experts the library would pick, for the benchmark's floors) and ``force_routing(idx)``
(the benchmark's balanced routing: the library's own gate still runs, so its cost stays in
the timing, then the choice of experts is replaced).

# T tokens, H hidden, F expert FFN size, E experts, k top-k, C capacity, B batch, S sequence
"""

from __future__ import annotations

import functools
import importlib.metadata
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_ext.errors import MoeExtError
from moe_ext.moe.router import RouterOutput
from moe_ext.plan import ParallelPlan

# benchmark strategy name -> (peer family, Megatron token dispatcher or None)
PEER_STRATEGIES = {
    "mcore_a2a": ("megatron", "alltoall"),
    "mcore_ag": ("megatron", "allgather"),
    "deepspeed": ("deepspeed", None),
}
# --peers names -> strategies they add to a bench_moe run
PEERS = {"megatron": ("mcore_a2a", "mcore_ag"), "deepspeed": ("deepspeed",)}
_DISTRIBUTIONS = {
    "torch": "torch",
    "megatron-core": "megatron-core",
    "deepspeed": "deepspeed",
    "transformers": "transformers",
}


class PeerUnavailable(MoeExtError):
    """A peer that cannot run here (library missing, unsupported shape): one line, with the fix."""


def library_versions() -> dict[str, str]:
    """Installed versions of torch, megatron-core, deepspeed, transformers ('absent' if not)."""
    versions = {}
    for name, dist_name in _DISTRIBUTIONS.items():
        try:
            versions[name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    versions["torch"] = torch.__version__
    return versions


def peer_strategies(names: str) -> list[str]:
    """``"megatron,deepspeed"`` -> benchmark strategy names; unknown names are an error."""
    out = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in PEERS:
            raise PeerUnavailable(f"unknown peer {name!r}; choose from {sorted(PEERS)}")
        out.extend(s for s in PEERS[name] if s not in out)
    return out


def _require(module: str, pip_name: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise PeerUnavailable(
            f"{pip_name} is not importable ({err}); pip install {pip_name}"
        ) from err


def _random_init_(module: nn.Module) -> None:
    """Every parameter ~ N(0, 1/fan_in) (fan_in = last dim), in place, on its device."""
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim > 1:
                param.normal_(0.0, param.shape[-1] ** -0.5)
            else:
                param.fill_(1.0)  # norms' scales; biases are absent in these layers


# ---------------------------------------------------------------- groups


def ep_plan(world: int, reason: str = "benchmark peer: EP = world") -> ParallelPlan:
    """Expert parallelism over all ranks (tp = pp = 1, dp = ep = world)."""
    from moe_ext.plan import plan_with_degrees

    return plan_with_degrees("ep_nccl", world, reason=reason)


@functools.cache
def _ep_groups(world: int, backend: str, timeout_s: float):
    """One ProcessGroups per process for all peers: Megatron's parallel_state and DeepSpeed's
    group registry both refuse a second, different set, and communicators are costly."""
    from moe_ext.groups import ProcessGroups

    return ProcessGroups.build(ep_plan(world), backend, timedelta(seconds=timeout_s))


def ep_groups(timeout_s: float = 300.0, experts: Optional[int] = None):
    """Our ProcessGroups for EP = world size (collective on first call; cached after);
    ``experts``: refuse an expert count the world size does not divide."""
    if not dist.is_initialized():
        raise PeerUnavailable(
            "torch.distributed is not initialised; call moe_ext.dist.init_distributed first"
        )
    world = dist.get_world_size()
    if experts is not None and experts % world:
        raise PeerUnavailable(
            f"{experts} experts do not split over {world} ranks; run with "
            f"a world size that divides the expert count"
        )
    return _ep_groups(world, dist.get_backend(), timeout_s)


def _balanced_probs(
    expert_idx: torch.Tensor, num_experts: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (probs[T, E], routing_map[T, E] bool) for forced experts, weight 1/k each."""
    top_k = expert_idx.shape[1]
    routing_map = torch.zeros(
        expert_idx.shape[0], num_experts, dtype=torch.bool, device=expert_idx.device
    ).scatter_(1, expert_idx, True)  # [T, E]
    probs = torch.zeros(
        expert_idx.shape[0], num_experts, dtype=like.dtype, device=expert_idx.device
    ).scatter_(1, expert_idx, 1.0 / top_k)
    return probs, routing_map


# ---------------------------------------------------------------- Megatron-core


def megatron_moe_config(
    hidden: int,
    ffn: int,
    experts: int,
    top_k: int,
    plan: ParallelPlan,
    *,
    dispatcher: str = "alltoall",
    params_dtype: torch.dtype,
    cpu_init: bool = False,
) -> Any:
    """TransformerConfig of one Megatron MoE layer: SwiGLU experts without bias, softmax
    top-k router in fp32, no aux loss, no token dropping, the plan's parallel degrees.
    Weights are left uninitialised (the caller loads or randomises them)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    heads = -(-max(1, hidden // 64) // plan.tp) * plan.tp  # Megatron: heads divisible by tp
    return TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=4 * hidden,
        num_moe_experts=experts,
        moe_router_topk=top_k,
        moe_ffn_hidden_size=ffn,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=False,
        moe_aux_loss_coeff=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=plan.tp,
        expert_model_parallel_size=plan.ep,
        expert_tensor_parallel_size=plan.etp,
        perform_initialization=False,
        use_cpu_initialization=cpu_init,
        bias_activation_fusion=False,
    )


def megatron_moe_layer(config: Any, groups: Any) -> nn.Module:
    """Megatron-core's own MoELayer from its local (non-TE) spec, on ``groups``' handles.
    Builds with 0.16's ``ModuleSpec`` and 0.19's ``functools.partial`` spec alike."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from moe_ext.megatron import pg_collection

    spec = get_moe_module_spec(
        use_te=False, num_experts=config.num_moe_experts, moe_grouped_gemm=False
    )
    if isinstance(spec, ModuleSpec):
        return build_module(spec, config=config, pg_collection=pg_collection(groups))
    return spec(config=config, pg_collection=pg_collection(groups))


class MegatronMoEPeer(nn.Module):
    """Megatron's MoELayer behind our layer's calling convention.

    ``forward(x[T, H]) -> y[T, H]`` (Megatron takes [S, B, H]: T tokens as S, B = 1)."""

    def __init__(self, layer: nn.Module, top_k: int):
        super().__init__()
        self.layer = layer
        self.top_k = top_k
        self.num_experts = layer.config.num_moe_experts
        self._gate = layer.router  # Megatron's TopKRouter
        self.layer.router = _ForcedMegatronRouter(self._gate, self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.layer(x.unsqueeze(1))  # [T, 1, H]
        return y.view(x.shape)

    def router(self, x: torch.Tensor) -> RouterOutput:
        """The experts Megatron's router picks for ``x[T, H]`` (probs renormalised top-k)."""
        probs, _ = self._gate(x.unsqueeze(1))  # [T, E], zero off the chosen experts
        weights, expert_idx = probs.float().topk(self.top_k, dim=-1)  # [T, k]
        zero = torch.zeros((), device=x.device)
        return RouterOutput(weights, expert_idx, zero, zero)

    def force_routing(self, expert_idx: Optional[torch.Tensor]) -> None:
        """Route by ``expert_idx[T, k]`` from now on (None: Megatron's own choice again)."""
        self.layer.router.expert_idx = expert_idx


class _ForcedMegatronRouter(nn.Module):
    """Megatron's router, run as is (its cost stays), with its choice optionally replaced."""

    def __init__(self, gate: nn.Module, num_experts: int):
        super().__init__()
        self.gate = gate
        self.num_experts = num_experts
        self.expert_idx: Optional[torch.Tensor] = None  # [T, k] int64

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = (
            self.gate(x) if padding_mask is None else self.gate(x, padding_mask)
        )  # [T, E] each
        if self.expert_idx is None:
            return probs, routing_map
        return _balanced_probs(self.expert_idx, self.num_experts, probs)

    def __getattr__(self, name: str):
        # Megatron's MoELayer reaches into its router (set_layer_number, expert_bias, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("gate"), name)


def megatron_peer(
    hidden: int,
    ffn: int,
    experts: int,
    top_k: int,
    *,
    dispatcher: str = "alltoall",
    dtype: torch.dtype,
    device: torch.device,
    timeout_s: float = 300.0,
) -> MegatronMoEPeer:
    """Megatron-core MoELayer (local spec, ``dispatcher`` = alltoall | allgather) at EP =
    world size with random weights on ``device``. Installs Megatron's parallel_state from our
    groups (kept for the process: later peers reuse the same groups)."""
    _require("megatron.core", "megatron-core")
    from moe_ext.megatron import install_parallel_state, seed_model_parallel_rng

    groups = ep_groups(timeout_s, experts)
    install_parallel_state(groups)
    if device.type == "cuda":
        # Megatron's CUDA RNG tracker streams (expert/tensor parallel) must exist on GPUs
        seed_model_parallel_rng(groups, 1234)
    config = megatron_moe_config(
        hidden,
        ffn,
        experts,
        top_k,
        groups.plan,
        dispatcher=dispatcher,
        params_dtype=dtype,
        cpu_init=device.type == "cpu",
    )
    with torch.device(device):
        layer = megatron_moe_layer(config, groups)
    layer = layer.to(device)
    _random_init_(layer)
    return MegatronMoEPeer(layer, top_k)


# ---------------------------------------------------------------- DeepSpeed


class SwiGLUExpert(nn.Module):
    """One expert for DeepSpeed's MoE: ``down(silu(gate(x)) * up(x))``, x[..., H] -> [..., H]."""

    def __init__(
        self,
        hidden: int,
        ffn: int,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden, ffn, **kw)
        self.up_proj = nn.Linear(hidden, ffn, **kw)
        self.down_proj = nn.Linear(ffn, hidden, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeepSpeedMoEPeer(nn.Module):
    """DeepSpeed's MoE behind our layer's calling convention: ``forward(x[T, H]) -> y[T, H]``."""

    def __init__(self, moe: nn.Module, top_k: int):
        super().__init__()
        self.moe = moe
        self.top_k = top_k
        gate = moe.deepspeed_moe.gate
        self._gate = gate
        moe.deepspeed_moe.gate = _ForcedDeepSpeedGate(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _, _ = self.moe(x)
        return y

    def router(self, x: torch.Tensor) -> RouterOutput:
        """The experts DeepSpeed's gate picks (top-k of the softmax of its logits)."""
        logits = F.linear(x.float(), self._gate.wg.weight.float())  # [T, E]
        weights, expert_idx = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        zero = torch.zeros((), device=x.device)
        return RouterOutput(weights / weights.sum(-1, keepdim=True), expert_idx, zero, zero)

    def force_routing(self, expert_idx: Optional[torch.Tensor]) -> None:
        """Route by ``expert_idx[T, k]`` from now on (None: DeepSpeed's own choice again)."""
        self.moe.deepspeed_moe.gate.expert_idx = expert_idx


class _ForcedDeepSpeedGate(nn.Module):
    """DeepSpeed's TopKGate; with ``expert_idx`` set, the same computation (fp32 logits,
    softmax, expert counts, capacity = largest count over the EP group, slot of each route
    in its expert's buffer, chosen gates renormalised) on the given experts instead of its
    top-k. Returns DeepSpeed's sparse-route tuple (l_aux, C, E, indices[k, T] int32,
    locations[k, T] int32, gates[k, T] f32, exp_counts[E])."""

    def __init__(self, gate: nn.Module):
        super().__init__()
        self.gate = gate
        self.expert_idx: Optional[torch.Tensor] = None  # [T, k] int64

    def forward(self, x, used_token=None, sparse_routes=False, use_tutel=False):
        if self.expert_idx is None:
            return self.gate(x, used_token, sparse_routes, use_tutel)
        if not sparse_routes or use_tutel:
            raise PeerUnavailable(
                "forced routing supports DeepSpeed's sparse-route dispatch "
                "only (DeepSpeed >= 0.19 without Tutel)"
            )
        logits = F.linear(x.float(), self.gate.wg.weight.float())  # [T, E]
        gates = torch.softmax(logits, dim=-1)
        num_experts = gates.shape[1]
        idx = self.expert_idx
        mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, idx, True)  # [T, E]
        exp_counts = mask.sum(0)  # [E]
        capacity = exp_counts.max()
        ep_group = self.gate.ep_group
        if ep_group is not None and dist.get_world_size(ep_group) > 1:
            # every rank's [E, C, H] buffer must have the same C for the all-to-all
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=ep_group)
        locations = torch.cumsum(mask, dim=0) - 1  # [T, E] slot in each expert's buffer
        chosen = gates.gather(1, idx)  # [T, k]
        chosen = chosen / chosen.sum(-1, keepdim=True).clamp_min(torch.finfo(chosen.dtype).eps)
        l_aux = torch.zeros((), device=x.device)
        return (
            l_aux,
            capacity,
            num_experts,
            idx.t().to(torch.int32).contiguous(),
            locations.gather(1, idx).t().to(torch.int32).contiguous(),
            chosen.t().contiguous(),
            exp_counts,
        )

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("gate"), name)


def deepspeed_peer(
    hidden: int,
    ffn: int,
    experts: int,
    top_k: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    timeout_s: float = 300.0,
) -> DeepSpeedMoEPeer:
    """deepspeed.moe.layer.MoE at EP = world size on our registered groups: SwiGLU experts
    of (H, F), top-k gate, no token dropping, no second-expert sampling, random weights."""
    _require("deepspeed.moe.layer", "deepspeed")
    from deepspeed.moe.layer import MoE

    groups = ep_groups(timeout_s, experts)
    groups.register_deepspeed_groups()
    with torch.device(device):
        template = SwiGLUExpert(hidden, ffn, dtype=dtype)
        # eval_capacity_factor is unused without token dropping (capacity = largest load)
        moe = MoE(
            hidden,
            template,
            num_experts=experts,
            ep_size=groups.plan.world_size,
            k=top_k,
            min_capacity=0,
            drop_tokens=False,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
    del template  # MoE deep-copied it once per local expert
    moe = moe.to(device=device, dtype=dtype)
    moe.set_deepspeed_parallelism()  # finds our registered group by name, creates none
    _random_init_(moe)
    return DeepSpeedMoEPeer(moe, top_k)


# ---------------------------------------------------------------- bench_moe entry


def build_peer(strategy: str) -> Callable[..., nn.Module]:
    """A tools/bench_moe.py builder: ``(shape, groups, dtype, device, max_tokens) -> layer``
    for a PEER_STRATEGIES name; ``groups`` is unused, a peer builds EP = world itself."""
    family, dispatcher = PEER_STRATEGIES[strategy]

    def build(
        shape, groups, dtype: torch.dtype, device: torch.device, max_tokens: int
    ) -> nn.Module:
        if family == "megatron":
            return megatron_peer(
                shape.hidden,
                shape.ffn,
                shape.experts,
                shape.top_k,
                dispatcher=dispatcher,
                dtype=dtype,
                device=device,
            )
        return deepspeed_peer(
            shape.hidden, shape.ffn, shape.experts, shape.top_k, dtype=dtype, device=device
        )

    return build


# ---------------------------------------------------------------- Hugging Face transformers


def hf_causal_lm(args: Any, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """transformers' causal LM of a moe_ext ``ModelArgs`` (its HF config), random weights
    built directly on ``device`` (transformers' own init, from the torch seed), eval mode."""
    _require("transformers", "transformers")
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_ext.train.export import hf_config

    config_dict = hf_config(args)
    model_type = config_dict.pop("model_type")
    config_dict.pop("architectures", None)
    config = AutoConfig.for_model(model_type, **config_dict)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def hf_decode_floor_s(
    model: nn.Module, num_experts: int, top_k: int, batch: int, hbm_bytes_per_s: float
) -> float:
    """Bytes one decode step of ``batch`` sequences must read ÷ bandwidth: every non-expert
    weight once (not the embedding table when the LM head is separate), each expert with
    the chance that one of ``batch`` tokens routes to it under uniform top-k routing."""
    p_touch = 1.0 - (1.0 - top_k / num_experts) ** batch
    tied = getattr(model.config, "tie_word_embeddings", False)
    total = 0.0
    for name, param in model.named_parameters():
        nbytes = param.numel() * param.element_size()
        if name.endswith("embed_tokens.weight") and not tied:
            continue  # decode reads B rows of the embedding, not the table
        total += nbytes * (p_touch if ".mlp.experts." in name else 1.0)
    return total / hbm_bytes_per_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: wall-clock timing of the whole generate call


def hf_generate_timed(
    model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int
) -> dict[str, float]:
    """Greedy ``model.generate`` of exactly ``new_tokens`` tokens after ``prompt_ids[B, S]``
    (int64, on the model's device; no EOS stop), timed by wall clock after a warm-up.

    Prefill time = a generate of one token; decode time = full generate - that. Returns
    prefill_s, decode_s, decode_steps (new_tokens - 1)."""
    device = prompt_ids.device
    mask = torch.ones_like(prompt_ids)
    kw = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n: int) -> float:
        _sync(device)
        begin = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt_ids, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(device)
        if out.shape[1] != prompt_ids.shape[1] + n:
            raise RuntimeError(
                f"generate returned {out.shape[1] - prompt_ids.shape[1]} new tokens, expected {n}"
            )
        return time.perf_counter() - begin

    run(2)  # warm-up: kernels, allocator
    prefill_s = run(1)
    total_s = run(new_tokens)
    return dict(
        prefill_s=prefill_s, decode_s=max(total_s - prefill_s, 0.0), decode_steps=new_tokens - 1
    )

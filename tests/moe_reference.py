"""Dense single-rank MoE reference in float64, written independently of moe_ext.moe.

# T tokens, H hidden, E experts, k top-k, F expert FFN size, Fs shared-expert FFN size

Routing is done token by token with plain Python ordering (no torch.topk), every expert is
evaluated on every token, and the routed outputs are mixed by a dense [T, E] gate matrix.
Everything is differentiable so tests compare gradients as well as outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class RoutingSpec:
    top_k: int
    score_func: str = "softmax"  # softmax | sigmoid
    norm_topk_prob: bool = True
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    routed_scaling_factor: float = 1.0


def _pick(values: list[float], count: int) -> list[int]:
    """Indices of the ``count`` largest values, largest first (ties: lower index first)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:count]


def reference_gates(x: torch.Tensor, router_weight: torch.Tensor, spec: RoutingSpec,
                    correction_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: [T, H]; router_weight: [E, H]. Returns dense gates [T, E] float64 (zero for
    experts a token did not pick), differentiable in x and router_weight."""
    logits = x.double() @ router_weight.double().t()  # [T, E]
    num_tokens, num_experts = logits.shape
    if spec.score_func == "softmax":
        scores = torch.exp(logits - logits.max(-1, keepdim=True).values)
        scores = scores / scores.sum(-1, keepdim=True)
    else:
        scores = 1.0 / (1.0 + torch.exp(-logits))
    choice = scores.detach().clone()
    if correction_bias is not None and spec.score_func == "sigmoid":
        choice = choice + correction_bias.double()
    rows = []
    for t in range(num_tokens):
        c = choice[t].tolist()
        allowed = list(range(num_experts))
        if spec.n_group:
            size = num_experts // spec.n_group
            group_score = []
            for g in range(spec.n_group):
                members = sorted(c[g * size:(g + 1) * size], reverse=True)
                group_score.append(sum(members[:2]))
            groups = _pick(group_score, spec.topk_group)
            allowed = [e for e in allowed if e // size in groups]
        picked_local = _pick([c[e] for e in allowed], spec.top_k)
        picked = [allowed[i] for i in picked_local]
        mask = torch.zeros(num_experts, dtype=torch.float64, device=x.device)
        mask[picked] = 1.0
        w = scores[t] * mask
        if spec.norm_topk_prob:
            w = w / w.sum()
        rows.append(w * spec.routed_scaling_factor)
    if not rows:
        return logits * 0
    return torch.stack(rows)  # [T, E]


def swiglu(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor,
           down_w: torch.Tensor) -> torch.Tensor:
    """x: [T, H]; gate_w, up_w: [F, H]; down_w: [H, F]. Returns [T, H]."""
    return (F.silu(x @ gate_w.t()) * (x @ up_w.t())) @ down_w.t()


def reference_moe(x: torch.Tensor, router_weight: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, spec: RoutingSpec,
                  correction_bias: Optional[torch.Tensor] = None,
                  shared: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                  shared_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Full MoE layer, float64. x: [T, H]; router_weight: [E, H]; gate_up: [E, 2F, H] (gate
    rows then up rows); down: [E, H, F]; shared: (gate [Fs, H], up [Fs, H], down [H, Fs]);
    shared_gate: [1, H]. Returns y [T, H] float64."""
    x = x.double()
    gates = reference_gates(x, router_weight, spec, correction_bias)  # [T, E]
    ffn = gate_up.shape[1] // 2
    y = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        gu = gate_up[e].double()
        out = swiglu(x, gu[:ffn], gu[ffn:], down[e].double())  # [T, H]
        y = y + gates[:, e:e + 1] * out
    if shared is not None:
        s = swiglu(x, *(w.double() for w in shared))
        if shared_gate is not None:
            s = torch.sigmoid(x @ shared_gate.double().t()) * s
        y = y + s
    return y

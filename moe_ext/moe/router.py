"""Top-k routers: softmax (Mixtral, Qwen2/3-MoE), softmax over the top-k logits with a
logit bias (gpt-oss) and sigmoid with correction bias and group-limited selection
(DeepSeek-V3), plus training losses and on-device load counters.

# T tokens, H hidden, E experts, k top-k, n_group expert groups

Router math runs in float32 whatever the model dtype (logits from float32 copies of x and
the weight), as routing decisions are sensitive to rounding.

Semantics, matching Hugging Face transformers 5:
- softmax, ``norm_topk_prob=True``: softmax over all logits, top-k, renormalise (Mixtral;
  equal to a softmax over the top-k logits), Qwen2/3-MoE with ``norm_topk_prob``;
- softmax, ``norm_topk_prob=False``: top-k of the full softmax (Qwen2-MoE default);
- topk_softmax: top-k of the logits, weights = softmax over those k logits (gpt-oss;
  ``norm_topk_prob`` does not apply, the k weights always sum to one);
- ``bias`` (gpt-oss): a learned [E] bias added to the logits before anything else;
- sigmoid: scores = sigmoid(logits); selection on scores + ``e_score_correction_bias``
  (the bias steers which experts are picked, never the weights), restricted to the
  ``topk_group`` best of ``n_group`` groups (group score = sum of its two best biased
  scores); weights = the unbiased scores of the picks, renormalised iff
  ``norm_topk_prob``, times ``routed_scaling_factor`` (DeepSeek-V3);
- ``group_score="max"``: a group scores its best expert instead (DeepSeek-V2's softmax
  ``group_limited_greedy``).

Fused fast path (inference): softmax and topk_softmax routers without groups, with or
without a logit bias, run as one Triton kernel
(:mod:`moe_ext.moe.kernels.routing`, op ``moe_ext::softmax_topk_router``: logits, softmax,
top-k, renormalisation, scaling and the load counters) when ``fused`` is set, the module
is in eval mode, no gradient is needed, x is on CUDA (or on CPU with Triton's interpreter
already running: tests) with the weight on the same device, T <= ``FUSED_MAX_TOKENS``
and E <= 512, H <= 8192, k <= 16. It picks the same experts (lowest id on exact ties),
with weights equal within float32 rounding, and returns ``logits=None``: nothing at
inference reads them (the losses are zero outside training). Everything else runs the
torch path below, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_ext.moe.kernels import kernels_for
from moe_ext.quant.formats import apply_keeping_dtypes

GROUP_SCORES = ("top2_sum", "max")  # how group-limited routing ranks a group
SCORE_FUNCS = ("softmax", "sigmoid", "topk_softmax")
# Tokens up to which the fused kernel routes (decode and small batches). Each block of
# tokens re-reads the [E, H] weight (from L2) with plain float32 FMAs, which pays off while
# the unfused path is launch-bound; larger T goes to the float32 GEMM of the torch path.
FUSED_MAX_TOKENS = 256
_FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@dataclass
class RouterOutput:
    weights: torch.Tensor  # [T, k] float32 routing weights
    expert_idx: torch.Tensor  # [T, k] int64 global expert ids
    aux_loss: torch.Tensor  # [] float32 load-balancing loss (0 when not training)
    z_loss: torch.Tensor  # [] float32 router z-loss (0 when not training)
    logits: Optional[torch.Tensor] = None  # [T, E] float32 router logits


def load_balancing_loss(probs: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss ``E * sum_i f_i * P_i``.

    probs: [T, E] float32 per-token expert probabilities; expert_idx: [T, k] int64.
    f_i is the fraction of tokens that picked expert i (summing to k over experts, as in
    transformers' ``load_balancing_loss_func``), P_i the mean probability of expert i."""
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum()
    picks = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    flat = expert_idx.reshape(-1)
    picks.index_add_(0, flat, torch.ones_like(flat, dtype=probs.dtype))
    return num_experts * torch.sum((picks / num_tokens) * probs.mean(0))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits: [T, E] float32."""
    if logits.shape[0] == 0:
        return logits.sum()
    return torch.logsumexp(logits, dim=-1).square().mean()


class TopKRouter(nn.Module):
    """Linear gate + top-k selection. Parameter ``weight`` [E, H], optional parameter
    ``bias`` [E] (logit bias); optional persistent buffer ``e_score_correction_bias`` [E]
    float32 (sigmoid routers, updated by the caller).

    ``expert_load`` [E] int64 accumulates, on device and without host syncs, how many
    token-expert pairs each expert received since the last ``reset_expert_load()``.

    ``fused`` (attribute and argument, default True) allows the fused-kernel fast path
    described in the module docstring; False always runs the torch path."""

    def __init__(
        self,
        hidden_size: int,
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
        bias: bool = False,
        record_load: bool = True,
        fused: bool = True,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"unknown router score_func {score_func!r}; use one of {SCORE_FUNCS}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        if (n_group is None) != (topk_group is None):
            raise ValueError(
                "set both n_group and topk_group for group-limited routing, or neither"
            )
        if n_group is not None:
            if num_experts % n_group or not 1 <= topk_group <= n_group:
                raise ValueError(
                    f"group-limited routing needs n_group dividing num_experts "
                    f"({num_experts}) and 1 <= topk_group <= n_group; got "
                    f"n_group={n_group}, topk_group={topk_group}"
                )
            if topk_group * (num_experts // n_group) < top_k:
                raise ValueError(
                    f"topk_group={topk_group} groups of {num_experts // n_group} "
                    f"experts cannot supply top_k={top_k} picks; raise topk_group"
                )
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.score_func, self.norm_topk_prob = score_func, norm_topk_prob
        if group_score not in GROUP_SCORES:
            raise ValueError(f"unknown group_score {group_score!r}; use one of {GROUP_SCORES}")
        self.n_group, self.topk_group, self.group_score = n_group, topk_group, group_score
        self.routed_scaling_factor = routed_scaling_factor
        self.record_load = record_load
        self.fused = fused
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, dtype=dtype, device=device)
        )
        nn.init.normal_(self.weight, std=hidden_size**-0.5)
        self.bias = (
            nn.Parameter(torch.zeros(num_experts, dtype=dtype, device=device)) if bias else None
        )
        if correction_bias:
            self.register_buffer(
                "e_score_correction_bias",
                torch.zeros(num_experts, dtype=torch.float32, device=device),
            )
        else:
            self.e_score_correction_bias = None
        self.register_buffer(
            "expert_load",
            persistent=False,
            tensor=torch.zeros(num_experts, dtype=torch.int64, device=device),
        )

    def _apply(self, fn, recurse: bool = True):
        """``model.to(torch.bfloat16)`` and the like move ``e_score_correction_bias`` but keep
        it float32: it decides near-tied picks (transformers keeps it float32 too)."""
        kept = () if self.e_score_correction_bias is None else ("e_score_correction_bias",)
        apply_keeping_dtypes(self, fn, kept, lambda f: super(TopKRouter, self)._apply(f, recurse))
        return self

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, experts={self.num_experts}, top_k={self.top_k}, "
            f"score_func={self.score_func}, norm_topk_prob={self.norm_topk_prob}, "
            f"n_group={self.n_group}, topk_group={self.topk_group}, "
            f"scale={self.routed_scaling_factor}, bias={self.bias is not None}"
        )

    def _select(self, choice: torch.Tensor) -> torch.Tensor:
        """choice: [T, E] float32 selection scores. Returns expert_idx [T, k] int64."""
        if self.n_group is not None and self.n_group > 1:
            num_tokens = choice.shape[0]
            grouped = choice.view(num_tokens, self.n_group, -1)  # [T, n_group, E/n_group]
            if self.group_score == "max":
                group_scores = grouped.amax(dim=-1)  # [T, n_group]
            else:
                best = min(2, grouped.shape[-1])
                group_scores = grouped.topk(best, dim=-1).values.sum(-1)  # [T, n_group]
            keep = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf"))
            choice = choice.view(num_tokens, -1)  # [T, E], -inf outside the kept groups
        return choice.topk(self.top_k, dim=-1).indices

    def fused_kernels(self, x: torch.Tensor):
        """The routing kernels module when this forward takes the fused fast path, else None
        (conditions in the module docstring). x: [T, H]."""
        if (
            not self.fused
            or self.training
            or self.score_func not in ("softmax", "topk_softmax")
            or self.n_group is not None
            or x.shape[0] > FUSED_MAX_TOKENS
            or x.device != self.weight.device
            or x.dtype not in _FUSED_DTYPES
            or self.weight.dtype not in _FUSED_DTYPES
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            return None
        kernels = kernels_for("routing", x.device)
        if (
            kernels is None
            or self.num_experts > kernels.MAX_EXPERTS
            or (self.hidden_size > kernels.MAX_HIDDEN or self.top_k > kernels.MAX_TOP_K)
        ):
            return None
        return kernels

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x: [T, H] any float dtype. Returns RouterOutput (weights [T, k] float32; logits
        None on the fused fast path)."""
        if x.dim() != 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"router expects [T, {self.hidden_size}], got {tuple(x.shape)}; "
                f"flatten batch and sequence first"
            )
        kernels = self.fused_kernels(x)
        if kernels is not None:
            weights, expert_idx = kernels.softmax_topk_router(
                x,
                self.weight,
                self.expert_load,
                self.top_k,
                # renormalised top-k probabilities = softmax over the top-k logits
                norm_topk_prob=self.norm_topk_prob or self.score_func == "topk_softmax",
                routed_scaling_factor=self.routed_scaling_factor,
                record_load=self.record_load,
                bias=self.bias,
            )  # [T, k] float32, [T, k] int64
            zero = weights.new_zeros(())  # no losses outside training
            return RouterOutput(weights, expert_idx, zero, zero, None)
        bias = None if self.bias is None else self.bias.float()
        logits = F.linear(x.float(), self.weight.float(), bias)  # [T, E]
        if self.score_func == "topk_softmax":
            top_logits, expert_idx = logits.topk(self.top_k, dim=-1)  # [T, k]
            top_weights = torch.softmax(top_logits, dim=-1)
            return self._finish(logits, top_weights, expert_idx, None)
        if self.score_func == "softmax":
            scores = torch.softmax(logits, dim=-1)  # [T, E]
            choice = scores
        else:
            scores = torch.sigmoid(logits)
            choice = scores.detach()
            if self.e_score_correction_bias is not None:
                choice = choice + self.e_score_correction_bias
        if self.n_group is None and self.score_func == "softmax":
            top_weights, expert_idx = scores.topk(self.top_k, dim=-1)  # [T, k]
        else:
            expert_idx = self._select(choice.detach())
            top_weights = scores.gather(1, expert_idx)  # [T, k]
        if self.norm_topk_prob:
            denom = top_weights.sum(-1, keepdim=True)
            if self.score_func == "sigmoid":
                denom = denom + 1e-20  # sigmoid scores can all underflow to zero
            top_weights = top_weights / denom
        return self._finish(logits, top_weights, expert_idx, scores)

    def _finish(
        self,
        logits: torch.Tensor,
        top_weights: torch.Tensor,
        expert_idx: torch.Tensor,
        scores: Optional[torch.Tensor],
    ) -> RouterOutput:
        """Scaling, load counters and training losses. logits: [T, E] float32; scores: [T, E]
        float32 softmax or sigmoid scores (None: topk_softmax, the loss takes the softmax of
        the logits); top_weights: [T, k] float32; expert_idx: [T, k] int64."""
        if self.routed_scaling_factor != 1.0:
            top_weights = top_weights * self.routed_scaling_factor
        if self.record_load:
            with torch.no_grad():
                flat = expert_idx.reshape(-1)
                self.expert_load.scatter_add_(0, flat, torch.ones_like(flat))
        if self.training:
            if scores is None:
                probs = torch.softmax(logits, dim=-1)
            elif self.score_func == "softmax":
                probs = scores
            else:
                probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
            aux, zl = load_balancing_loss(probs, expert_idx), z_loss(logits)
        else:
            aux = zl = logits.new_zeros(())
        return RouterOutput(top_weights, expert_idx, aux, zl, logits)

    @torch.no_grad()
    def read_expert_load(self, reset: bool = False) -> torch.Tensor:
        """Token-expert pairs per expert since the last reset: [E] int64 on the router's
        device (a copy; moving it to the host is the caller's sync)."""
        load = self.expert_load.clone()
        if reset:
            self.expert_load.zero_()
        return load

    @torch.no_grad()
    def reset_expert_load(self) -> None:
        self.expert_load.zero_()

"""Pipeline-parallel training steps of the native model: one-forward-one-backward (1F1B) over
``train.pipeline_microbatches`` micro-batches, with the DeepSpeed engine still reducing
gradients and stepping.

# B micro_batch (sequences per data-parallel rank), M micro-batches, b = B/M, S sequence,
# H hidden, V vocab; pp stages, stage s holds a contiguous block of layers

Schedule (Megatron's non-interleaved 1F1B): stage s runs min(pp - s - 1, M) warm-up
forwards, then alternates one forward and one backward, then drains the remaining
backwards. Activations go forward and their gradients backward point to point between
neighbouring stages of the same (tp, dp) coordinate (``torch.distributed.batch_isend_irecv``:
a send and a receive posted together never deadlock). At most pp - s micro-batches are in
flight on stage s, so activation memory is bounded by the pipeline depth, not by M.

Losses: the last stage computes each micro-batch's next-token loss; every stage adds the
load-balancing (and z) losses of its own MoE layers to its backward. Micro-batch i's
objective is divided by M, so the gradients are those of the mean over micro-batches.

DeepSpeed: every micro-batch's backward goes through ``engine.backward`` on a scalar
surrogate (the last stage's loss; elsewhere sum(output * incoming gradient) plus the local
router losses, whose gradient is exactly the pipeline's), with the engine's gradient
accumulation boundary set only for the last micro-batch
(``engine.set_gradient_accumulation_boundary``, DeepSpeed's documented manual
accumulation). So the engine accumulates M micro-batches and reduces dense gradients over
dp and expert gradients over edp once, as DeepSpeed's own PipelineEngine does after its
schedule; the caller then clips and calls ``engine.step()``. ZeRO-2 partitions gradients
inside backward hooks, which the PipelineEngine of DeepSpeed itself refuses with pipeline
parallelism; the launcher refuses it too (``check_pipeline``).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_ext.errors import MoeExtError


class PipelineConfigError(MoeExtError):
    """Pipeline settings that cannot train (one line: problem and fix)."""


def check_pipeline(
    pp: int, num_layers: int, micro_batch: int, microbatches: int, zero_stage: int
) -> None:
    """The pipeline settings' one-line refusals, before any process group or weight."""
    if microbatches < 1:
        raise PipelineConfigError(
            f"train.pipeline_microbatches={microbatches}; it must be at least 1"
        )
    if pp > num_layers:
        raise PipelineConfigError(
            f"parallel.pp={pp} is larger than the model's {num_layers} layers; choose "
            f"parallel.pp <= {num_layers}"
        )
    if micro_batch % microbatches:
        raise PipelineConfigError(
            f"train.micro_batch={micro_batch} does not split into "
            f"train.pipeline_microbatches={microbatches} equal micro-batches; choose a "
            f"divisor of {micro_batch}"
        )
    if pp > 1 and zero_stage >= 2:
        raise PipelineConfigError(
            f"train.zero_stage={zero_stage} with parallel.pp={pp}: ZeRO-2 reduces gradients "
            f"inside each micro-batch's backward, which pipeline accumulation does not "
            f"support (DeepSpeed's PipelineEngine refuses it too); use train.zero_stage=1"
        )


class PipelineSchedule:
    """1F1B training steps (and forward-only evaluation) of this rank's pipeline stage.

    engine: the DeepSpeed engine of ``moe_ext.deepspeed.engine.build_engine`` (its
    ``module`` is a CausalLMWithAux around a parallelized Transformer stage); groups:
    ProcessGroups of the plan (pp > 1); microbatches: M, dividing every batch's B."""

    def __init__(self, engine: Any, groups: Any, microbatches: int):
        self.engine = engine
        self.groups = groups
        self.microbatches = microbatches
        self.wrapped = engine.module
        self.model = engine.module.model
        context = self.model.context
        self.prev, self.next = context.pp_prev, context.pp_next
        self.pp_group = groups.pp
        self.stage, self.stages = groups.pp_rank, groups.plan.pp
        self.first, self.last = self.model.is_first_stage, self.model.is_last_stage

    # ---- point to point --------------------------------------------------------------
    def _exchange(
        self,
        send: Optional[torch.Tensor] = None,
        send_to: Optional[int] = None,
        recv_like: Optional[torch.Tensor] = None,
        recv_from: Optional[int] = None,
    ) -> Optional[torch.Tensor]:
        """Post an optional send and an optional receive (a buffer shaped like
        ``recv_like``) together and wait for both. Returns the received tensor."""
        ops, received = [], None
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send.contiguous(), send_to))
        if recv_like is not None:
            received = torch.empty_like(recv_like)
            ops.append(dist.P2POp(dist.irecv, received, recv_from))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return received

    def _hidden_buffer(self, tokens: torch.Tensor) -> torch.Tensor:
        """An (uninitialised) [b, S, H] buffer in the model dtype, for receives."""
        b, S = tokens.shape
        return torch.empty(
            b, S, self.model.args.hidden_size, dtype=self.model.dtype, device=tokens.device
        )

    def _recv_forward(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        if self.first:
            return None
        hidden = self._exchange(recv_like=self._hidden_buffer(tokens), recv_from=self.prev)
        return hidden.requires_grad_(True)  # a leaf: its gradient goes back to the previous stage

    # ---- one micro-batch -------------------------------------------------------------
    def _router_losses(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weighted local router losses, aux sum, z sum) of this stage's MoE layers after a
        forward, fp32 scalars (the layers keep only their latest losses: read at once)."""
        layers = self.wrapped.moe_layers()
        zero = torch.zeros((), dtype=torch.float32, device=self.engine.device)
        aux = sum((m.aux_loss.float() for m in layers if m.aux_loss is not None), zero)
        z = sum((m.z_loss.float() for m in layers if m.z_loss is not None), zero)
        weighted = self.wrapped.aux_loss_coeff * aux + self.wrapped.z_loss_coeff * z
        return weighted, aux.detach(), z.detach()

    def _forward(
        self, batch: torch.Tensor, hidden: Optional[torch.Tensor], stats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch forward of this stage. batch: [b, S+1] int64; hidden: [b, S, H] or
        None. Returns (output, objective): on the last stage both are the scalar objective
        (lm + router losses) / M; elsewhere the hidden states [b, S, H] and the local router
        losses / M. Adds (lm, aux, z) / M into ``stats`` [3]."""
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [b, S] each
        out = self.model.stage_forward(inputs, hidden)  # [b, S, V] or [b, S, H]
        weighted, aux, z = self._router_losses()
        M = self.microbatches
        if self.last:
            lm = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), targets.reshape(-1))
            stats += torch.stack((lm.detach(), aux, z)) / M
            objective = (lm + weighted) / M
            return objective, objective
        stats[1:] += torch.stack((aux, z)) / M
        return out, weighted / M

    def _backward(
        self,
        index: int,
        hidden: Optional[torch.Tensor],
        output: torch.Tensor,
        objective: torch.Tensor,
        output_grad: Optional[torch.Tensor],
    ) -> Optional[torch.Tensor]:
        """Micro-batch ``index``'s backward through the engine (module docstring); returns
        the gradient of this stage's input hidden states (None on the first stage)."""
        if self.last:
            surrogate = objective
        else:
            # d/d(output) of sum(output * g) is g: the next stage's gradient, exactly
            surrogate = (output * output_grad).sum().float() + objective
        self.engine.set_gradient_accumulation_boundary(index == self.microbatches - 1)
        self.engine.backward(surrogate, scale_wrt_gas=False)
        return None if hidden is None else hidden.grad

    # ---- whole steps -----------------------------------------------------------------
    def train_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward of ``batch`` [B, S+1] int64 in M micro-batches (1F1B); the
        gradients are reduced by the engine at the end, ready for clipping and
        ``engine.step()``. Returns (loss, lm_loss, aux_loss), fp32 scalars equal on every
        stage: the means over micro-batches, summed over the pipeline's stages."""
        M = self.microbatches
        chunks = batch.chunk(M)  # M x [b, S+1]
        stats = torch.zeros(3, dtype=torch.float32, device=batch.device)  # lm, aux, z
        warmup = min(self.stages - self.stage - 1, M)
        remaining = M - warmup
        inflight: deque = deque()  # (index, hidden in, output, objective)
        for i in range(warmup):
            hidden = self._recv_forward(chunks[i][:, :-1])
            out, objective = self._forward(chunks[i], hidden, stats)
            self._exchange(send=out.detach(), send_to=self.next)
            inflight.append((i, hidden, out, objective))
        hidden = self._recv_forward(chunks[warmup][:, :-1]) if remaining else None
        for j in range(remaining):
            i = warmup + j
            out, objective = self._forward(chunks[i], hidden, stats)
            grad = None
            if not self.last:  # send this output, receive the oldest in-flight one's gradient
                grad = self._exchange(out.detach(), self.next, out, self.next)
            inflight.append((i, hidden, out, objective))
            index, old_hidden, old_out, old_objective = inflight.popleft()
            input_grad = self._backward(index, old_hidden, old_out, old_objective, grad)
            if j == remaining - 1:
                hidden = None
                if not self.first:
                    self._exchange(send=input_grad, send_to=self.prev)
            elif self.first:
                hidden = None
            else:  # send the gradient back, receive the next micro-batch's input
                buffer = self._hidden_buffer(chunks[i + 1][:, :-1])
                hidden = self._exchange(input_grad, self.prev, buffer, self.prev)
                hidden.requires_grad_(True)
        for _ in range(warmup):
            index, old_hidden, old_out, old_objective = inflight.popleft()
            grad = self._exchange(recv_like=old_out, recv_from=self.next)
            input_grad = self._backward(index, old_hidden, old_out, old_objective, grad)
            if not self.first:
                self._exchange(send=input_grad, send_to=self.prev)
        return self._totals(stats)

    def _totals(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """stats [3] (this stage's lm, aux, z) -> (loss, lm, aux) summed over the stages."""
        dist.all_reduce(stats, group=self.pp_group)
        lm, aux, z = stats
        loss = lm + self.wrapped.aux_loss_coeff * aux + self.wrapped.z_loss_coeff * z
        return loss, lm, aux

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Next-token loss of ``batch`` [B, S+1] int64 through the whole pipeline, one
        micro-batch at a time; fp32 scalar, equal on every stage."""
        total = torch.zeros((), dtype=torch.float32, device=batch.device)
        for chunk in batch.chunk(self.microbatches):
            inputs, targets = chunk[:, :-1], chunk[:, 1:]  # [b, S]
            hidden = self._recv_forward(inputs)
            out = self.model.stage_forward(inputs, hidden)
            if self.last:
                total += F.cross_entropy(
                    out.float().reshape(-1, out.shape[-1]), targets.reshape(-1)
                )
            else:
                self._exchange(send=out, send_to=self.next)
        dist.all_reduce(total, group=self.pp_group)
        return total / self.microbatches

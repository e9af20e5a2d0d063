"""The training loop around a DeepSpeed engine (moe_ext.deepspeed.engine.build_engine).

Every step: learning rate from the step, this rank's batch from (seed, step), forward
(LM loss + weighted aux loss), backward (DeepSpeed reduces dense gradients over the data-
parallel group and expert gradients over the expert-data-parallel group), clip, optimizer
step, and the data-parallel mean of the losses for the log and the progress bar.
With pp > 1 the forward and backward are the 1F1B schedule of moe_ext.train.pipeline over
``train.pipeline_microbatches`` micro-batches (the engine reduces once, after the last);
``train.activation_checkpointing`` recomputes every decoder block in backward.

Clipping uses the exact global norm (moe_ext.train.clip: every gradient element counted
once over dp/edp, tp, ep, etp and pp). The DeepSpeed engine clips inside its step under
every ZeRO stage and dtype (moe_ext.deepspeed.engine.install_exact_norm) and reports the
norm; an engine that does not (``own_clipping``: engine=megatron) is clipped here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from moe_ext.deepspeed.engine import set_lr
from moe_ext.model.decoder import Transformer
from moe_ext.train.clip import clip_grad_norm_, grad_placements
from moe_ext.train.data import TokenData, eval_batches, train_batch
from moe_ext.train.pipeline import PipelineSchedule

log = logging.getLogger("moe_ext.train")


def lr_at(step: int, conf: Any) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if conf.warmup_steps > 0 and step < conf.warmup_steps:
        return conf.lr * (step + 1) / conf.warmup_steps
    span = max(1, conf.steps - conf.warmup_steps)
    progress = min(1.0, (step - conf.warmup_steps) / span)
    floor = conf.lr * conf.min_lr_ratio
    return floor + 0.5 * (conf.lr - floor) * (1.0 + math.cos(math.pi * progress))


def trainer_clips(engine: str, dtype: torch.dtype) -> bool:
    """Whether the Trainer clips (``own_clipping``) for ``engine=`` in ``dtype``: the DeepSpeed
    engine clips inside its step with the exact norm, as does Megatron's bf16 optimizer;
    Megatron's fp32 engine (torch AdamW) does not."""
    return engine == "megatron" and dtype == torch.float32


@dataclass
class RunState:
    """What a run has done so far (restored from a training checkpoint on resume)."""

    step: int = 0  # optimizer steps taken
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per step
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "val_loss"}


class Trainer:
    """Runs steps of one engine; every rank constructs one with the same arguments."""

    def __init__(
        self,
        engine: Any,
        groups: Any,
        data: TokenData,
        conf: Any,
        device: torch.device,
        own_clipping: bool,
    ):
        self.engine = engine
        self.groups = groups
        self.data = data
        self.conf = conf
        self.device = device
        self.own_clipping = own_clipping
        # the native model has shard_slices (args); Megatron's GPTModel trains at tp = pp = 1
        self.placements = (
            grad_placements(self.model, groups, getattr(self.model, "args", None))
            if own_clipping
            else None
        )
        self.dp, self.dp_rank = groups.plan.dp, groups.dp_rank
        # the native model (engine=deepspeed): per-block recomputation and, with pp > 1,
        # the 1F1B schedule over this rank's stage
        native = isinstance(self.model, Transformer)
        if native:
            self.model.activation_checkpointing = conf.activation_checkpointing
        self.pipeline = (
            PipelineSchedule(engine, groups, conf.pipeline_microbatches)
            if native and groups.plan.pp > 1
            else None
        )
        self.eval_set = eval_batches(
            data, conf.eval_batches, conf.micro_batch, conf.seq_len, self.dp, self.dp_rank
        )

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module.model

    def _dp_mean(self, values: torch.Tensor) -> list[float]:
        if self.dp > 1:
            dist.all_reduce(values, group=self.groups.dp)
            values = values / self.dp
        return values.tolist()  # sync: losses go to the log and the progress bar

    def train_step(self, step: int) -> dict[str, Any]:
        """Take optimizer step ``step`` (0-based); returns its record (dp-mean losses)."""
        conf = self.conf
        lr = lr_at(step, conf)
        set_lr(self.engine, lr)
        batch = train_batch(
            self.data, step, conf.seed, conf.micro_batch, conf.seq_len, self.dp, self.dp_rank
        ).to(self.device)  # [B, S+1]
        start = time.perf_counter()
        if self.pipeline is not None:  # 1F1B; the engine reduced the gradients at the end
            loss, lm_loss, aux_loss = self.pipeline.train_step(batch)
        else:
            loss, lm_loss, aux_loss = self.engine(batch)
            self.engine.backward(loss)
        norm = (
            clip_grad_norm_(self.model, conf.grad_clip, self.placements, self.groups.world)
            if self.own_clipping
            else None
        )
        self.engine.step()
        values = torch.stack([loss.detach().float(), lm_loss.float(), aux_loss.float()])
        loss_v, lm_v, aux_v = self._dp_mean(values)
        seconds = time.perf_counter() - start
        if norm is None:
            reported = self.engine.get_global_grad_norm()
            # sync (when a tensor): for the log; the step above already waited on the device
            grad_norm = None if reported is None else float(reported)
        else:
            grad_norm = float(norm)  # sync: already waited on by the losses above
        tokens = self.dp * conf.micro_batch * conf.seq_len
        return {
            "step": step + 1,
            "loss": loss_v,
            "lm_loss": lm_v,
            "aux_loss": aux_v,
            "lr": lr,
            "grad_norm": grad_norm,
            "seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9),
        }

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean LM loss over the fixed held-out batches (None without a held-out tail)."""
        if not self.eval_set:
            return None
        module = self.engine.module
        module.eval()
        try:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
            for batch in self.eval_set:
                if self.pipeline is not None:
                    total += self.pipeline.eval_loss(batch.to(self.device))
                else:
                    total += module(batch.to(self.device))[1].float()
        finally:
            module.train()
        return self._dp_mean((total / len(self.eval_set)).reshape(1))[0]

    def run(
        self,
        state: RunState,
        on_checkpoint: Optional[Callable[[RunState], None]] = None,
        progress: bool = False,
    ) -> RunState:
        """Train from ``state.step`` to ``conf.steps``, evaluating every ``eval_every`` and
        calling ``on_checkpoint`` every ``save_every`` steps and at the end (collective)."""
        from tqdm.auto import tqdm

        conf = self.conf
        bar = tqdm(
            total=conf.steps,
            initial=state.step,
            unit="step",
            disable=not progress,
            dynamic_ncols=True,
        )
        try:
            for step in range(state.step, conf.steps):
                record = self.train_step(step)
                state.history.append(record)
                state.step = done = step + 1
                bar.set_postfix(
                    loss=f"{record['lm_loss']:.3f}",
                    aux=f"{record['aux_loss']:.3f}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                )
                bar.update(1)
                last = done == conf.steps
                if last or (conf.eval_every > 0 and done % conf.eval_every == 0):
                    val = self.evaluate()
                    if val is not None:
                        state.evals.append({"step": done, "val_loss": val})
                        message = f"step {done}: held-out loss {val:.4f}"
                        bar.write(message) if progress else log.info(message)
                if on_checkpoint is not None and (
                    last or (conf.save_every > 0 and done % conf.save_every == 0)
                ):
                    on_checkpoint(state)
        finally:
            bar.close()
        return state

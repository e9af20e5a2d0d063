"""engine=megatron: Megatron-core GPTModel with moe_ext's MoE layer for launch/infer.py and
launch/train.py (GPU; Megatron-core is CUDA-only).

# B batch, S sequence, V vocab (V_local = V / tp), H hidden

Weights: the native model's shard of this rank (``moe_ext.launching.build_model_shard``:
exactly the checkpoint slices the plan gives the rank, or the deterministic random init)
is renamed to GPTModel's names (``native_to_megatron``), its vocabulary rows split over tp,
and loaded with ``load_into_megatron`` (every GPTModel tensor covered). So engine=megatron
starts from the same numbers as engine=native for any moe_ext or Hugging Face checkpoint.

Generation (``generate``, same contract as ``moe_ext.model.generate``): no KV cache; each
step recomputes the full forward over the right-padded batch [B, S_cur] and reads the
logits at each request's last real position. With a causal mask and positions starting at
0 for every request, right padding never changes a real position's logits, so this is
exact, but it costs O(S^2) per request: a correctness path, not a fast one. Every rank
computes every request (data-parallel replicas do not split them) and the next ids come
from rank 0 each step, so all ranks take the same number of steps (their MoE exchanges
must pair up) even if their logits differ in the last bit.

Training (``build_train_engine``): an engine with the interface ``moe_ext.train.loop.
Trainer`` drives (``engine(batch)``, ``backward``, ``step``, ``module``, ``optimizer``).
The loss is GPTModel's own (``labels=`` -> per-token cross entropy); the routers' weighted
load-balancing and z losses reach the gradients inside the layer through Megatron's
``MoEAuxLossAutoScaler`` (``moe_aux_loss_coeff = train.aux_loss_coeff * k``, see
``moe_ext.megatron.config.loss_coeffs``), so the returned loss adds them for the log only.
Two precisions, tp = pp = 1:
- fp32 (``MegatronTrainEngine``): fp32 parameters, torch AdamW; gradients reduced
  explicitly after backward with two coalesced all-reduces: dense parameters averaged over
  dp, expert parameters (``allreduce = False``) summed over edp and divided by dp, i.e. the
  gradient of the mean of the per-rank losses, as the DeepSpeed engine does. The Trainer
  clips (exact norm over EP ranks).
- bf16 (``MegatronMixedPrecisionEngine``, CUDA): Megatron's own mixed-precision path. The
  GPTModel holds bf16 parameters inside Megatron's ``DistributedDataParallel`` (fp32
  gradient buffers, the same dense-over-dp / expert-over-edp reduction and 1/dp scaling,
  run by ``finalize_model_grads``); ``get_megatron_optimizer`` keeps fp32 main parameters
  and Adam states, one optimizer for dense and one for expert parameters chained, and
  clips with Megatron's global norm: dense squares reduced over the model-parallel group,
  expert squares over the expert tensor-model-pipeline group (so over EP), combined once.
  ``train.zero_stage=1`` selects Megatron's DistributedOptimizer (main parameters and
  optimizer states sharded over dp / edp), 0 the plain Float16 optimizer.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from moe_ext.launching import UsageError

CUDA_ONLY = "engine=megatron needs CUDA (Megatron-core is CUDA-only); use engine={fallback}"
LOG_LINE = (
    "engine=megatron: Megatron-core GPTModel with the moe_ext MoE layer; generation "
    "recomputes the full sequence every step (no KV cache: correctness path, slow)"
)


class MegatronEngineError(UsageError):
    """A job engine=megatron cannot run (one line: problem and fix)."""


# ---- checks made before any process group exists ----------------------------------------


def require_cuda(device: str, cuda_available: bool, fallback: str) -> None:
    """Refuse engine=megatron without CUDA (``device`` is the launcher's device= value)."""
    if not cuda_available or device == "cpu":
        raise MegatronEngineError(CUDA_ONLY.format(fallback=fallback))


def check_plan(plan: Any, args: Any, training: bool = False) -> None:
    """Refuse plans and model shapes GPTModel cannot take here (imports megatron-core)."""
    try:
        from moe_ext.megatron.config import MegatronConfigError, transformer_config_kwargs
    except ImportError as err:
        raise MegatronEngineError(
            f"engine=megatron: megatron-core is not importable ({err}); "
            f"pip install megatron-core or use the other engine"
        ) from err
    if plan.pp > 1:
        raise MegatronEngineError(
            f"engine=megatron runs parallel.pp=1 only (plan has pp="
            f"{plan.pp}); use parallel.pp=1 or engine=native"
        )
    if training and plan.tp > 1:
        raise MegatronEngineError(
            f"engine=megatron training runs parallel.tp=1 only (plan has "
            f"tp={plan.tp}; the export maps unsharded tensors); use "
            f"strategy=replicate or ep_* with parallel.tp=1"
        )
    tp = plan.tp
    if tp > 1:
        problems = []
        if args.num_key_value_heads % tp:
            problems.append(f"{args.num_key_value_heads} kv heads")
        if args.vocab_size % tp:
            problems.append(f"vocabulary of {args.vocab_size}")
        if (
            any(not args.is_moe_layer(i) for i in range(args.num_hidden_layers))
            and args.intermediate_size % tp
        ):
            problems.append(f"dense FFN size {args.intermediate_size}")
        if problems:
            raise MegatronEngineError(
                f"Megatron splits {', '.join(problems)} over tp={tp}, which "
                f"does not divide them; choose another parallel.tp"
            )
    try:
        transformer_config_kwargs(args, plan)
    except MegatronConfigError as err:
        raise MegatronEngineError(str(err)) from err


def check_train_settings(dtype: str, zero_stage: int, resume: bool = False) -> None:
    """engine=megatron trains fp32 (torch AdamW, no ZeRO) or bf16 (Megatron's mixed-precision
    optimizer; train.zero_stage=1: its DistributedOptimizer). ``dtype`` is the launcher's
    normalised name (auto | fp32 | bf16 | fp16); ``resume``: the job resumes a checkpoint
    (the DistributedOptimizer's sharded Adam states are not in our training checkpoints)."""
    if resume and zero_stage == 1:
        raise MegatronEngineError(
            "engine=megatron cannot resume with train.zero_stage=1 (the DistributedOptimizer's "
            "sharded states are not saved); train and resume with train.zero_stage=0"
        )
    if dtype not in ("auto", "fp32", "bf16"):
        raise MegatronEngineError(
            f"engine=megatron trains in fp32 or bf16 (dtype={dtype} asked); use "
            f"dtype=bf16, fp32 or auto"
        )
    if zero_stage not in (0, 1):
        raise MegatronEngineError(
            f"engine=megatron shards optimizer states only (train.zero_stage="
            f"{zero_stage}); use train.zero_stage=1 (DistributedOptimizer) or 0"
        )
    if zero_stage == 1 and dtype == "fp32":
        raise MegatronEngineError(
            "engine=megatron's DistributedOptimizer (train.zero_stage=1) runs with "
            "dtype=bf16; use dtype=bf16, or train.zero_stage=0 for fp32"
        )


# ---- the model ---------------------------------------------------------------------------


def native_shard_to_megatron(
    state: dict[str, torch.Tensor], args: Any, plan: Any, ranks: Any
) -> dict[str, torch.Tensor]:
    """This rank's native shard (names and slices of ``shard_slices``; pp = 1) -> its
    GPTModel state: Megatron names, q/k/v fused per query group, vocabulary rows of the
    embedding and output layer split over tp (native ranks hold all rows)."""
    from moe_ext.megatron.weights import native_to_megatron
    from moe_ext.model.parallelize import shard_slices

    names = set(shard_slices(plan, ranks, args))
    out = native_to_megatron({n: t for n, t in state.items() if n in names}, args)
    if plan.tp > 1:
        rows = args.vocab_size // plan.tp
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name in out:
                out[name] = out[name][ranks.tp_rank * rows : (ranks.tp_rank + 1) * rows]
    return out


def build_gpt_model(
    args: Any,
    plan: Any,
    groups: Any,
    device: torch.device,
    dtype: torch.dtype,
    aux_loss_coeff: float = 0.0,
    z_loss_coeff: float = 0.0,
) -> nn.Module:
    """An uninitialised GPTModel (our layer spec, our groups) on ``device`` in ``dtype``.
    Installs Megatron's parallel_state from ``groups`` (left installed: the model's
    attention reads it). aux/z coefficients are ours (``train.*``), mapped to Megatron's."""
    from moe_ext.megatron import dist_ckpt
    from moe_ext.megatron.state import install_parallel_state_and_rng

    install_parallel_state_and_rng(groups, args.init_seed, device)
    return dist_ckpt.build_gpt_model(
        args,
        plan,
        groups,
        dtype,
        device,
        moe_aux_loss_coeff=aux_loss_coeff * args.num_experts_per_tok,
        moe_z_loss_coeff=z_loss_coeff or None,
    )


def build_megatron_model(
    source: Any,
    plan: Any,
    groups: Any,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = False,
    native: Optional[nn.Module] = None,
    aux_loss_coeff: float = 0.0,
    z_loss_coeff: float = 0.0,
) -> nn.Module:
    """This rank's GPTModel holding the weights of ``source`` (a launching.ModelSource).

    native: this rank's native shard if the caller has it (training keeps it for the
    export); otherwise it is built here (``build_model_shard``) and dropped after the copy.
    Raises CheckpointError / MegatronConfigError (ValueErrors) naming what is wrong."""
    from moe_ext.launching import build_model_shard
    from moe_ext.megatron.weights import load_into_megatron

    if native is None:
        native = build_model_shard(source, plan, groups, rank, device, dtype, progress)
    model = build_gpt_model(source.args, plan, groups, device, dtype, aux_loss_coeff, z_loss_coeff)
    with torch.no_grad():
        load_into_megatron(
            model, native_shard_to_megatron(native.state_dict(), source.args, plan, groups)
        )
    return model


def copy_to_native(model: nn.Module, native: nn.Module) -> None:
    """GPTModel weights (tp = pp = 1) -> the native shard of the same rank (same slices),
    e.g. to export a trained model with moe_ext.train.export."""
    from moe_ext.megatron.weights import megatron_to_native

    state = megatron_to_native(model.state_dict(), native.args)
    own = native.state_dict()
    missing = sorted(n for n, p in native.named_parameters() if n not in state)
    if missing or any(n not in own for n in state):
        raise MegatronEngineError(
            f"GPTModel and the native shard disagree (missing "
            f"{missing[:3]}, extra {[n for n in state if n not in own][:3]})"
            f"; build both from the same args and plan"
        )
    with torch.no_grad():
        for name, param in native.named_parameters():
            param.copy_(state[name])


def causal_mask(length: int, device: torch.device) -> Optional[torch.Tensor]:
    """The attention mask GPTModel's local attention takes: None on CUDA (it builds the
    causal mask itself), [1, 1, S, S] bool (True = hidden) elsewhere."""
    if device.type == "cuda":
        return None
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), 1)[None, None]


def _forward_logits(
    model: nn.Module, tokens: torch.Tensor, tp_group: Any, last: torch.Tensor
) -> torch.Tensor:
    """tokens [B, S] -> logits [B, V] at positions ``last`` [B] (full vocabulary: the
    vocab-parallel shards are all-gathered over tp)."""
    B, S = tokens.shape
    positions = torch.arange(S, device=tokens.device)[None].expand(B, S)  # [B, S]
    logits = model(tokens, positions, causal_mask(S, tokens.device))  # [B, S, V_local]
    picked = logits[torch.arange(B, device=tokens.device), last]  # [B, V_local]
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        parts = [torch.empty_like(picked) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, picked.contiguous(), group=tp_group)
        picked = torch.cat(parts, dim=-1)  # [B, V]
    return picked.float()


def _fence(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: timing boundary only


def _run_batch(
    model: nn.Module,
    prompts: list[list[int]],
    max_new: list[int],
    conf: Any,
    eos: Optional[torch.Tensor],
    pad_id: int,
    generator: Optional[torch.Generator],
    tp_group: Any,
    result: Any,
    device: torch.device,
) -> list[list[int]]:
    from moe_ext.model.generate import finish_requests, sample

    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)  # [B]
    longest, steps = max(len(p) for p in prompts), max(max_new)
    # right padding: under the causal mask a real position never attends to it
    buf = torch.tensor(
        [list(p) + [pad_id] * (longest + steps - len(p)) for p in prompts],
        dtype=torch.long,
        device=device,
    )  # [B, longest + steps]
    limits = torch.tensor(max_new, dtype=torch.long, device=device)  # [B]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = torch.full((B, steps), pad_id, dtype=torch.long, device=device)  # [B, steps]
    rows = torch.arange(B, device=device)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    _fence(device)
    t0 = time.perf_counter()
    t_prefill = t0
    for step in range(steps):
        width = longest + step  # every request has grown by `step` tokens
        logits = _forward_logits(model, buf[:, :width], tp_group, lengths + step - 1)  # [B, V]
        nxt = sample(logits, conf.temperature, conf.top_p, generator, conf.top_k)  # [B]
        if distributed:
            # every rank must take the same tokens (and so the same number of MoE exchanges)
            dist.broadcast(nxt, src=0)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, step] = nxt
        buf[rows, lengths + step] = nxt
        if eos is not None:
            done |= torch.isin(nxt, eos)
        done |= limits <= step + 1
        if step == 0:
            _fence(device)
            t_prefill = time.perf_counter()
        else:
            result.decode_steps += 1
            result.decode_tokens += B
        if bool(done.all().item()):  # sync: stop once every request has finished
            break
    _fence(device)
    result.prefill_s += t_prefill - t0
    result.decode_s += time.perf_counter() - t_prefill
    return finish_requests(out, max_new, eos, result)


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt_ids: list[list[int]],
    conf: Any,
    eos_id: Union[int, Sequence[int], None],
    pad_id: Optional[int] = None,
    max_new_tokens: Union[int, Sequence[int], None] = None,
    seed: int = 0,
    groups: Any = None,
    dp: int = 1,
    dp_rank: int = 0,
) -> Any:
    """``moe_ext.model.generate``'s contract for a GPTModel: continuations of
    ``prompt_ids`` (every rank passes the full list and gets every result), greedy
    (``conf.temperature == 0``) or temperature/top-k/top-p sampling from ``seed``, stop after an
    EOS id (kept) or at each request's ``max_new_tokens`` (default ``conf.max_new_tokens``),
    batches of ``conf.max_batch_size``. Full recompute per step (module docstring).

    groups: the ProcessGroups of the model's plan (its tp group gathers vocab shards);
    dp/dp_rank: this rank's replica, for the token counts only (each replica reports its
    share, so summing over replicas counts every token once). Returns GenerationResult."""
    from moe_ext.model.generate import GenerateError, GenerationResult, _eos_tensor, _per_request

    device = next(model.parameters()).device
    if pad_id is None:
        pad_id = 0
    if any(len(p) == 0 for p in prompt_ids):
        raise GenerateError("empty prompt: every prompt needs at least one token (e.g. BOS)")
    n = len(prompt_ids)
    max_new = _per_request(max_new_tokens, conf.max_new_tokens, n)
    longest = max(len(p) + m for p, m in zip(prompt_ids, max_new))
    limit = getattr(model, "max_sequence_length", None)
    if limit is not None and longest > limit:
        raise GenerateError(
            f"a prompt plus its new tokens is {longest} tokens, over the "
            f"model's context of {limit}; shorten it"
        )
    model.eval()
    conf = conf.with_sampling()  # unset sampling fields: the built-in defaults (greedy)
    generator = None
    if conf.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    tp_group = groups.tp if groups is not None and groups.plan.tp > 1 else None
    eos = _eos_tensor(eos_id, device)
    result = GenerationResult(tokens=[])
    batch = max(1, conf.max_batch_size)
    for start in range(0, n, batch):
        chunk = list(range(start, min(n, start + batch)))
        result.tokens += _run_batch(
            model,
            [prompt_ids[i] for i in chunk],
            [max_new[i] for i in chunk],
            conf,
            eos,
            pad_id,
            generator,
            tp_group,
            result,
            device,
        )
    # this replica's share of the requests (the launcher sums the counts over replicas)
    mine = range(n * dp_rank // dp, n * (dp_rank + 1) // dp)
    result.prefill_tokens = sum(len(prompt_ids[i]) for i in mine)
    result.decode_tokens = result.decode_tokens * len(mine) // max(1, n)
    return result


# ---- training ----------------------------------------------------------------------------


class GPTCausalLM(nn.Module):
    """``forward(batch[B, S+1] int64) -> (loss, lm_loss, aux_loss)`` fp32 scalars for a
    GPTModel whose MoE layers are MoEExtLayer. lm_loss: GPTModel's mean next-token cross
    entropy; aux_loss: the sum of the layers' (unweighted) load-balancing losses; loss =
    lm_loss + the weighted router losses, whose gradient the layers inject themselves
    (MoEAuxLossAutoScaler) so they are added here detached: ``loss.backward()`` is right."""

    def __init__(self, model: nn.Module, aux_loss_coeff: float, z_loss_coeff: float):
        super().__init__()
        self.model = model
        self.aux_loss_coeff = aux_loss_coeff
        self.z_loss_coeff = z_loss_coeff

    def moe_layers(self) -> list[nn.Module]:
        from moe_ext.megatron.layer import MoEExtLayer

        return [m for m in self.model.modules() if isinstance(m, MoEExtLayer)]

    def forward(self, batch: torch.Tensor):
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, S] each
        B, S = inputs.shape
        positions = torch.arange(S, device=inputs.device)[None].expand(B, S)  # [B, S]
        per_token = self.model(
            inputs, positions, causal_mask(S, inputs.device), labels=targets
        )  # [B, S] fp32
        lm_loss = per_token.float().mean()
        zero = lm_loss.new_zeros(())
        layers = self.moe_layers()
        aux = sum((m.aux_loss.detach().float() for m in layers if m.aux_loss is not None), zero)
        z = sum((m.z_loss.detach().float() for m in layers if m.z_loss is not None), zero)
        loss = lm_loss + self.aux_loss_coeff * aux + self.z_loss_coeff * z
        return loss, lm_loss.detach(), aux


def _all_reduce_coalesced(grads: list[torch.Tensor], group: Any, scale: float) -> None:
    """grads[i] <- scale * sum over ``group`` of grads[i] (one flat buffer, one collective)."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class MegatronTrainEngine:
    """What ``moe_ext.train.loop.Trainer`` and ``moe_ext.train.state`` use of an engine:
    ``engine(batch)``, ``backward(loss)`` (with the gradient reductions), ``step()``,
    ``module`` (a GPTCausalLM; ``module.model`` is the GPTModel), ``optimizer`` (torch
    AdamW), ``get_global_grad_norm()``. Clipping is the Trainer's (``own_clipping``: fp32,
    no ZeRO), with the exact norm over EP ranks."""

    def __init__(self, module: GPTCausalLM, optimizer: torch.optim.Optimizer, groups: Any):
        self.module = module
        self.optimizer = optimizer
        self.groups = groups
        plan = groups.plan
        self.dp = plan.dp
        self.dense_group = groups.dp if plan.dp > 1 else None
        self.expert_group = groups.edp if plan.edp > 1 else None

    def __call__(self, batch: torch.Tensor):
        return self.module(batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        dense, experts = [], []
        for param in self.module.parameters():
            if param.grad is None:
                continue
            (experts if getattr(param, "allreduce", True) is False else dense).append(param.grad)
        # gradient of the mean over dp ranks of their losses: experts already hold the sum
        # over their EP group's tokens, so summing over edp and dividing by dp matches
        _all_reduce_coalesced(dense, self.dense_group, 1.0 / self.dp)
        _all_reduce_coalesced(experts, self.expert_group, 1.0 / self.dp)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> None:
        return None  # the Trainer measures and clips itself


class MegatronMixedPrecisionEngine:
    """The bf16 engine (module docstring): the Trainer's interface over a GPTModel inside
    Megatron's DistributedDataParallel with Megatron's mixed-precision optimizer.
    ``get_global_grad_norm()`` is the norm the last step measured (before clipping)."""

    def __init__(self, module: GPTCausalLM, ddp: nn.Module, optimizer: Any, groups: Any):
        self.module = module
        self.ddp = ddp
        self.optimizer = optimizer
        self.groups = groups
        self._grad_norm: Optional[float] = None

    def __call__(self, batch: torch.Tensor):
        return self.module(batch)

    def backward(self, loss: torch.Tensor) -> None:
        from megatron.core.distributed import finalize_model_grads

        loss.backward()
        finalize_model_grads([self.ddp])  # dense over dp, experts over edp, 1/dp scaling

    def step(self) -> None:
        ok, norm, _ = self.optimizer.step()
        if not ok:  # bf16 has no loss scale: only a NaN/inf gradient fails a step
            raise MegatronEngineError(
                "engine=megatron: the optimizer step found non-finite gradients; lower "
                "train.lr or raise train.warmup_steps"
            )
        self._grad_norm = norm
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def get_global_grad_norm(self) -> Optional[float]:
        return self._grad_norm


def adam_config_class() -> type:
    """Megatron's Adam optimizer config class (``AdamOptimizerConfig`` where the installed
    megatron-core has it, else the ``OptimizerConfig`` that held the Adam fields)."""
    from megatron.core import optimizer

    return getattr(optimizer, "AdamOptimizerConfig", optimizer.OptimizerConfig)


def megatron_optimizer_config(
    *,
    dtype: torch.dtype,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    grad_clip: float,
    distributed_optimizer: bool,
) -> dict[str, Any]:
    """Megatron ``adam_config_class()`` keyword arguments of the bf16 engine: Adam with fp32
    main parameters, gradients and states, clipping at ``grad_clip`` (0: off)."""
    return dict(
        optimizer="adam",
        lr=lr,
        min_lr=lr,
        weight_decay=weight_decay,
        adam_beta1=betas[0],
        adam_beta2=betas[1],
        adam_eps=1e-8,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        params_dtype=dtype,
        main_grads_dtype=torch.float32,
        main_params_dtype=torch.float32,
        use_distributed_optimizer=distributed_optimizer,
        clip_grad=grad_clip,
    )


def megatron_ddp(model: nn.Module, groups: Any, distributed_optimizer: bool = False) -> nn.Module:
    """``model`` (a GPTModel) inside Megatron's DistributedDataParallel on ``groups`` (installed
    as parallel_state): fp32 gradient buffers (``param.main_grad``), no overlap; after
    backward, ``finalize_model_grads([ddp])`` averages dense gradients over dp and sums
    expert ones (``allreduce = False``) over edp, both scaled by 1/dp."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from moe_ext.megatron.state import install_parallel_state

    install_parallel_state(groups)  # DDP and the optimizer read parallel_state's groups
    return DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=distributed_optimizer,
            check_for_nan_in_grad=False,
        ),
        module=model,
    )


def megatron_train_engine(
    model: nn.Module,
    groups: Any,
    *,
    dtype: torch.dtype,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    aux_loss_coeff: float,
    z_loss_coeff: float,
    grad_clip: float = 0.0,
    distributed_optimizer: bool = False,
) -> Any:
    """A training engine around a built GPTModel (ours or one with Megatron's own MoE
    layers, as the benchmark's peers): fp32 -> ``MegatronTrainEngine`` (torch AdamW, the
    Trainer clips), bf16 -> ``MegatronMixedPrecisionEngine`` (Megatron's DDP and optimizer,
    which clips at ``grad_clip``)."""
    model.train()
    module = GPTCausalLM(model, aux_loss_coeff, z_loss_coeff)
    if dtype == torch.float32:
        if distributed_optimizer:
            raise MegatronEngineError(
                "engine=megatron's DistributedOptimizer runs with dtype=bf16; use "
                "dtype=bf16 or train.zero_stage=0"
            )
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=lr,
            betas=betas,
            foreach=False,
        )
        return MegatronTrainEngine(module, optimizer, groups)
    if dtype != torch.bfloat16:
        raise MegatronEngineError(f"engine=megatron trains fp32 or bf16, not {dtype}")
    from megatron.core.optimizer import get_megatron_optimizer

    ddp = megatron_ddp(model, groups, distributed_optimizer)
    optimizer = get_megatron_optimizer(
        adam_config_class()(
            **megatron_optimizer_config(
                dtype=dtype,
                lr=lr,
                weight_decay=weight_decay,
                betas=betas,
                grad_clip=grad_clip,
                distributed_optimizer=distributed_optimizer,
            )
        ),
        [ddp],
        # no gloo copies of our groups (parallel_state holds only the ones moe_ext built)
        **(
            {"use_gloo_process_groups": False}
            if "use_gloo_process_groups" in inspect.signature(get_megatron_optimizer).parameters
            else {}
        ),
    )
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    return MegatronMixedPrecisionEngine(module, ddp, optimizer, groups)


def build_train_engine(
    native: nn.Module,
    source: Any,
    groups: Any,
    device: torch.device,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    aux_loss_coeff: float,
    z_loss_coeff: float,
    dtype: torch.dtype = torch.float32,
    grad_clip: float = 0.0,
    zero_stage: int = 0,
) -> Any:
    """A GPTModel in ``dtype`` holding the weights of ``native`` (this rank's native fp32
    shard, as launch/train.py builds it), wrapped for training (``megatron_train_engine``);
    AdamW decays matrices, not norms. ``grad_clip`` is applied by the bf16 engine (the
    Trainer clips the fp32 one); ``zero_stage`` 1 = DistributedOptimizer (bf16)."""
    model = build_megatron_model(
        source,
        groups.plan,
        groups,
        0,
        device,
        dtype,
        native=native,
        aux_loss_coeff=aux_loss_coeff,
        z_loss_coeff=z_loss_coeff,
    )
    return megatron_train_engine(
        model,
        groups,
        dtype=dtype,
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        aux_loss_coeff=aux_loss_coeff,
        z_loss_coeff=z_loss_coeff,
        grad_clip=grad_clip,
        distributed_optimizer=zero_stage == 1,
    )

"""DeepSpeed engine glue for the native model: expert parameters marked and grouped the way
DeepSpeed's MoE support expects, our process groups registered as DeepSpeed's, and the
engine built around a causal-LM loss that adds the routers' load-balancing loss.

How DeepSpeed 0.19 treats MoE (deepspeed/moe/utils.py, runtime/engine.py, runtime/zero/
stage_1_and_2.py):
  - a parameter is an expert parameter when it has ``allreduce = False``; its
    ``group_name`` (``ep_size_{ep}``) names the expert-data-parallel group its gradient
    is summed over (after a division by the full data-parallel size, so the result is the
    same at every ep);
  - ZeRO 1/2 partitions an optimizer param group marked ``'moe': True`` (with ``'name'`` =
    that group name) over the expert-data-parallel group instead of the data-parallel one;
  - all of this is switched on only when the engine finds a ``deepspeed.moe.layer.MoE``
    module in the model (``engine.has_moe_layers``). Our MoE layers are not DeepSpeed's, so
    ``MoEPresence`` (a parameter-free ``MoE`` subclass) tells the engine they exist.

Clipping. DeepSpeed's own norms are per-rank or averaged over replicas, which is not the
global norm once experts are split over EP ranks. ``install_exact_norm`` makes whichever
optimizer DeepSpeed picked (its ZeRO 1/2 optimizer, its bf16 optimizer of ZeRO 1, or the
client AdamW without ZeRO) measure the exact global norm of moe_ext.train.clip, clip with
it and report it through ``engine.get_global_grad_norm()``; DeepSpeed's
``gradient_clipping`` stays 0.

# B batch, S sequence, V vocab
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe_ext.errors import MoeExtError

EXPERT_PARAM_MARK = ".mlp.experts."  # stacked routed-expert weights (sharded by EP)


class DeepSpeedSetupError(MoeExtError):
    """A configuration the DeepSpeed glue cannot run (one line: problem and fix)."""


def is_expert_param(name: str) -> bool:
    """Routed-expert parameter (``layers.{i}.mlp.experts.*``): EP-sharded, reduced over edp."""
    return EXPERT_PARAM_MARK in f".{name}"


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the routed-expert parameters (``layers.{i}.mlp.experts.*``)."""
    return [n for n, _ in model.named_parameters() if is_expert_param(n)]


def mark_expert_params(model: nn.Module, group_name: str) -> list[nn.Parameter]:
    """Mark routed-expert parameters as DeepSpeed MoE parameters: ``allreduce = False`` (the
    engine then reduces their gradients over the expert-data-parallel group, not the data-
    parallel one) and ``group_name`` (which expert groups). Returns the marked parameters."""
    names = set(expert_param_names(model))
    marked = []
    for name, param in model.named_parameters():
        if name in names:
            param.allreduce = False
            param.group_name = group_name
            marked.append(param)
    return marked


def optimizer_param_groups(
    model: nn.Module, group_name: str, weight_decay: float
) -> list[dict[str, Any]]:
    """Parameter groups for the optimizer, split the way DeepSpeed's MoE support expects.

    Dense parameters go into ``dense`` (decayed: matrices) and ``dense_no_decay`` (norms,
    biases, 1-d); expert parameters into one group ``{'name': group_name, 'moe': True}``
    (the format of deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer).
    Experts must already be marked (``mark_expert_params``)."""
    from deepspeed.moe.utils import is_moe_param

    decay, no_decay, experts = [], [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_moe_param(param):
            if getattr(param, "group_name", None) != group_name:
                raise DeepSpeedSetupError(
                    f"an expert parameter belongs to expert group "
                    f"{getattr(param, 'group_name', None)!r}, not "
                    f"{group_name!r}; mark all experts with one group"
                )
            experts.append(param)
        elif param.ndim >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"name": "dense", "params": decay, "weight_decay": weight_decay},
        {"name": "dense_no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    if experts:
        groups.append(
            {"name": group_name, "moe": True, "params": experts, "weight_decay": weight_decay}
        )
    return [g for g in groups if g["params"]]


def _moe_presence_class():
    from deepspeed.moe.layer import MoE

    class MoEPresence(MoE):
        """Parameter-free stand-in that makes DeepSpeed's engine switch its MoE handling on
        (``has_moe_layers``: expert broadcast/reduction over the expert-data-parallel
        group, MoE optimizer groups in ZeRO). It never runs; the model's own MoE layers do
        the work. The groups it names must already be registered
        (``ProcessGroups.register_deepspeed_groups``)."""

        def __init__(self, num_experts: int, ep_size: int, group_name: str):
            nn.Module.__init__(self)
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = group_name
            self.enable_expert_tensor_parallelism = False
            self.use_residual = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """Groups come from moe_ext.groups, registered before the engine exists."""

        def forward(self, *args, **kwargs):
            raise RuntimeError(
                "MoEPresence only marks the model as MoE for DeepSpeed; it has no forward"
            )

    return MoEPresence


class CausalLMWithAux(nn.Module):
    """The module the DeepSpeed engine wraps: the native Transformer plus its training loss.

    ``forward(batch[B, S+1] int64) -> (loss, lm_loss, aux_loss)`` (fp32 scalars): next-token
    cross entropy over the B·S positions (mean), plus ``aux_loss_coeff`` times the sum of
    every MoE layer's load-balancing loss and ``z_loss_coeff`` times their z-losses. Under
    data parallelism each rank computes this on its own batch and the engine averages the
    gradients, so the objective is the mean of the per-rank losses."""

    def __init__(
        self,
        model: nn.Module,
        aux_loss_coeff: float,
        z_loss_coeff: float = 0.0,
        moe_presence: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.model = model
        self.aux_loss_coeff = aux_loss_coeff
        self.z_loss_coeff = z_loss_coeff
        if moe_presence is not None:
            self.moe_presence = moe_presence

    def moe_layers(self) -> list[nn.Module]:
        return [block.mlp for block in self.model.layers.values() if block.is_moe]

    def forward(self, batch: torch.Tensor):
        """batch: [B, S+1] int64 token ids; inputs are [:, :-1], targets [:, 1:]."""
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, S] each
        logits = self.model(inputs)  # [B, S, V]
        lm_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        zero = lm_loss.new_zeros(())
        aux = sum((m.aux_loss.float() for m in self.moe_layers() if m.aux_loss is not None), zero)
        z = sum((m.z_loss.float() for m in self.moe_layers() if m.z_loss is not None), zero)
        loss = lm_loss + self.aux_loss_coeff * aux + self.z_loss_coeff * z
        return loss, lm_loss.detach(), aux.detach()


ZERO3_REFUSAL = (
    "train.zero_stage=3 partitions parameters, which DeepSpeed 0.19 supports for MoE only in "
    "its own AutoEP layers, not our sharded experts; use train.zero_stage=2 "
    "train.offload_optimizer=true (optimizer states in CPU memory)"
)


def deepspeed_config(
    micro_batch: int,
    dp: int,
    zero_stage: int,
    dtype: torch.dtype,
    offload_optimizer: bool = False,
) -> dict[str, Any]:
    """The engine's config dict: one micro-batch per step (no accumulation), the client
    optimizer under ZeRO 0/1/2 (its states in CPU memory with ``offload_optimizer``), bf16
    only when asked (CPU runs fp32). DeepSpeed never clips (``install_exact_norm`` does)."""
    if zero_stage == 3:
        raise DeepSpeedSetupError(ZERO3_REFUSAL)
    if zero_stage not in (0, 1, 2):
        raise DeepSpeedSetupError(f"train.zero_stage={zero_stage}; use 0, 1 or 2")
    if dtype == torch.float16:
        raise DeepSpeedSetupError(
            "dtype=fp16 training needs loss scaling that this launcher "
            "does not configure; use dtype=bf16 or fp32"
        )
    if dtype == torch.bfloat16 and zero_stage == 0:
        # DeepSpeed without ZeRO would step the bf16 weights themselves (no fp32 masters)
        raise DeepSpeedSetupError(
            "dtype=bf16 needs train.zero_stage=1 or 2 (DeepSpeed keeps "
            "fp32 master weights only in its ZeRO/bf16 optimizers); or "
            "use dtype=fp32"
        )
    if offload_optimizer and zero_stage == 0:
        raise DeepSpeedSetupError(
            "train.offload_optimizer=true needs train.zero_stage=1 or 2 (DeepSpeed offloads "
            "the optimizer states of its ZeRO optimizer)"
        )
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * dp,
        "gradient_clipping": 0.0,  # install_exact_norm clips with the exact global norm
        "steps_per_print": 2**31 - 1,  # our progress bar reports instead
        "wall_clock_breakdown": False,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # our torch AdamW under ZeRO
    }
    if dtype == torch.bfloat16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}  # fp32 gradients and masters
    if zero_stage:
        # MoE under ZeRO 1/2 needs contiguous gradients and reduce-scatter (stage_1_and_2.py)
        config["zero_optimization"] = {
            "stage": zero_stage,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "overlap_comm": False,
        }
        if offload_optimizer:
            # fp32 masters, gradients and AdamW states of this rank's partition live in CPU
            # memory and the (torch) AdamW steps there; DeepSpeedCPUAdam would need its
            # C++ op built, so the client optimizer is allowed instead
            config["zero_optimization"]["offload_optimizer"] = {
                "device": "cpu",
                "pin_memory": torch.cuda.is_available(),
            }
            config["zero_force_ds_cpu_optimizer"] = False
    return config


def install_exact_norm(engine: Any, groups: Any, max_norm: float) -> None:
    """Make ``engine``'s optimizer clip to ``max_norm`` (0: measure only) with the exact
    global gradient norm (moe_ext.train.clip) and report that norm as
    ``engine.get_global_grad_norm()`` ([] fp32 tensor on the engine's device; on the CPU
    under ZeRO's optimizer offload).

    The gradients the norm reads are the reduced ones DeepSpeed's optimizer steps with:
      - DeepSpeedZeroOptimizer (ZeRO 1/2, fp32 or bf16, CPU offload or not): this rank's
        partition (``averaged_gradients``, or the offloaded fp32 partition's ``.grad``);
        its ``scaled_global_norm`` is replaced, so its step clips with our norm and stores
        it as ``_global_grad_norm``;
      - BF16_Optimizer (bf16 + ZeRO 1): the whole fp32 gradients; its step is wrapped
        (our norm and clip first, its own clipping off);
      - the client AdamW (ZeRO 0, fp32): ``param.grad``; its step is wrapped likewise."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from moe_ext.train.clip import clip_, global_grad_norm, grad_placements

    model = engine.module.model
    by_name = grad_placements(model, groups, model.args)
    placement = {id(p): by_name[n] for n, p in model.named_parameters() if n in by_name}
    world = groups.world if groups.plan.world_size > 1 else None
    device = engine.device
    opt = engine.optimizer

    if isinstance(opt, DeepSpeedZeroOptimizer):

        def partition_pieces():
            for i, params in enumerate(opt.params_in_partition):
                if opt.cpu_offload:
                    flat = opt.single_partition_of_fp32_groups[i].grad.view(-1)
                    for p in params:
                        _, _, dest, count = opt.grad_position[opt.get_param_id(p)]
                        yield placement[id(p)], flat.narrow(0, int(dest), int(count))
                else:  # as DeepSpeed's get_grad_norm_direct: padding skipped, one per param
                    grads = (
                        g for g in opt.averaged_gradients[i] if not getattr(g, "_zero_padding", 0)
                    )
                    for g, p in zip(grads, params):
                        yield placement[id(p)], g

        def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
            assert norm_type == 2, "only the 2-norm"
            norm = global_grad_norm(partition_pieces(), world, partitioned=True, device=device)
            # ZeRO's step divides the loss scale back out, and clips the partition with the
            # norm where it keeps it (opt.device: "cpu" under offload, its gradients' side)
            return (norm * opt.loss_scale).to(opt.device)

        opt.scaled_global_norm = scaled_global_norm
        opt.clip_grad = max_norm  # its step: grads *= max_norm / (norm + 1e-6), if below 1
        return

    if isinstance(opt, BF16_Optimizer):

        def whole_grads():
            for i, group in enumerate(opt.bf16_groups):
                for j, lp in enumerate(group):
                    if opt.fp32_groups_has_gradients[i][j]:
                        yield placement[id(lp)], opt.fp32_groups_gradients[i][j]

        opt.clip_grad = 0.0  # its own (per-rank) clipping off
        # its step still takes a norm, now only to detect overflow: it is handed ours, which
        # is non-finite exactly when a counted gradient is (and saves a second pass; its own
        # would also fail on a tp rank > 0, where no dense gradient is counted by DeepSpeed)
        grads_for_norm = opt.get_grads_for_norm

        def grads_for_overflow_check(for_clipping: bool = False):
            if for_clipping:
                return grads_for_norm(for_clipping=True)
            return [exact["norm"].reshape(1)], {}

        opt.get_grads_for_norm = grads_for_overflow_check
    elif isinstance(opt, torch.optim.Optimizer):

        def whole_grads():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        yield placement[id(p)], p.grad

    else:
        raise DeepSpeedSetupError(
            f"DeepSpeed chose optimizer {type(opt).__name__}, whose gradients the exact "
            f"clipping cannot read; use train.zero_stage=1 or 2"
        )
    original_step = opt.step
    exact: dict[str, torch.Tensor] = {}  # this step's norm, for the bf16 overflow check

    @torch.no_grad()
    def step(closure=None):
        pieces = list(whole_grads())
        norm = exact["norm"] = global_grad_norm(pieces, world, partitioned=False, device=device)
        clip_((g for _, g in pieces), norm, max_norm)
        result = original_step(closure)
        if not getattr(opt, "overflow", False):
            opt._global_grad_norm = norm  # the engine copies it after the step
        return result

    opt.step = step


def build_engine(
    model: nn.Module,
    groups: Any,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    micro_batch: int,
    zero_stage: int,
    grad_clip: float,
    aux_loss_coeff: float,
    z_loss_coeff: float,
    dtype: torch.dtype,
    offload_optimizer: bool = False,
):
    """Wrap a parallelized native ``Transformer`` in a DeepSpeed engine.

    groups: moe_ext.groups.ProcessGroups of the model's plan; torch.distributed must be up.
    Registers our ep/edp groups with DeepSpeed, marks expert parameters, builds a torch
    AdamW over DeepSpeed-style parameter groups and calls deepspeed.initialize with our
    ``mpu``. Returns the engine; ``engine.module`` is a ``CausalLMWithAux``. Its step clips
    to ``grad_clip`` (0: none) with the exact global norm, which ``get_global_grad_norm()``
    returns (``install_exact_norm``), under every ZeRO stage and dtype."""
    import deepspeed

    plan = groups.plan
    config = deepspeed_config(micro_batch, plan.dp, zero_stage, dtype, offload_optimizer)
    group_name = groups.register_deepspeed_groups()
    mark_expert_params(model, group_name)
    num_experts = model.args.num_experts
    presence = (
        _moe_presence_class()(num_experts, plan.ep, group_name)
        if expert_param_names(model)
        else None
    )
    wrapped = CausalLMWithAux(model, aux_loss_coeff, z_loss_coeff, presence)
    param_groups = optimizer_param_groups(model, group_name, weight_decay)
    optimizer = torch.optim.AdamW(
        param_groups, lr=lr, betas=betas, weight_decay=weight_decay, foreach=False
    )
    engine, _, _, _ = deepspeed.initialize(
        model=wrapped,
        optimizer=optimizer,
        config=config,
        mpu=groups.deepspeed_mpu(),
        dist_init_required=False,
    )
    install_exact_norm(engine, groups, grad_clip)
    return engine


def set_lr(engine: Any, lr: float) -> None:
    """Set every optimizer param group's learning rate (the schedule is a pure function of
    the step, so resuming needs no scheduler state)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def optimizer_state(engine: Any) -> dict[str, Any]:
    """This rank's optimizer state (a ZeRO optimizer returns only its partition)."""
    return engine.optimizer.state_dict()


def load_optimizer_state(engine: Any, state: dict[str, Any], dp_rank: int, dp: int) -> None:
    """Restore ``optimizer_state`` saved by this same rank under the same plan. ZeRO reads
    its fp32 master partition back too (as does the bf16 optimizer of ZeRO 1 + bf16), so
    training continues bit for bit."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(engine.optimizer, (DeepSpeedZeroOptimizer, BF16_Optimizer)):
        states: list[Optional[dict[str, Any]]] = [None] * dp
        states[dp_rank] = state  # both pick the list entry of their data-parallel rank
        engine.optimizer.load_state_dict(
            states, load_optimizer_states=True, load_from_fp32_weights=True
        )
    else:
        engine.optimizer.load_state_dict(state)

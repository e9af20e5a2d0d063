"""MoEExtLayer: moe_ext's router, grouped experts and plan-chosen dispatcher as a
Megatron-core MoE layer (a ``BaseMoELayer``), usable inside GPTModel through a layer spec.

# S sequence (this rank's share under sequence parallelism), B batch, T = S*B tokens,
# H hidden, E experts, k top-k, tp tensor-parallel size

Why BaseMoELayer and not MoELayer: Megatron's MoELayer builds its own router and picks
its token dispatcher inside ``__init__`` from ``moe_token_dispatcher_type``; in
megatron-core 0.16.1 that router calls ``te_general_gemm`` and dies with a NameError when
Transformer Engine is absent. This layer never constructs either: routing is
``moe_ext.moe.router.TopKRouter``, transport is the plan's dispatcher
(``plan.dispatcher``), experts are ``GroupedExperts``. Megatron treats it as a plain MLP
module (``forward`` returns ``(output, None)``).

Parameter names are the native ones under the layer (``router.weight``,
``experts.gate_up_proj`` [E_local, 2F_local, H], ``experts.down_proj`` [E_local, H,
F_local], ``shared_expert.{gate,up,down}_proj.weight``, ``shared_expert_gate.weight``), so
``decoder.layers.{i}.mlp.<name>`` in GPTModel is ``layers.{i}.mlp.<name>`` natively.

Tokens and tensor parallelism (docs/ARCHITECTURE.md, "Rank layout"):
- no sequence parallelism, tp > 1: TP ranks hold identical tokens. ep_* strategies route
  all tokens (identically on every TP rank), send only this rank's 1/tp slice through the
  exchange and all-gather the results; tp_experts runs the identical tokens through the
  FFN-sharded experts (its dispatcher all-reduces);
- sequence parallelism: TP ranks hold different tokens. ep_* and replicate use them as
  they are; tp_experts all-gathers them over TP first and keeps its own rows after.
Both token movements are differentiable with Megatron's conventions (a TP-replicated
activation has the full, identical gradient on every TP rank).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from megatron.core.transformer.moe.moe_layer import BaseMoELayer

from moe_ext.megatron.config import MegatronConfigError, loss_coeffs, moe_layer_kwargs
from moe_ext.moe.dispatch import DispatchGroups, build_dispatcher
from moe_ext.moe.dispatch.comm import (
    all_gather_raw,
    gather_slices,
    group_rank,
    group_size,
    run_on_token_slice,
    take_slice,
)
from moe_ext.moe.layer import add_shared_expert, build_moe_layer, routed_output

_BASE_INIT_PARAMS = set(inspect.signature(BaseMoELayer.__init__).parameters)


class MoEExtLayer(BaseMoELayer):
    """Megatron MoE layer running moe_ext's router, experts and the plan's dispatcher.

    Args (Megatron's, in both 0.16.x ModuleSpec and 0.19.x partial call styles):
      config: TransformerConfig (MoE fields mapped by moe_ext.megatron.config);
      submodules: ignored (our parts are fixed; accepted so Megatron specs can pass it);
      layer_number, is_mtp_layer, name: as Megatron's MoELayer;
      pg_collection: Megatron ProcessGroupCollection; None -> ``groups``' collection.
    Keyword-only (bound by ``moe_layer_spec``):
      plan: moe_ext ParallelPlan (strategy, degrees, dispatcher class);
      groups: moe_ext ProcessGroups built from the plan (preferred source of the EP/ETP
        groups); None -> the pg_collection's ep / expt_tp groups;
      experts_backend: GroupedExperts backend ("auto" | "grouped_mm" | "loop").
    """

    def __init__(
        self,
        config: Any,
        submodules: Any = None,
        layer_number: Optional[int] = None,
        pg_collection: Any = None,
        is_mtp_layer: bool = False,
        name: Optional[str] = None,
        *,
        plan: Any,
        groups: Any = None,
        experts_backend: str = "auto",
    ):
        if pg_collection is None:
            if groups is None:
                raise MegatronConfigError(
                    "MoEExtLayer needs process groups: pass groups= (moe_ext "
                    "ProcessGroups) or pg_collection="
                )
            pg_collection = groups.to_megatron_pg_collection()
        base_kwargs = dict(config=config, layer_number=layer_number, pg_collection=pg_collection)
        if "is_mtp_layer" in _BASE_INIT_PARAMS:
            base_kwargs["is_mtp_layer"] = is_mtp_layer
        super().__init__(**base_kwargs)
        self.plan = plan
        self.module_name = name
        layer_kwargs = moe_layer_kwargs(config)
        self._check_groups(config, plan, pg_collection)
        self.tp_group = pg_collection.tp
        # replicas of this rank's expert shard, for sharded_state_dict's replica ids
        self.expt_dp_group = getattr(pg_collection, "expt_dp", None)
        self.dp_cp_group = getattr(pg_collection, "dp_cp", None)
        self.sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        if groups is not None:
            dispatch_groups = groups.dispatch_groups()
        else:
            dispatch_groups = DispatchGroups(
                ep=pg_collection.ep if plan.ep > 1 else None,
                etp=pg_collection.expt_tp if plan.etp > 1 else None,
            )
        self.dispatcher = build_dispatcher(
            plan.dispatcher, layer_kwargs["num_experts"], dispatch_groups
        )
        if self.dispatcher.num_local_experts != self.num_local_experts:
            raise MegatronConfigError(
                f"dispatcher {plan.dispatcher} holds {self.dispatcher.num_local_experts} local "
                f"experts but Megatron's EP group implies {self.num_local_experts}; build the "
                f"pg_collection from the same plan"
            )
        if getattr(config, "use_cpu_initialization", False) or not torch.cuda.is_available():
            device = torch.device("cpu")
        else:
            device = torch.device("cuda", torch.cuda.current_device())
        inner = build_moe_layer(
            **layer_kwargs,
            dispatcher=self.dispatcher,
            experts_backend=experts_backend,
            dtype=getattr(config, "params_dtype", None),
            device=device,
        )
        # Our parts become this module's children under their native names.
        self.router = inner.router
        self.experts = inner.experts
        self.shared_expert = inner.shared_expert
        self.shared_expert_gate = inner.shared_expert_gate
        self.aux_loss_coeff, self.z_loss_coeff = loss_coeffs(config)
        self.aux_loss: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None
        self._mark_params(config)
        if getattr(config, "perform_initialization", False):
            self._initialize(config)

    # -- construction helpers ----------------------------------------------------------
    @staticmethod
    def _check_groups(config: Any, plan: Any, pg_collection: Any) -> None:
        sizes = {
            "tp": (group_size(pg_collection.tp), plan.tp),
            "ep": (group_size(pg_collection.ep), plan.ep),
            "expt_tp": (group_size(getattr(pg_collection, "expt_tp", None)), plan.etp),
        }
        bad = {k: v for k, v in sizes.items() if v[0] != v[1]}
        if bad:
            raise MegatronConfigError(
                f"pg_collection group sizes { ({k: v[0] for k, v in bad.items()}) } differ from "
                "the "
                f"plan's ({ ({k: v[1] for k, v in bad.items()}) }); build it with "
                f"ProcessGroups.build(plan, ...).to_megatron_pg_collection()"
            )
        for field, want in (
            ("expert_model_parallel_size", plan.ep),
            ("expert_tensor_parallel_size", plan.etp),
            ("tensor_model_parallel_size", plan.tp),
        ):
            have = getattr(config, field, None)
            if have is not None and have != want:
                raise MegatronConfigError(
                    f"config.{field}={have} but the plan has {want}; build "
                    f"the TransformerConfig from the plan (moe_ext.megatron."
                    f"transformer_config_kwargs)"
                )

    def _mark_params(self, config: Any) -> None:
        """Megatron's gradient bookkeeping: expert weights are reduced over the expert-data-
        parallel group (``allreduce=False``), replicated router / shared-expert weights see
        different tokens per TP rank only under sequence parallelism."""
        for param in self.experts.parameters():
            param.allreduce = False
        for module in (self.router, self.shared_expert, self.shared_expert_gate):
            if module is not None:
                for param in module.parameters():
                    param.sequence_parallel = self.sequence_parallel

    @torch.no_grad()
    def _initialize(self, config: Any) -> None:
        """Megatron's init methods: ``init_method`` for router, gate/up projections and the
        shared gate, ``output_layer_init_method`` for down projections. Expert weights are
        drawn from Megatron's expert-parallel RNG stream (different per EP/ETP rank) when
        it is set up on this device."""
        init, out_init = config.init_method, config.output_layer_init_method
        init(self.router.weight)
        if self.shared_expert is not None:
            init(self.shared_expert.gate_proj.weight)
            init(self.shared_expert.up_proj.weight)
            out_init(self.shared_expert.down_proj.weight)
        if self.shared_expert_gate is not None:
            init(self.shared_expert_gate.weight)
        with _expert_rng(self.experts.gate_up_proj.device):
            init(self.experts.gate_up_proj)
            out_init(self.experts.down_proj)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    # -- Megatron's expert-bias update hooks (finalize_model_grads) ---------------------
    @property
    def expert_bias(self) -> torch.Tensor:
        """The router's selection bias [E] float32, under the name Megatron updates."""
        bias = self.router.e_score_correction_bias
        if bias is None:
            raise AttributeError("router has no expert bias (moe_router_enable_expert_bias=False)")
        return bias

    @property
    def local_tokens_per_expert(self) -> torch.Tensor:
        """Token-expert pairs per expert [E] int64 since Megatron last zeroed them."""
        if self.router.e_score_correction_bias is None:
            raise AttributeError("router has no expert bias (moe_router_enable_expert_bias=False)")
        return self.router.expert_load

    # -- Megatron distributed checkpointing --------------------------------------------
    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> dict:
        """This layer's tensors for ``megatron.core.dist_checkpointing``: key
        ``{prefix}<native name>``, each naming the global (unsharded) tensor, so a checkpoint
        saved under one plan loads under any other.

        - ``experts.gate_up_proj`` global [E, 2F, H]: this rank's [E_local, 2F_local, H] is
          expert block ``ep_rank`` of ``ep`` on dim 0; under expert TP its gate rows are FFN
          fragment ``etp_rank`` of ``2*etp`` on dim 1 and its up rows fragment
          ``etp + etp_rank`` (the global layout keeps every gate row before every up row), so
          a factory splits the two on save and concatenates them on load;
        - ``experts.down_proj`` global [E, H, F]: expert block on dim 0, FFN fragment
          ``etp_rank`` of ``etp`` on dim 2;
          expert shards repeat across the expert-data-parallel group: replica id
          ``(0, 0, edp_rank)``, the edp rank 0 copy is the one written;
        - everything else (router weight and bias, shared expert, its gate) is replicated
          over TP and DP: Megatron's ``make_sharded_tensor_for_checkpoint``, replica id
          ``(0, tp_rank, dp_rank)``.
        ``sharded_offsets`` (the layer axis TransformerBlock prepends for homogeneous layer
        stacks; ``(axis, rank offset, fragments)`` triples) are prepended to every tensor.
        """
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        if self.dp_cp_group is not None and "dp_cp_group" not in (metadata or {}):
            # our own pg_collection's group: Megatron's fallback reads a global parallel
            # state that a pg_collection-built model never installs (megatron-core 0.19)
            metadata = {**(metadata or {}), "dp_cp_group": self.dp_cp_group}
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        lead = len(sharded_offsets)  # prepended axes before the tensor's own
        dispatcher = self.dispatcher
        ep_rank = dispatcher.local_expert_start // dispatcher.num_local_experts
        ep = dispatcher.num_experts // dispatcher.num_local_experts
        etp, etp_rank = dispatcher.ffn_shards, dispatcher.ffn_shard_rank
        edp_group = self.expt_dp_group
        if edp_group is None:  # a pg_collection without expt_dp: Megatron's global one
            from megatron.core import parallel_state

            edp_group = parallel_state.get_expert_data_parallel_group()
        expert_replica = (0, 0, group_rank(edp_group))
        expert_block = (lead, ep_rank, ep)

        def gate_up_halves(
            key: str, t: torch.Tensor, replica_id: Any, flattened_range: Optional[slice]
        ) -> list:
            if flattened_range is not None:
                raise MegatronConfigError(
                    f"{key}: flattened (bucket-space) sharding of FFN-sharded experts is not "
                    f"supported; save with a non-flattened format (e.g. the distributed "
                    f"optimizer's fully_sharded_model_space / dp_reshardable)"
                )
            gate, up = t.chunk(2, dim=1)  # [E_local, F_local, H] each
            return [
                ShardedTensor.from_rank_offsets(
                    key,
                    half.contiguous(),
                    *sharded_offsets,
                    expert_block,
                    (lead + 1, fragment, 2 * etp),
                    replica_id=replica_id,
                    prepend_axis_num=lead,
                )
                for half, fragment in ((gate, etp_rank), (up, etp + etp_rank))
            ]

        def gate_up_merge(halves: list) -> torch.Tensor:
            return torch.cat(halves, dim=1)  # [E_local, 2F_local, H]

        out: dict = {}
        for name, tensor in self.state_dict(prefix="", keep_vars=True).items():
            key = f"{prefix}{name}"
            if name == "experts.gate_up_proj" and etp > 1:
                out[key] = ShardedTensorFactory(
                    key, tensor, gate_up_halves, gate_up_merge, expert_replica
                )
            elif name == "experts.gate_up_proj":
                out[key] = ShardedTensor.from_rank_offsets(
                    key,
                    tensor,
                    *sharded_offsets,
                    expert_block,
                    replica_id=expert_replica,
                    prepend_axis_num=lead,
                )
            elif name == "experts.down_proj":
                ffn = ((lead + 2, etp_rank, etp),) if etp > 1 else ()
                out[key] = ShardedTensor.from_rank_offsets(
                    key,
                    tensor,
                    *sharded_offsets,
                    expert_block,
                    *ffn,
                    replica_id=expert_replica,
                    prepend_axis_num=lead,
                )
            elif name.startswith("experts."):
                raise MegatronConfigError(
                    f"{key}: no checkpoint sharding known for expert "
                    f"tensor {name}; add it to sharded_state_dict"
                )
            else:
                out[key] = make_sharded_tensor_for_checkpoint(
                    tensor,
                    key,
                    prepend_offsets=sharded_offsets,
                    tp_group=self.attn_tp_group,
                    dp_cp_group=metadata["dp_cp_group"],
                )
        return out

    # -- forward -------------------------------------------------------------------------
    def _routed(
        self, tokens: torch.Tensor, weights: torch.Tensor, expert_idx: torch.Tensor
    ) -> torch.Tensor:
        """tokens [T, H], weights [T, k] f32, expert_idx [T, k] -> routed output [T, H], with
        the tokens moved over TP as the module docstring says."""

        def experts_path(x, w, idx):
            return routed_output(self.dispatcher, self.experts, x, w, idx)

        group = self.tp_group if self.plan.tp > 1 else None
        if group_size(group) == 1:
            return experts_path(tokens, weights, expert_idx)
        if self.plan.is_expert_parallel and not self.sequence_parallel:
            # identical tokens on the TP ranks: each exchanges only its 1/tp share
            return run_on_token_slice(experts_path, (tokens, weights, expert_idx), group)
        if self.plan.strategy == "tp_experts" and self.sequence_parallel:
            # FFN-sharded experts need the same tokens on every TP rank; the dispatcher
            # all-reduces the input gradients (copy_to_partials), so each rank's gradient of
            # the gathered tokens is already the full one and gather_slices keeps its rows
            x = gather_slices(tokens.contiguous(), group)  # [tp*T, H]
            w = gather_slices(weights.contiguous(), group)  # [tp*T, k]
            idx = all_gather_raw(expert_idx.contiguous(), group)  # [tp*T, k]
            return take_slice(experts_path(x, w, idx), group)  # [T, H]
        return experts_path(tokens, weights, expert_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        intermediate_tensors: Any = None,
        padding_mask: Optional[torch.Tensor] = None,
        **unused: Any,
    ):
        """hidden_states: [S, B, H] in the model dtype. Returns (output [S, B, H], None).

        ``padding_mask`` is accepted for Megatron's call signature; padding tokens are
        routed like any other (their outputs are ignored downstream)."""
        if intermediate_tensors is not None:
            raise MegatronConfigError(
                "MoEExtLayer does not support partial CUDA-graph capture "
                "of the MoE layer; leave moe_* out of cuda_graph_scope"
            )
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])  # [T, H]
        routing = self.router(tokens)
        output = self._routed(tokens, routing.weights, routing.expert_idx)  # [T, H]
        output = add_shared_expert(output, tokens, self.shared_expert, self.shared_expert_gate)
        self.aux_loss, self.z_loss = routing.aux_loss, routing.z_loss
        if self.training and torch.is_grad_enabled():
            output = self._attach_router_losses(output, routing.aux_loss, routing.z_loss)
        return output.reshape(shape), None

    def _attach_router_losses(
        self, output: torch.Tensor, aux: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """Put the weighted router losses into the backward pass the way Megatron does
        (MoEAuxLossAutoScaler: identity forward, loss gradient injected backward), and
        report them to Megatron's aux-loss tracker for logging."""
        from megatron.core.transformer.moe import moe_utils

        terms = [
            (name, coeff * loss)
            for name, coeff, loss in (
                ("load_balancing_loss", self.aux_loss_coeff, aux),
                ("z_loss", self.z_loss_coeff, z),
            )
            if coeff
        ]
        for name, loss in terms:
            output = moe_utils.MoEAuxLossAutoScaler.apply(output, loss)
            if self.layer_number is not None:
                moe_utils.save_to_aux_losses_tracker(
                    name, loss.detach(), self.layer_number, self.config.num_layers
                )
        return output


class _expert_rng:
    """Context: Megatron's expert-parallel CUDA RNG stream when it exists, else a no-op."""

    def __init__(self, device: torch.device):
        self._ctx = None
        if device.type != "cuda":
            return
        try:
            from megatron.core.tensor_parallel import random as mrandom

            tracker = mrandom.get_cuda_rng_tracker()
            name = mrandom.get_expert_parallel_rng_tracker_name()
            if name in tracker.get_states():
                self._ctx = tracker.fork(name)
        except (ImportError, AttributeError):
            self._ctx = None

    def __enter__(self):
        if self._ctx is not None:
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            return self._ctx.__exit__(*exc)
        return False

"""Apply a ParallelPlan to a (full, parallelism-free) Transformer, torchtitan style.

# E experts, F expert FFN size, nH/nKV heads, D head dim, tp/pp/ep/etp degrees

``shard_slices`` says which slice of every full tensor this rank holds (the checkpoint
loader reads exactly those); ``parallelize`` cuts the model to the same slices in place
(meta tensors stay meta) and wires the process groups:
  - attention: q/k/v rows and o_proj columns by heads over tp (kv heads replicated when
    nKV < tp), one all-reduce after o_proj; dense MLPs likewise on their FFN dim;
  - pipeline: stage s keeps a contiguous block of layers, embeddings on the first stage,
    norm + lm_head on the last, hidden states sent point-to-point every step;
  - MoE: the plan's dispatcher over ``groups.dispatch_groups()`` with this rank's expert
    shard (EP block on dim 0, expert-TP slice on F); ep_* with tp > 1 splits the tokens
    over the TP ranks around the exchange;
  - data parallel (dp > 1): generate() gives each replica its share of the prompts, in
    lockstep when experts are split across replicas.
What the forward pass and generate() need of the plan afterwards is ``model.context``, a
``ParallelContext`` (context.py) that ``parallelize`` sets and nothing else does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_ext.checkpoint.shard import ShardRequest
from moe_ext.errors import MoeExtError
from moe_ext.model.args import ModelArgs
from moe_ext.model.context import ParallelContext
from moe_ext.model.decoder import Transformer
from moe_ext.quant.layout import stored_requests
from moe_ext.quant.linear import quantize_modules_


class ParallelizeError(MoeExtError):
    """A plan that does not fit the model shape (one line: problem and fix)."""


@dataclass(frozen=True)
class RankCoords:
    """This rank's coordinate on every parallel axis (ProcessGroups has the same fields)."""

    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    etp_rank: int = 0

    @classmethod
    def of(cls, plan: Any, rank: int) -> "RankCoords":
        """Coordinates of global ``rank`` under ``plan`` without any process group."""
        from moe_ext.groups import rank_layout

        layout = rank_layout(plan)

        def index(family: str) -> int:
            return next(g.index(rank) for g in layout[family] if rank in g)

        return cls(
            tp_rank=index("tp"),
            pp_rank=index("pp"),
            dp_rank=index("dp"),
            ep_rank=index("ep"),
            etp_rank=index("etp"),
        )


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Layers of pipeline stage ``stage``: contiguous, earlier stages take the remainder."""
    if num_layers < pp:
        raise ParallelizeError(
            f"{num_layers} layers cannot fill {pp} pipeline stages; "
            f"choose parallel.pp <= {num_layers}"
        )
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def _check_plan(plan: Any, args: ModelArgs) -> None:
    tp = plan.tp
    if args.num_attention_heads % tp:
        raise ParallelizeError(
            f"{args.num_attention_heads} attention heads cannot be split over "
            f"tp={tp}; choose parallel.tp dividing the head count"
        )
    nkv = args.num_key_value_heads
    if nkv % tp and tp % nkv:
        raise ParallelizeError(
            f"{nkv} kv heads and tp={tp}: one must divide the other; choose another parallel.tp"
        )
    if args.num_experts % plan.ep:
        raise ParallelizeError(
            f"{args.num_experts} experts cannot be split over ep={plan.ep}; "
            f"choose parallel.ep dividing {args.num_experts}"
        )
    if args.moe_intermediate_size % plan.etp:
        raise ParallelizeError(
            f"expert FFN size {args.moe_intermediate_size} cannot be split "
            f"over etp={plan.etp}; choose another parallel.etp"
        )


def _dense_mlp_sharded(args: ModelArgs, tp: int) -> bool:
    """Dense MLPs are TP-sharded when their FFN size divides; else every TP rank holds all."""
    return tp > 1 and args.intermediate_size % tp == 0


def shard_slices(plan: Any, ranks: Any, args: ModelArgs) -> dict[str, ShardRequest]:
    """For every tensor this rank holds: which part of the full tensor (native name).

    plan: ParallelPlan (tp, pp, ep, etp); ranks: RankCoords or ProcessGroups (tp_rank,
    pp_rank, ep_rank, etp_rank). Tensors absent from the result live on other stages."""
    _check_plan(plan, args)
    tp, r = plan.tp, ranks.tp_rank
    attention = args.family.attention_shards(args, tp, r)  # names under self_attn.
    full = ShardRequest.full()
    out: dict[str, ShardRequest] = {}
    first, last = ranks.pp_rank == 0, ranks.pp_rank == plan.pp - 1
    if first or (last and args.tie_word_embeddings):
        out["embed_tokens.weight"] = full
    if last:
        out["norm.weight"] = full
        if not args.tie_word_embeddings:
            out["lm_head.weight"] = full
    E, F = args.num_experts, args.moe_intermediate_size
    e_local, f_local = E // plan.ep, F // plan.etp
    e0, f0 = ranks.ep_rank * e_local, ranks.etp_rank * f_local
    experts = slice(e0, e0 + e_local)
    dense_tp = _dense_mlp_sharded(args, tp)
    dense_f = args.intermediate_size // tp
    for i in stage_layers(args.num_hidden_layers, plan.pp, ranks.pp_rank):
        p = f"layers.{i}."
        out[p + "input_layernorm.weight"] = full
        out[p + "post_attention_layernorm.weight"] = full
        out.update({p + "self_attn." + name: req for name, req in attention.items()})
        m = p + "mlp."
        if args.is_moe_layer(i):
            out[m + "router.weight"] = full
            if args.router_bias:
                out[m + "router.bias"] = full
            if args.router_correction_bias:
                out[m + "router.e_score_correction_bias"] = full
            gate_up_rows = [(f0, f0 + f_local), (F + f0, F + f0 + f_local)]
            out[m + "experts.gate_up_proj"] = ShardRequest.blocks(
                dim=1, ranges=gate_up_rows, outer=(experts,)
            )
            out[m + "experts.down_proj"] = ShardRequest(
                boxes=((experts, slice(None), slice(f0, f0 + f_local)),)
            )
            if args.expert_bias:  # like their weights' rows; down's bias whole on F shards
                out[m + "experts.gate_up_proj_bias"] = ShardRequest.blocks(
                    dim=1, ranges=gate_up_rows, outer=(experts,)
                )
                out[m + "experts.down_proj_bias"] = ShardRequest(boxes=((experts,),))
            if args.has_shared_expert:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    out[m + f"shared_expert.{proj}.weight"] = full
                if args.shared_expert_gate:
                    out[m + "shared_expert_gate.weight"] = full
        elif dense_tp:
            rows = (r * dense_f, (r + 1) * dense_f)
            out[m + "gate_proj.weight"] = ShardRequest.block(0, *rows)
            out[m + "up_proj.weight"] = ShardRequest.block(0, *rows)
            out[m + "down_proj.weight"] = ShardRequest.block(1, *rows)
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[m + f"{proj}.weight"] = full
    return out


def take_shard(tensor: torch.Tensor, request: ShardRequest) -> torch.Tensor:
    """The part of a full tensor a request names (works on meta tensors)."""
    boxes = [tensor[tuple(slice(a, b) for a, b in box)] for box in request.bounds(tensor.shape)]
    return boxes[0] if len(boxes) == 1 else torch.cat(boxes, dim=request.cat_dim)


def _replace_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Parameter or buffer ``name`` of ``model`` becomes ``value`` (quantized weights and
    their scales are buffers)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._buffers:
        module._buffers[leaf] = value.contiguous()
        return
    old = getattr(module, leaf)
    setattr(module, leaf, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def parallelize(model: Transformer, plan: Any, groups: Any) -> Transformer:
    """Shard ``model`` in place for this rank of ``plan`` and set its process groups.

    plan: ParallelPlan; groups: ProcessGroups built from it. A model with real weights
    keeps this rank's slices of them; a meta model stays meta (load or init afterwards)."""
    args = model.args
    requests = stored_requests(shard_slices(plan, groups, args), args)
    keep = set(stage_layers(args.num_hidden_layers, plan.pp, groups.pp_rank))
    # -- pipeline: drop what other stages hold ------------------------------------------
    for key in list(model.layers.keys()):
        if int(key) not in keep:
            del model.layers[key]
    if "embed_tokens.weight" not in requests:
        model.embed_tokens = None
    if "norm.weight" not in requests:
        model.norm = None
        model.lm_head = None
    # -- MoE layers: this rank's dispatcher and expert shard ------------------------------
    from moe_ext.moe.dispatch import build_dispatcher

    for key, block in model.layers.items():
        if not block.is_moe:
            continue
        old = block.mlp
        ref = old.router.weight
        dispatcher = build_dispatcher(plan.dispatcher, args.num_experts, groups.dispatch_groups())
        new = args.family.build_moe(args, dispatcher, dtype=ref.dtype, device=ref.device)
        quantize_modules_(new, args, prefix=f"layers.{key}.mlp.")
        if ref.device.type != "meta":
            prefix = f"layers.{key}.mlp."
            state = {
                n: take_shard(t, requests[prefix + n])
                for n, t in old.state_dict().items()
                if prefix + n in requests
            }
            new.load_state_dict(state, strict=True)
        block.mlp = new
        if plan.tokens_split_over_tp:
            block.moe_token_split_group = groups.tp
    # -- attention and dense MLPs: TP slices ----------------------------------------------
    for name, tensor in list(model.state_dict(keep_vars=True).items()):
        if ".mlp.router." in name or ".mlp.experts." in name or ".mlp.shared_expert" in name:
            continue  # built for this rank above
        request = requests.get(name)
        if request is None:
            raise ParallelizeError(
                f"no shard rule for tensor {name}; the model and shard_slices disagree"
            )
        if not request.is_full(tensor.shape):
            _replace_tensor(model, name, take_shard(tensor.data, request))
    if plan.tp > 1:
        for block in model.layers.values():
            block.self_attn.tp_group = groups.tp
            if not block.is_moe and _dense_mlp_sharded(args, plan.tp):
                block.mlp.tp_group = groups.tp
    model.context = parallel_context(plan, groups)
    return model


def parallel_context(plan: Any, groups: Any) -> ParallelContext:
    """What the model and generate() need to know of ``plan`` on this rank.

    plan: ParallelPlan; groups: ProcessGroups built from it."""
    pipelined, replicated = plan.pp > 1, plan.dp > 1
    return ParallelContext(
        plan=plan,
        pp_prev=groups.pp_prev_rank if pipelined else None,
        pp_next=groups.pp_next_rank if pipelined else None,
        pp_group=groups.pp if pipelined else None,
        pp_last_rank=groups.ranks_of("pp")[-1] if pipelined else None,
        dp_size=plan.dp,
        dp_rank=groups.dp_rank if replicated else 0,
        dp_group=groups.dp if replicated else None,
        # experts split across replicas: every replica must make every MoE exchange
        lockstep=replicated and plan.is_expert_parallel,
        # graphs need static, sync-free steps: no per-step pipeline traffic, no split-size
        # exchange (ep_* dispatchers learn their splits on the host)
        cuda_graph_safe=plan.pp == 1 and not plan.is_expert_parallel,
    )

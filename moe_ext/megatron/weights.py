"""Native (moe_ext checkpoint) names <-> Megatron-core GPTModel state_dict names.

# V vocab, H hidden, nH/nKV heads (ng = nKV query groups), D head dim, F dense FFN size,
# E experts; "_local" = this rank's shard

GPTModel built from ``moe_ext.megatron.get_gpt_decoder_block_spec`` (local spec, no
Transformer Engine) names its tensors (i = layer index inside this pipeline stage):
  embedding.word_embeddings.weight                 [V_local, H]      <- embed_tokens.weight
  decoder.layers.{i}.input_layernorm.weight        [H]
  decoder.layers.{i}.self_attention.linear_qkv.weight  [ng_local*(nH/ng+2)*D, H]
      per query group g: its nH/ng q heads, then k_g, then v_g (Megatron's interleaving)
      <- q_proj, k_proj, v_proj (.bias likewise)
  decoder.layers.{i}.self_attention.linear_proj.weight [H, nH_local*D] <- o_proj.weight
  decoder.layers.{i}.self_attention.{q,k}_layernorm.weight [D]  <- {q,k}_norm.weight
  decoder.layers.{i}.pre_mlp_layernorm.weight      [H]  <- post_attention_layernorm.weight
  decoder.layers.{i}.mlp.<name>                    MoE layers: MoEExtLayer keeps the native
                                                   names (router.weight, experts.*, shared_*)
  decoder.layers.{i}.mlp.linear_fc1.weight         [2F_local, H]  dense: cat(gate, up)
  decoder.layers.{i}.mlp.linear_fc2.weight         [H, F_local]   dense: down_proj
  decoder.final_layernorm.weight                   [H]  <- norm.weight
  output_layer.weight                              [V_local, H]  <- lm_head.weight
Sharding follows the plan: ``moe_ext.model.parallelize.shard_slices`` picks this rank's
native slices (heads by tp, experts by ep/etp, this stage's layers), then the vocabulary
rows are split by tp as Megatron's vocab-parallel embedding and output layer expect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from moe_ext.megatron.config import MegatronConfigError

_ATTN = "self_attn."


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q [nq*D, ...], k/v [ng*D, ...] (weights or biases) -> Megatron's interleaved
    [ng*(nq/ng+2)*D, ...]."""
    groups = k.shape[0] // head_dim
    rest = tuple(q.shape[1:])
    qg = q.reshape(groups, -1, *rest)  # [ng, nq/ng*D, ...]
    kg = k.reshape(groups, head_dim, *rest)  # [ng, D, ...]
    vg = v.reshape(groups, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def _split_qkv(
    qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of _fuse_qkv for nH query heads in ng groups."""
    rest = tuple(qkv.shape[1:])
    per_group = num_heads // num_groups
    grouped = qkv.reshape(num_groups, (per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest))


def _vocab_rows(tensor: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    if tp == 1:
        return tensor
    if tensor.shape[0] % tp:
        raise MegatronConfigError(
            f"vocabulary of {tensor.shape[0]} rows does not split over "
            f"tp={tp}; pad the vocabulary to a multiple of {tp}"
        )
    rows = tensor.shape[0] // tp
    return tensor[tp_rank * rows : (tp_rank + 1) * rows]


def native_to_megatron(
    state: Mapping[str, torch.Tensor], args: Any, plan: Any = None, ranks: Any = None
) -> dict[str, torch.Tensor]:
    """Full native tensors (moe_ext names, e.g. ``init_random_full(args)``) -> this rank's
    GPTModel state dict (MoEExtLayer on MoE layers, Megatron's MLP on dense ones).

    plan/ranks: ParallelPlan and this rank's coordinates (ProcessGroups or RankCoords);
    None = one rank holding everything."""
    from moe_ext.model.parallelize import shard_slices, stage_layers, take_shard

    tp, tp_rank = (plan.tp, ranks.tp_rank) if plan is not None else (1, 0)
    if tp > 1 and args.num_key_value_heads % tp:
        raise MegatronConfigError(
            f"Megatron splits query groups over tp: {args.num_key_value_heads}"
            f" kv heads do not split over tp={tp}; choose tp dividing "
            f"{args.num_key_value_heads}"
        )
    if (
        tp > 1
        and any(not args.is_moe_layer(i) for i in range(args.num_hidden_layers))
        and args.intermediate_size % tp
    ):
        raise MegatronConfigError(
            f"dense FFN size {args.intermediate_size} does not split over "
            f"tp={tp}; Megatron's MLP needs tp dividing it"
        )
    if plan is None:
        local = dict(state)
        first_layer = 0
    else:
        requests = shard_slices(plan, ranks, args)
        missing = sorted(set(requests) - set(state))
        if missing:
            raise MegatronConfigError(
                f"native state lacks {missing[:3]}...; pass the full model's tensors"
            )
        local = {name: take_shard(state[name], req) for name, req in requests.items()}
        first_layer = stage_layers(args.num_hidden_layers, plan.pp, ranks.pp_rank).start
    out: dict[str, torch.Tensor] = {}
    D = args.head_dim
    for name, tensor in local.items():
        if name == "embed_tokens.weight":
            out["embedding.word_embeddings.weight"] = _vocab_rows(tensor, tp, tp_rank)
            if args.tie_word_embeddings and "norm.weight" in local:
                # the last stage holds its own copy of the tied output embedding
                out["output_layer.weight"] = _vocab_rows(tensor, tp, tp_rank)
            continue
        if name == "lm_head.weight":
            out["output_layer.weight"] = _vocab_rows(tensor, tp, tp_rank)
            continue
        if name == "norm.weight":
            out["decoder.final_layernorm.weight"] = tensor
            continue
        _, index, rest = name.split(".", 2)
        prefix = f"decoder.layers.{int(index) - first_layer}."
        if rest == "input_layernorm.weight":
            out[prefix + "input_layernorm.weight"] = tensor
        elif rest == "post_attention_layernorm.weight":
            out[prefix + "pre_mlp_layernorm.weight"] = tensor
        elif rest.startswith(_ATTN):
            attn, leaf = rest[len(_ATTN) :].split(".", 1)  # e.g. q_proj, weight
            target = prefix + "self_attention."
            if attn == "q_proj":
                k = local[f"layers.{index}.{_ATTN}k_proj.{leaf}"]
                v = local[f"layers.{index}.{_ATTN}v_proj.{leaf}"]
                out[target + f"linear_qkv.{leaf}"] = _fuse_qkv(tensor, k, v, D)
            elif attn == "o_proj":
                out[target + f"linear_proj.{leaf}"] = tensor
            elif attn in ("q_norm", "k_norm"):
                out[target + f"{attn[0]}_layernorm.{leaf}"] = tensor
            elif attn not in ("k_proj", "v_proj"):
                raise MegatronConfigError(f"no Megatron name for {name}")
        elif rest.startswith("mlp."):
            mlp = rest[len("mlp.") :]
            if args.is_moe_layer(int(index)):
                out[prefix + rest] = tensor
            elif mlp == "gate_proj.weight":
                up = local[f"layers.{index}.mlp.up_proj.weight"]
                out[prefix + "mlp.linear_fc1.weight"] = torch.cat([tensor, up], dim=0)
            elif mlp == "down_proj.weight":
                out[prefix + "mlp.linear_fc2.weight"] = tensor
            elif mlp != "up_proj.weight":
                raise MegatronConfigError(f"no Megatron name for {name}")
        else:
            raise MegatronConfigError(f"no Megatron name for {name}")
    return out


def megatron_to_native(
    state: Mapping[str, torch.Tensor], args: Any, first_layer: int = 0
) -> dict[str, torch.Tensor]:
    """An unsharded (tp = 1) GPTModel state dict -> native names. Expert tensors keep the
    shape they have (a rank's EP shard stays a shard); ``first_layer`` is the global index
    of ``decoder.layers.0`` (pipeline stages). Megatron's ``_extra_state`` entries are
    dropped."""
    out: dict[str, torch.Tensor] = {}
    nH, nKV, D = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    for name, tensor in state.items():
        if name.endswith("_extra_state"):
            continue
        if name == "embedding.word_embeddings.weight":
            out["embed_tokens.weight"] = tensor
        elif name == "output_layer.weight":
            if not args.tie_word_embeddings:
                out["lm_head.weight"] = tensor
        elif name == "decoder.final_layernorm.weight":
            out["norm.weight"] = tensor
        elif name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers.") :].split(".", 1)
            prefix = f"layers.{int(index) + first_layer}."
            if rest == "input_layernorm.weight":
                out[prefix + rest] = tensor
            elif rest == "pre_mlp_layernorm.weight":
                out[prefix + "post_attention_layernorm.weight"] = tensor
            elif rest.startswith("self_attention.linear_qkv."):
                leaf = rest.rsplit(".", 1)[1]
                q, k, v = _split_qkv(tensor, nH, nKV, D)
                for proj, value in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[prefix + f"{_ATTN}{proj}.{leaf}"] = value
            elif rest.startswith("self_attention.linear_proj."):
                out[prefix + f"{_ATTN}o_proj." + rest.rsplit(".", 1)[1]] = tensor
            elif rest.startswith("self_attention.q_layernorm.") or rest.startswith(
                "self_attention.k_layernorm."
            ):
                which = rest[len("self_attention.")]
                out[prefix + f"{_ATTN}{which}_norm.weight"] = tensor
            elif rest == "mlp.linear_fc1.weight":
                gate, up = tensor.chunk(2, dim=0)
                out[prefix + "mlp.gate_proj.weight"] = gate
                out[prefix + "mlp.up_proj.weight"] = up
            elif rest == "mlp.linear_fc2.weight":
                out[prefix + "mlp.down_proj.weight"] = tensor
            elif rest.startswith("mlp."):
                out[prefix + rest] = tensor  # MoEExtLayer: native names already
            else:
                raise MegatronConfigError(f"no native name for {name}")
        else:
            raise MegatronConfigError(f"no native name for {name}")
    return out


def load_into_megatron(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a ``native_to_megatron`` state into a GPTModel; every model tensor must be
    covered (Megatron's ``_extra_state`` entries aside) and no name may be left over."""
    result = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise MegatronConfigError(
            f"GPTModel and the mapped state disagree: missing "
            f"{missing[:4]}, unexpected {list(result.unexpected_keys)[:4]}; "
            f"build the model and the state from the same args and plan"
        )


def megatron_expert_state(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    prefix: str,
    local_expert_start: int = 0,
    num_local: Optional[int] = None,
    ffn_shards: int = 1,
    ffn_rank: int = 0,
) -> dict[str, torch.Tensor]:
    """Full expert tensors (gate_up [E, 2F, H], down [E, H, F]) -> Megatron's own
    SequentialMLP names ``{prefix}local_experts.{j}.linear_fc1.weight`` [2F_local, H]
    (gate slice, then up slice) / ``linear_fc2.weight`` [H, F_local] for this rank's experts
    [start, start + num_local) and FFN slice ``ffn_rank`` of ``ffn_shards``; used to load
    the same experts into Megatron's MoELayer for comparisons and conversions."""
    num_local = gate_up.shape[0] - local_expert_start if num_local is None else num_local
    ffn = gate_up.shape[1] // 2
    part = ffn // ffn_shards
    lo = ffn_rank * part
    out = {}
    for j in range(num_local):
        e = local_expert_start + j
        out[f"{prefix}local_experts.{j}.linear_fc1.weight"] = torch.cat(
            [gate_up[e, lo : lo + part], gate_up[e, ffn + lo : ffn + lo + part]], dim=0
        )
        out[f"{prefix}local_experts.{j}.linear_fc2.weight"] = down[e, :, lo : lo + part]
    return out

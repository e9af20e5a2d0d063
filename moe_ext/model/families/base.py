"""What every model family shares: the config mapping into ``ModelArgs``, the tensor
names and shapes the model holds, the Hugging Face weight layout, and the block builders.

# H hidden, V vocab, nH/nKV heads, D head dim, E experts, F expert FFN, Fd dense FFN,
# S shared-expert FFN

A family module subclasses ``Family`` and states only what differs (its config keys,
its HF names); ``moe_ext.model.families`` registers it. The model, the planner's memory
count and the checkpoint maps all read the same ``param_shapes``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

from moe_ext.model.args import ModelArgs, ModelArgsError, normalize_rope_scaling
from moe_ext.model.families.fields import ConfigFields
from moe_ext.quant.config import parse_quantization

if TYPE_CHECKING:
    import torch
    from torch import nn

    from moe_ext.checkpoint.shard import ShardRequest

GATE_UP = "gate_up_proj"
DOWN = "down_proj"
EXPERT_PARAM = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
# Keys of a conf/model file that describe where the model comes from, not its shape.
LAUNCH_KEYS = ("name", "tokenizer", "weights", "init_seed")


class Family:
    """One Hugging Face ``model_type`` family. Subclasses set the class attributes and
    implement ``family_args`` / ``family_config``; the rest is shared."""

    model_type: str
    aliases: tuple[str, ...] = ()
    architecture: str  # HF ``architectures`` entry written on export
    default_rope_theta: float = 10_000.0
    # Hugging Face per-expert layout: the MoE block's module name and the expert
    # projections' names in (gate, up, down) order.
    hf_moe_block: str = "mlp"
    hf_expert_parts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # Other names this family's checkpoints spell differently: (native, HF) fragments of
    # the name after ``model.``, e.g. ("mlp.shared_expert.", "mlp.shared_experts.").
    hf_renames: tuple[tuple[str, str], ...] = ()
    gates_shared_expert: bool = False  # its shared expert has a sigmoid gate (qwen2_moe)
    hf_router: str = "gate"  # the router's module name in HF checkpoints
    # Expert tensors the checkpoints store in another layout than the native one: (native
    # name under ``mlp.``, transform of moe_ext.checkpoint.hf_maps.STORED_TRANSFORMS); such
    # tensors are read and written in that layout only (gpt_oss).
    hf_expert_transforms: tuple[tuple[str, str], ...] = ()
    # Whether the family's attention implements transformers' partial rotary
    # (``partial_rotary_factor`` < 1); others refuse such a config.
    partial_rotary: bool = False

    # ---- config mapping -------------------------------------------------------------
    def family_args(self, cfg: ConfigFields) -> dict[str, Any]:
        """The ModelArgs fields only this family reads, from its config keys."""
        raise NotImplementedError

    def family_config(self, args: ModelArgs) -> dict[str, Any]:
        """This family's own ``config.json`` entries for ``args`` (inverse of family_args)."""
        raise NotImplementedError

    def args_from_config(self, cfg: ConfigFields) -> ModelArgs:
        act = cfg.str("hidden_act", "silu")
        if act != "silu":
            raise ModelArgsError(
                f"{cfg.source}: hidden_act {act!r} is not supported (SwiGLU with silu only)"
            )
        num_heads = cfg.int("num_attention_heads")
        rope_theta, rope_scaling, partial = _rope(cfg, self.default_rope_theta)
        if partial is None:
            partial = self.default_partial_rotary_factor(cfg)
        if partial != 1.0 and not self.partial_rotary:
            raise ModelArgsError(
                f"{cfg.source}: partial_rotary_factor {partial} is not supported for "
                f"{self.model_type} (its attention rotates the whole head); remove it"
            )
        args = ModelArgs(
            model_type=self.model_type,
            vocab_size=cfg.int("vocab_size"),
            hidden_size=cfg.int("hidden_size"),
            intermediate_size=cfg.int("intermediate_size"),
            num_hidden_layers=cfg.int("num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=cfg.int("num_key_value_heads", None) or num_heads,
            num_experts_per_tok=cfg.int("num_experts_per_tok"),
            head_dim=cfg.int("head_dim", None),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=cfg.float("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.int("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.bool("tie_word_embeddings", False),
            bos_token_id=cfg.token_ids("bos_token_id"),
            eos_token_id=cfg.token_ids("eos_token_id"),
            pad_token_id=cfg.token_ids("pad_token_id"),
            init_seed=cfg.int("init_seed", 1234),
            partial_rotary_factor=partial,
            quantization=parse_quantization(cfg.raw("quantization_config"), cfg.source),
            **self.family_args(cfg),
        )
        if partial != 1.0:
            from moe_ext.model.layers import rotary_dim

            try:
                rotary_dim(args)  # an odd or empty rotated width is a config error
            except ModelArgsError as err:
                raise ModelArgsError(f"{cfg.source}: {err}") from err
        return args

    def default_partial_rotary_factor(self, cfg: ConfigFields) -> float:
        """The rotated fraction of each head when neither the RoPE parameters nor a
        top-level ``partial_rotary_factor`` key give one (transformers' per-family default)."""
        return 1.0

    def hf_config(self, args: ModelArgs, tokenizer: Optional[str] = None) -> dict[str, Any]:
        """The Hugging Face ``config.json`` of ``args``; ``ModelArgs.from_hf_config`` reads
        it back to the same args. ``tokenizer="byte"`` records a byte-level vocabulary."""
        config: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": args.vocab_size,
            "hidden_size": args.hidden_size,
            "intermediate_size": args.intermediate_size,
            "num_hidden_layers": args.num_hidden_layers,
            "num_attention_heads": args.num_attention_heads,
            "num_key_value_heads": args.num_key_value_heads,
            "head_dim": args.head_dim,
            "num_experts_per_tok": args.num_experts_per_tok,
            "hidden_act": "silu",
            "rope_theta": args.rope_theta,
            "rms_norm_eps": args.rms_norm_eps,
            "max_position_embeddings": args.max_position_embeddings,
            "tie_word_embeddings": args.tie_word_embeddings,
            "bos_token_id": args.bos_token_id,
            "eos_token_id": args.eos_token_id,
            "pad_token_id": args.pad_token_id,
        }
        if args.rope_scaling is not None:
            config["rope_scaling"] = dict(args.rope_scaling)
        if args.quantization is not None:
            config["quantization_config"] = args.quantization.to_hf()
        config.update(self.family_config(args))
        if tokenizer is not None:
            config["tokenizer"] = tokenizer
        return config

    # ---- tensors --------------------------------------------------------------------
    def param_shapes(self, args: ModelArgs) -> dict[str, tuple[int, ...]]:
        """Every native tensor a checkpoint holds for the full model (parameters and
        persistent buffers) with its shape, in ``state_dict`` order (the names of
        docs/ARCHITECTURE.md "Parameter names")."""
        H, V = args.hidden_size, args.vocab_size
        out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (V, H)}
        for i in range(args.num_hidden_layers):
            p = f"layers.{i}."
            out[p + "input_layernorm.weight"] = (H,)
            out.update({p + "self_attn." + k: v for k, v in self.attention_shapes(args).items()})
            out[p + "post_attention_layernorm.weight"] = (H,)
            mlp = self.moe_shapes(args) if args.is_moe_layer(i) else self.dense_shapes(args)
            out.update({p + "mlp." + k: v for k, v in mlp.items()})
        out["norm.weight"] = (H,)
        if not args.tie_word_embeddings:
            out["lm_head.weight"] = (V, H)
        return out

    def attention_shapes(self, args: ModelArgs) -> dict[str, tuple[int, ...]]:
        H, D = args.hidden_size, args.head_dim
        q, kv = args.num_attention_heads * D, args.num_key_value_heads * D
        out: dict[str, tuple[int, ...]] = {}
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out[proj + ".weight"] = (rows, H)
            if args.qkv_bias:
                out[proj + ".bias"] = (rows,)
        out["o_proj.weight"] = (H, q)
        if args.o_bias:
            out["o_proj.bias"] = (H,)
        if args.qk_norm:
            out.update({"q_norm.weight": (D,), "k_norm.weight": (D,)})
        return out

    def attention_shards(self, args: ModelArgs, tp: int, tp_rank: int) -> dict[str, "ShardRequest"]:
        """Which part of each ``attention_shapes`` tensor TP rank ``tp_rank`` of ``tp``
        holds: q/k/v rows and o_proj columns by heads (kv heads replicated when nKV < tp);
        biases follow their rows, o_proj's bias and the per-head norms are whole."""
        from moe_ext.checkpoint.shard import ShardRequest

        D, nH, nKV = args.head_dim, args.num_attention_heads, args.num_key_value_heads
        q_rows = (tp_rank * nH // tp * D, (tp_rank + 1) * nH // tp * D)
        kv_first, kv_count = tp_rank * nKV // tp, max(1, nKV // tp)
        kv_rows = (kv_first * D, (kv_first + kv_count) * D)
        full = ShardRequest.full()
        out: dict[str, ShardRequest] = {}
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            out[proj + ".weight"] = ShardRequest.block(0, *rows)
            if args.qkv_bias:
                out[proj + ".bias"] = ShardRequest.block(0, *rows)
        out["o_proj.weight"] = ShardRequest.block(1, *q_rows)
        if args.o_bias:
            out["o_proj.bias"] = full
        if args.qk_norm:
            out.update({"q_norm.weight": full, "k_norm.weight": full})
        return out

    def moe_shapes(self, args: ModelArgs) -> dict[str, tuple[int, ...]]:
        H, E, F = args.hidden_size, args.num_experts, args.moe_intermediate_size
        out = {
            "router.weight": (E, H),
        }
        if args.router_correction_bias:
            out["router.e_score_correction_bias"] = (E,)  # a persistent buffer, float32
        out.update({"experts." + GATE_UP: (E, 2 * F, H), "experts." + DOWN: (E, H, F)})
        if args.has_shared_expert:
            S = args.shared_expert_intermediate_size
            out.update(
                {
                    "shared_expert.gate_proj.weight": (S, H),
                    "shared_expert.up_proj.weight": (S, H),
                    "shared_expert.down_proj.weight": (H, S),
                }
            )
            if args.shared_expert_gate:
                out["shared_expert_gate.weight"] = (1, H)
        return out

    def dense_shapes(self, args: ModelArgs) -> dict[str, tuple[int, ...]]:
        H, Fd = args.hidden_size, args.intermediate_size
        return {"gate_proj.weight": (Fd, H), "up_proj.weight": (Fd, H), "down_proj.weight": (H, Fd)}

    def kv_cache_bytes_per_token(self, args: ModelArgs, tp: int, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one cached token costs one TP rank of ``tp``, over all layers
        (a pipeline stage holds its layers' share). GQA: K and V of the rank's kv heads
        (replicated when nKV < tp); an attention kind with another cache overrides this."""
        kv_heads = max(1, args.num_key_value_heads // tp)
        return args.num_hidden_layers * 2 * kv_heads * args.head_dim * dtype_bytes

    def kv_cache_bytes(self, args: ModelArgs, tp: int, slots: int, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one TP rank holds for one sequence of ``slots`` cache slots; an
        attention kind whose cache does not grow with every slot (sliding windows)
        overrides this."""
        return slots * self.kv_cache_bytes_per_token(args, tp, dtype_bytes)

    # ---- blocks ---------------------------------------------------------------------
    def build_rotary(self, args: ModelArgs) -> "nn.Module":
        """The rotary embedding the decoder computes once per forward and hands to every
        attention block: ``forward(positions [B, S] int64, dtype) -> (cos, sin)``, each
        [B, S, rotary dims] in ``dtype``. A family whose attention wants other tables (MLA's
        rope head dim, say) returns its own."""
        from moe_ext.model.layers import RotaryEmbedding

        return RotaryEmbedding(args)

    def build_attention(self, args: ModelArgs, layer_id: int) -> "nn.Module":
        from moe_ext.model.layers import Attention

        return Attention(args)

    def build_dense_mlp(self, args: ModelArgs, layer_id: int) -> "nn.Module":
        from moe_ext.model.layers import DenseMLP

        return DenseMLP(args.hidden_size, args.intermediate_size)

    def moe_options(self, args: ModelArgs) -> dict[str, Any]:
        """The router, expert and shared-expert options of ``build_moe_layer`` for this
        family; a family with more (group rules, biases, a clamped SwiGLU) extends them."""
        return dict(
            score_func=args.score_func,
            norm_topk_prob=args.norm_topk_prob,
            n_group=args.n_group,
            topk_group=args.topk_group,
            routed_scaling_factor=args.routed_scaling_factor,
            correction_bias=args.router_correction_bias,
            shared_expert_size=args.shared_expert_intermediate_size,
            shared_expert_gate=args.shared_expert_gate,
        )

    def build_moe(
        self,
        args: ModelArgs,
        dispatcher: Any = "local",
        dtype: Optional["torch.dtype"] = None,
        device: Any = None,
    ) -> "nn.Module":
        """The MoE MLP of one layer (router, grouped experts and any shared expert, as
        ``moe_options`` says) holding the dispatcher's expert shard."""
        from moe_ext.moe.layer import build_moe_layer

        return build_moe_layer(
            args.hidden_size,
            args.moe_intermediate_size,
            args.num_experts,
            args.num_experts_per_tok,
            dispatcher=dispatcher,
            dtype=dtype,
            device=device,
            **self.moe_options(args),
        )

    # ---- Hugging Face per-expert names ----------------------------------------------
    def hf_moe_prefix(self, layer: int, layout: str) -> str:
        block = self.hf_moe_block if layout == "per-expert" else "mlp"
        return f"model.layers.{layer}.{block}."

    def hf_renames_for(self, layout: str) -> tuple[tuple[str, str], ...]:
        """The ``hf_renames`` pairs export applies in ``layout`` ("per-expert" | "fused");
        import undoes every pair, whichever layout wrote the name."""
        return self.hf_renames

    def hf_skipped(self, key: str, args: ModelArgs) -> bool:
        """Whether HF tensor ``key`` is one the engine does not run and import skips: the
        ``args.mtp_layers`` multi-token-prediction layers stored after the decoder's
        (``model.layers.{L}`` .. ``{L + mtp_layers - 1}``, L = num_hidden_layers), as
        transformers skips them."""
        prefix = "model.layers."
        if not args.mtp_layers or not key.startswith(prefix):
            return False
        index = key[len(prefix) :].split(".", 1)[0]
        first = args.num_hidden_layers
        return index.isdigit() and first <= int(index) < first + args.mtp_layers

    def hf_expert_keys(self, layer: int, stacked: str, expert: int) -> list[str]:
        """HF names holding expert ``expert`` of a stacked tensor, in row order:
        [gate, up] for gate_up_proj, [down] for down_proj."""
        gate, up, down = self.hf_expert_parts
        parts = (gate, up) if stacked == GATE_UP else (down,)
        prefix = self.hf_moe_prefix(layer, "per-expert") + f"experts.{expert}."
        return [prefix + p + ".weight" for p in parts]

    def __repr__(self) -> str:
        return f"<family {self.model_type}>"


def expert_param(name: str) -> Optional[tuple[int, str]]:
    """``(layer, "gate_up_proj" | "down_proj")`` for a routed-expert tensor, else None."""
    m = EXPERT_PARAM.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def _rope(
    cfg: ConfigFields, default_theta: float
) -> tuple[float, Optional[dict[str, Any]], Optional[float]]:
    """(rope_theta, scaling, partial_rotary_factor) from transformers-5 ``rope_parameters``
    or the older ``rope_theta`` + ``rope_scaling`` pair; the factor as transformers ranks
    it: the RoPE parameters' own, else the top-level key, else None (the family default)."""
    params = _mapping(cfg, "rope_parameters")
    scaling = _mapping(cfg, "rope_scaling")
    theta = (
        params.pop("rope_theta", None)
        or scaling.pop("rope_theta", None)
        or cfg.float("rope_theta", None)
        or default_theta
    )
    merged = {**scaling, **params}
    partial = merged.pop("partial_rotary_factor", None)
    if partial is None:
        partial = cfg.float("partial_rotary_factor", None)
    elif isinstance(partial, bool) or not isinstance(partial, (int, float)):
        raise ModelArgsError(
            f"{cfg.source}: partial_rotary_factor must be a number, got {partial!r}"
        )
    if (
        merged.get("rope_type", merged.get("type")) in ("llama3", "yarn")
        and "original_max_position_embeddings" not in merged
    ):
        # transformers fills this in from max_position_embeddings when it is absent
        merged["original_max_position_embeddings"] = cfg.int("max_position_embeddings", 4096)
    try:
        scaling = normalize_rope_scaling(merged)
    except ModelArgsError as err:
        raise ModelArgsError(f"{cfg.source}: rope_parameters / rope_scaling: {err}") from err
    return float(theta), scaling, None if partial is None else float(partial)


def _mapping(cfg: ConfigFields, key: str) -> dict[str, Any]:
    value = cfg.raw(key, {})
    if not isinstance(value, Mapping):
        raise ModelArgsError(f"{cfg.source}: {key} must be a mapping, got {value!r}")
    return dict(value)

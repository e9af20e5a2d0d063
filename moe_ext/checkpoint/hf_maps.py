"""Per-family name maps between Hugging Face checkpoints and native (moe_ext) names, and the
tensor shapes a ``config.json`` implies.

Native names are those of docs/ARCHITECTURE.md "Parameter names" (no ``model.`` prefix,
stacked experts). Hugging Face stores experts in one of two layouts:
  per-expert (legacy; what transformers 5 ``save_pretrained`` still writes):
    mixtral   model.layers.{i}.block_sparse_moe.experts.{j}.w1|w3|w2.weight  (gate|up|down)
              model.layers.{i}.block_sparse_moe.gate.weight                     (router)
    qwen*_moe model.layers.{i}.mlp.experts.{j}.gate_proj|up_proj|down_proj.weight
              model.layers.{i}.mlp.gate.weight
  fused (transformers 5 in-memory names, loadable as they are):
    model.layers.{i}.mlp.experts.gate_up_proj [E, 2F, H], .down_proj [E, H, F],
    model.layers.{i}.mlp.gate.weight
Every other tensor is ``model.<native name>`` (``lm_head.weight`` has no prefix).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from moe_ext.checkpoint.errors import CheckpointError

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
LAYOUTS = ("per-expert", "fused")

GATE_UP = "gate_up_proj"
DOWN = "down_proj"


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of one checkpoint, read from its Hugging Face config."""

    family: str
    num_layers: int
    hidden: int  # H
    vocab: int  # V
    num_heads: int  # nH
    num_kv_heads: int  # nKV
    head_dim: int  # D
    num_experts: int  # E
    expert_ffn: int  # F
    dense_ffn: int  # dense-MLP layers
    shared_ffn: int  # qwen2_moe shared expert (0: none)
    moe_layers: frozenset[int]
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    tied: bool


def _need(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise CheckpointError(f"config.json lacks {' / '.join(keys)}; add it (the Hugging Face config of the model)")


def family_of(config: dict[str, Any]) -> str:
    family = config.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(
            f"unknown model_type {family!r} in config.json; supported families: {', '.join(FAMILIES)}"
        )
    return family


def model_shape(config: dict[str, Any]) -> ModelShape:
    """Dimensions implied by a Hugging Face ``config.json`` dict of a supported family."""
    family = family_of(config)
    num_layers = int(_need(config, "num_hidden_layers"))
    hidden = int(_need(config, "hidden_size"))
    num_heads = int(_need(config, "num_attention_heads"))
    num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
    head_dim = int(config.get("head_dim") or hidden // num_heads)
    num_experts = int(_need(config, "num_local_experts", "num_experts"))
    dense_ffn = int(_need(config, "intermediate_size"))
    if family == "mixtral":
        expert_ffn, shared_ffn = dense_ffn, 0
        moe_layers = frozenset(range(num_layers))
        qkv_bias, o_bias, qk_norm = False, False, False
    else:
        expert_ffn = int(_need(config, "moe_intermediate_size"))
        shared_ffn = int(config.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0
        sparse_step = int(config.get("decoder_sparse_step") or 1)
        dense_only = set(config.get("mlp_only_layers") or [])
        moe_layers = frozenset(
            i for i in range(num_layers) if i not in dense_only and num_experts > 0 and (i + 1) % sparse_step == 0
        )
        if family == "qwen2_moe":
            # Qwen1.5-MoE configs predate the key and always had q/k/v biases.
            qkv_bias, o_bias, qk_norm = bool(config.get("qkv_bias", True)), False, False
        else:
            bias = bool(config.get("attention_bias", False))
            qkv_bias, o_bias, qk_norm = bias, bias, True
    return ModelShape(
        family=family,
        num_layers=num_layers,
        hidden=hidden,
        vocab=int(_need(config, "vocab_size")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        num_experts=num_experts,
        expert_ffn=expert_ffn,
        dense_ffn=dense_ffn,
        shared_ffn=shared_ffn,
        moe_layers=moe_layers,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=qk_norm,
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def native_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every native tensor name the config implies, with its unsharded shape, in model order."""
    m = model_shape(config)
    H, D = m.hidden, m.head_dim
    out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (m.vocab, H)}
    for i in range(m.num_layers):
        p = f"layers.{i}."
        out[p + "input_layernorm.weight"] = (H,)
        out[p + "self_attn.q_proj.weight"] = (m.num_heads * D, H)
        out[p + "self_attn.k_proj.weight"] = (m.num_kv_heads * D, H)
        out[p + "self_attn.v_proj.weight"] = (m.num_kv_heads * D, H)
        out[p + "self_attn.o_proj.weight"] = (H, m.num_heads * D)
        if m.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = (m.num_heads * D,)
            out[p + "self_attn.k_proj.bias"] = (m.num_kv_heads * D,)
            out[p + "self_attn.v_proj.bias"] = (m.num_kv_heads * D,)
        if m.o_bias:
            out[p + "self_attn.o_proj.bias"] = (H,)
        if m.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (D,)
            out[p + "self_attn.k_norm.weight"] = (D,)
        out[p + "post_attention_layernorm.weight"] = (H,)
        if i in m.moe_layers:
            E, F = m.num_experts, m.expert_ffn
            out[p + "mlp.router.weight"] = (E, H)
            out[p + "mlp.experts." + GATE_UP] = (E, 2 * F, H)
            out[p + "mlp.experts." + DOWN] = (E, H, F)
            if m.shared_ffn:
                S = m.shared_ffn
                out[p + "mlp.shared_expert.gate_proj.weight"] = (S, H)
                out[p + "mlp.shared_expert.up_proj.weight"] = (S, H)
                out[p + "mlp.shared_expert.down_proj.weight"] = (H, S)
                out[p + "mlp.shared_expert_gate.weight"] = (1, H)
        else:
            out[p + "mlp.gate_proj.weight"] = (m.dense_ffn, H)
            out[p + "mlp.up_proj.weight"] = (m.dense_ffn, H)
            out[p + "mlp.down_proj.weight"] = (H, m.dense_ffn)
    out["norm.weight"] = (H,)
    if not m.tied:
        out["lm_head.weight"] = (m.vocab, H)
    return out


_EXPERT_NATIVE = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_ROUTER_NATIVE = re.compile(r"^layers\.(\d+)\.mlp\.router\.weight$")


def expert_tensor(native: str) -> Optional[tuple[int, str]]:
    """``(layer, "gate_up_proj" | "down_proj")`` for a stacked expert name, else None."""
    m = _EXPERT_NATIVE.match(native)
    return (int(m.group(1)), m.group(2)) if m else None


# ---- Hugging Face -> native ------------------------------------------------------------

_HF_PER_EXPERT = re.compile(
    r"^layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_HF_FUSED = re.compile(r"^layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)$")
_HF_ROUTER = re.compile(r"^layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")
_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

# Tensors some HF checkpoints carry that no model parameter corresponds to.
_HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class HFKey:
    """Where an HF tensor goes: a native name, plus expert index and part for per-expert keys."""

    native: str
    expert: Optional[int] = None  # per-expert layout only
    part: Optional[str] = None  # "gate" | "up" | "down" (per-expert layout only)


def is_ignored_hf_key(key: str) -> bool:
    return bool(_HF_IGNORED.search(key))


def parse_hf_key(key: str) -> HFKey:
    """Native destination of one Hugging Face tensor name (any supported layout)."""
    name = key[len("model."):] if key.startswith("model.") else key
    m = _HF_PER_EXPERT.match(name)
    if m:
        part = _PART[m.group(3)]
        stacked = DOWN if part == "down" else GATE_UP
        return HFKey(f"layers.{m.group(1)}.mlp.experts.{stacked}", int(m.group(2)), part)
    m = _HF_FUSED.match(name)
    if m:
        return HFKey(f"layers.{m.group(1)}.mlp.experts.{m.group(2)}")
    m = _HF_ROUTER.match(name)
    if m:
        return HFKey(f"layers.{m.group(1)}.mlp.router.weight")
    return HFKey(name)


# ---- native -> Hugging Face ------------------------------------------------------------

def _moe_block(family: str, layout: str) -> str:
    # transformers 5 renames Mixtral's block_sparse_moe to mlp in memory; legacy files keep it.
    return "block_sparse_moe" if family == "mixtral" and layout == "per-expert" else "mlp"


def hf_key(native: str, family: str, layout: str) -> str:
    """HF name of a non-expert tensor, or of a stacked expert tensor in the fused layout."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if native == "lm_head.weight":
        return native
    m = _ROUTER_NATIVE.match(native)
    if m:
        return f"model.layers.{m.group(1)}.{_moe_block(family, layout)}.gate.weight"
    m = _EXPERT_NATIVE.match(native)
    if m and layout == "per-expert":
        raise CheckpointError(f"{native} is stored per expert in the per-expert layout; use hf_expert_keys")
    return "model." + native


def hf_expert_keys(native: str, family: str, expert: int) -> list[str]:
    """Per-expert HF names holding expert ``expert`` of a stacked tensor, in row order of
    ``native[expert]``: [gate, up] for gate_up_proj, [down] for down_proj."""
    layer, kind = expert_tensor(native) or (None, None)
    if layer is None:
        raise CheckpointError(f"{native} is not a stacked expert tensor")
    prefix = f"model.layers.{layer}.{_moe_block(family, 'per-expert')}.experts.{expert}."
    if family == "mixtral":
        parts = ["w1", "w3"] if kind == GATE_UP else ["w2"]
    else:
        parts = ["gate_proj", "up_proj"] if kind == GATE_UP else ["down_proj"]
    return [prefix + p + ".weight" for p in parts]

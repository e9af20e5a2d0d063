"""ModelArgs: the one description of a model's shape, read by the native decoder, the
planner's memory count and the checkpoint maps.

Fields are Hugging Face ``config.json`` names where one exists. Each family module
(``moe_ext.model.families``) maps its config keys onto these fields and back; this module
holds only what every family shares (validation, RoPE scaling, the MoE-layer rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Optional

from moe_ext.errors import MoeExtError

if TYPE_CHECKING:
    from moe_ext.model.families.base import Family
    from moe_ext.quant.config import QuantConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


class ModelArgsError(MoeExtError):
    """A model configuration the native engine cannot run (one line: problem and fix)."""


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense-MLP layers; Mixtral experts
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    moe_intermediate_size: Optional[int] = None  # qwen experts; None: intermediate_size
    shared_expert_intermediate_size: Optional[int] = None  # None: no shared expert
    # a sigmoid gate [1, H] on the shared expert; None: the family's default (qwen2_moe: yes)
    shared_expert_gate: Optional[bool] = None
    # router: softmax top-k, or sigmoid scores with a correction bias steering the picks
    # and group-limited selection (DeepSeek-V3 family); see moe_ext.moe.router
    score_func: str = "softmax"  # softmax | sigmoid
    router_correction_bias: bool = False  # buffer e_score_correction_bias [E] float32
    n_group: Optional[int] = None  # expert groups for group-limited top-k (None: off)
    topk_group: Optional[int] = None  # groups kept per token
    routed_scaling_factor: float = 1.0  # routed output scale
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    rope_theta: float = 1_000_000.0
    rope_scaling: Optional[dict[str, Any]] = None  # normalised: has "rope_type"; None = default
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: Optional[int] = None  # keys farther back than this are not attended
    # ---- MLA (deepseek_v2 / deepseek_v3) ----
    # Multi-head Latent Attention (moe_ext.model.mla) when kv_lora_rank is set; head_dim
    # is then the rotated part of a head (qk_rope_head_dim), num_key_value_heads the heads.
    kv_lora_rank: Optional[int] = None  # width of the cached KV latent
    q_lora_rank: Optional[int] = None  # None: a plain q_proj (DeepSeek-V2-Lite)
    qk_nope_head_dim: int = 0  # per-head query/key dims that carry no position
    v_head_dim: int = 0
    rope_interleave: bool = True  # deepseek_v3: rotate adjacent pairs (else halves)
    topk_method: Optional[str] = None  # greedy | group_limited_greedy | noaux_tc
    first_k_dense_replace: int = 0  # dense MLP in layers [0, k) (and off moe_layer_freq)
    moe_layer_freq: int = 1
    # ---- glm4_moe / minimax_m2 ----
    # RoPE on the first int(head_dim * factor) dims of each q/k head (rotate-half pairs
    # within them), the rest passed through (transformers' partial rotary)
    partial_rotary_factor: float = 1.0
    # q/k RMSNorm (qk_norm): "per_head" over each head's D (weights [D]); "per_layer" over
    # the whole projection, all heads' nH·D at once (weights [nH·D] / [nKV·D], MiniMax-M2)
    qk_norm_type: str = "per_head"
    # multi-token-prediction layers checkpoints store after the decoder's own
    # (model.layers.{L..L+n-1}); not run, skipped on import
    mtp_layers: int = 0
    # ---- gpt_oss ----
    # Attention kind per layer, "full_attention" | "sliding_attention" (HF layer_types);
    # None: every layer alike. Sliding layers attend to the last sliding_window keys and
    # keep a ring-buffer KV cache of that many slots (moe_ext.model.sink_attention).
    layer_types: Optional[list[str]] = None
    attention_sinks: bool = False  # self_attn.sinks [nH]: a per-head logit in the softmax sum
    router_bias: bool = False  # router.bias [E], added to the router logits
    expert_bias: bool = False  # experts.gate_up_proj_bias [E, 2F], experts.down_proj_bias [E, H]
    # Clamped SwiGLU (gpt_oss experts): (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g) with
    # g = clamp(gate, max=l), l = swiglu_limit; None: the plain silu(gate) * up.
    swiglu_limit: Optional[float] = None
    swiglu_alpha: float = 1.702
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list[int]] = None
    pad_token_id: Optional[int] = None
    # weights stored quantized (moe_ext.quant); None: every tensor in the model dtype
    quantization: Optional["QuantConfig"] = None
    init_seed: int = 1234

    def __post_init__(self) -> None:
        self.family  # an unknown model_type is an error here  # noqa: B018
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "num_experts",
        ):
            if getattr(self, name) < 1:
                raise ModelArgsError(
                    f"{name}={getattr(self, name)} must be >= 1; fix the model config"
                )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelArgsError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads {self.num_key_value_heads}; fix the config"
            )
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ModelArgsError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in "
                f"1..num_experts ({self.num_experts})"
            )
        if self.head_dim % 2:
            raise ModelArgsError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.shared_expert_gate is None:
            self.shared_expert_gate = self.family.gates_shared_expert and bool(
                self.shared_expert_intermediate_size
            )
        if self.shared_expert_gate and not self.shared_expert_intermediate_size:
            raise ModelArgsError(
                "shared_expert_gate needs shared_expert_intermediate_size; fix the model config"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            self.sliding_window = None
        self.mlp_only_layers = [int(i) for i in self.mlp_only_layers]
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling)
        if self.quantization is not None:
            from moe_ext.quant.layout import check_args

            check_args(self)

    # ---- derived shape facts -------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        """HF rule (qwen2_moe/qwen3_moe): sparse unless listed in mlp_only_layers or off-step."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def has_shared_expert(self) -> bool:
        return bool(self.shared_expert_intermediate_size)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def family(self) -> "Family":
        from moe_ext.model.families import get_family

        return get_family(self.model_type, "ModelArgs")

    # ---- constructors ---------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], source: str = "config.json") -> "ModelArgs":
        """From a Hugging Face ``config.json`` dict (transformers 4 or 5 layout)."""
        from moe_ext.model.families import args_from_hf_config

        return args_from_hf_config(config, source)

    @classmethod
    def from_model_conf(cls, conf: Any, source: Optional[str] = None) -> "ModelArgs":
        """From a ``conf/model`` entry (an OmegaConf node or a dict): Hugging Face keys plus
        name / tokenizer / weights / init_seed; an unknown key is an error."""
        from omegaconf import DictConfig, OmegaConf

        from moe_ext.model.families import args_from_model_conf

        if isinstance(conf, DictConfig):
            conf = OmegaConf.to_container(conf, resolve=True)
        name = conf.get("name")
        return args_from_model_conf(
            conf, source or (f"conf/model/{name}.yaml" if name else "model config")
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def normalize_rope_scaling(scaling: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """Normalise a rope-scaling dict to ``{"rope_type": ..., params}``; None for plain RoPE."""
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelArgsError(
            f"rope type {rope_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelArgsError(
            "partial_rotary_factor != 1 is not supported; these families rotate the whole head"
        )
    scaling.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return None
    missing = [k for k in _ROPE_REQUIRED[rope_type] if scaling.get(k) is None]
    if missing:
        raise ModelArgsError(
            f"rope type {rope_type!r} needs {', '.join(missing)} in rope_scaling / rope_parameters"
        )
    return {"rope_type": rope_type, **scaling}

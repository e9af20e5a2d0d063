"""ModelArgs: one model shape for the native decoder, from a Hugging Face ``config.json``
dict or from the Hydra ``ModelConf``.

Families: ``mixtral`` (softmax top-k router, renormalised), ``qwen2_moe`` (shared expert
with a sigmoid gate, q/k/v bias, dense-MLP layers from ``decoder_sparse_step`` /
``mlp_only_layers``), ``qwen3_moe`` (per-head q/k RMSNorm, optional top-k renormalisation,
explicit ``head_dim``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional
from moe_ext.errors import MoeExtError

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
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
    shared_expert_intermediate_size: Optional[int] = None  # qwen2_moe shared expert
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
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list[int]] = None
    pad_token_id: Optional[int] = None
    init_seed: int = 1234

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelArgsError(f"model_type {self.model_type!r} is not supported by the native "
                                 f"engine; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelArgsError(f"num_attention_heads {self.num_attention_heads} is not a multiple "
                                 f"of num_key_value_heads {self.num_key_value_heads}; fix the config")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ModelArgsError(f"num_experts_per_tok {self.num_experts_per_tok} must be in "
                                 f"1..num_experts ({self.num_experts})")
        if self.head_dim % 2:
            raise ModelArgsError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window <= 0:
            self.sliding_window = None
        self.mlp_only_layers = [int(i) for i in self.mlp_only_layers]
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling)

    # ---- derived shape facts -------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        """HF rule (qwen2_moe/qwen3_moe): sparse unless listed in mlp_only_layers or off-step."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def has_shared_expert(self) -> bool:
        return self.model_type == "qwen2_moe" and bool(self.shared_expert_intermediate_size)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    # ---- constructors ---------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> "ModelArgs":
        """From a Hugging Face ``config.json`` dict (transformers 4 or 5 layout)."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelArgsError(f"model_type {model_type!r} is not supported by the native "
                                 f"engine; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ModelArgsError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
        # HF spells it num_local_experts (mixtral; qwen3_moe in transformers 5) or num_experts
        num_experts = config.get("num_local_experts", config.get("num_experts"))
        if num_experts is None:
            raise ModelArgsError("config.json has neither num_local_experts nor num_experts; "
                                 "the native engine runs MoE models only")
        rope_theta, rope_scaling = _hf_rope(config, 1e6 if model_type == "mixtral" else 1e4)
        common = dict(
            model_type=model_type,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            num_experts_per_tok=config["num_experts_per_tok"],
            head_dim=config.get("head_dim"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"),
        )
        if model_type == "mixtral":
            return cls(**common, num_experts=num_experts, norm_topk_prob=True,
                       sliding_window=config.get("sliding_window"))
        sliding = config.get("sliding_window") if config.get("use_sliding_window") else None
        if sliding and model_type == "qwen2_moe":
            # HF qwen2_moe windows only some layers (layer_types / max_window_layers)
            raise ModelArgsError("qwen2_moe with use_sliding_window=true is not supported; "
                                 "set use_sliding_window=false in config.json")
        qwen = dict(num_experts=num_experts,
                    moe_intermediate_size=config.get("moe_intermediate_size"),
                    norm_topk_prob=config.get("norm_topk_prob", False),
                    decoder_sparse_step=config.get("decoder_sparse_step", 1),
                    mlp_only_layers=list(config.get("mlp_only_layers") or []))
        if model_type == "qwen2_moe":
            return cls(**common, **qwen,
                       shared_expert_intermediate_size=config.get("shared_expert_intermediate_size"),
                       qkv_bias=config.get("qkv_bias", True))
        bias = bool(config.get("attention_bias", False))
        return cls(**common, **qwen, qkv_bias=bias, o_bias=bias, qk_norm=True,
                   sliding_window=sliding)

    @classmethod
    def from_model_conf(cls, conf: Any) -> "ModelArgs":
        """From ``moe_ext.config.ModelConf`` (or an OmegaConf node / dict of its fields)."""
        from omegaconf import DictConfig, OmegaConf

        if isinstance(conf, DictConfig):
            conf = OmegaConf.to_container(conf, resolve=True)
        get = conf.get if isinstance(conf, Mapping) else (lambda k, d=None: getattr(conf, k, d))
        hf = {f: get(f) for f in (
            "model_type", "vocab_size", "hidden_size", "intermediate_size",
            "moe_intermediate_size", "shared_expert_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts_per_tok",
            "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "rope_theta",
            "rope_scaling", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "sliding_window")}
        hf = {k: v for k, v in hf.items() if v is not None}
        hf["num_experts"] = hf["num_local_experts"] = get("num_experts")
        if hf.get("sliding_window"):
            hf["use_sliding_window"] = True
        bias = get("attention_bias", False)
        hf["attention_bias"] = bias
        qkv_bias = get("qkv_bias")
        if hf.get("model_type") == "qwen2_moe":
            hf["qkv_bias"] = True if qkv_bias is None else qkv_bias
        args = cls.from_hf_config(hf)
        args.init_seed = get("init_seed", 1234) or 1234
        return args

    def to_model_conf(self, name: str) -> Any:
        """The shape as a ``moe_ext.config.ModelConf`` (what the planner reads), e.g. for a
        model that came from a checkpoint's config.json."""
        from moe_ext.config import ModelConf

        shape = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                 "moe_intermediate_size", "shared_expert_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
                 "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step",
                 "max_position_embeddings", "tie_word_embeddings", "sliding_window")
        return ModelConf(name=name, mlp_only_layers=list(self.mlp_only_layers),
                         attention_bias=self.o_bias, qkv_bias=self.qkv_bias,
                         **{f: getattr(self, f) for f in shape})

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
        raise ModelArgsError(f"rope type {rope_type!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelArgsError("partial_rotary_factor != 1 is not supported; these families "
                             "rotate the whole head")
    scaling.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return None
    missing = [k for k in _ROPE_REQUIRED[rope_type] if scaling.get(k) is None]
    if missing:
        raise ModelArgsError(f"rope type {rope_type!r} needs {', '.join(missing)} in "
                             f"rope_scaling / rope_parameters")
    return {"rope_type": rope_type, **scaling}


def _hf_rope(config: Mapping[str, Any], default_theta: float
             ) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, scaling) from transformers-5 ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` pair."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or scaling.pop("rope_theta", None) \
        or config.get("rope_theta") or default_theta
    merged = {**scaling, **params}
    if merged.get("rope_type", merged.get("type")) in ("llama3", "yarn") \
            and "original_max_position_embeddings" not in merged:
        # transformers fills this in from max_position_embeddings when it is absent
        merged["original_max_position_embeddings"] = config.get("max_position_embeddings", 4096)
    return float(theta), normalize_rope_scaling(merged)

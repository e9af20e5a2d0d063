"""Structured-config schemas for Hydra, registered in one ConfigStore.

Every config group under ``conf/`` (topology/, strategy/, parallel/, model/) starts from
the schema registered here (``defaults: [base_<group>]``), so a typo in a command-line
override is an error instead of a silently ignored key. Modules never read environment
variables: launchers turn the environment (torchrun's RANK/WORLD_SIZE, CUDA devices)
into these dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TopologyConf:
    """A forced topology (``+topology=pcie``); absent from the config means: probe."""

    kind: str = "auto"  # auto | pcie | nvlink | cpu
    num_gpus: Optional[int] = None  # None: probe count, else the launch's local world size
    p2p: Optional[bool] = None  # peer access between GPUs
    p2p_atomics: Optional[bool] = None  # native atomics over the peer link
    nvlink_count: Optional[int] = None  # NVLink links per GPU pair (nvlink kind)
    pcie_gen: Optional[int] = None
    pcie_width: Optional[int] = None
    gpu_memory_gib: Optional[float] = None  # per GPU; None: probe


@dataclass
class StrategyConf:
    """Expert-parallel strategy: a name and the dispatcher class that implements it."""

    name: str = "auto"  # auto | replicate | tp_experts | ep_allgather | ep_nccl | ep_nvshmem
    dispatcher: Optional[Any] = None  # {_target_: moe_ext.moe.dispatch....}; None with auto


@dataclass
class ParallelConf:
    """Parallel degrees; None means derived by the plan (see moe_ext.plan)."""

    tp: Optional[int] = None
    pp: Optional[int] = None
    dp: Optional[int] = None
    ep: Optional[int] = None
    etp: Optional[int] = None


@dataclass
class ModelConf:
    """A model shape in Hugging Face ``config.json`` terms (fields shared by the supported
    families); ``checkpoint=<dir>`` replaces it with the checkpoint's own config."""

    name: str = MISSING
    model_type: str = MISSING  # mixtral | qwen2_moe | qwen3_moe
    vocab_size: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING  # dense MLP layers (and Mixtral experts)
    moe_intermediate_size: Optional[int] = None  # qwen2_moe / qwen3_moe experts
    shared_expert_intermediate_size: Optional[int] = None  # qwen2_moe
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    head_dim: Optional[int] = None
    num_experts: int = MISSING  # HF: num_local_experts (mixtral) / num_experts (qwen)
    num_experts_per_tok: int = MISSING
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    rope_theta: float = 1_000_000.0
    rope_scaling: Optional[dict[str, Any]] = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen3_moe: q/k/v/o bias
    qkv_bias: Optional[bool] = None  # qwen2_moe: q/k/v bias; None = family default (true)
    sliding_window: Optional[int] = None  # mixtral / qwen3_moe (use_sliding_window)
    hidden_act: str = "silu"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    tokenizer: Optional[str] = None  # "byte" | path to a tokenizer.json | None (checkpoint's)
    init_seed: int = 1234  # random init (no checkpoint): identical at every world size
    # weights used when no checkpoint= is given: a directory, or "pkg:<path>" inside the
    # installed moe_ext package; None: random init from init_seed
    weights: Optional[str] = None


@dataclass
class GenerateConf:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_batch_size: int = 64
    cuda_graphs: bool = True  # CUDA-graph decode on GPU
    compile_decode: bool = True  # GPU: torch.compile (inductor) each block's decode step
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)


@dataclass
class InferConf:
    model: ModelConf = MISSING
    strategy: StrategyConf = MISSING
    parallel: ParallelConf = field(default_factory=ParallelConf)
    topology: Optional[TopologyConf] = None  # None: probe; `+topology=pcie` forces one
    engine: str = "native"  # native | megatron
    checkpoint: Optional[str] = None  # moe_ext or Hugging Face directory; None: random init
    prompts: Optional[str] = None  # JSONL; None: built-in demo prompts
    output: Optional[str] = None  # JSONL written by rank 0
    generate: GenerateConf = field(default_factory=GenerateConf)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp16 | fp32
    dist_timeout_s: int = 300  # collective timeout: a stuck peer is an error, not a hang


GROUPS = ("model", "strategy", "parallel", "topology")


def check_group_choices(overrides: list[str], conf_dir: Path) -> None:
    """Reject ``strategy=ep_foo`` / ``+topology=infiniband`` with one line listing the choices
    (Hydra's own message spans a dozen lines and lists schema nodes as options)."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        choices = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        if value not in choices:
            plus = "+" if key == "topology" else ""
            raise ValueError(f"unknown {key} {value!r}; choose one of {', '.join(choices)} "
                             f"({plus}{key}=<name>, files in conf/{key}/)")


def register_configs() -> None:
    """Register the schemas; idempotent, called by every Hydra main before it runs."""
    cs = ConfigStore.instance()
    cs.store(name="infer_schema", node=InferConf)
    cs.store(group="topology", name="base_topology", node=TopologyConf)
    cs.store(group="strategy", name="base_strategy", node=StrategyConf)
    cs.store(group="parallel", name="base_parallel", node=ParallelConf)
    cs.store(group="model", name="base_model", node=ModelConf)

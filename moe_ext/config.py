"""Structured-config schemas for Hydra, registered in one ConfigStore.

Every option of a config group under ``conf/`` (topology/, strategy/, parallel/, model/)
starts from the schema registered here (``defaults: [/<group>_schema@_here_, _self_]``), so
a typo in a command-line override is an error instead of a silently ignored key. The
schemas are stored as root configs, not as options of their groups, so ``--help`` and the
"unknown choice" errors list only real choices. Modules never read environment variables:
launchers turn the environment (torchrun's RANK/WORLD_SIZE, CUDA devices, MOE_EXT_DEBUG)
into these dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from moe_ext.errors import MoeExtError


class ConfigError(MoeExtError):
    """A config field outside its range (one line: the field, its value and the fix)."""


@dataclass
class TopologyConf:
    """A forced topology (``+topology=pcie``); kind ``auto`` (the default) means: probe, with
    ``topology.gpu_memory_gib=N`` alone replacing the probed per-GPU memory."""

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
    # > 1: dual-batch overlap in the expert-parallel layer (each MoE layer's tokens in this
    # many parts, one part's exchange under another's experts); ep_nccl and ep_allgather
    overlap_microbatches: int = 1


@dataclass
class ParallelConf:
    """Parallel degrees; None means derived by the plan (see moe_ext.plan)."""

    tp: Optional[int] = None
    pp: Optional[int] = None
    dp: Optional[int] = None
    ep: Optional[int] = None
    etp: Optional[int] = None


@dataclass
class PlanConf:
    """How strategy=auto decides (moe_ext.plan, moe_ext.cost)."""

    # machine profile JSON (tools/calibrate.py writes one; conf/profiles/ ships some); None:
    # the shipped profile closest to the topology, else auto's rules; "none": the rules
    profile: Optional[str] = None


# What generation does when neither ``generate.*`` nor the checkpoint's
# generation_config.json sets a sampling field: greedy (temperature 0), top-p and top-k off.
SAMPLING_DEFAULTS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}


@dataclass
class GenerateConf:
    max_new_tokens: int = 32
    # Sampling. None: the checkpoint's generation_config.json, else SAMPLING_DEFAULTS.
    temperature: Optional[float] = None  # 0: greedy
    top_p: Optional[float] = None  # 1: off
    top_k: Optional[int] = None  # 0: off
    max_batch_size: int = 64
    cuda_graphs: bool = True  # CUDA-graph decode on GPU
    compile_decode: bool = True  # GPU: torch.compile (inductor) each block's decode step
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)
    # pp > 1: micro-batches of a batch's rows in flight over the stages (None: pp of them,
    # at most one per row; 1: the one-at-a-time path, every stage waiting on the others)
    pipeline_microbatches: Optional[int] = None
    # prompt positions per prefill chunk (each attends to the cache of the earlier ones):
    # pipelined prefill overlaps stages chunk by chunk, and expert-parallel prefill runs
    # each chunk on the static, sync-free exchange. 0 / None: the whole prompt at once
    prefill_chunk: Optional[int] = 256
    # expert-parallel prefill: chunks grow past prefill_chunk while (rows of the largest
    # replica) x (chunk positions) stays within this many tokens per rank (0: never). Each
    # chunk costs every MoE layer two collectives, whose latency decides small chunks on
    # links without P2P (2x H200, P2P off: 2.4 ms a mixtral layer at 16 tokens per rank
    # against a 0.33 ms weight floor, docs/PERF.md); the bound keeps the exchange's padded
    # buffers (ep x tokens x top-k rows) to a few hundred MB next to a nearly full card
    prefill_exchange_tokens: int = 2048

    def with_sampling(self, defaults: Optional[Mapping[str, Any]] = None) -> GenerateConf:
        """A copy with every sampling field set: its own value, else ``defaults`` (what a
        checkpoint's generation_config.json gives), else SAMPLING_DEFAULTS."""
        defaults = defaults or {}
        chosen = {}
        for name, builtin in SAMPLING_DEFAULTS.items():
            value = getattr(self, name)
            chosen[name] = value if value is not None else defaults.get(name, builtin)
        return replace(self, **chosen)

    def check(self, prefix: str = "generate") -> None:
        """Refuse values generation cannot run with; ``prefix`` names the fields in the
        message (``generate`` or ``sample``). Unset sampling fields pass."""
        if self.max_new_tokens < 1:
            raise ConfigError(
                f"{prefix}.max_new_tokens={self.max_new_tokens}; it must be at least 1"
            )
        if self.max_batch_size < 1:
            raise ConfigError(
                f"{prefix}.max_batch_size={self.max_batch_size}; it must be at least 1"
            )
        if self.temperature is not None and self.temperature < 0:
            raise ConfigError(
                f"{prefix}.temperature={self.temperature}; use 0 (greedy) or a positive value"
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}.top_p={self.top_p}; use a value in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"{prefix}.top_k={self.top_k}; use 0 (off) or a positive count")
        if self.pipeline_microbatches is not None and self.pipeline_microbatches < 1:
            raise ConfigError(
                f"{prefix}.pipeline_microbatches={self.pipeline_microbatches}; use null "
                f"(one per pipeline stage), 1 (one batch at a time) or more"
            )
        if self.prefill_chunk is not None and self.prefill_chunk < 0:
            raise ConfigError(
                f"{prefix}.prefill_chunk={self.prefill_chunk}; use 0 (whole prompt) or a "
                f"positive number of prompt positions"
            )
        if self.prefill_exchange_tokens < 0:
            raise ConfigError(
                f"{prefix}.prefill_exchange_tokens={self.prefill_exchange_tokens}; use 0 "
                f"(chunks of exactly prefill_chunk) or a positive token count"
            )


@dataclass
class InferConf:
    # conf/model/<name>.yaml: Hugging Face config.json keys plus name / tokenizer / weights /
    # init_seed, validated by its family (moe_ext.model.families); checkpoint= replaces it
    model: Any = MISSING
    strategy: StrategyConf = MISSING
    parallel: ParallelConf = field(default_factory=ParallelConf)
    # kind auto: probe; `+topology=pcie` forces one; `topology.gpu_memory_gib=96` alone
    # plans for the probed GPUs with that much memory each
    topology: TopologyConf = field(default_factory=TopologyConf)
    plan: PlanConf = field(default_factory=PlanConf)  # plan.profile=<file> for strategy=auto
    engine: str = "native"  # native | megatron
    checkpoint: Optional[str] = None  # moe_ext or Hugging Face directory; None: random init
    checkpoint_verify: bool = False  # hash every shard as it loads (see docs/RELIABILITY.md)
    prompts: Optional[str] = None  # JSONL; None: built-in demo prompts
    output: Optional[str] = None  # JSONL written by rank 0
    generate: GenerateConf = field(default_factory=GenerateConf)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp16 | fp32, or bfloat16 / float16 / half /
    # float32 (moe_ext.launching.DTYPE_ALIASES)
    dtype: str = "auto"
    dist_timeout_s: int = 300  # collective timeout: a stuck peer is an error, not a hang
    # check every process group's all-reduce and a peer copy before loading (moe_ext.preflight);
    # None: on for GPU runs, off on CPU
    preflight: Optional[bool] = None
    debug: bool = False  # errors also print their chained traceback (as MOE_EXT_DEBUG=1)


@dataclass
class ServerConf:
    """launch/serve.py's server and engine sizes (moe_ext.serve)."""

    host: str = "127.0.0.1"  # 0.0.0.0 serves other machines too
    port: int = 8000
    max_queue: int = 256  # requests waiting for a KV row; one more is a 429
    max_batch_size: int = 32  # KV-cache rows per data-parallel replica (running requests)
    # prompt tokens a replica prefills per step beside its decodes: larger spreads each
    # eager forward's host cost over more tokens, smaller stalls running decodes less
    # (docs/PERF.md "Serving": 8192 against 2048 at 64 clients, qwen3_30b_a3b on one H200:
    # 1.48x the output tok/s, inter-token p99 445 against 353 ms)
    prefill_chunk: int = 8192
    # prompt + max_tokens limit and each row's KV slots; None: the model's context, at most
    # DEFAULT_SERVE_CONTEXT (rows x context slots are allocated up front)
    max_context: Optional[int] = None
    model_name: Optional[str] = None  # the name clients send; None: conf/model or checkpoint dir
    cuda_graphs: bool = True  # GPU: CUDA-graph decode per batch bucket
    compile_decode: bool = True  # GPU: torch.compile each block's decode step (as infer)
    # torch.profiler over engine steps profile_skip+1 .. profile_skip+profile_steps, every
    # rank: <profile_dir>/serve_rank{r}.json (trace) and .txt (ops by time); None: off
    profile_dir: Optional[str] = None
    profile_steps: int = 32
    profile_skip: int = 16

    def check(self) -> None:
        """Refuse sizes the server cannot run with (one line: field, value, fix)."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port={self.port}; use a port in 0..65535 (0: any free one)")
        for name in ("max_queue", "max_batch_size", "prefill_chunk", "profile_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server.{name}={getattr(self, name)}; it must be at least 1")
        if self.profile_skip < 0:
            raise ConfigError(
                f"server.profile_skip={self.profile_skip}; use 0 (from the first step) or more"
            )
        if self.max_context is not None and self.max_context < 2:
            raise ConfigError(
                f"server.max_context={self.max_context}; it must hold a prompt and a token (>= 2)"
            )


DEFAULT_SERVE_CONTEXT = 4096


@dataclass
class ServeConf:
    """launch/serve.py: InferConf's model / strategy / parallel / topology / dtype fields
    (same meaning), no prompts or output, and ``server.*``. Sampling defaults for requests
    that leave them unset come from the checkpoint's generation_config.json."""

    model: Any = MISSING
    strategy: StrategyConf = MISSING
    parallel: ParallelConf = field(default_factory=ParallelConf)
    topology: TopologyConf = field(default_factory=TopologyConf)
    plan: PlanConf = field(default_factory=PlanConf)
    server: ServerConf = field(default_factory=ServerConf)
    checkpoint: Optional[str] = None  # moe_ext or Hugging Face directory; None: random init
    checkpoint_verify: bool = False
    seed: int = 0  # the engine's generator for sampled requests without a seed
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # as InferConf.dtype
    dist_timeout_s: int = 300  # collective timeout: a dead rank ends the server (503, exit 1)
    preflight: Optional[bool] = None
    debug: bool = False


GROUPS = ("model", "strategy", "parallel", "topology")


def schema_name(group: str) -> str:
    """The root config an option of ``group`` starts from: ``defaults: [/<this>@_here_]``."""
    return f"{group}_schema"


def check_group_choices(overrides: list[str], conf_dir: Path) -> None:
    """Reject ``strategy=ep_foo`` / ``+topology=infiniband`` with one line listing the choices
    (Hydra's own message spans a dozen lines), and ``topology=pcie`` without its ``+`` (the
    group is not in the defaults: leaving it out means probe). The choices are the yaml
    files of ``conf_dir/<group>/``; the schemas are not among them."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        choices = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        plus = "+" if key == "topology" else ""
        if value not in choices:
            raise ConfigError(
                f"unknown {key} {value!r}; choose one of {', '.join(choices)} "
                f"({plus}{key}=<name>, files in conf/{key}/)"
            )
        if plus and not override.startswith(("+", "~")):
            raise ConfigError(
                f"{override}: the topology group is added, not replaced; type +{key}={value}"
            )


def register_configs() -> None:
    """Register the schemas; idempotent, called by every Hydra main before it runs."""
    cs = ConfigStore.instance()
    cs.store(name="infer_schema", node=InferConf)
    cs.store(name="serve_schema", node=ServeConf)
    cs.store(name=schema_name("topology"), node=TopologyConf)
    cs.store(name=schema_name("strategy"), node=StrategyConf)
    cs.store(name=schema_name("parallel"), node=ParallelConf)

"""Training throughput of one model shape under several systems, in one process group
(tools/bench_train.py is the command line around it).

# B micro-batch (sequences per data-parallel rank), S sequence length, W world size,
# H hidden, E experts, k top-k, L layers

A *case* is (system, strategy) on a ``conf/model`` shape cut to ``layers`` layers:

| system    | model                         | MoE layer                     | engine          |
|-----------|-------------------------------|-------------------------------|-----------------|
| deepspeed | native Transformer            | ours, the strategy dispatcher | DeepSpeed       |
| megatron  | Megatron GPTModel, local spec | ours (MoEExtLayer)            | engine=megatron |
| mcore_a2a | Megatron GPTModel, local spec | Megatron's MoELayer, alltoall | engine=megatron |
| mcore_ag  | Megatron GPTModel, local spec | Megatron's MoELayer, allgather| engine=megatron |
| ds_moe    | native Transformer            | deepspeed.moe.layer.MoE       | DeepSpeed       |

Peers (the last three) run expert parallelism over all ranks (EP = W, tp = pp = 1),
random weights, the same batch shape, dtype, optimizer settings and aux-loss weight.
Without Transformer Engine the Megatron GPTModels use the local spec: unfused attention
(scores materialised) and, for Megatron's MoELayer, SequentialMLP experts (one GEMM pair
per local expert); DeepSpeed's MoE also loops over its local experts. The native model
attends with torch SDPA.

A step is launch/train.py's own (``moe_ext.train.loop.Trainer.train_step`` on random
tokens): forward (LM + weighted aux loss), backward with the engine's gradient reduction,
clipping, optimizer step, and the data-parallel mean of the losses read back to the host
(the step's end). ``warmup`` untimed steps, then ``steps`` timed ones (the Trainer's
wall clock per step). ZeRO on the Megatron systems (bf16) is Megatron's
DistributedOptimizer. The row reports the slowest rank's median step, tokens/s = dp x B
x S / that, and MFU = tokens/s x model FLOPs per token
(``moe_ext.cost.train_flops_per_token``: 6 x active matrix parameters + attention) /
(W x ``peak_tflops``). Peak memory per rank: ``torch.cuda.max_memory_allocated`` over the
warm-up and timed steps, weights and optimizer states included (CPU: the process's peak
resident set, for the record only).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import socket
import statistics
import sys
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from moe_ext.dist import peak_memory_bytes
from moe_ext.errors import MoeExtError

SYSTEMS = ("deepspeed", "megatron", "mcore_a2a", "mcore_ag", "ds_moe")
PEER_SYSTEMS = {"mcore_a2a": "alltoall", "mcore_ag": "allgather", "ds_moe": None}
NATIVE_STRATEGIES = ("replicate", "tp_experts", "ep_allgather", "ep_nccl", "ep_nvshmem")
PEER_STRATEGY = "ep"  # the strategy column of a peer row: EP over all ranks
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class BenchTrainError(MoeExtError):
    """A benchmark case that cannot run as asked (one line: problem and fix)."""


@dataclass(frozen=True)
class TrainCase:
    """One benchmark case; every rank runs it with the same values."""

    model: str  # conf/model name
    layers: Optional[int]  # cut the model to this many layers (None: all)
    system: str  # one of SYSTEMS
    strategy: str  # a native strategy, or PEER_STRATEGY for the peers
    micro_batch: int = 8
    seq_len: int = 2048
    steps: int = 10
    warmup: int = 3
    dtype: str = "bf16"
    zero_stage: int = 1  # DeepSpeed systems
    grad_clip: float = 0.0
    aux_loss_coeff: float = 0.01
    lr: float = 1e-4
    peak_tflops: float = 790.0  # dense peak of one device in this dtype (H200 bf16)
    activation_checkpointing: bool = False  # native model (deepspeed, ds_moe)


@dataclass
class TrainRow:
    model: str
    layers: int
    system: str
    strategy: str
    world: int
    link: str  # "p2p_off", "default" or "cpu"
    dtype: str
    micro_batch: int
    seq_len: int
    zero_stage: int
    grad_clip: float
    status: str  # ok | error: ...
    step_ms: Optional[float] = None  # slowest rank's median
    step_p10_ms: Optional[float] = None
    step_p90_ms: Optional[float] = None
    tokens_per_s: Optional[float] = None  # all ranks together
    mfu: Optional[float] = None  # fraction of W x peak_tflops
    flops_per_token: Optional[float] = None
    peak_mem_gib: list = field(default_factory=list)  # per rank
    params_per_rank: list = field(default_factory=list)
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    plan: str = ""
    steps: int = 0
    warmup: int = 0
    peak_tflops: float = 0.0
    host: str = ""
    versions: dict = field(default_factory=dict)


# ---- the model shape ---------------------------------------------------------------------


def bench_model_args(name: str, layers: Optional[int], repo: Optional[Path] = None):
    """ModelArgs of ``conf/model/<name>.yaml`` cut to its first ``layers`` layers (per-layer
    lists cut alike), random weights (no checkpoint)."""
    from omegaconf import OmegaConf

    from moe_ext.model import ModelArgs

    root = repo or Path(__file__).resolve().parents[2]
    path = root / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / "conf" / "model").glob("*.yaml"))
        raise BenchTrainError(f"no model config {path}; choose one of {known}")
    conf = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    conf["weights"] = None
    if layers is not None:
        if not 1 <= layers <= conf["num_hidden_layers"]:
            raise BenchTrainError(
                f"--layers {layers}: {name} has {conf['num_hidden_layers']} layers; "
                f"give 1..{conf['num_hidden_layers']}"
            )
        conf["num_hidden_layers"] = layers
        for key in ("layer_types",):
            if isinstance(conf.get(key), list):
                conf[key] = conf[key][:layers]
        if isinstance(conf.get("mlp_only_layers"), list):
            conf["mlp_only_layers"] = [i for i in conf["mlp_only_layers"] if i < layers]
    return ModelArgs.from_model_conf(conf)


def check_case(case: TrainCase, world: int, device_type: str) -> None:
    """Refuse a case before any group or weight exists (BenchTrainError)."""
    if case.system not in SYSTEMS:
        raise BenchTrainError(f"unknown system {case.system!r}; choose from {SYSTEMS}")
    if case.system in PEER_SYSTEMS:
        if case.strategy != PEER_STRATEGY:
            raise BenchTrainError(
                f"peer {case.system} runs EP over all ranks only (strategy "
                f"{PEER_STRATEGY!r}), not {case.strategy!r}"
            )
    elif case.strategy not in NATIVE_STRATEGIES:
        raise BenchTrainError(
            f"unknown strategy {case.strategy!r}; choose from {NATIVE_STRATEGIES}"
        )
    if case.dtype not in DTYPES:
        raise BenchTrainError(f"dtype {case.dtype!r}; choose from {sorted(DTYPES)}")
    if case.dtype == "bf16" and device_type == "cpu":
        raise BenchTrainError("bf16 training runs on CUDA; on CPU pass --dtype fp32")
    if case.dtype == "bf16" and case.zero_stage == 0 and not _uses_megatron(case):
        raise BenchTrainError(
            "DeepSpeed bf16 training needs --zero-stage 1 or 2 (fp32 masters); or --dtype fp32"
        )
    for name in ("micro_batch", "seq_len", "steps"):
        if getattr(case, name) < 1:
            raise BenchTrainError(f"{name}={getattr(case, name)}; it must be at least 1")


def case_plan(case: TrainCase, world: int, args: Any):
    """The ParallelPlan of a case: the strategy's own degrees, or EP = world for peers."""
    from moe_ext.plan import plan_with_degrees

    if case.system in PEER_SYSTEMS:
        if args.num_experts % world:
            raise BenchTrainError(
                f"{args.num_experts} experts do not split over {world} ranks; run the "
                f"peers with a world size that divides the expert count"
            )
        return plan_with_degrees("ep_nccl", world, reason="benchmark peer: EP = world")
    tp = world if case.strategy == "tp_experts" else 1
    return plan_with_degrees(case.strategy, world, tp=tp, reason="bench_train", model=args)


_GROUPS: dict[tuple, Any] = {}


def groups_for(plan: Any, timeout_s: float = 300.0) -> Any:
    """One ProcessGroups per set of degrees for the whole process (collective on first
    use): DeepSpeed's group registry and Megatron's parallel_state hold on to the first
    set they see, and plans of equal degrees (ep_nccl, ep_allgather, the peers) share it."""
    from moe_ext.groups import ProcessGroups

    key = (plan.world_size, plan.tp, plan.pp, plan.dp, plan.ep, plan.etp, plan.edp)
    if key not in _GROUPS:
        _GROUPS[key] = ProcessGroups.build(plan, dist.get_backend(), timedelta(seconds=timeout_s))
    return _GROUPS[key]


# ---- building each system ----------------------------------------------------------------


def _source(args: Any, name: str):
    from moe_ext.launching import ModelSource

    return ModelSource(args, name, None, None, False)


def _native_model(case: TrainCase, args: Any, plan: Any, groups: Any, device: torch.device):
    from moe_ext.launching import build_model_shard

    rank = dist.get_rank()
    return build_model_shard(
        _source(args, case.model), plan, groups, rank, device, torch.float32, False
    )


def _deepspeed_engine(case: TrainCase, model: nn.Module, groups: Any) -> Any:
    from moe_ext.deepspeed.engine import build_engine

    return build_engine(
        model,
        groups,
        lr=case.lr,
        weight_decay=0.0,
        betas=(0.9, 0.95),
        micro_batch=case.micro_batch,
        zero_stage=case.zero_stage,
        grad_clip=case.grad_clip,
        aux_loss_coeff=case.aux_loss_coeff,
        z_loss_coeff=0.0,
        dtype=DTYPES[case.dtype],
    )


class DeepSpeedMoEBlock(nn.Module):
    """deepspeed.moe.layer.MoE in the place of a native MoE block: ``forward(x[B, S, H])
    -> y[B, S, H]``; ``aux_loss`` is DeepSpeed's gate loss of the last forward (the
    native loss adds ``aux_loss_coeff`` times it, as for our router's)."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe
        self.aux_loss: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, l_aux, _ = self.moe(x)
        self.aux_loss = l_aux
        return y


def _ds_moe_model(case: TrainCase, args: Any, plan: Any, groups: Any, device: torch.device):
    """The native model with every MoE block replaced by DeepSpeed's MoE (EP = world on
    ``groups``, registered as DeepSpeed's; the engine attaches each layer to it): SwiGLU
    experts of (H, F), top-k gate without token dropping, random weights (N(0, 1/fan_in))."""
    from deepspeed.moe.layer import MoE

    from moe_ext.bench.peers import SwiGLUExpert, _random_init_

    model = _native_model(case, args, plan, groups, device)
    groups.register_deepspeed_groups()
    H, F, E, k = (
        args.hidden_size,
        args.moe_intermediate_size,
        args.num_experts,
        args.num_experts_per_tok,
    )
    for block in model.layers.values():
        if not block.is_moe:
            continue
        with torch.device(device):
            moe = MoE(
                H,
                SwiGLUExpert(H, F),
                num_experts=E,
                ep_size=plan.ep,
                k=k,
                min_capacity=0,
                drop_tokens=False,
                use_rts=False,
                top2_2nd_expert_sampling=False,
            )
        _random_init_(moe)
        block.mlp = DeepSpeedMoEBlock(moe.to(device))
    return model


def _mcore_peer_model(
    case: TrainCase, args: Any, plan: Any, groups: Any, device: torch.device, dispatcher: str
) -> nn.Module:
    """Megatron-core GPTModel of the native shape with Megatron's own MoELayer (local
    spec, ``dispatcher``), random weights (N(0, 1/fan_in), norms 1)."""
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs

    from moe_ext.bench.peers import _random_init_
    from moe_ext.megatron.config import gpt_model_kwargs, uninitialised_transformer_config
    from moe_ext.megatron.state import install_parallel_state_and_rng, pg_collection

    dtype = DTYPES[case.dtype]
    install_parallel_state_and_rng(groups, args.init_seed, device)
    config = uninitialised_transformer_config(
        args,
        plan,
        dtype,
        device,
        moe_token_dispatcher_type=dispatcher,
        moe_aux_loss_coeff=case.aux_loss_coeff * args.num_experts_per_tok,
    )
    spec = gpt_layer_specs.get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization="RMSNorm", pp_rank=0
    )
    model = GPTModel(config, spec, pg_collection=pg_collection(groups), **gpt_model_kwargs(args))
    model = model.to(device=device, dtype=dtype)
    _random_init_(model)
    return model


def _megatron_engine(case: TrainCase, gpt: nn.Module, groups: Any) -> Any:
    from moe_ext.megatron.engine import megatron_train_engine

    return megatron_train_engine(
        gpt,
        groups,
        dtype=DTYPES[case.dtype],
        lr=case.lr,
        weight_decay=0.0,
        betas=(0.9, 0.95),
        aux_loss_coeff=case.aux_loss_coeff,
        z_loss_coeff=0.0,
        grad_clip=case.grad_clip,
        distributed_optimizer=case.zero_stage > 0 and case.dtype == "bf16",
    )


def build_case_engine(case: TrainCase, args: Any, plan: Any, groups: Any, device: torch.device):
    """The training engine of a case on this rank: ``engine(batch[B, S+1]) -> (loss, lm,
    aux)``, ``engine.backward(loss)``, ``engine.step()``, ``engine.module.model``."""
    if case.system == "deepspeed":
        return _deepspeed_engine(case, _native_model(case, args, plan, groups, device), groups)
    if case.system == "ds_moe":
        return _deepspeed_engine(case, _ds_moe_model(case, args, plan, groups, device), groups)
    if case.system == "megatron":
        from moe_ext.megatron.engine import build_megatron_model, check_plan

        check_plan(plan, args, training=True)
        native = _native_model(case, args, plan, groups, device)
        gpt = build_megatron_model(
            _source(args, case.model),
            plan,
            groups,
            dist.get_rank(),
            device,
            DTYPES[case.dtype],
            native=native,
            aux_loss_coeff=case.aux_loss_coeff,
        )
        del native
        return _megatron_engine(case, gpt, groups)
    gpt = _mcore_peer_model(case, args, plan, groups, device, PEER_SYSTEMS[case.system])
    return _megatron_engine(case, gpt, groups)


# ---- timing ------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: a step's wall-clock boundary


def _uses_megatron(case: TrainCase) -> bool:
    return case.system in ("megatron", "mcore_a2a", "mcore_ag")


def loop_conf(case: TrainCase) -> Any:
    """The ``train.*`` settings of launch/train.py for a case (no evaluation, no warm-up of
    the learning rate: a constant ``lr``)."""
    from moe_ext.train.config import TrainLoopConf

    return TrainLoopConf(
        steps=case.warmup + case.steps,
        lr=case.lr,
        warmup_steps=0,
        min_lr_ratio=1.0,
        grad_clip=case.grad_clip,
        micro_batch=case.micro_batch,
        seq_len=case.seq_len,
        aux_loss_coeff=case.aux_loss_coeff,
        zero_stage=case.zero_stage,
        activation_checkpointing=case.activation_checkpointing,
        eval_batches=0,
        val_fraction=0.0,
    )


def time_case(
    engine: Any,
    case: TrainCase,
    groups: Any,
    vocab: int,
    device: torch.device,
    progress: bool = False,
) -> dict[str, Any]:
    """Warm-up then timed steps of launch/train.py's Trainer on random tokens; this rank's
    step seconds (the Trainer's: forward to the losses read back), losses and peak memory."""
    from tqdm.auto import tqdm

    from moe_ext.train.data import TokenData
    from moe_ext.train.loop import Trainer, trainer_clips

    gen = torch.Generator().manual_seed(1234)
    tokens = max(1 << 20, 4 * groups.plan.dp * case.micro_batch * (case.seq_len + 1))
    data = TokenData(
        train=torch.randint(0, vocab, (tokens,), generator=gen),
        val=torch.zeros(0, dtype=torch.long),
        source="random tokens",
    )
    conf = loop_conf(case)
    engine_name = "megatron" if _uses_megatron(case) else "deepspeed"  # as launch/train.py
    own = trainer_clips(engine_name, DTYPES[case.dtype])
    trainer = Trainer(engine, groups, data, conf, device, own_clipping=own)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, losses = [], []
    total = case.warmup + case.steps
    with tqdm(
        total=total, disable=not progress, unit="step", desc=f"{case.system}/{case.strategy}"
    ) as bar:
        for step in range(total):
            record = trainer.train_step(step)
            if step >= case.warmup:
                seconds.append(record["seconds"])
            losses.append(record["lm_loss"])
            bar.set_postfix(loss=f"{record['lm_loss']:.3f}")
            bar.update(1)
    _sync(device)
    return {
        "seconds": seconds,
        "losses": losses,
        "peak_mem_gib": peak_memory_bytes(device) / 2**30,
        "params": sum(p.numel() for p in engine.module.parameters()),
        "dp": groups.plan.dp,
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(case: TrainCase, per_rank: list[dict[str, Any]], flops_per_token: float) -> dict:
    """Row figures from every rank's ``time_case`` result: the slowest rank's median."""
    medians = [statistics.median(r["seconds"]) for r in per_rank]
    slow = per_rank[max(range(len(per_rank)), key=lambda i: medians[i])]
    step_s = max(medians)
    world = len(per_rank)
    tokens_per_s = per_rank[0]["dp"] * case.micro_batch * case.seq_len / step_s
    return dict(
        step_ms=step_s * 1e3,
        step_p10_ms=_percentile(slow["seconds"], 0.1) * 1e3,
        step_p90_ms=_percentile(slow["seconds"], 0.9) * 1e3,
        tokens_per_s=tokens_per_s,
        mfu=tokens_per_s * flops_per_token / (world * case.peak_tflops * 1e12),
        flops_per_token=flops_per_token,
        peak_mem_gib=[round(r["peak_mem_gib"], 3) for r in per_rank],
        params_per_rank=[r["params"] for r in per_rank],
        first_loss=per_rank[0]["losses"][0],
        last_loss=per_rank[0]["losses"][-1],
    )


@contextlib.contextmanager
def _case_scope(device: torch.device) -> Iterator[None]:
    """Megatron's parallel_state is reset and memory given back after every case."""
    try:
        yield
    finally:
        try:
            from moe_ext.megatron.state import uninstall_parallel_state

            uninstall_parallel_state()
        except ImportError:
            pass
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_case(
    case: TrainCase, device: torch.device, link: str, progress: bool = False
) -> Optional[TrainRow]:
    """Run one case on every rank (collective); rank 0 gets its row, the others None. A
    failure on any rank becomes an ``error: ...`` row (every rank takes part in the
    agreement, so the next case starts together)."""
    from moe_ext.bench.peers import library_versions
    from moe_ext.cost import train_flops_per_token

    world, rank = dist.get_world_size(), dist.get_rank()
    row = TrainRow(
        model=case.model,
        layers=case.layers or 0,
        system=case.system,
        strategy=case.strategy,
        world=world,
        link=link,
        dtype=case.dtype,
        micro_batch=case.micro_batch,
        seq_len=case.seq_len,
        zero_stage=case.zero_stage,
        grad_clip=case.grad_clip,
        status="ok",
        steps=case.steps,
        warmup=case.warmup,
        peak_tflops=case.peak_tflops,
        host=socket.gethostname(),
        versions=library_versions(),
    )
    result: Any
    with _case_scope(device):
        try:
            check_case(case, world, device.type)
            args = bench_model_args(case.model, case.layers)
            row.layers = args.num_hidden_layers
            plan = case_plan(case, world, args)
            row.plan = plan.describe().split(" | ")[0]
            groups = groups_for(plan)
            engine = build_case_engine(case, args, plan, groups, device)
            result = time_case(engine, case, groups, args.vocab_size, device, progress)
            flops = train_flops_per_token(args, case.seq_len).total
            del engine
        except Exception as err:  # noqa: BLE001 - becomes the row's status
            print(
                f"[rank {rank}] {case.system}/{case.strategy} failed:\n{traceback.format_exc()}",
                file=sys.stderr,
                flush=True,
            )
            first = (str(err).splitlines() or [type(err).__name__])[0]
            result = f"error: {type(err).__name__}: {first}"[:300]
            flops = 0.0
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, result)
    if rank != 0:
        return None
    errors = [r for r in gathered if isinstance(r, str)]
    if errors:
        row.status = errors[0]
        return row
    for key, value in summarize(case, gathered, flops).items():
        setattr(row, key, value)
    return row


# ---- rows on disk, table and chart -------------------------------------------------------


def row_key(row: TrainRow) -> tuple:
    return (
        row.model,
        row.layers,
        row.system,
        row.strategy,
        row.world,
        row.link,
        row.dtype,
        row.micro_batch,
        row.seq_len,
    )


def load_rows(path: Path) -> list[TrainRow]:
    names = {f.name for f in fields(TrainRow)}
    data = json.loads(Path(path).read_text())
    return [TrainRow(**{k: v for k, v in d.items() if k in names}) for d in data["rows"]]


def merge_rows(path: Path, new_rows: list[TrainRow]) -> list[TrainRow]:
    """Rows of ``path`` (if any) with ``new_rows`` replacing those of the same key;
    written back (to a temporary file, then renamed)."""
    rows = load_rows(path) if Path(path).is_file() else []
    fresh = {row_key(r) for r in new_rows}
    rows = [r for r in rows if row_key(r) not in fresh] + list(new_rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    tmp.replace(path)
    return rows


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def mfu_text(mfu: Optional[float]) -> str:
    """``12.3%``; two significant digits below 0.1% (CPU runs); ``-`` when unknown."""
    if mfu is None:
        return "-"
    percent = 100 * mfu
    return f"{percent:.1f}%" if percent >= 0.1 else f"{percent:.2g}%"


def format_table(rows: list[TrainRow]) -> str:
    """One line per row: model, system/strategy, world, link, tokens/s, MFU, step, memory."""
    head = (
        f"{'model':<18} {'system':<10} {'strategy':<13} {'W':>2} {'link':<8} {'dtype':<5} "
        f"{'tok/s':>10} {'MFU':>6} {'step ms':>9} {'peak GiB/rank':>16}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = "/".join(f"{m:.1f}" for m in r.peak_mem_gib) or "-"
        mfu = mfu_text(r.mfu)
        lines.append(
            f"{r.model + ':' + str(r.layers) + 'L':<18} {r.system:<10} {r.strategy:<13} "
            f"{r.world:>2} {r.link:<8} {r.dtype:<5} {_fmt(r.tokens_per_s, ',.0f'):>10} "
            f"{mfu:>6} {_fmt(r.step_ms, '.1f'):>9} {mem:>16}  {r.status}"
        )
    return "\n".join(lines)


def plot(rows: list[TrainRow], path: Path) -> None:
    """Bar chart: tokens/s (and MFU on the bars) per system/strategy, one panel per
    (model, world, link, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[TrainRow]] = {}
    for r in rows:
        if r.status == "ok":
            panels.setdefault((r.model, r.layers, r.world, r.link, r.dtype), []).append(r)
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for ax, (key, mine) in zip(axes[:, 0], sorted(panels.items())):
        model, layers, world, link, dtype = key
        labels = [f"{r.system}\n{r.strategy}" for r in mine]
        values = [r.tokens_per_s / 1e3 for r in mine]
        colors = ["tab:blue" if r.system in ("deepspeed", "megatron") else "tab:gray" for r in mine]
        bars = ax.bar(range(len(mine)), values, color=colors)
        for bar, r in zip(bars, mine):
            ax.annotate(
                f"{mfu_text(r.mfu)} MFU",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(range(len(mine)), labels, fontsize=8)
        ax.set_ylabel("K tokens/s")
        ax.set_title(
            f"{model} ({layers} layers), world {world}, {link}, {dtype}, "
            f"B={mine[0].micro_batch} x S={mine[0].seq_len}"
        )
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

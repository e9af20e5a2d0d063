"""Helpers shared by the test files; no test file imports another.

Sections (in this order):
- paths: REPO, TOOLS, TINY_CHECKPOINT
- several ranks: run_ranks (spawned gloo/NCCL ranks), torchrun (the command prefix),
  run_launcher (launch/*.py as a subprocess), free_port; the multirank guard
- launcher configs and model arguments: tiny_conf, model_conf, tiny_args, qwen2_args,
  plan_of, layout_plan
- checkpoints on disk: write_tiny_checkpoint, family_args, write_family_checkpoint,
  export_megatron_families, make_infer_checkpoints
- the launcher on ranks: launcher_conf, launcher_generate, check_launcher_cases
- Hugging Face reference models: HF_PROMPTS, HF_EOS, hf_model, hf_greedy, hf_greedy_each,
  left_pad; DeepSeek: DEEPSEEK_VARIANTS, deepseek_hf_config, deepseek_hf_model, randomize_;
  GLM-4.5 and MiniMax-M2: GLM_PROMPTS, GLM_NEW_TOKENS, GLM_VARIANTS, glm_hf_model,
  randomize_glm, MINIMAX_VARIANTS, minimax_hf_model, native_from_dir, masked_logits,
  check_against_transformers, check_compiled_decode; gpt-oss: GPT_OSS_WINDOW,
  GPT_OSS_PROMPTS, GPT_OSS_NEW_TOKENS, GPT_OSS_SHAPE, gpt_oss_hf_model, gpt_oss_native_state
- MoE references (float64, independent of moe_ext.moe): RoutingSpec, reference_gates,
  reference_moe, swiglu
- dispatcher cases: H, F_EXPERT, E, FS, CASES, case_tensors, build_case_layer, check_close,
  check_strategy; the static exchange: STATIC, static_dispatcher,
  check_static_equals_dynamic, no_sync_body; assert_nvshmem_refusal
- Megatron-core: MEGATRON_H, MEGATRON_E, megatron_config, megatron_plan, megatron_args
- Triton: HAS_TRITON, needs_triton, interpreted, needs_interpreter,
  run_cpu_cases_in_interpreter, graph_recorder, count_op_nodes, capture_compiled

Tests that start ranks live in tests/multirank/ (tests/conftest.py marks them); run_ranks
and torchrun fail a test that is not marked ``multirank``.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moe_ext.launching import end_child_processes

# ==== paths ===============================================================================

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
TINY_CHECKPOINT = REPO / "moe_ext" / "data" / "checkpoints" / "tiny"

# ==== several ranks =======================================================================

# Whether the running test is marked multirank: set by tests/conftest.py around each test,
# None outside a test (then nothing is checked).
current_test_is_multirank: Optional[bool] = None


def require_multirank(what: str) -> None:
    """Fail the running test unless it is marked ``multirank`` (it is about to start ranks)."""
    if current_test_is_multirank is False:
        pytest.fail(
            f"{what} starts ranks, but this test is not marked multirank: move it to "
            "tests/multirank/ (or mark it @pytest.mark.multirank)",
            pytrace=False,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank, world_size, port, store_path, backend, fn, args, errors):
    # MASTER_* for code under test that reads them; the ranks meet through a file store:
    # a TCP store on a port picked in advance can lose it to another process (EADDRINUSE
    # seen on the GPU machine)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = 0
    try:
        extra = {}
        if backend == "nccl":  # one GPU per rank, bound before NCCL or NVSHMEM start
            torch.cuda.set_device(rank)
            extra["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=120),
            **extra,
        )
        fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent test
        tb = traceback.format_exc()
        # printed at once as well: a peer left waiting in a collective turns the run into a
        # timeout, and this may then be the only trace of the cause
        print(f"rank {rank} failed:\n{tb}", file=sys.stderr, flush=True)
        errors.put((rank, tb))
        code = 1
    # NCCL groups are not destroyed: after CUDA-graph-captured NCCL collectives
    # destroy_process_group blocked on 2xH200 (see moe_ext.launching.exit_now).
    if dist.is_initialized() and backend != "nccl":
        dist.destroy_process_group()
    end_child_processes()  # os._exit would orphan them (Megatron's checkpoint writer)
    # Skip interpreter teardown: a C++ worker thread left joinable by a library (seen with
    # DeepSpeed on gloo, about 1 run in 10) aborts the process there with "terminate called
    # without an active exception", after every check has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(fn, world_size: int, args: tuple = (), backend: str = "gloo") -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks (gloo on CPU,
    or NCCL with one GPU per rank) and raise the first rank's failure.

    ``fn`` must be a module-level function (it is pickled into the spawned processes);
    torch.distributed is initialised before it runs and destroyed after. Only for tests
    marked ``multirank``. A start that fails inside gloo's connection set-up (seen once in
    ~900 tests on a loaded 2-core machine: "connectFullMesh failed ... Connection closed by
    peer") is retried once: no rank has run ``fn`` then, so the retry is a clean start."""
    require_multirank(f"run_ranks(world_size={world_size})")
    for attempt in (1, 2):
        failure = _spawn_ranks(fn, world_size, args, backend)
        if failure is None:
            return
        rank, tb = failure
        if not (attempt == 1 and "init_process_group" in tb and "connectFullMesh" in tb):
            raise AssertionError(f"rank {rank} failed:\n{tb}")


def _spawn_ranks(fn, world_size: int, args: tuple, backend: str) -> Optional[tuple[int, str]]:
    """One start of ``world_size`` ranks: None when all succeed, else the first failing
    rank's (rank, traceback)."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    store_dir = tempfile.mkdtemp(prefix="moe_ext_ranks_")
    store_path = os.path.join(store_dir, "store")
    procs = [
        ctx.Process(
            target=_rank_entry, args=(r, world_size, port, store_path, backend, fn, args, errors)
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 600
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            time.sleep(2)  # a rank failed; its peers may wait in a collective for good
            break
        time.sleep(0.1)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    shutil.rmtree(store_dir, ignore_errors=True)
    if not errors.empty():
        return errors.get()
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    assert not bad, f"ranks exited abnormally (rank, exitcode): {bad}"
    return None


def torchrun(nproc: int) -> list[str]:
    """The command that starts ``nproc`` ranks of a script: ``[*torchrun(2), script, ...]``.
    Only for tests marked ``multirank`` when ``nproc`` > 1."""
    if nproc > 1:
        require_multirank(f"torchrun --nproc-per-node={nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]


# NVLink multicast off for NCCL, torch symmetric memory and NVSHMEM (the GPU machines'
# rule); a test's torchrun on GPUs passes these
NCCL_TEST_ENV = dict(
    NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1"
)


def gpu_torchrun_env() -> dict[str, str]:
    """The environment of a test's torchrun over GPUs: this process's, one OpenMP thread,
    unbuffered output, NCCL_TEST_ENV."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **NCCL_TEST_ENV)


def run_launcher(
    script: Path,
    args: list[str],
    nproc: int = 1,
    env: dict | None = None,
    cwd: Path = REPO,
    timeout: float = 240,
) -> subprocess.CompletedProcess:
    """``script`` (launch/infer.py, launch/train.py) with Hydra overrides ``args``: plain
    python for one rank, torchrun for more. MOE_EXT_DEBUG is cleared, so errors are the
    one-line form unless ``env`` sets it."""
    environ = {k: v for k, v in os.environ.items() if k != "MOE_EXT_DEBUG"}
    environ.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    prefix = [sys.executable] if nproc == 1 else torchrun(nproc)
    return subprocess.run(
        [*prefix, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=environ,
    )


# ==== launcher configs and model arguments ================================================


def short_train_overrides(run_dir, steps: int, micro_batch: int = 2, save_every: int = 0):
    """launch/train.py overrides of a short test run writing into ``run_dir``: ``steps``
    steps of ``micro_batch`` sequences of 32 tokens, one warm-up step, no progress bar, no
    evaluation, a training checkpoint every ``save_every`` steps (0: none)."""
    return [
        f"hydra.run.dir={run_dir}",
        "progress=false",
        f"train.steps={steps}",
        "train.warmup_steps=1",
        f"train.micro_batch={micro_batch}",
        "train.seq_len=32",
        "train.eval_every=0",
        "train.eval_batches=1",
        f"train.save_every={save_every}",
    ]


DISPATCHERS = {
    "replicate": "moe_ext.moe.dispatch.local.LocalDispatcher",
    "tp_experts": "moe_ext.moe.dispatch.tp_sharded.TPShardedDispatcher",
    "ep_nccl": "moe_ext.moe.dispatch.nccl_a2a.AllToAllDispatcher",
    "ep_allgather": "moe_ext.moe.dispatch.allgather_rs.AllGatherDispatcher",
}


def tiny_conf(schema, **overrides):
    """``schema`` (InferConf / TrainConf) for the tiny model with dotted-key overrides,
    e.g. ``tiny_conf(TrainConf, **{"train.steps": 3})``."""
    from omegaconf import OmegaConf

    from moe_ext.config import ParallelConf, StrategyConf

    model = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny.yaml"))
    cfg = schema(model=model, strategy=StrategyConf(name="auto"), parallel=ParallelConf())
    for key, value in overrides.items():
        target = cfg
        *path, leaf = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return cfg


def model_conf(name: str):
    """conf/model/<name>.yaml as Hydra composes it."""
    from omegaconf import OmegaConf

    return OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")


def tiny_args():
    """ModelArgs of conf/model/tiny.yaml."""
    from moe_ext.model import ModelArgs

    return ModelArgs.from_model_conf(model_conf("tiny"))


def qwen2_args():
    """A small qwen2_moe: a dense layer (mlp_only_layers), a shared expert, q/k/v bias and
    nKV=1 < tp (kv replicated)."""
    from moe_ext.model import ModelArgs

    return ModelArgs(
        model_type="qwen2_moe",
        vocab_size=260,
        hidden_size=48,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        shared_expert_gate=True,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        qkv_bias=True,
    )


def plan_of(strategy, tp=1, pp=1, dp=1, ep=1, etp=1, world=2):
    """A ParallelPlan with the given degrees (edp derived), not validated."""
    from moe_ext.plan import ParallelPlan

    return ParallelPlan(
        strategy=strategy,
        world_size=world,
        tp=tp,
        pp=pp,
        dp=dp,
        ep=ep,
        etp=etp,
        edp=tp * dp // (ep * etp),
        dispatcher=DISPATCHERS[strategy],
        reason="test",
    )


def groups_per_layout(plan, cache: dict, backend: str = "gloo", timeout_s: float = 120.0):
    """ProcessGroups for ``plan`` built once per degree layout (tp, pp, dp, ep, etp) and
    kept in ``cache`` (DeepSpeed keeps a process-wide registry of expert groups by name, so
    plans with equal degrees must share the groups); returned with ``plan`` as their plan."""
    import dataclasses

    from moe_ext.groups import ProcessGroups

    key = (plan.tp, plan.pp, plan.dp, plan.ep, plan.etp)
    if key not in cache:
        cache[key] = ProcessGroups.build(plan, backend, datetime.timedelta(seconds=timeout_s))
    return dataclasses.replace(cache[key], plan=plan)


def sharded_random_model(args, plan, groups, device="cpu"):
    """This rank's shard of a Transformer of ``args`` under ``plan``: built on meta,
    parallelized over ``groups``, filled on ``device`` with the seeded random init (the same
    values as ``init_random_full``'s slices). Returns (model, its shard requests by name)."""
    from moe_ext.model import Transformer
    from moe_ext.model.parallelize import parallelize, shard_slices
    from moe_ext.model.weights import init_random_

    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, plan, groups)
    requests = shard_slices(plan, groups, args)
    init_random_(model, requests=requests, device=device)
    return model, requests


def deepspeed_test_engine(
    model,
    groups,
    *,
    lr,
    micro_batch,
    zero_stage,
    aux_loss_coeff,
    grad_clip=0.0,
    dtype=torch.float32,
    **extra,
):
    """moe_ext.deepspeed.engine.build_engine with the tests' fixed optimizer: AdamW betas
    (0.9, 0.95), no weight decay, no z loss. ``extra``: build_engine's other keywords."""
    from moe_ext.deepspeed.engine import build_engine

    return build_engine(
        model,
        groups,
        lr=lr,
        weight_decay=0.0,
        betas=(0.9, 0.95),
        micro_batch=micro_batch,
        zero_stage=zero_stage,
        grad_clip=grad_clip,
        aux_loss_coeff=aux_loss_coeff,
        z_loss_coeff=0.0,
        dtype=dtype,
        **extra,
    )


def layout_plan(strategy, world, tp=1, pp=1, ep=None):
    """A ParallelPlan for rank-layout tests: dp from world / (tp pp); ep (ep_nccl) defaults
    to tp dp; the dispatcher is a placeholder."""
    from moe_ext.plan import ParallelPlan

    dp = world // (tp * pp)
    if strategy == "replicate":
        ep_, etp, edp = 1, 1, tp * dp
    elif strategy == "tp_experts":
        ep_, etp, edp = 1, tp, dp
    else:
        ep_ = ep or tp * dp
        etp, edp = 1, tp * dp // ep_
    return ParallelPlan(strategy, world, tp, pp, dp, ep_, etp, edp, "d", "test")


# ==== checkpoints on disk =================================================================


def _write_moe_ext(
    directory: Path, config: dict, model_type: str, dtype: str, state: dict[str, torch.Tensor]
) -> None:
    from moe_ext.checkpoint.format import SafetensorsWriter, TensorEntry, dtype_name, write_manifest

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    layout = [(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in state.items()]
    writer = SafetensorsWriter(directory / "model.safetensors", layout)
    entries = [
        TensorEntry(n, shape, dt, writer.write_tensor(n, [state[n]]), "model.safetensors")
        for n, dt, shape in layout
    ]
    writer.close()
    write_manifest(directory, model_type, dtype, entries)


def write_tiny_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """The tiny model's random weights as a moe_ext checkpoint (fp32, byte tokenizer);
    returns the tensors."""
    from moe_ext.model.weights import init_random_full
    from moe_ext.train.export import hf_config

    args = tiny_args()
    state = {n: t.contiguous() for n, t in init_random_full(args).items()}
    _write_moe_ext(directory, hf_config(args, "byte"), args.model_type, "fp32", state)
    return state


def family_args(family: str):
    """Small ModelArgs of ``family`` (mixtral, qwen2_moe, qwen3_moe) that exercise its
    particular parts (shared expert and dense layer, q/k norms and tied embeddings)."""
    from moe_ext.model import ModelArgs

    base = dict(
        model_type=family,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        rope_theta=10000.0,
        max_position_embeddings=64,
        init_seed=7,
    )
    if family == "mixtral":  # experts take intermediate_size, every layer MoE
        base.update(intermediate_size=16, moe_intermediate_size=None)
    if family == "qwen2_moe":  # shared expert + gate, q/k/v bias, a dense layer
        base.update(
            shared_expert_intermediate_size=24,
            shared_expert_gate=True,
            mlp_only_layers=[1],
            qkv_bias=True,
            norm_topk_prob=False,
        )
    if family == "qwen3_moe":  # q/k norms, head_dim != H / nH, tied embeddings, dense layer 0
        base.update(
            qk_norm=True,
            head_dim=16,
            tie_word_embeddings=True,
            decoder_sparse_step=2,
            num_hidden_layers=3,
        )
    return ModelArgs(**base)


def write_family_checkpoint(
    directory: Path, family: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A moe_ext checkpoint of ``family_args(family)``'s random weights (norms off 1, so a
    swapped norm shows) plus a tokenizer side file. Returns the tensors as written."""
    from moe_ext.checkpoint.format import dtype_name
    from moe_ext.model import init_random_full
    from moe_ext.train.export import hf_config

    args = family_args(family)
    gen = torch.Generator().manual_seed(3)
    state = {}
    for name, t in init_random_full(args).items():
        if "norm" in name:
            t = 0.5 + torch.rand(t.shape, generator=gen)
        state[name] = t.to(dtype).contiguous()
    _write_moe_ext(directory, hf_config(args), family, dtype_name(dtype), state)
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return state


def export_megatron_families(root: Path) -> dict[str, tuple]:
    """family -> (moe_ext source dir, its tensors, its Megatron export dir) under ``root``:
    mixtral in bf16, qwen2_moe and qwen3_moe in fp32."""
    from moe_ext.megatron.dist_ckpt import export_megatron

    out = {}
    for family, dtype in (
        ("mixtral", torch.bfloat16),
        ("qwen2_moe", torch.float32),
        ("qwen3_moe", torch.float32),
    ):
        src, meg = root / f"{family}_src", root / f"{family}_meg"
        state = write_family_checkpoint(src, family, dtype)
        export_megatron(src, meg, progress=False)
        out[family] = (src, state, meg)
    return out


# Tiny Hugging Face checkpoints of every family for the launcher tests (infer.py)
INFER_PROMPTS = [[1, 5, 7, 9, 11, 13], [2, 4, 6], [3, 8, 30, 31, 32, 33, 34, 35]]
INFER_NEW_TOKENS = 6
INFER_FAMILIES = {
    "mixtral": dict(intermediate_size=64, num_local_experts=8),
    "qwen2_moe": dict(
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=8,
        shared_expert_intermediate_size=48,
        decoder_sparse_step=2,
        mlp_only_layers=[],
    ),
    "qwen3_moe": dict(
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=8,
        head_dim=16,
        norm_topk_prob=True,
    ),
}


def _make_hf_checkpoint(family: str, directory: Path) -> list[list[int]]:
    """Save a tiny random HF model and return its greedy continuations of INFER_PROMPTS."""
    import transformers

    config_cls = {
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
    }[family]
    model_cls = {
        "mixtral": transformers.MixtralForCausalLM,
        "qwen2_moe": transformers.Qwen2MoeForCausalLM,
        "qwen3_moe": transformers.Qwen3MoeForCausalLM,
    }[family]
    config = config_cls(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=1,
        **INFER_FAMILIES[family],
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # larger router logits: routing decisions far from ties
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.shape[0] == 8:
                param.mul_(8.0)
    model.save_pretrained(directory)
    expected = []
    for prompt in INFER_PROMPTS:
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=INFER_NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        expected.append(out[0, len(prompt) :].tolist())
    return expected


def make_infer_checkpoints(root: Path, families=tuple(INFER_FAMILIES)) -> dict:
    """family -> (checkpoint dir, transformers' greedy ids for INFER_PROMPTS), and
    "prompts" -> a prompts file of INFER_PROMPTS."""
    out = {}
    for family in families:
        directory = root / family
        out[family] = (str(directory), _make_hf_checkpoint(family, directory))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in INFER_PROMPTS))
    out["prompts"] = str(prompts)
    return out


# ==== the launcher on ranks ==============================================================
# launch/infer.py's own steps (prepare -> groups -> build_model -> generate) inside spawned
# gloo ranks: many configurations per spawn, each checked against expected greedy ids.


def launcher_conf(overrides: list[str]):
    """The launcher's config, composed exactly as `launch/infer.py <overrides>` would."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moe_ext.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def local_dist_env(rank: int = 0, world_size: int = 1):
    """The DistEnv of rank ``rank`` of ``world_size`` ranks, all on this host (127.0.0.1,
    port 0: a launcher step that starts no process group)."""
    from moe_ext.dist import DistEnv

    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=rank,
        local_world_size=world_size,
        master_addr="127.0.0.1",
        master_port=0,
    )


def launcher_generate(overrides: list[str], rank: int, world_size: int) -> list[list[int]]:
    """The ids launch/infer.py generates with ``overrides`` on this gloo rank (CPU)."""
    from moe_ext.cli import infer  # launch/infer.py's steps
    from moe_ext.groups import ProcessGroups
    from moe_ext.model import generate

    cfg = launcher_conf(overrides)
    env = local_dist_env(rank, world_size)
    job = infer.prepare(cfg, env, cuda_available=False, num_local_gpus=0)
    groups = ProcessGroups.build(job.plan, backend="gloo", timeout=datetime.timedelta(seconds=120))
    model = infer.build_model(job, groups, rank, torch.device("cpu"))
    result = generate(
        model,
        job.prompt_ids,
        cfg.generate,
        eos_id=job.tokenizer.eos_id,
        pad_id=job.tokenizer.pad_id,
        seed=cfg.seed,
    )
    return result.tokens


def launcher_cases(checkpoints: dict, names, plans, new_tokens: int) -> list:
    """``check_launcher_cases`` input for every named checkpoint under every plan: greedy
    fp32 generation of ``new_tokens``. checkpoints: name -> (directory, expected ids per
    prompt), plus "prompts" -> the prompts file; plans: [(label, extra overrides)]."""
    cases = []
    for name in names:
        directory, expected = checkpoints[name]
        for label, extra in plans:
            overrides = [
                f"checkpoint={directory}",
                f"prompts={checkpoints['prompts']}",
                f"generate.max_new_tokens={new_tokens}",
                "dtype=fp32",
                *extra,
            ]
            cases.append((f"{name} {label}", overrides, expected))
    return cases


def check_launcher_cases(
    rank: int, world_size: int, cases: list[tuple[str, list[str], list]]
) -> None:
    """run_ranks body: each (label, overrides, expected ids) case generates ``expected``;
    fails with every case that did not."""
    failures = []
    for label, overrides, expected in cases:
        got = launcher_generate(overrides, rank, world_size)
        if got != expected:
            failures.append(f"{label}: got {got}, transformers {expected}")
    assert not failures, "\n".join(failures)


# ==== Hugging Face reference models =======================================================

HF_PROMPTS = [[5, 17, 3, 42, 8, 9, 11], [7, 1, 30], [60, 2, 2, 19, 4]]
HF_EOS = 13


def hf_model(family: str, **extra):
    """A tiny transformers model of ``family`` with random weights (norms and biases too,
    so every parameter matters), in eval mode; ``extra`` goes to its config."""
    import transformers

    common = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=HF_EOS,
    )
    if family == "mixtral":
        config = transformers.MixtralConfig(
            **common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **extra
        )
        model = transformers.MixtralForCausalLM(config)
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **common,
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            **extra,
        )
        model = transformers.Qwen2MoeForCausalLM(config)
    else:
        config = transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=40,
            moe_intermediate_size=16,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            **extra,
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                torch.randn_like(p) * (0.2 if "norm" not in name else 0.1)
                + (1.0 if "norm" in name else 0.0)
            )
    return model.eval()


def left_pad(prompts):
    """Left-padded ids [B, L] (pad 0) and attention mask [B, L] of ``prompts``."""
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_greedy(hf, prompts, max_new, eos=HF_EOS):
    """transformers' greedy continuations of ``prompts``, each cut after its first ``eos``."""
    ids, mask = left_pad(prompts)
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    rows = []
    for row in out[:, ids.shape[1] :].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def hf_greedy_each(hf, prompts, new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuations of each prompt on its own (no padding, no EOS)."""
    out = []
    for prompt in prompts:
        ids = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        out.append(ids[0, len(prompt) :].tolist())
    return out


# DeepSeek tiny shapes of each routing kind: variant -> (model_type, config changes)
DEEPSEEK_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
DEEPSEEK_VARIANTS = {
    # DeepSeek-V2-Lite: plain q_proj, softmax greedy top-k, two shared experts
    "v2_lite": (
        "deepseek_v2",
        dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1),
    ),
    # DeepSeek-V2: q LoRA, softmax top-k within the best groups (group score = max)
    "v2_group": (
        "deepseek_v2",
        dict(
            q_lora_rank=12,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.7,
        ),
    ),
    # DeepSeek-V3: sigmoid + correction bias, groups (top-2 sum), renormalised and scaled;
    # YaRN with DeepSeek's mscale (softmax scale times mscale_all_dim's factor squared)
    "v3": (
        "deepseek_v3",
        dict(
            q_lora_rank=12,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            rope_parameters={
                **DEEPSEEK_YARN,
                "rope_theta": 10000.0,
                "mscale": 1.0,
                "mscale_all_dim": 0.7,
            },
        ),
    ),
    # deepseek_v3 without rope_interleave (rotate-half pairs) and with attention biases
    "v3_half_bias": (
        "deepseek_v3",
        dict(q_lora_rank=None, n_group=2, topk_group=1, rope_interleave=False, attention_bias=True),
    ),
}


def deepseek_hf_config(variant: str, **changes):
    """The transformers config of a tiny DEEPSEEK_VARIANTS[variant] (EOS = HF_EOS)."""
    import transformers

    model_type, extra = DEEPSEEK_VARIANTS[variant]
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=2 if model_type == "deepseek_v2" else 1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=HF_EOS,
    )
    return transformers.AutoConfig.for_model(model_type, **{**common, **extra, **changes})


def randomize_(model, seed: int = 0):
    """Random everything (norms, biases, correction biases too) so every term matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise * 0.1 + 1.0 if "norm" in name else noise * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
    return model.eval()


def deepseek_hf_model(variant: str, **changes):
    """A tiny random transformers model of DEEPSEEK_VARIANTS[variant], in eval mode."""
    import transformers

    config = deepseek_hf_config(variant, **changes)
    return randomize_(transformers.AutoModelForCausalLM.from_config(config))


# GLM-4.5 (glm4_moe) and MiniMax-M2 (minimax_m2): tiny random checkpoints, read back
# through the checkpoint reader (their HF names: mlp.gate, e_score_correction_bias,
# mlp.shared_experts; block_sparse_moe.experts.{j}.w1/w3/w2)
GLM_PROMPTS = [[5, 17, 3, 42, 8, 9, 11], [7, 1, 30], [60, 2, 2, 19, 4, 77, 101, 3, 9]]
GLM_NEW_TOKENS = 10
GLM_VARIANTS = {
    # GLM-4.5-Air's layout: q/k/v biases, no q/k norm, one group, one shared expert
    "air": dict(attention_bias=True, use_qk_norm=False, n_group=1, topk_group=1),
    # GLM-4.6-like: per-head q/k norm, 4 groups of 2 experts (2 kept), scaled weights,
    # a shared expert twice the expert FFN, two dense layers first
    "grouped": dict(
        attention_bias=True,
        use_qk_norm=True,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        n_shared_experts=2,
        first_k_dense_replace=2,
    ),
    # YaRN over the rotated half of each head (the frequencies span Dr = D/2)
    "yarn": dict(
        attention_bias=True,
        use_qk_norm=True,
        n_group=2,
        topk_group=1,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
    ),
}
MINIMAX_VARIANTS = {
    # the released layout: rotary_dim = head_dim / 2, routing bias
    "m2": dict(rotary_dim=8),
    # rotary_dim a quarter of the head, four kv heads
    "quarter": dict(rotary_dim=4, num_key_value_heads=4),
}


def glm_hf_model(variant: str, **changes):
    """A tiny random Glm4MoeForCausalLM of GLM_VARIANTS[variant], fp32, eval mode; biases,
    norms and the router's correction bias all random and non-zero."""
    import transformers

    config = transformers.Glm4MoeConfig(
        **{
            **dict(
                vocab_size=128,
                hidden_size=64,
                intermediate_size=96,
                moe_intermediate_size=32,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                partial_rotary_factor=0.5,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_shared_experts=1,
                first_k_dense_replace=1,
                norm_topk_prob=True,
                max_position_embeddings=128,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=None,
            ),
            **GLM_VARIANTS[variant],
            **changes,
        }
    )
    torch.manual_seed(0)
    model = transformers.Glm4MoeForCausalLM(config)
    randomize_glm(model)
    return model.eval()


@torch.no_grad()
def randomize_glm(model) -> None:
    """Every parameter and the correction biases random: a term the engine drops shows."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith(".bias"):
            p.copy_(0.3 * torch.randn_like(p))
        else:
            p.copy_(0.2 * torch.randn_like(p))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.randn_like(b))


def minimax_hf_model(variant: str, **changes):
    """A tiny random MiniMaxM2ForCausalLM of MINIMAX_VARIANTS[variant], fp32, eval mode;
    norms, the router and its correction bias random and non-zero."""
    import transformers

    config = transformers.MiniMaxM2Config(
        **{
            **dict(
                vocab_size=128,
                hidden_size=64,
                intermediate_size=32,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                num_local_experts=8,
                num_experts_per_tok=2,
                max_position_embeddings=128,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=None,
            ),
            **MINIMAX_VARIANTS[variant],
            **changes,
        }
    )
    torch.manual_seed(0)
    model = transformers.MiniMaxM2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale, shift = (0.1, 1.0) if "norm" in name else (0.2, 0.0)
            p.copy_(shift + scale * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    return model.eval()


def safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files in ``directory``, by stored name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def check_hf_export_round_trip(
    ext: Path, original: dict, hf, ids: torch.Tensor, tmp_path: Path
) -> None:
    """Export moe_ext checkpoint ``ext`` in both Hugging Face layouts: the per-expert
    export equals ``original`` (the source tensors) bit for bit, dtype included; the fused
    export holds ``hf``'s in-memory state; transformers loads both as ``hf``'s class with
    logits on ``ids`` [B, S] identical to ``hf``'s."""
    import transformers

    from moe_ext.checkpoint.convert import export_hf

    per_expert, fused = tmp_path / "per_expert", tmp_path / "fused"
    export_hf(ext, per_expert, progress=False)
    export_hf(ext, fused, layout="fused", progress=False)
    exported = safetensors_dir(per_expert)
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype, key
        assert torch.equal(exported[key].view(torch.uint8), tensor.view(torch.uint8)), key
    fused_tensors, state = safetensors_dir(fused), hf.state_dict()
    assert fused_tensors.keys() == state.keys()
    assert all(torch.equal(fused_tensors[k], state[k]) for k in state)
    with torch.no_grad():
        reference = hf(ids).logits
    for directory in (per_expert, fused):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        assert type(loaded) is type(hf)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, reference, rtol=0, atol=0)


def native_from_dir(directory: Path):
    """The native model of a saved HF checkpoint, read through the checkpoint reader."""
    from moe_ext.checkpoint import CheckpointReader
    from moe_ext.model import ModelArgs, Transformer

    with CheckpointReader.open(directory) as reader:
        args = ModelArgs.from_hf_config(reader.config)
        state = {name: reader.read(name) for name in reader.names()}
    model = Transformer(args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(".expert_load" in m for m in missing), (missing, unexpected)
    return model.eval()


def masked_logits(hf) -> torch.Tensor:
    """transformers' logits of the real (unpadded) positions of left-padded GLM_PROMPTS."""
    ids, mask = left_pad(GLM_PROMPTS)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def check_against_transformers(hf, tmp_path: Path) -> None:
    """``hf`` saved and read back: logits on left-padded GLM_PROMPTS within 1e-4 and greedy
    ids equal transformers'."""
    from moe_ext.config import GenerateConf
    from moe_ext.model import generate

    hf.save_pretrained(tmp_path)
    model = native_from_dir(tmp_path)
    ids, mask = left_pad(GLM_PROMPTS)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = model(ids, kv_start=(mask == 0).sum(1))
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=1e-4)
    got = generate(model, GLM_PROMPTS, GenerateConf(max_new_tokens=GLM_NEW_TOKENS), eos_id=None)
    assert got.tokens == hf_greedy_each(hf, GLM_PROMPTS, GLM_NEW_TOKENS)
    assert len({tuple(t) for t in got.tokens}) > 1  # not a degenerate continuation


@torch.inference_mode()
def decode_logits(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill ``prompt`` [B, L] into fresh caches, then ``steps`` greedy decode steps in
    the static shape compile_decode compiles. Returns their logits [steps, B, V] float32."""
    B, L = prompt.shape
    kv_start = torch.zeros(B, dtype=torch.long, device=prompt.device)
    model.setup_caches(B, L + steps)
    logits = model(
        prompt, torch.arange(L, device=prompt.device), kv_start, L, last_only=True, use_cache=True
    )
    out = []
    for step in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        slot = torch.tensor([L + step], device=prompt.device)
        logits = model(nxt, slot, kv_start, None, last_only=True, use_cache=True)
        out.append(logits[:, -1].float())
    return torch.stack(out)


def check_compiled_decode(model) -> None:
    """compile_decode (aot_eager: dynamo and AOT autograd, no C compiler) traces the
    family's decode block (partial rotary's slices, its q/k norm, the sigmoid router) and
    gives the eager decode step's logits."""

    def decode_logits():
        ids = torch.tensor([p[:3] for p in GLM_PROMPTS])  # [3, 3]
        model.setup_caches(3, 64)
        kv_start = torch.zeros(3, dtype=torch.long)
        logits = model(ids, torch.arange(3), kv_start, 3, last_only=True, use_cache=True)
        step = logits[:, -1].argmax(-1, keepdim=True)  # [3, 1]
        return model(step, torch.tensor([3]), kv_start, None, last_only=True, use_cache=True)

    eager = decode_logits()
    model.compile_decode(backend="aot_eager")
    try:
        compiled = decode_logits()
    finally:
        model.compile_decode(False)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# gpt-oss: tiny random checkpoints with non-zero biases and sinks and a SwiGLU limit low
# enough to clamp, so a missing term fails
GPT_OSS_WINDOW = 6
# longer than the window, one shorter; decoding runs the ring round several times
GPT_OSS_PROMPTS = [list(range(2, 21)), [5, 6, 7], list(range(30, 41)), [9, 8, 7, 6, 5, 4, 3, 2]]
GPT_OSS_NEW_TOKENS = 10
GPT_OSS_SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=48,  # F != H and 2F != H: a layout mix-up cannot pass by shape
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=GPT_OSS_WINDOW,
    max_position_embeddings=256,
    swiglu_limit=2.0,  # low: the clamps act on these random weights
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 4.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 64,
    },
    initializer_range=0.15,  # large enough that greedy continuations vary
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,
)


def gpt_oss_hf_model(seed: int = 0, **changes):
    """A tiny random transformers GptOssForCausalLM (GPT_OSS_SHAPE with ``changes``) with
    non-zero biases and sinks, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GptOssConfig(**{**GPT_OSS_SHAPE, **changes})
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                param.normal_(0.0, 0.5)
            if name.endswith("router.weight"):
                param.mul_(4.0)  # routing decisions far from ties
    return model


def gpt_oss_native_state(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' gpt-oss tensors in native names and layout, written out independently
    of the checkpoint maps: experts [E, H, 2F] interleaved -> [E, 2F, H] gate rows then up
    rows."""
    out = {}
    for name, t in hf_state.items():
        name = name.removeprefix("model.")
        if name.endswith("experts.gate_up_proj"):
            t = torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1).transpose(1, 2)
        elif name.endswith("experts.gate_up_proj_bias"):
            t = torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)
        elif name.endswith("experts.down_proj"):
            t = t.transpose(1, 2)
        out[name] = t.contiguous()
    return out


# ==== MoE references ======================================================================
# Dense single-rank MoE in float64, written independently of moe_ext.moe.
# T tokens, H hidden, E experts, k top-k, F expert FFN size, Fs shared-expert FFN size.
# Routing is done token by token with plain Python ordering (no torch.topk), every expert is
# evaluated on every token, and the routed outputs are mixed by a dense [T, E] gate matrix.
# Everything is differentiable so tests compare gradients as well as outputs.


@dataclass
class RoutingSpec:
    top_k: int
    score_func: str = "softmax"  # softmax | sigmoid
    norm_topk_prob: bool = True
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    routed_scaling_factor: float = 1.0


def _pick(values: list[float], count: int) -> list[int]:
    """Indices of the ``count`` largest values, largest first (ties: lower index first)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:count]


def reference_gates(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    spec: RoutingSpec,
    correction_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x: [T, H]; router_weight: [E, H]. Returns dense gates [T, E] float64 (zero for
    experts a token did not pick), differentiable in x and router_weight."""
    logits = x.double() @ router_weight.double().t()  # [T, E]
    num_tokens, num_experts = logits.shape
    if spec.score_func == "softmax":
        scores = torch.exp(logits - logits.max(-1, keepdim=True).values)
        scores = scores / scores.sum(-1, keepdim=True)
    else:
        scores = 1.0 / (1.0 + torch.exp(-logits))
    choice = scores.detach().clone()
    if correction_bias is not None and spec.score_func == "sigmoid":
        choice = choice + correction_bias.double()
    rows = []
    for t in range(num_tokens):
        c = choice[t].tolist()
        allowed = list(range(num_experts))
        if spec.n_group:
            size = num_experts // spec.n_group
            group_score = []
            for g in range(spec.n_group):
                members = sorted(c[g * size : (g + 1) * size], reverse=True)
                group_score.append(sum(members[:2]))
            groups = _pick(group_score, spec.topk_group)
            allowed = [e for e in allowed if e // size in groups]
        picked_local = _pick([c[e] for e in allowed], spec.top_k)
        picked = [allowed[i] for i in picked_local]
        mask = torch.zeros(num_experts, dtype=torch.float64, device=x.device)
        mask[picked] = 1.0
        w = scores[t] * mask
        if spec.norm_topk_prob:
            w = w / w.sum()
        rows.append(w * spec.routed_scaling_factor)
    if not rows:
        return logits * 0
    return torch.stack(rows)  # [T, E]


def swiglu(
    x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor
) -> torch.Tensor:
    """x: [T, H]; gate_w, up_w: [F, H]; down_w: [H, F]. Returns [T, H]."""
    return (F.silu(x @ gate_w.t()) * (x @ up_w.t())) @ down_w.t()


def reference_moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    spec: RoutingSpec,
    correction_bias: Optional[torch.Tensor] = None,
    shared: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    shared_gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Full MoE layer, float64. x: [T, H]; router_weight: [E, H]; gate_up: [E, 2F, H] (gate
    rows then up rows); down: [E, H, F]; shared: (gate [Fs, H], up [Fs, H], down [H, Fs]);
    shared_gate: [1, H]. Returns y [T, H] float64."""
    x = x.double()
    gates = reference_gates(x, router_weight, spec, correction_bias)  # [T, E]
    ffn = gate_up.shape[1] // 2
    y = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        gu = gate_up[e].double()
        out = swiglu(x, gu[:ffn], gu[ffn:], down[e].double())  # [T, H]
        y = y + gates[:, e : e + 1] * out
    if shared is not None:
        s = swiglu(x, *(w.double() for w in shared))
        if shared_gate is not None:
            s = torch.sigmoid(x @ shared_gate.double().t()) * s
        y = y + s
    return y


# ==== dispatcher cases ====================================================================
# Every dispatcher computes the dense reference's outputs and gradients.
# T tokens, H hidden, E experts, k top-k, F expert FFN size, FS shared-expert FFN size.
# EP strategies give each rank its own tokens (a slice of the global batch); the TP-sharded
# strategy gives every rank the whole batch. Gradients checked: input, expert shards (sliced
# from the full reference gradient), router weight and shared expert (summed over the EP
# group, whose ranks each saw part of the batch).

H, F_EXPERT, E, FS = 16, 32, 8, 16

# name, routing, per-rank token counts (indexed by EP rank, cycled), options
CASES = [
    ("softmax_renorm", RoutingSpec(top_k=2), [7, 5, 3, 6], {}),
    (
        "softmax_plain_shared_gate",
        RoutingSpec(top_k=2, norm_topk_prob=False),
        [4, 6, 5, 2],
        {"shared": True},
    ),
    (
        "sigmoid_group_bias_scale",
        RoutingSpec(
            top_k=3, score_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5
        ),
        [6, 3, 5, 4],
        {"bias": "random"},
    ),
    (
        "all_to_one_expert_k1",
        RoutingSpec(top_k=1, score_func="sigmoid"),
        [5, 4, 3, 6],
        {"bias": "expert3"},
    ),
    ("rank_with_zero_tokens", RoutingSpec(top_k=2), [6, 0, 4, 0], {}),
    ("one_token_k_all", RoutingSpec(top_k=E), [1, 1, 1, 1], {}),
]
STRATEGIES = ("local", "tp_sharded", "allgather_rs", "nccl_a2a")


def case_tensors(seed, spec, tokens, opts, dtype, device):
    """Full (unsharded) weights, the global batch and the output gradient, identical on
    every rank; rounded to ``dtype`` so the float64 reference sees the same values."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    t = {
        "router": rand(E, H, scale=0.5),
        "gate_up": rand(E, 2 * F_EXPERT, H, scale=H**-0.5),
        "down": rand(E, H, F_EXPERT, scale=F_EXPERT**-0.5),
        "x": rand(sum(tokens), H),
        "grad": rand(sum(tokens), H),
        "bias": None,
        "shared": None,
        "shared_gate": None,
    }
    if opts.get("bias") == "random":
        t["bias"] = torch.randn(E, generator=gen).mul(0.1).to(device)
    elif opts.get("bias") == "expert3":
        t["bias"] = torch.zeros(E, device=device)
        t["bias"][3] = 100.0  # every token picks expert 3 (selection only)
    if opts.get("shared"):
        t["shared"] = (
            rand(FS, H, scale=H**-0.5),
            rand(FS, H, scale=H**-0.5),
            rand(H, FS, scale=FS**-0.5),
        )
        t["shared_gate"] = rand(1, H, scale=H**-0.5)
    return t


def build_case_layer(strategy, spec, opts, groups, t, dtype, device):
    """The MoE layer of a case with ``strategy`` (a dispatcher name or instance) and the
    case's full weights ``t`` loaded (its own expert shard)."""
    from moe_ext.moe.layer import build_moe_layer, load_full_expert_weights

    layer = build_moe_layer(
        H,
        F_EXPERT,
        E,
        spec.top_k,
        score_func=spec.score_func,
        norm_topk_prob=spec.norm_topk_prob,
        n_group=spec.n_group,
        topk_group=spec.topk_group,
        routed_scaling_factor=spec.routed_scaling_factor,
        correction_bias=t["bias"] is not None,
        shared_expert_size=FS if opts.get("shared") else None,
        shared_expert_gate=bool(opts.get("shared")),
        dispatcher=strategy,
        groups=groups,
        dtype=dtype,
        device=device,
    )
    with torch.no_grad():
        layer.router.weight.copy_(t["router"])
        if t["bias"] is not None:
            layer.router.e_score_correction_bias.copy_(t["bias"])
        if t["shared"] is not None:
            for lin, w in zip(
                (
                    layer.shared_expert.gate_proj,
                    layer.shared_expert.up_proj,
                    layer.shared_expert.down_proj,
                ),
                t["shared"],
            ):
                lin.weight.copy_(w)
            layer.shared_expert_gate.weight.copy_(t["shared_gate"])
    load_full_expert_weights(layer, t["gate_up"], t["down"])
    return layer


def _case_reference(spec, t):
    leaves = {
        name: t[name].double().clone().requires_grad_()
        for name in ("x", "router", "gate_up", "down")
    }
    shared = (
        None
        if t["shared"] is None
        else tuple(w.double().clone().requires_grad_() for w in t["shared"])
    )
    shared_gate = (
        None if t["shared_gate"] is None else t["shared_gate"].double().clone().requires_grad_()
    )
    y = reference_moe(
        leaves["x"],
        leaves["router"],
        leaves["gate_up"],
        leaves["down"],
        spec,
        t["bias"],
        shared,
        shared_gate,
    )
    (y * t["grad"].double()).sum().backward()
    grads = {name: leaf.grad for name, leaf in leaves.items()}
    grads["shared"] = None if shared is None else [w.grad for w in shared]
    grads["shared_gate"] = None if shared_gate is None else shared_gate.grad
    return y.detach(), grads


def check_close(actual, expected, what, tol):
    """``tol`` "fp32": float32 tolerances; a number (bf16): the largest error relative to
    the expected tensor's scale."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    if expected.numel() == 0:
        return
    if tol == "fp32":
        torch.testing.assert_close(
            actual, expected, rtol=1e-4, atol=2e-5, msg=lambda m: f"{what}: {m}"
        )
    else:  # bf16: error relative to the tensor's scale
        err = (actual - expected).abs().max().item()
        scale = max(expected.abs().max().item(), 1e-3)
        assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x scale {scale:.3g}"


def _sum_over(tensor, group):
    if group is not None:
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
    return tensor


def check_strategy(strategy, groups, seed, dtype, device, tol, cases=CASES):
    """Run every case through ``strategy`` on this rank and compare with the reference."""
    from moe_ext.moe.layer import expert_shard

    ep_size, ep_rank = groups.ep_size, groups.ep_rank
    for case_idx, (name, spec, counts, opts) in enumerate(cases):
        what = f"{strategy} ep={ep_size} etp={groups.etp_size} case={name}"
        tokens = [counts[r % len(counts)] for r in range(ep_size)]
        t = case_tensors(seed + case_idx, spec, tokens, opts, dtype, device)
        y_ref, g_ref = _case_reference(spec, t)
        lo = sum(tokens[:ep_rank])
        rows = slice(lo, lo + tokens[ep_rank])  # this rank's tokens (all of them for etp)
        layer = build_case_layer(strategy, spec, opts, groups, t, dtype, device)
        layer.train()
        x = t["x"][rows].clone().requires_grad_()
        y = layer(x)
        assert y.dtype == dtype and y.shape == x.shape, what
        (y * t["grad"][rows]).sum().backward()
        check_close(y, y_ref[rows], f"{what}: output", tol)
        check_close(x.grad, g_ref["x"][rows], f"{what}: input grad", tol)
        gate_up_ref, down_ref = expert_shard(g_ref["gate_up"], g_ref["down"], layer.dispatcher)
        check_close(layer.experts.gate_up_proj.grad, gate_up_ref, f"{what}: gate_up grad", tol)
        check_close(layer.experts.down_proj.grad, down_ref, f"{what}: down grad", tol)
        check_close(
            _sum_over(layer.router.weight.grad, groups.ep),
            g_ref["router"],
            f"{what}: router grad",
            tol,
        )
        if g_ref["shared"] is not None:
            mods = (
                layer.shared_expert.gate_proj,
                layer.shared_expert.up_proj,
                layer.shared_expert.down_proj,
                layer.shared_expert_gate,
            )
            for mod, ref in zip(mods, list(g_ref["shared"]) + [g_ref["shared_gate"]]):
                check_close(_sum_over(mod.weight.grad, groups.ep), ref, f"{what}: shared grad", tol)
        load = layer.router.read_expert_load()
        assert int(load.sum()) == tokens[ep_rank] * spec.top_k, what
        if opts.get("bias") == "expert3":
            assert int(load[3]) == tokens[ep_rank], f"{what}: bias did not force expert 3"


# The static-capacity exchange: the EP dispatchers that can run it on CPU
# (allgather_rs = ep_allgather, nccl_a2a = ep_nccl). C capacity, G ep size.

STATIC = ("allgather_rs", "nccl_a2a")


def static_dispatcher(name: str, groups, capacity: int):
    """Dispatcher ``name`` over ``groups`` with the static exchange at ``capacity``."""
    from moe_ext.moe.dispatch import dispatcher_class

    dispatcher = dispatcher_class(name)(E, groups)
    dispatcher.set_capacity(capacity)
    return dispatcher


def _run_layer(layer, x, grad):
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * grad).sum().backward()
    return y.detach(), x.grad, layer.experts.gate_up_proj.grad, layer.router.weight.grad


def check_static_equals_dynamic(
    name, groups, seed, cases, extra, dtype=torch.float32, device=torch.device("cpu"), tol=None
):
    """Per case, capacity = max T over the group + ``extra``: the static layer's output and
    gradients equal the dynamic layer's (same weights, same tokens), with and without
    autograd (the no-grad path gathers one packed byte buffer), and match the float64
    reference (check_strategy). ``tol`` None: float32 to 1e-6 (CPU; the same arithmetic);
    else check_close's scale-relative bound (bf16 kernels may tile differently for the
    static row count)."""
    ep_size, ep_rank = groups.ep_size, groups.ep_rank

    def same(got, want, what):
        if tol is None:
            torch.testing.assert_close(
                got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}"
            )
        else:
            check_close(got, want, what, tol)

    for case_idx, (case_name, spec, counts, opts) in enumerate(cases):
        tokens = [counts[r % len(counts)] for r in range(ep_size)]
        capacity = max(max(tokens), 1) + extra
        what = f"{name} ep={ep_size} case={case_name} T={tokens[ep_rank]} C={capacity}"
        t = case_tensors(seed + case_idx, spec, tokens, opts, dtype, device)
        lo = sum(tokens[:ep_rank])
        x, grad = t["x"][lo : lo + tokens[ep_rank]], t["grad"][lo : lo + tokens[ep_rank]]
        dynamic = build_case_layer(name, spec, opts, groups, t, dtype, device)
        static = build_case_layer(
            static_dispatcher(name, groups, capacity), spec, opts, groups, t, dtype, device
        )
        for got, want, part in zip(
            _run_layer(static, x, grad),
            _run_layer(dynamic, x, grad),
            ("output", "input grad", "gate_up grad", "router grad"),
        ):
            same(got, want, f"{what}: {part}")
        with torch.no_grad():
            same(static(x), dynamic(x), f"{what}: no-grad output")
        check_strategy(
            static_dispatcher(name, groups, capacity),
            groups,
            seed + case_idx,
            dtype,
            device,
            tol or "fp32",
            cases=[cases[case_idx]],
        )


_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__")


class _NoHostReads:
    """Make every way of reading a tensor value on the host raise (and restore after)."""

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

        def refuse(name):
            def method(*args, **kwargs):
                raise AssertionError(f"host sync: Tensor.{name} called")

            return method

        for name in _HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        return self

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)
        return False


def no_sync_body(rank, world):
    """The static exchange's dispatch + combine read nothing back to the host (at 0, some
    and capacity tokens, with and without autograd), while the dynamic one does."""
    from moe_ext.moe.dispatch import DispatchGroups, dispatcher_class

    groups = DispatchGroups(ep=dist.group.WORLD if world > 1 else None)
    gen = torch.Generator().manual_seed(rank)
    capacity, top_k = 5, 2
    x, weights = torch.randn(3, H, generator=gen), torch.rand(3, top_k, generator=gen)
    expert_idx = torch.randint(0, E, (3, top_k), generator=gen)
    with pytest.raises(AssertionError, match="host sync"), _NoHostReads():
        # the guard catches a real sync: the dynamic exchange reads its sizes on the host
        dispatcher_class("allgather_rs")(E, groups).dispatch(x, weights, expert_idx)
    for name in STATIC:
        for num_tokens in (0, 3, capacity):
            dispatcher = static_dispatcher(name, groups, capacity)
            x = torch.randn(num_tokens, H, generator=gen)
            weights = torch.rand(num_tokens, top_k, generator=gen)
            expert_idx = torch.randint(0, E, (num_tokens, top_k), generator=gen)
            for grad in (False, True):
                xg = x.clone().requires_grad_(grad)
                with torch.set_grad_enabled(grad), _NoHostReads():
                    x_local, counts, handle = dispatcher.dispatch(xg, weights, expert_idx)
                    y = dispatcher.combine(x_local * 2.0, handle)
                    if grad:
                        y.sum().backward()
                assert x_local.shape == (groups.ep_size * capacity * top_k, H)
                assert counts.shape == (dispatcher.num_local_experts,)
                assert y.shape == (num_tokens, H)
                # experts that double their input: y = 2 * x * (sum of the token's weights)
                torch.testing.assert_close(y.detach(), 2 * x * weights.sum(1, keepdim=True))
                if grad:
                    torch.testing.assert_close(
                        xg.grad, 2 * weights.sum(1, keepdim=True).expand(-1, H)
                    )


def assert_nvshmem_refusal(err: BaseException, *words: str) -> None:
    """NvshmemDispatcher's refusal: one line pointing at strategy=ep_nccl, with ``words``."""
    message = str(err)
    assert "\n" not in message, message
    assert "strategy=ep_nccl" in message, message
    for word in words:
        assert word in message, message


# ==== Megatron-core =======================================================================
# T tokens, H hidden, E experts, k top-k

MEGATRON_H, MEGATRON_E = 32, 8


@contextlib.contextmanager
def megatron_on_cpu(hide_cuda: bool = False):
    """Inside a spawned rank only: Megatron's CUDA-only helpers redirected to the CPU (its
    current device "cpu", its CUDA RNG tracker's fork a no-op), so GPTModel and MoELayer
    run there. ``hide_cuda`` (the benchmark peers): ``torch.cuda.is_available()`` is False
    too (CUDA streams/events skipped), and megatron-core 0.16.1's router gemm is named
    without Transformer Engine. Nothing is restored: the rank's process ends after."""
    from megatron.core.tensor_parallel import random as mrandom

    if hide_cuda:
        from megatron.core.transformer.moe import moe_utils
    torch.cuda.current_device = lambda: "cpu"
    if hide_cuda:
        torch.cuda.is_available = lambda: False
    mrandom.CudaRNGStatesTracker.fork = lambda *a, **k: contextlib.nullcontext()
    if hide_cuda and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # 0.16.1 names it only when TE imports
    yield


def megatron_config(**kw):
    """A small Megatron TransformerConfig (H = MEGATRON_H, E = MEGATRON_E experts, top-2,
    CPU initialisation) with ``kw`` on top."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(
        num_layers=2,
        hidden_size=MEGATRON_H,
        num_attention_heads=4,
        ffn_hidden_size=64,
        num_moe_experts=MEGATRON_E,
        moe_router_topk=2,
        moe_ffn_hidden_size=16,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_router_dtype="fp32",
        use_cpu_initialization=True,
    )
    base.update(kw)
    return TransformerConfig(**base)


def megatron_plan(strategy: str, world: int, tp: int = 1):
    from moe_ext.plan import plan_with_degrees

    return plan_with_degrees(strategy, world, tp, reason="test")


def megatron_args(model_type: str = "qwen3_moe", **kw):
    """Small ModelArgs (hidden MEGATRON_H) of ``model_type`` for GPTModel comparisons."""
    from moe_ext.model import ModelArgs

    base = dict(
        model_type=model_type,
        vocab_size=64,
        hidden_size=MEGATRON_H,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        rope_theta=10000.0,
        qk_norm=model_type == "qwen3_moe",
        qkv_bias=model_type == "qwen2_moe",
    )
    if model_type == "qwen2_moe":
        base.update(
            shared_expert_intermediate_size=24,
            shared_expert_gate=True,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        )
    base.update(kw)
    return ModelArgs(**base)


# ==== Triton ==============================================================================
# Triton decides when it is first imported (TRITON_INTERPRET=1 in the environment) whether
# kernels compile or run in its CPU interpreter, so a test file's ``test_cpu_*`` cases are
# marked ``needs_interpreter`` and rerun by ``run_cpu_cases_in_interpreter`` in a child
# pytest with that variable set; in the parent process (compiled kernels or no GPU) they
# skip. Without triton installed (CI installs only the project's dependencies; CUDA torch
# brings triton) everything Triton-specific skips.

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def interpreted() -> bool:
    """Whether this process runs Triton kernels in the interpreter."""
    if not HAS_TRITON:
        return False
    from moe_ext.moe.kernels import grouped_gemm

    return grouped_gemm.INTERPRETED


needs_interpreter = pytest.mark.skipif(
    not interpreted(),
    reason="runs in the TRITON_INTERPRET=1 child of test_kernels_under_interpreter",
)


def run_cpu_cases_in_interpreter(test_file: str) -> None:
    """Run ``test_file``'s ``test_cpu_*`` cases in a child pytest under the interpreter;
    fail with the child's output tail unless they all ran and passed."""
    if interpreted():
        pytest.skip("already inside the interpreter child")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "test_cpu_",
            str(Path(test_file).resolve()),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter cases failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail


def graph_recorder(graphs):
    """A torch.compile backend that keeps each traced FX graph and runs it eagerly."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def count_op_nodes(graphs, packet):
    """Calls of the custom op ``packet`` (dynamo records the packet, AOT the overload)."""
    return sum(
        node.op == "call_function" and node.target in (packet, packet.default)
        for gm in graphs
        for node in gm.graph.nodes
    )


def capture_compiled(module, *inputs):
    """``module`` under inductor (fullgraph, static shapes), warmed up on a side stream
    (compile and autotune happen outside capture), then captured in a CUDA graph.
    Returns (graph, output of the captured call); replay after writing into ``inputs``."""
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="inductor", fullgraph=True, dynamic=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            compiled(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(*inputs)
    return graph, out


def stand_in_graph_capture(graph_class, monkeypatch=None) -> list[int]:
    """CUDA graphs stood in for on CPU: ``graph_class.capture`` (a DecodeGraph subclass)
    runs its step twice, the warm-up steps a real capture makes (collectives included), and
    each replay runs it again from the same static buffers. Returns the list each capture
    appends its batch size to. Patches the class through ``monkeypatch`` (undone after the
    test), else for the rest of the process (a rank's)."""
    captures: list[int] = []

    def capture(self):
        for _ in range(2):
            self._step()
        captures.append(self.tokens.shape[0])
        owner = self

        class Replay:
            def replay(self):
                owner.logits = owner._step()

        self.graph = Replay()

    if monkeypatch is not None:
        monkeypatch.setattr(graph_class, "capture", capture)
    else:
        graph_class.capture = capture
    return captures


def agreeing_share(got: list[list[int]], expected: list[list[int]]) -> float:
    """Share of ``expected``'s tokens that ``got`` reproduces before its first difference in
    each sequence. Greedy bf16 runs whose kernels differ (batch shapes, fusion) part after a
    near-tie late in some sequence; a broken cache or graph replay parts at once."""
    assert len(got) == len(expected), (len(got), len(expected))
    total = sum(len(e) for e in expected)
    agreeing = 0
    for g, e in zip(got, expected):
        n = 0
        while n < min(len(g), len(e)) and g[n] == e[n]:
            n += 1
        agreeing += n
    return agreeing / max(total, 1)

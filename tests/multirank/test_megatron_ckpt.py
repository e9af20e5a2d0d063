"""moe_ext checkpoint <-> Megatron-core distributed checkpoint on several ranks: the
one-process export loaded into GPTModel at EP=2, expert-TP=2 (+TP=2) and experts
replicated over 2 expert-data-parallel ranks (2 gloo ranks; more cases on 2 GPUs), checked
against each rank's expert slice taken from the full tensors by hand and the native
decoder's logits; then saved from there and imported again, which only comes back
bit-exact if ``MoEExtLayer.sharded_state_dict`` gives correct global offsets and replica
ids. The one-process conversions are in tests/unit/test_megatron_ckpt.py.

# E experts, F expert FFN size, H hidden, V vocab
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import json
import os
import shutil
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|DEPRECATED).*")

from safetensors.torch import load_file  # noqa: E402

from moe_ext.checkpoint.format import read_manifest  # noqa: E402
from moe_ext.megatron.dist_ckpt import (  # noqa: E402
    MEGATRON_MANIFEST,
    export_megatron,
    import_megatron,
)
from moe_ext.model import ModelArgs  # noqa: E402
from tests.support import (  # noqa: E402
    TOOLS,
    export_megatron_families,
    run_ranks,
    write_family_checkpoint,
)

TOOL = TOOLS / "convert_checkpoint.py"
TIMEOUT = datetime.timedelta(seconds=120)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (moe_ext source dir, its tensors, Megatron export dir)."""
    return export_megatron_families(tmp_path_factory.mktemp("megatron_ckpt"))


# ---- several ranks: load the export under EP / expert-TP / edp, save from there ------------

# (family, strategy, tp) at world 2: EP=2; expert-TP=2 with TP=2 attention (gate/up factory,
# vocab-parallel tied embedding); experts replicated over 2 expert-data-parallel ranks
RANK_CASES = [
    ("qwen2_moe", "ep_nccl", 1),
    ("qwen3_moe", "tp_experts", 2),
    ("mixtral", "replicate", 1),
]
GPU_CASES = RANK_CASES + [("qwen3_moe", "ep_nccl", 2), ("mixtral", "ep_allgather", 1)]


def _plan(strategy: str, world: int, tp: int = 1):
    from moe_ext.plan import plan_with_degrees

    return plan_with_degrees(strategy, world, tp, reason="test")


@contextlib.contextmanager
def _cpu_megatron(device: torch.device):
    """Inside a spawned CPU rank only: Megatron's CUDA-only forward helpers (current
    device, CUDA RNG tracker fork) redirected to the CPU."""
    if device.type == "cuda":
        yield
        return
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"
    mrandom.CudaRNGStatesTracker.fork = lambda *a, **k: contextlib.nullcontext()
    yield


def _check_layer_axis(layer, index: int, num_layers: int) -> None:
    """A layer axis prepended to sharded_state_dict (TransformerBlock's homogeneous-stack
    form): every tensor gains it, expert offsets stay the plan's (ep block, FFN fragment)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    d = layer.dispatcher
    out = layer.sharded_state_dict(prefix="x.", sharded_offsets=((0, index, num_layers),))
    gate_up = out["x.experts.gate_up_proj"]
    parts = gate_up.build() if isinstance(gate_up, ShardedTensorFactory) else [gate_up]
    E_local, two_f_local, H = layer.experts.gate_up_proj.shape
    f_local, F = two_f_local // 2, two_f_local // 2 * d.ffn_shards
    starts = [(index, d.local_expert_start, d.ffn_shard_rank * f_local, 0)]
    if len(parts) == 2:  # gate rows, then up rows of the same FFN fragment
        starts.append((index, d.local_expert_start, F + d.ffn_shard_rank * f_local, 0))
    else:
        assert d.ffn_shards == 1
    for part, start in zip(parts, starts):
        assert part.global_shape == (num_layers, d.num_experts, 2 * F, H), part
        assert part.global_offset == start, part
    down = out["x.experts.down_proj"]
    assert down.global_shape == (num_layers, d.num_experts, H, F)
    assert down.global_offset == (index, d.local_expert_start, 0, d.ffn_shard_rank * f_local)
    router = out["x.router.weight"]
    assert router.global_shape == (num_layers,) + tuple(layer.router.weight.shape)
    assert router.global_offset == (index, 0, 0)


def _rank_case(rank, world, family, strategy, tp, src, meg, saved, backend, device):
    from moe_ext.groups import ProcessGroups
    from moe_ext.megatron import (
        MoEExtLayer,
        install_parallel_state,
        seed_model_parallel_rng,
        uninstall_parallel_state,
    )
    from moe_ext.megatron.dist_ckpt import build_gpt_model, load_megatron, save_megatron
    from moe_ext.model import Transformer
    from moe_ext.moe.layer import expert_shard

    args = ModelArgs.from_hf_config(json.loads((Path(src) / "config.json").read_text()))
    full = {n: t.float() for n, t in load_file(str(Path(src) / "model.safetensors")).items()}
    plan = _plan(strategy, world, tp)
    groups = ProcessGroups.build(plan, backend, TIMEOUT)
    install_parallel_state(groups)
    try:
        if device.type == "cuda":
            seed_model_parallel_rng(groups, 1234)
        model = build_gpt_model(args, plan, groups, torch.float32, device).eval()
        load_megatron(model, meg)
        # each MoE layer holds exactly the plan's slice of the source experts
        for i, layer in enumerate(model.decoder.layers):
            if isinstance(layer.mlp, MoEExtLayer):
                gate_up, down = expert_shard(
                    full[f"layers.{i}.mlp.experts.gate_up_proj"],
                    full[f"layers.{i}.mlp.experts.down_proj"],
                    layer.mlp.dispatcher,
                )
                assert torch.equal(layer.mlp.experts.gate_up_proj.cpu(), gate_up), i
                assert torch.equal(layer.mlp.experts.down_proj.cpu(), down), i
                assert torch.equal(
                    layer.mlp.router.weight.cpu(), full[f"layers.{i}.mlp.router.weight"]
                ), i
                _check_layer_axis(layer.mlp, i, args.num_hidden_layers)
        native = Transformer(args)
        native.load_state_dict(full)
        native = native.to(device).eval()
        seed = 11 + (groups.dp_rank if tp > 1 else rank)  # identical tokens within TP
        tokens = torch.randint(
            0, args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed)
        ).to(device)
        positions = torch.arange(7, device=device)[None].expand(2, 7)
        mask = None if device.type == "cuda" else torch.triu(torch.ones(7, 7), 1).bool()[None, None]
        with torch.no_grad():
            logits = model(tokens, positions, mask)  # [B, S, V / tp]
            ref = native(tokens)  # [B, S, V]
        vocab = args.vocab_size // tp
        ref = ref[..., groups.tp_rank * vocab : (groups.tp_rank + 1) * vocab]
        torch.testing.assert_close(logits.float(), ref.float(), rtol=1e-3, atol=1e-3)
        save_megatron(model, saved)
    finally:
        uninstall_parallel_state()


def _ranks_body(rank, world, cases, dirs, backend):
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 logits compared at 1e-3
        torch.backends.cudnn.allow_tf32 = False
    failures = []
    if backend == "nccl":  # a hung collective dumps every thread's stack, then exits
        faulthandler.dump_traceback_later(150, exit=True)
    with _cpu_megatron(device):
        for case, (src, meg, saved) in zip(cases, dirs):
            try:
                _rank_case(rank, world, *case, src, meg, saved, backend, device)
            except Exception:  # noqa: BLE001 - every case reported with its traceback
                failures.append(f"[{' '.join(map(str, case))}]\n{traceback.format_exc()}")
                # now, too: should the peer then wait in a collective of this case, the
                # run ends in a timeout and this is the only trace of the cause
                print(f"rank {rank}: {failures[-1]}", file=sys.stderr, flush=True)
    if failures:
        raise AssertionError(
            f"rank {rank}: {len(failures)} case(s) failed:\n\n" + "\n\n".join(failures)
        )


def _import_saved(meg: Path, saved: Path, out: Path) -> None:
    """The checkpoint the ranks saved, with the export's config, manifest and side files
    next to it, imports bit-exact against the source (import_megatron's sha256 check)."""
    for path in meg.iterdir():
        if path.name in ("config.json", MEGATRON_MANIFEST, "tokenizer_config.json"):
            shutil.copyfile(path, saved / path.name)
    import_megatron(saved, out, progress=False)


def _fp32_exports(exported, tmp_path, cases):
    """(src, export, save dir) per case; the bf16 mixtral source re-exported in fp32 so
    logits compare at float32 tolerance."""
    dirs = []
    for i, (family, strategy, tp) in enumerate(cases):
        src, state, meg = exported[family]
        if state["norm.weight"].dtype != torch.float32:
            src = tmp_path / f"{family}_fp32_src"
            meg = tmp_path / f"{family}_fp32_meg"
            if not src.exists():
                write_family_checkpoint(src, family, torch.float32)
                export_megatron(src, meg, progress=False)
        dirs.append((str(src), str(meg), str(tmp_path / f"saved_{i}_{family}_{strategy}")))
    return dirs


@pytest.mark.timeout(300)
def test_load_under_ep_etp_edp_matches_native_and_saves_back_bit_exact_world2(exported, tmp_path):
    dirs = _fp32_exports(exported, tmp_path, RANK_CASES)
    run_ranks(_ranks_body, world_size=2, args=(RANK_CASES, dirs, "gloo"))
    for i, (src, meg, saved) in enumerate(dirs):
        _import_saved(Path(meg), Path(saved), tmp_path / f"back_{i}")


def _tool(*args: str, hide_gpus: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [sys.executable, str(TOOL), *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd="/",
    )


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_gpu_load_export_ep2_matches_native_logits(tmp_path):
    """2 GPUs, NCCL: the export (the one-process CPU conversion, run on the GPU box) loaded
    into GPTModel at EP=2, expert-TP=2 (+TP=2), replicated experts over edp=2, EP=2 with
    TP=2, allgather EP=2; experts per rank and logits vs the native decoder; saved back from
    the ranks and imported bit-exact against the source. Conversions run with the GPUs
    visible; should one fail, it is retried through the CLI with them hidden (so the ranks'
    checks still run) and the failure reported at the end."""
    tool_failures = []

    def tool(fn, *args) -> None:
        """In this process (GPUs visible); on failure recorded, then the CLI, GPUs hidden."""
        try:
            fn(*args, progress=False)
        except Exception as e:  # noqa: BLE001 - reported at the end
            tool_failures.append(f"{fn.__name__} with GPUs visible: {type(e).__name__}: {e}")
            command = fn.__name__.replace("_megatron", "-megatron")
            res = _tool(command, *map(str, args), "--force", hide_gpus=True)
            assert res.returncode == 0, f"{command} {args}: {res.stderr}"

    dirs = []
    for i, (family, strategy, tp) in enumerate(GPU_CASES):
        src, meg = tmp_path / f"{family}_src", tmp_path / f"{family}_meg"
        if not src.exists():
            write_family_checkpoint(src, family, torch.float32)
            tool(export_megatron, src, meg)
        dirs.append((str(src), str(meg), str(tmp_path / f"saved_{i}_{family}_{strategy}")))
    run_ranks(_ranks_body, world_size=2, args=(GPU_CASES, dirs, "nccl"), backend="nccl")
    for i, (src, meg, saved) in enumerate(dirs):
        for path in Path(meg).iterdir():
            if path.name in ("config.json", MEGATRON_MANIFEST, "tokenizer_config.json"):
                shutil.copyfile(path, Path(saved) / path.name)
        back = tmp_path / f"back_{i}"
        tool(import_megatron, Path(saved), back)  # checks sha256 against the source
        assert read_manifest(back)["dtype"] == "fp32"
    assert not tool_failures, "\n".join(tool_failures)

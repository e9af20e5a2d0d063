"""launch/infer.py end to end: greedy ids equal Hugging Face transformers' greedy generate
on the same weights, for every strategy at 1, 2 and 4 ranks and with pp=2; bad input is
one line on stderr, exit 2, no output file.

The rank matrix calls the launcher's own steps (prepare -> groups -> build_model ->
generate) inside spawned gloo ranks, many configurations per spawn; the command line
itself runs through torchrun / python in a few subprocess cases.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.multirank import run_ranks

REPO = Path(__file__).resolve().parents[1]
INFER = REPO / "launch" / "infer.py"
PROMPTS = [[1, 5, 7, 9, 11, 13], [2, 4, 6], [3, 8, 30, 31, 32, 33, 34, 35]]
NEW_TOKENS = 6

FAMILIES = {
    "mixtral": dict(intermediate_size=64, num_local_experts=8),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                      shared_expert_intermediate_size=48, decoder_sparse_step=2,
                      mlp_only_layers=[]),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                      head_dim=16, norm_topk_prob=True),
}


def _make_hf_checkpoint(family: str, directory: Path) -> list[list[int]]:
    """Save a tiny random HF model and return its greedy continuations of PROMPTS."""
    import transformers

    config_cls = {"mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
                  "qwen3_moe": transformers.Qwen3MoeConfig}[family]
    model_cls = {"mixtral": transformers.MixtralForCausalLM,
                 "qwen2_moe": transformers.Qwen2MoeForCausalLM,
                 "qwen3_moe": transformers.Qwen3MoeForCausalLM}[family]
    config = config_cls(vocab_size=128, hidden_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                        max_position_embeddings=128, eos_token_id=None, pad_token_id=0,
                        bos_token_id=1, **FAMILIES[family])
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # larger router logits: routing decisions far from ties
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.shape[0] == 8:
                param.mul_(8.0)
    model.save_pretrained(directory)
    expected = []
    for prompt in PROMPTS:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    return expected


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, list[list[int]]]]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        directory = root / family
        out[family] = (str(directory), _make_hf_checkpoint(family, directory))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    out["prompts"] = str(prompts)
    return out


def _infer_conf(overrides: list[str]):
    """The launcher's config, composed exactly as `launch/infer.py <overrides>` would."""
    from hydra import compose, initialize_config_dir

    from moe_ext.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def _generate_with_launcher(overrides: list[str], rank: int, world_size: int) -> list[list[int]]:
    from moe_ext.cli import infer  # launch/infer.py's steps
    from moe_ext.dist import DistEnv
    from moe_ext.groups import ProcessGroups
    from moe_ext.model import generate

    cfg = _infer_conf(overrides)
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank,
                  local_world_size=world_size, master_addr="127.0.0.1", master_port=0)
    job = infer.prepare(cfg, env, cuda_available=False, num_local_gpus=0)
    groups = ProcessGroups.build(job.plan, backend="gloo", timeout=timedelta(seconds=120))
    model = infer.build_model(job, groups, rank, torch.device("cpu"))
    result = generate(model, job.prompt_ids, cfg.generate, eos_id=job.tokenizer.eos_id,
                            pad_id=job.tokenizer.pad_id, seed=cfg.seed)
    return result.tokens


def _check_cases(rank: int, world_size: int, cases: list[tuple[str, list[str], list]]) -> None:
    failures = []
    for label, overrides, expected in cases:
        got = _generate_with_launcher(overrides, rank, world_size)
        if got != expected:
            failures.append(f"{label}: got {got}, transformers {expected}")
    assert not failures, "\n".join(failures)


def _cases(checkpoints, strategy_overrides: list[tuple[str, list[str]]]):
    cases = []
    for family in FAMILIES:
        directory, expected = checkpoints[family]
        for label, extra in strategy_overrides:
            overrides = [f"checkpoint={directory}", f"prompts={checkpoints['prompts']}",
                         f"generate.max_new_tokens={NEW_TOKENS}", "dtype=fp32", *extra]
            cases.append((f"{family} {label}", overrides, expected))
    return cases


STRATEGIES = [(s, [f"strategy={s}"]) for s in
              ("replicate", "tp_experts", "ep_allgather", "ep_nccl")]


def test_single_rank_matches_transformers(checkpoints):
    run_ranks(_check_cases, 1, args=(_cases(checkpoints, [("auto", [])]),))


def test_two_ranks_every_strategy_and_pipeline(checkpoints):
    extra = [("replicate pp=2", ["strategy=replicate", "parallel.pp=2"]),
             ("ep_nccl pp=2", ["strategy=ep_nccl", "parallel.pp=2"])]
    run_ranks(_check_cases, 2, args=(_cases(checkpoints, STRATEGIES + extra),))


def test_four_ranks_every_strategy(checkpoints):
    extra = [("ep_nccl tp=2", ["strategy=ep_nccl", "parallel.tp=2"]),
             ("tp_experts pp=2", ["strategy=tp_experts", "parallel.pp=2"]),
             ("ep_allgather pp=2", ["strategy=ep_allgather", "parallel.pp=2"]),
             # EP 2 x 2 replicas: what auto picks on PCIe when half the experts fit a GPU
             ("ep_allgather ep=2", ["strategy=ep_allgather", "parallel.ep=2"])]
    run_ranks(_check_cases, 4, args=(_cases(checkpoints, STRATEGIES + extra),))


# -- the command line --------------------------------------------------------------------

def _cli(args: list[str], nproc: int = 1, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if nproc == 1:
        cmd = [sys.executable, str(INFER), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", str(INFER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_cli_demo_writes_output(tmp_path, checkpoints):
    out = tmp_path / "out.jsonl"
    res = _cli(["+topology=pcie", "generate.max_new_tokens=5", f"output={out}"], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "plan: replicate" in res.stdout + res.stderr  # auto on PCIe with a tiny model
    assert "decode:" in res.stdout + res.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and all(len(r["output_ids"]) == 5 for r in lines)
    assert all(isinstance(r["text"], str) and r["prompt_ids"] for r in lines)

    directory, expected = checkpoints["qwen3_moe"]
    out2 = tmp_path / "hf.jsonl"
    res = _cli([f"checkpoint={directory}", f"prompts={checkpoints['prompts']}",
                f"generate.max_new_tokens={NEW_TOKENS}", "strategy=ep_nccl", f"output={out2}"],
               nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [json.loads(x)["output_ids"] for x in out2.read_text().splitlines()] == expected


def _bad_prompts(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["strategy", "topology", "degrees", "ep_divides", "nvshmem",
                                  "jsonl", "too_long", "checkpoint", "corrupt", "family"])
def test_cli_bad_input_is_one_line(tmp_path, case, checkpoints):
    out = tmp_path / "out.jsonl"
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    good = Path(checkpoints["qwen3_moe"][0])
    (corrupt / "config.json").write_bytes((good / "config.json").read_bytes())
    weights = (good / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # truncated
    family = tmp_path / "family"
    family.mkdir()
    (family / "config.json").write_text(json.dumps({"model_type": "llama"}))
    args, needle = {
        "strategy": (["strategy=ep_foo"], "strategy"),
        "topology": (["+topology=infiniband"], "topology"),
        "degrees": (["strategy=replicate", "parallel.tp=2"], "world"),
        "ep_divides": (["strategy=ep_nccl", "parallel.ep=3"], "ep"),
        "nvshmem": (["strategy=ep_nvshmem", "+topology=pcie"], "ep_nccl"),
        "jsonl": (["prompts=" + _bad_prompts(tmp_path, '{"prompt": 3}')], "prompt"),
        "too_long": (["generate.max_new_tokens=100000"], "max_new_tokens"),
        "checkpoint": ([f"checkpoint={tmp_path / 'nope'}"], "nope"),
        "corrupt": ([f"checkpoint={corrupt}"], "model.safetensors"),
        "family": ([f"checkpoint={family}"], "llama"),
    }[case]
    res = _cli([*args, f"output={out}"])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert len(errors) == 1 and needle in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_cli_world_size_mismatch_two_ranks(tmp_path):
    res = _cli(["strategy=tp_experts", "parallel.tp=4"], nproc=2)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "world" in errors[0], res.stderr[-2000:]

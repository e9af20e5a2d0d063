"""launch/infer.py on one rank: bad input is one line on stderr, exit 2, no output file.
The greedy ids against transformers on 1, 2 and 4 ranks: tests/multirank/test_infer.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import REPO, make_infer_checkpoints, run_launcher

INFER = REPO / "launch" / "infer.py"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """A tiny qwen3_moe HF checkpoint; the corrupt case truncates a copy of its weights."""
    return make_infer_checkpoints(tmp_path_factory.mktemp("hf"), families=("qwen3_moe",))


def _bad_prompts(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case",
    [
        "strategy",
        "topology",
        "degrees",
        "ep_divides",
        "nvshmem",
        "jsonl",
        "too_long",
        "checkpoint",
        "corrupt",
        "family",
    ],
)
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
    res = run_launcher(INFER, [*args, f"output={out}"], timeout=300)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert len(errors) == 1 and needle in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not out.exists()

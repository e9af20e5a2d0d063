"""launch/serve.py's checks before any process group (moe_ext.cli.serve.prepare): server.*
ranges, the context, the listen address on rank 0; what the server takes from the
checkpoint (model name, stop ids, request sampling defaults from generation_config.json, the
chat template); and the launcher's one-line error and exit 2 on a port in use."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from moe_ext.cli import serve
from moe_ext.config import ConfigError, ServeConf
from moe_ext.dist import DistEnv
from moe_ext.launching import UsageError
from tests.support import REPO, local_dist_env, run_launcher, tiny_conf


def _env(rank: int = 0) -> DistEnv:
    return local_dist_env(rank, world_size=1)


def _prepare(rank: int = 0, **overrides):
    cfg = tiny_conf(ServeConf, **{"server.port": 0, **overrides})
    return serve.prepare(cfg, _env(rank), cuda_available=False, num_local_gpus=0)


def test_tiny_defaults():
    job = _prepare()
    assert job.model_name == "tiny"
    assert job.max_context == 2048  # the tiny model's context, under the 4096 cap
    assert job.stop_ids == [257]
    assert (job.temperature, job.top_p) == (0.0, 1.0)
    assert job.chat_template is not None and job.chat_template.where == "the built-in template"
    assert job.plan.world_size == 1
    job = _prepare(**{"server.max_context": 300, "server.model_name": "mine"})
    assert (job.max_context, job.model_name) == (300, "mine")


@pytest.mark.parametrize(
    "overrides, error, text",
    [
        ({"server.max_batch_size": 0}, ConfigError, "server.max_batch_size=0"),
        ({"server.max_queue": 0}, ConfigError, "server.max_queue=0"),
        ({"server.prefill_chunk": -1}, ConfigError, "server.prefill_chunk=-1"),
        ({"server.port": 70000}, ConfigError, "server.port=70000"),
        ({"server.max_context": 1}, ConfigError, "server.max_context=1"),
        ({"server.profile_steps": 0}, ConfigError, "server.profile_steps=0"),
        ({"server.profile_skip": -1}, ConfigError, "server.profile_skip=-1"),
        ({"server.max_context": 4096}, UsageError, "over the model's context of 2048"),
        ({"server.host": "no-such-host.invalid"}, UsageError, "server.host=no-such-host"),
        ({"dtype": "fp64"}, UsageError, "dtype='fp64'"),
    ],
)
def test_refusals(overrides, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace(".", r"\.")):
        _prepare(**overrides)


def test_port_in_use_is_refused_on_rank_0_only():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port}.*server.port="):
            _prepare(**{"server.port": port})
        assert _prepare(rank=1, **{"server.port": port}).model_name == "tiny"


def test_checkpoint_sampling_defaults_and_template(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    tiny = REPO / "moe_ext" / "data" / "checkpoints" / "tiny"
    for file in tiny.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    (directory / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [257, 5]})
    )
    (directory / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    job = _prepare(checkpoint=str(directory))
    assert (job.temperature, job.top_p) == (0.6, 0.9)
    assert job.stop_ids == [257, 5]
    assert job.model_name == "ckpt"
    assert job.chat_template.where.endswith("chat_template.jinja")


def test_launcher_port_in_use_one_line_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_launcher(REPO / "launch" / "serve.py", [f"server.port={port}"], timeout=120)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_launcher_unknown_server_key(tmp_path: Path):
    out = run_launcher(REPO / "launch" / "serve.py", ["server.prot=1"], timeout=120)
    assert out.returncode != 0
    assert "prot" in out.stderr

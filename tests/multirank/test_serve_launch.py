"""launch/serve.py end to end: torchrun, 2 gloo ranks, the tiny model, a real socket on
127.0.0.1 and the official ``openai`` client.

- 32 concurrent greedy requests of mixed prompt lengths (completions and chat, streaming
  and not) under ep_nccl (two data-parallel replicas) give exactly the text and token
  counts launch/infer.py writes for the same prompts (its ``{"messages": [...]}`` lines for
  the chats): batching changes nothing. The slow tier repeats it with pp2 (replicate) and
  tp_experts.
- SIGTERM to rank 0 drains: new requests get 503, the streams in flight finish in full,
  and the job exits 0.
- kill -9 of rank 1 mid-stream: the open stream ends with an error event, new requests
  get 503, and the job exits non-zero within the collective timeout (no hang).

The jobs run through tests/multirank/test_faults_launch.py's Torchrun (own sessions, found
through /proc, everything killed at the end).
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from moe_ext.model import Transformer
from tests.multirank.test_faults_launch import torchrun
from tests.support import REPO, free_port, run_launcher

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = [
    pytest.mark.multirank,
    pytest.mark.skipif(
        not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc (Linux)"
    ),
    pytest.mark.skipif(
        "cache_rows" not in inspect.signature(Transformer.forward).parameters,
        reason="the engine needs Transformer.forward's per-row KV cache (issue 20, contract 1)",
    ),
]

SERVE, INFER = REPO / "launch" / "serve.py", REPO / "launch" / "infer.py"
START_S = 180  # two ranks importing torch and loading on a loaded 2-core machine
MAX_TOKENS = 12
TEXT = (REPO / "moe_ext" / "data" / "corpus" / "shakespeare.txt").read_text()[2000:12000]
EP = ["strategy=ep_nccl"]  # two data-parallel replicas, experts split over them
SERVER = [
    "server.max_batch_size=8",  # 16 rows over 2 replicas for 32 requests: some wait
    "server.prefill_chunk=16",  # long prompts span several steps beside running decodes
    "server.max_context=256",
]


def prompts() -> list[dict]:
    """28 completion prompts of 1..180 characters and 4 chats."""
    lengths = [1 + (i * 53) % 180 for i in range(28)]
    lines = [{"prompt": TEXT[i * 97 : i * 97 + n]} for i, n in enumerate(lengths)]
    for i in range(4):
        chat = [{"role": "user", "content": TEXT[3000 + i * 50 : 3000 + i * 50 + 10 + 9 * i]}]
        if i % 2:
            chat.insert(0, {"role": "system", "content": "Speak as Hamlet."})
        lines.append({"messages": chat})
    return lines


def infer_outputs(tmp_path: Path, lines: list[dict], plan: list[str], nproc: int = 2) -> list[dict]:
    source, output = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = [
        f"prompts={source}",
        f"output={output}",
        f"generate.max_new_tokens={MAX_TOKENS}",
        "generate.temperature=0",
        *plan,
    ]
    done = run_launcher(INFER, args, nproc=nproc, timeout=START_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in output.read_text().splitlines()]


def wait_healthy(job, base: str) -> None:
    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    job.wait_until(healthy, "a healthy server", START_S)


def ask(client, line: dict, stream: bool, max_tokens: int = MAX_TOKENS, **extra):
    """(text, completion_tokens, finish_reason) of one request."""
    if "messages" in line:
        create = client.chat.completions.create
        kwargs = {"messages": line["messages"]}
        piece = lambda c: c.choices[0].delta.content or "" if c.choices else ""
        whole = lambda r: r.choices[0].message.content
    else:
        create = client.completions.create
        kwargs = {"prompt": line["prompt"]}
        piece = lambda c: c.choices[0].text if c.choices else ""
        whole = lambda r: r.choices[0].text
    kwargs.update(model="tiny", max_tokens=max_tokens, temperature=0, **extra)
    if not stream:
        reply = create(**kwargs)
        return whole(reply), reply.usage.completion_tokens, reply.choices[0].finish_reason
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **kwargs))
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return "".join(map(piece, chunks)), chunks[-1].usage.completion_tokens, finish


def _client(port: int):
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120
    )


@pytest.fixture
def server(tmp_path, request):
    extra = getattr(request, "param", EP)
    port = free_port()
    with torchrun(SERVE, [f"server.port={port}", *SERVER, *extra], tmp_path) as job:
        wait_healthy(job, f"http://127.0.0.1:{port}")
        job.find_workers()
        yield job, port


def check_batching_changes_nothing(tmp_path: Path, port: int, plan: list[str], nproc: int = 2):
    """32 concurrent requests, half streaming, each equal to launch/infer.py's output."""
    lines = prompts()
    expected = infer_outputs(tmp_path, lines, plan, nproc)
    client = _client(port)
    with concurrent.futures.ThreadPoolExecutor(len(lines)) as pool:
        futures = [pool.submit(ask, client, line, i % 2 == 1) for i, line in enumerate(lines)]
        got = [f.result(timeout=300) for f in futures]
    for i, ((text, count, finish), want) in enumerate(zip(got, expected)):
        assert text == want["text"], f"request {i}: {text!r} != infer's {want['text']!r}"
        assert count == len(want["output_ids"]), f"request {i}"
        assert finish == ("stop" if want["output_ids"][-1] == 257 else "length"), f"request {i}"
    return client


def test_batching_changes_nothing_and_sigterm_drains(tmp_path, server):
    job, port = server
    client = check_batching_changes_nothing(tmp_path, port, EP)

    # SIGTERM on rank 0 while 3 long streams run: they finish, new requests get 503, exit 0
    started, results = threading.Barrier(4, timeout=120), []

    def long_stream(prompt):
        stream = client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=150,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text, finish = "", None
        for k, chunk in enumerate(stream):
            if k == 0:
                started.wait()
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        results.append((text, finish))

    threads = [threading.Thread(target=long_stream, args=(p,)) for p in ("To be", "or", "not")]
    for thread in threads:
        thread.start()
    started.wait()
    os.kill(job.workers[0], signal.SIGTERM)
    refused = None
    deadline = time.monotonic() + 30
    while refused is None and time.monotonic() < deadline:
        try:
            client.completions.create(model="tiny", prompt="late", max_tokens=2)
            time.sleep(0.05)  # accepted before the drain began: try again
        except openai.InternalServerError as err:
            refused = err.status_code
    assert refused == 503
    for thread in threads:
        thread.join(120)
    assert len(results) == 3 and all(f == "length" for _, f in results), results
    assert all(len(text.encode()) <= 150 and text for text, _ in results)
    assert job.wait(60) == 0, job.text()[-3000:]
    assert "drained" in job.text()


PLANS = [["strategy=replicate", "parallel.pp=2"], ["strategy=tp_experts"]]


@pytest.mark.slow
@pytest.mark.parametrize("server", PLANS, indirect=True, ids=["pp2", "tp_experts"])
def test_batching_changes_nothing_other_plans(tmp_path, server, request):
    job, port = server
    plan = request.node.callspec.params["server"]
    check_batching_changes_nothing(tmp_path, port, plan)


@pytest.mark.faults
@pytest.mark.parametrize("server", [[*EP, "dist_timeout_s=15"]], indirect=True)
def test_dead_rank_error_event_503_and_exit(server):
    job, port = server
    base = f"http://127.0.0.1:{port}"
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 240, "stream": True}
    events = []
    with httpx.stream(
        "POST", f"{base}/v1/completions", json={**body, "ignore_eos": True}, timeout=120
    ) as reply:
        killed = None
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
                if killed is None:
                    killed = time.monotonic()
                    os.kill(job.workers[1], signal.SIGKILL)
    assert killed is not None
    last = json.loads(events[-1])  # an error event, not [DONE], ends the stream
    assert last["error"]["type"] == "service_unavailable", events[-3:]
    statuses = set()
    while job.proc.poll() is None and time.monotonic() - killed < 60:
        try:
            reply = httpx.post(
                f"{base}/v1/completions",
                json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                timeout=30,
            )
            statuses.add(reply.status_code)
        except httpx.HTTPError:  # the server closed: the job is ending
            pass
        time.sleep(0.1)
    assert 503 in statuses and 200 not in statuses, statuses
    code = job.wait(60)
    assert code != 0, job.text()[-3000:]
    assert time.monotonic() - killed < 15 + 45

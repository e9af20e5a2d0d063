"""The OpenAI-compatible HTTP server (moe_ext.serve.http) over a fake engine
(tests/serve_fake.py), on a real uvicorn socket on 127.0.0.1, spoken to by the official
``openai`` client (and httpx / a raw socket where the client cannot send the request).

The fake engine's output for any prompt is known (serve_fake.expected_ids), so every text,
usage count and finish reason is checked against it; chat prompts against the template's
own encoding; stop strings, incremental UTF-8, every bad request (400 naming the field),
429 with Retry-After, 503, an engine failure mid-stream, a client disconnect (streaming or
not) cancelling its engine request, and /metrics counting what was served.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time

import pytest

from moe_ext.model.tokenizer import ByteTokenizer
from moe_ext.serve.chat import load_chat_template
from moe_ext.serve.engine import EngineUnavailable, QueueFull
from moe_ext.serve.http import Defaults, HttpServer, TextStream, build_app
from tests.serve_fake import FakeEngine, expected_ids, wait_until
from tests.support import free_port, tiny_args

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOK = ByteTokenizer()
TIMEOUT_S = 20.0


def _text(ids: list[int]) -> str:
    return TOK.decode(ids)


@contextlib.contextmanager
def _http_server(engine: FakeEngine, tokenizer):
    """The FastAPI app over ``engine`` on a free local port; yields its base URL."""
    app = build_app(
        engine,
        tokenizer,
        vocab_size=260,
        chat_template=load_chat_template(None, "byte"),
        defaults=Defaults(temperature=0.0, top_p=1.0),
    )
    port = free_port()
    server = HttpServer(app, "127.0.0.1", port)
    server.start(timeout_s=TIMEOUT_S)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
    assert not server.thread.is_alive()


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(model_name="tiny", max_context=256)
    with _http_server(engine, TOK) as base:
        yield engine, base


@pytest.fixture
def engine(served):
    served[0].reset()
    return served[0]


@pytest.fixture
def base(served):
    return served[1]


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)


# ---- completions and chat, streaming and not ----------------------------------------------


def test_completion(engine, client):
    out = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=12)
    prompt = TOK.encode("The quick brown fox")
    assert out.choices[0].text == _text(expected_ids(len(prompt), 12))
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), 12)
    assert out.usage.total_tokens == len(prompt) + 12
    assert out.model == "tiny" and out.object == "text_completion"
    ids, params = engine.submitted[0]
    assert ids == prompt
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (
        12,
        0.0,
        1.0,
        None,
    )


def test_completion_token_ids_sampling_and_default_length(engine, client):
    out = client.completions.create(
        model="tiny", prompt=[256, 72, 105], temperature=0.7, top_p=0.9, seed=5
    )
    assert out.choices[0].text == _text(expected_ids(3, 16))  # OpenAI's default max_tokens
    ids, params = engine.submitted[0]
    assert ids == [256, 72, 105]
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (16, 0.7, 0.9, 5)


def test_completion_stream(engine, client):
    engine.delay_s = 0.002
    stream = client.completions.create(
        model="tiny",
        prompt="Once upon a time",
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    prompt = TOK.encode("Once upon a time")
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == _text(expected_ids(len(prompt), 40))
    assert all("\ufffd" not in t for t in texts)  # no half characters on the wire
    assert len([t for t in texts if t]) > 5  # it really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == len(prompt)


def test_chat(engine, client):
    messages = [
        {"role": "system", "content": "Speak verse."},
        {"role": "user", "content": "Hi there"},
    ]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9)
    prompt = load_chat_template(None, "byte").encode(messages, TOK)
    assert engine.submitted[0][0] == prompt
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == _text(expected_ids(len(prompt), 9))
    assert out.usage.prompt_tokens == len(prompt)
    assert out.object == "chat.completion"


def test_chat_stream_and_default_max_tokens(engine, client):
    messages = [{"role": "user", "content": "Tell me"}]
    prompt = load_chat_template(None, "byte").encode(messages, TOK)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=30, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == _text(expected_ids(len(prompt), 30))
    assert chunks[-1].choices[0].finish_reason == "length"
    engine.reset()
    client.chat.completions.create(model="tiny", messages=messages)
    assert engine.submitted[0][1].max_tokens == 256 - len(prompt)  # the room left


def test_eos_finishes_with_stop(engine, client):
    engine.eos_after = 5
    out = client.completions.create(model="tiny", prompt="abc", max_tokens=50)
    assert out.choices[0].text == _text(expected_ids(4, 5))
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 6  # the EOS id counts, its text is empty
    out = client.completions.create(
        model="tiny", prompt="abc", max_tokens=20, extra_body={"ignore_eos": True}
    )
    assert engine.submitted[-1][1].ignore_eos
    assert out.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text_and_cancel(engine, client, stream):
    engine.delay_s = 0.002
    prompt = TOK.encode("x")  # 2 ids: the reply starts at offset 2
    full = _text(expected_ids(len(prompt), 60))
    stop = "fake"
    assert stop in full
    out = client.completions.create(
        model="tiny", prompt="x", max_tokens=60, stop=["zzz", stop], stream=stream
    )
    if stream:
        chunks = list(out)
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        text, finish = out.choices[0].text, out.choices[0].finish_reason
    assert text == full[: full.index(stop)]
    assert finish == "stop"
    assert engine.wait_cancelled(0, TIMEOUT_S)


def test_models_and_health(engine, client, base):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(f"{base}/health", timeout=TIMEOUT_S).status_code == 200
    engine.draining = True
    reply = httpx.get(f"{base}/health", timeout=TIMEOUT_S)
    assert (reply.status_code, reply.json()["status"]) == (503, "draining")


# ---- errors -------------------------------------------------------------------------------

GOOD = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
BAD = [
    ("completions", {"prompt": "hi"}, "model"),
    ("completions", {"model": "tiny"}, "prompt"),
    ("completions", {**GOOD, "model": "gpt-4"}, "model"),
    ("completions", {**GOOD, "model": 7}, "model"),
    ("completions", {**GOOD, "prompt": 12}, "prompt"),
    ("completions", {**GOOD, "prompt": [1, "a"]}, "prompt"),
    ("completions", {**GOOD, "prompt": [1, 999]}, "prompt"),
    ("completions", {**GOOD, "prompt": []}, "prompt"),
    ("completions", {**GOOD, "max_tokens": "4"}, "max_tokens"),
    ("completions", {**GOOD, "max_tokens": 0}, "max_tokens"),
    ("completions", {**GOOD, "max_tokens": 255}, "max_tokens"),  # 3 + 255 > 256
    ("completions", {**GOOD, "prompt": "x" * 300}, "prompt"),
    ("completions", {**GOOD, "temperature": "hot"}, "temperature"),
    ("completions", {**GOOD, "temperature": 3}, "temperature"),
    ("completions", {**GOOD, "top_p": 0}, "top_p"),
    ("completions", {**GOOD, "seed": 1.5}, "seed"),
    ("completions", {**GOOD, "stop": 5}, "stop"),
    ("completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("completions", {**GOOD, "n": 2}, "n"),
    ("completions", {**GOOD, "stream": "yes"}, "stream"),
    ("completions", {**GOOD, "stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {**GOOD, "logprobs": 2}, "logprobs"),
    ("completions", {**GOOD, "echo": True}, "echo"),
    ("completions", {**GOOD, "presence_penalty": 0.5}, "presence_penalty"),
    ("completions", {**GOOD, "top_k": 5}, "top_k"),
    ("chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("chat/completions", {"model": "tiny"}, "messages"),
    ("chat/completions", {**CHAT, "messages": "hi"}, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"content": "hi"}]}, "messages[0].role"),
    (
        "chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": 3}]},
        "messages[0].content",
    ),
    ("chat/completions", {**CHAT, "max_completion_tokens": 1000}, "max_tokens"),
    ("chat/completions", {**CHAT, "model": None}, "model"),
]


@pytest.mark.parametrize("endpoint, body, param", BAD)
def test_bad_request_names_the_field(engine, base, endpoint, body, param):
    reply = httpx.post(f"{base}/v1/{endpoint}", json=body, timeout=TIMEOUT_S)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param.split("[")[0].split(".")[0] in error["message"] or param == "model"
    assert not engine.submitted  # nothing reached the engine


def test_bad_bodies_then_still_serving(engine, base, client):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        reply = httpx.post(
            f"{base}/v1/completions",
            content=raw,
            headers={"Content-Type": "application/json"},
            timeout=TIMEOUT_S,
        )
        assert reply.status_code == 400
        assert "JSON" in reply.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    out = client.completions.create(model="tiny", prompt="hi", max_tokens=3)
    assert out.choices[0].text == _text(expected_ids(3, 3))


def test_off_values_of_unsupported_fields_pass(engine, client):
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        presence_penalty=0,
        frequency_penalty=0.0,
        logprobs=False,
        response_format={"type": "text"},
        tool_choice="none",
        user="someone",
    )
    assert out.choices[0].finish_reason == "length"


def test_queue_full_is_429_with_retry_after(engine, client, base):
    engine.refuse = QueueFull(2.4, max_queue=8)
    reply = httpx.post(f"{base}/v1/completions", json=GOOD, timeout=TIMEOUT_S)
    assert reply.status_code == 429
    assert reply.headers["retry-after"] == "3"
    with pytest.raises(openai.RateLimitError):
        client.completions.create(**GOOD)


def test_unavailable_is_503(engine, client):
    engine.refuse = EngineUnavailable("the server is shutting down")
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(**CHAT)
    assert err.value.status_code == 503


def test_engine_failure_mid_request(engine, client):
    engine.fail_after = 3
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(**GOOD)
    assert err.value.status_code == 503 and "rank 1" in str(err.value)
    engine.reset()
    engine.fail_after = 3
    chunks = []
    with pytest.raises(openai.APIError, match="rank 1"):
        for chunk in client.completions.create(
            model="tiny", prompt="hi", max_tokens=9, stream=True
        ):
            chunks.append(chunk)
    assert "".join(c.choices[0].text for c in chunks) == _text(expected_ids(3, 3))


# ---- disconnects --------------------------------------------------------------------------


GONE = 'moe_ext_request_finish_total{reason="client_gone"}'


def test_stream_disconnect_cancels(engine, base):
    gone = _metrics(base).get(GONE, 0)
    engine.delay_s = 0.02  # 10 s of tokens: only a cancel ends it in time
    body = {**GOOD, "max_tokens": 250, "prompt": "a", "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=TIMEOUT_S) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    assert engine.wait_cancelled(0, 5.0)
    assert wait_until(lambda: not engine.running, 5.0)
    assert wait_until(lambda: _metrics(base).get(GONE, 0) == gone + 1, 5.0)


def test_disconnect_cancels_non_streaming(engine, base):
    engine.delay_s = 0.02
    body = json.dumps({**GOOD, "max_tokens": 250, "prompt": "a"}).encode()
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_until(lambda: engine.submitted, 5.0)
    assert engine.wait_cancelled(0, 5.0)


# ---- metrics and text decoding -------------------------------------------------------------


def test_metrics(engine, client, base):
    before = _metrics(base)
    client.completions.create(model="tiny", prompt="abc", max_tokens=7)
    list(client.completions.create(model="tiny", prompt="ab", max_tokens=5, stream=True))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="ab", max_tokens=0)
    after = _metrics(base)
    delta = lambda name: after.get(name, 0) - before.get(name, 0)
    assert delta("moe_ext_prompt_tokens_total") == 4 + 3
    assert delta("moe_ext_generation_tokens_total") == 12
    assert delta('moe_ext_requests_total{endpoint="completions",status="200"}') == 2
    assert delta('moe_ext_requests_total{endpoint="completions",status="400"}') == 1
    assert delta('moe_ext_request_finish_total{reason="length"}') == 2
    assert delta("moe_ext_time_to_first_token_seconds_count") == 2
    assert delta("moe_ext_inter_token_latency_seconds_count") == 6 + 4
    assert after["moe_ext_kv_rows_total"] == 8
    assert after["moe_ext_requests_running"] == 0
    assert "moe_ext_kv_cache_usage_ratio" in after


def _metrics(base: str) -> dict[str, float]:
    reply = httpx.get(f"{base}/metrics", timeout=TIMEOUT_S)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    out = {}
    for line in reply.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_text_stream_utf8_and_stop_holdback():
    text = "héllo wörld ✓ done"
    ids = list(text.encode())
    stream = TextStream(TOK, ["wörld ✓ x"])
    deltas = [stream.add([i]) for i in ids] + [stream.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    stream = TextStream(TOK, ["ld ✓"])
    deltas = [stream.add([i]) for i in ids]
    assert "".join(deltas) + stream.finish() == "héllo wör"
    assert stream.stopped
    # a stop string split across events is never partly sent before it is recognized
    stream = TextStream(TOK, ["wörld"])
    sent = ""
    for i in ids:
        sent += stream.add([i])
        assert "wö" not in sent
    assert sent == "héllo "


def test_server_start_error_is_one_line():
    from moe_ext.serve.http import ServerStartError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HttpServer(build_app(FakeEngine(), TOK, 260), "127.0.0.1", port, "critical")
        start = time.monotonic()
        with pytest.raises(ServerStartError, match="server.port"):
            server.start(timeout_s=TIMEOUT_S)
        assert time.monotonic() - start < TIMEOUT_S


@pytest.mark.parametrize("layout", ["byte_level", "metaspace"])
def test_text_stream_equals_whole_decode_for_bpe_tokenizers(tmp_path, layout):
    """Token by token, the deltas of a checkpoint tokenizer join to its decode of all ids
    (a byte-level BPE, and a Metaspace one whose decode drops a leading space)."""
    tokenizers = pytest.importorskip("tokenizers")
    from moe_ext.model.tokenizer import HFTokenizer

    corpus = ["Hello world, héllo wörld ✓", "the quick brown fox jumps over the lazy dog"]
    if layout == "byte_level":
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
        tok.decoder = tokenizers.decoders.Metaspace()
        alphabet = []
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>"], initial_alphabet=alphabet
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(str(tmp_path))
    text = "héllo wörld ✓, the lazy fox"
    ids = hf.encode(text, add_bos=False)
    stream = TextStream(hf, [])
    deltas = [stream.add([i]) for i in ids] + [stream.finish()]
    assert "".join(deltas) == hf.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_stop_strings_random_against_whole_text():
    """Random texts, stop strings and event sizes: the streamed text is the whole text cut
    at the earliest stop match, whatever the chunking."""
    import random

    rng = random.Random(0)
    alphabet = "ab é✓"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[: min(cuts)] if cuts else text
        ids = list(text.encode())
        stream, out, i = TextStream(TOK, stops), "", 0
        while i < len(ids) and not stream.stopped:
            n = rng.randint(1, 4)
            out += stream.add(ids[i : i + n])
            i += n
        out += stream.finish()
        assert out == expected, (text, stops)
        assert stream.stopped == bool(cuts)


def test_ids_only_tokenizer_streams_a_chunk_per_token():
    """Random weights or a checkpoint without tokenizer.json: no text, yet a streaming client
    (tools/bench_serve.py times TTFT and inter-token gaps from the chunks) sees each token."""
    from moe_ext.cli.infer import IdsOnlyTokenizer

    httpx = pytest.importorskip("httpx")
    engine = FakeEngine(model_name="ids", max_context=256)
    engine.delay_s = 0.002
    with _http_server(engine, IdsOnlyTokenizer(tiny_args())) as base:
        body = {"model": "ids", "prompt": [1, 2, 3], "max_tokens": 10, "stream": True}
        url = f"{base}/v1/completions"
        with httpx.stream("POST", url, json=body, timeout=TIMEOUT_S) as reply:
            events = [
                json.loads(line[5:])
                for line in reply.iter_lines()
                if line.startswith("data:") and line.strip() != "data: [DONE]"
            ]
        content = [e for e in events if e["choices"][0]["finish_reason"] is None]
        assert [e["choices"][0]["text"] for e in content] == [""] * 10
        assert events[-1]["choices"][0]["finish_reason"] == "length"

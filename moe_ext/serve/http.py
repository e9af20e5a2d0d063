"""The OpenAI-compatible HTTP front of the serving engine (rank 0 only): FastAPI + uvicorn.

    POST /v1/completions        {"model", "prompt": text | [ids] | [text] | [[ids]], ...}
    POST /v1/chat/completions   {"model", "messages": [{"role", "content"}, ...], ...}
    GET  /v1/models   GET /health   GET /metrics (Prometheus text, its own registry)

Both POSTs take ``max_tokens`` (chat also ``max_completion_tokens``), ``temperature``,
``top_p``, ``seed``, ``stop`` (a string or up to 4), ``n`` (1 only), ``stream`` and
``stream_options.include_usage``; ``ignore_eos`` (as vLLM) generates max_tokens whatever
the model emits. Unset sampling fields take the checkpoint's generation_config.json values
(``defaults``). Fields this server does not implement (logprobs, echo, penalties, top_k,
tools, response_format other than text, ...; UNSUPPORTED) are a 400 unless they hold their
"off" value; fields it does not know are ignored, as OpenAI's server does.

Errors are OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 400
``invalid_request_error`` naming the field (``param``) for a missing field, a wrong type or
range, a prompt plus max_tokens beyond the context, an unknown model, a body that is not a
JSON object; 429 with ``Retry-After`` when the engine's queue is full; 503 while the engine
drains or after a rank died. A request never takes the server down.

Text: ids are decoded incrementally (a character cut across tokens waits for its end);
``stop`` strings are matched on the decoded text, which is cut before the match, and the
engine request is cancelled there. A stream holds back the tail that could still begin a
stop string. A client that disconnects (streaming or not) cancels its engine request, which
frees its KV row.

The engine is any EngineClient (moe_ext.serve.engine): ``submit`` is called on the event
loop's thread and its RequestStream yields TokenEvents on that loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import FastAPI
from fastapi import Request as HttpRequest  # module-level: FastAPI resolves the annotations
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moe_ext.errors import MoeExtError
from moe_ext.serve.chat import ChatTemplate, ChatTemplateError, MessagesError

log = logging.getLogger("moe_ext.serve.http")

MAX_STOP_STRINGS = 4  # as OpenAI
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.05  # how often a non-streaming request checks for its client
# TTFT / inter-token latency bucket edges (seconds): sub-ms CUDA-graph decode to slow CPU runs
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)


class HttpError(MoeExtError):
    """An error answered in OpenAI's JSON shape with ``status``; ``param`` names the field."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        type_: str = "invalid_request_error",
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type_, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class Defaults:
    """What unset sampling fields take: generation_config.json's values (the stop ids are
    the engine's own: it stops on the model's EOS ids unless ``ignore_eos``)."""

    temperature: float = 1.0
    top_p: float = 1.0


# ---- metrics ----------------------------------------------------------------------------


class ServeMetrics:
    """The server's Prometheus metrics in their own CollectorRegistry (no global state):
    requests by endpoint and status, finish reasons, prompt / generated tokens, TTFT and
    inter-token latency histograms, end-to-end latency; the engine's running / queued
    requests and KV use are read from ``EngineClient.stats()`` at each scrape."""

    def __init__(self, engine: Any):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "moe_ext_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.finished = Counter(
            "moe_ext_request_finish", "Requests finished, by reason", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("moe_ext_prompt_tokens", "Prompt tokens in", registry=r)
        self.generation_tokens = Counter(
            "moe_ext_generation_tokens", "Generated tokens out", registry=r
        )
        self.ttft = Histogram(
            "moe_ext_time_to_first_token_seconds",
            "Request arrival to its first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "moe_ext_inter_token_latency_seconds",
            "Time between a request's successive tokens",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "moe_ext_request_latency_seconds",
            "Request arrival to its last token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        gauge = lambda name, text: Gauge(name, text, registry=r)
        self.running = gauge("moe_ext_requests_running", "Requests holding a KV row")
        self.queued = gauge("moe_ext_requests_queued", "Requests waiting for admission")
        self.kv_rows_used = gauge("moe_ext_kv_rows_used", "KV-cache rows in use")
        self.kv_rows_total = gauge("moe_ext_kv_rows_total", "KV-cache rows")
        self.kv_tokens_used = gauge("moe_ext_kv_tokens_used", "KV-cache tokens reserved")
        self.kv_tokens_total = gauge("moe_ext_kv_tokens_total", "KV-cache token capacity")
        self.kv_usage = gauge("moe_ext_kv_cache_usage_ratio", "KV tokens reserved / capacity")
        self.healthy = gauge("moe_ext_engine_healthy", "1 while every rank answers")
        self.draining = gauge("moe_ext_engine_draining", "1 after SIGTERM, until exit")

    def render(self) -> bytes:
        """The text exposition, engine gauges refreshed first."""
        from prometheus_client import generate_latest

        stats = self.engine.stats()
        self.running.set(stats.running)
        self.queued.set(stats.queued)
        self.kv_rows_used.set(stats.kv_rows_used)
        self.kv_rows_total.set(stats.kv_rows_total)
        self.kv_tokens_used.set(stats.kv_tokens_used)
        self.kv_tokens_total.set(stats.kv_tokens_total)
        self.kv_usage.set(stats.kv_tokens_used / max(stats.kv_tokens_total, 1))
        self.healthy.set(1 if stats.healthy else 0)
        self.draining.set(1 if stats.draining else 0)
        return generate_latest(self.registry)


# ---- request parsing --------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad(message: str, param: Optional[str]) -> HttpError:
    return HttpError(400, message, param)


def _optional(body: dict, name: str, check, kind: str) -> Any:
    """``body[name]`` when set (None counts as unset), refused unless ``check(value)``."""
    value = body.get(name)
    if value is not None and not check(value):
        raise _bad(f"'{name}' must be {kind}, got {json.dumps(value)[:80]}", name)
    return value


@dataclass
class Request:
    """One parsed POST: what the engine gets and what the answer needs."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: list[str]
    ignore_eos: bool
    stream: bool
    include_usage: bool


# Request fields this server does not implement, with the values that mean "off" (what
# clients send by default); anything else is a 400 naming the field rather than an answer
# that silently ignores it.
UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
    "top_k": (None, 0, -1),
    "min_tokens": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
}
UNSUPPORTED_CHOICES = {"tool_choice": (None, "none", "auto"), "response_format": None}


def _refuse_unsupported(body: dict) -> None:
    for name, off in UNSUPPORTED.items():
        given = body.get(name)
        if not any(
            given == value and isinstance(given, bool) == isinstance(value, bool) for value in off
        ):
            raise _bad(f"'{name}' is not supported by this server; leave it out", name)
    if body.get("tool_choice") not in UNSUPPORTED_CHOICES["tool_choice"]:
        raise _bad("'tool_choice' is not supported by this server; leave it out", "tool_choice")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad(
            '\'response_format\' other than {"type": "text"} is not supported by this server',
            "response_format",
        )


def _parse_common(body: dict, model_name: str, defaults: Defaults) -> dict[str, Any]:
    model = body.get("model")
    if model is None:
        raise _bad("'model' is required", "model")
    if not isinstance(model, str):
        raise _bad("'model' must be a string", "model")
    if model != model_name:
        raise HttpError(
            400,
            f"the model '{model}' does not exist; this server serves '{model_name}'",
            "model",
            code="model_not_found",
        )
    _refuse_unsupported(body)
    temperature = _optional(body, "temperature", _is_number, "a number")
    if temperature is not None and not 0 <= temperature <= 2:
        raise _bad(f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    top_p = _optional(body, "top_p", _is_number, "a number")
    if top_p is not None and not 0 < top_p <= 1:
        raise _bad(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    seed = _optional(body, "seed", _is_int, "an integer")
    n = _optional(body, "n", _is_int, "an integer")
    if n is not None and n != 1:
        raise _bad(f"'n' must be 1 (this server returns one choice), got {n}", "n")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise _bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
    stream = _optional(body, "stream", lambda v: isinstance(v, bool), "a boolean")
    options = _optional(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
        include_usage = _optional(
            options, "include_usage", lambda v: isinstance(v, bool), "a boolean"
        )
    ignore_eos = _optional(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean")
    return {
        "temperature": float(defaults.temperature if temperature is None else temperature),
        "top_p": float(defaults.top_p if top_p is None else top_p),
        "seed": seed,
        "stop": stop,
        "ignore_eos": bool(ignore_eos),
        "stream": bool(stream),
        "include_usage": bool(include_usage),
    }


def _max_tokens(body: dict, names: tuple[str, ...]) -> Optional[int]:
    for name in names:
        value = _optional(body, name, _is_int, "an integer")
        if value is not None:
            if value < 1:
                raise _bad(f"'{name}' must be at least 1, got {value}", name)
            return value
    return None


def _check_context(prompt: int, max_tokens: Optional[int], max_context: int, field: str) -> int:
    """max_tokens, defaulted to the room left; refused when prompt + max_tokens exceed the
    context (``field``: the prompt's field when it alone is too long)."""
    if prompt >= max_context:
        raise _bad(
            f"the prompt is {prompt} tokens, which leaves no room in this server's context of "
            f"{max_context} tokens; shorten '{field}'",
            field,
        )
    if max_tokens is None:
        return max_context - prompt
    if prompt + max_tokens > max_context:
        raise _bad(
            f"'max_tokens' is {max_tokens}, and the prompt is {prompt} tokens: together over "
            f"this server's context of {max_context} tokens; lower 'max_tokens' to at most "
            f"{max_context - prompt}",
            "max_tokens",
        )
    return max_tokens


def _check_ids(ids: list[int], vocab_size: int, field: str) -> list[int]:
    if not ids:
        raise _bad(f"'{field}' is empty", field)
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise _bad(f"'{field}' holds token id {bad}, outside [0, {vocab_size})", field)
    return ids


# ---- incremental decoding and stop strings ----------------------------------------------


class TextStream:
    """Generated ids -> text deltas, as they arrive. Each step decodes the window from the
    previous emission's first id (context for tokenizers whose pieces depend on their left
    neighbour) and emits what it adds, unless it ends in U+FFFD (a character whose bytes
    are not all there yet). ``stop`` strings cut the text before the first match; the tail
    that could still begin one is held back until more text or the end."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        # a tokenizer without text (a checkpoint with ids only, random weights): every
        # step's ids still make a (textless) chunk, so streaming clients see each token
        self.ids_only = tokenizer.decode([0]) is None
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0  # the window's start
        self.read = 0  # ids decoded into ``text``
        self.text = ""  # decoded so far
        self.sent = 0  # characters of ``text`` handed out
        self.searched = 0  # characters of ``text`` searched for stop strings
        self.stopped = False  # a stop string matched

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) or ""

    def add(self, ids: list[int]) -> str:
        """The new text these ids make visible (possibly "")."""
        self.ids.extend(ids)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of generation."""
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix : self.read])
            self.text += self._decode(self.ids[self.prefix :])[len(before) :]
            self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        # a match not found last time ends in the new text: search only from there
        start = max(0, self.searched - self.hold)
        found = (self.text.find(s, start) for s in self.stop)
        cut = min((i for i in found if i >= 0), default=-1)
        self.searched = len(self.text)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            end = len(self.text)
        else:
            end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta


# ---- the app ----------------------------------------------------------------------------


def build_app(
    engine: Any,
    tokenizer: Any,
    vocab_size: int,
    chat_template: Optional[ChatTemplate] = None,
    defaults: Defaults = Defaults(),
    metrics: Optional[ServeMetrics] = None,
):
    """The FastAPI app over ``engine`` (an EngineClient). ``tokenizer``: encode(text) /
    decode(ids) of the model (an ids-only tokenizer makes text prompts a 400);
    ``vocab_size``: the embedding rows prompt ids must index; ``chat_template``: None makes
    /v1/chat/completions a 400 naming ``messages``."""
    from moe_ext.serve.engine import (
        ContextTooLong,
        EngineUnavailable,
        InvalidRequest,
        QueueFull,
        SamplingParams,
    )

    app = FastAPI(title="moe_ext", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = metrics or ServeMetrics(engine)
    app.state.metrics = metrics
    model_name = engine.model_name
    created = int(time.time())

    def error_response(err: HttpError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def read_body(request: HttpRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _bad(
                f"the request body is not valid JSON ({err}); send a JSON object", None
            ) from err
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", None)
        return body

    def encode(text: str, field: str) -> list[int]:
        try:
            return tokenizer.encode(text)
        except MoeExtError as err:  # a checkpoint without tokenizer.json
            raise _bad(f"'{field}': {err}", field) from err

    def parse_completion(body: dict) -> Request:
        common = _parse_common(body, model_name, defaults)
        prompt = body.get("prompt")
        if prompt is None:
            raise _bad("'prompt' is required", "prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = _check_ids(encode(prompt, "prompt"), vocab_size, "prompt")
        elif isinstance(prompt, list) and all(_is_int(i) for i in prompt):
            ids = _check_ids(prompt, vocab_size, "prompt")
        else:
            raise _bad(
                "'prompt' must be a string or a list of token ids (one prompt: n=1 serving)",
                "prompt",
            )
        max_tokens = _max_tokens(body, ("max_tokens",))
        max_tokens = _check_context(
            len(ids),
            COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            engine.max_context,
            "prompt",
        )
        return Request(ids, max_tokens, **common)

    def parse_chat(body: dict) -> Request:
        common = _parse_common(body, model_name, defaults)
        if "messages" not in body:
            raise _bad("'messages' is required", "messages")
        if chat_template is None:
            raise _bad(
                f"the model '{model_name}' has no chat template (no chat_template in its "
                f"tokenizer_config.json or chat_template.jinja); use /v1/completions",
                "messages",
            )
        try:
            ids = chat_template.encode(body["messages"], tokenizer)
        except MessagesError as err:
            raise _bad(str(err), err.field) from err
        except ChatTemplateError as err:
            raise _bad(str(err), "messages") from err
        except MoeExtError as err:  # an ids-only tokenizer
            raise _bad(f"'messages': {err}", "messages") from err
        ids = _check_ids(ids, vocab_size, "messages")
        max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
        max_tokens = _check_context(len(ids), max_tokens, engine.max_context, "messages")
        return Request(ids, max_tokens, **common)

    def submit(req: Request):
        params = SamplingParams(
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop_token_ids=(),
            ignore_eos=req.ignore_eos,
        )
        try:
            return engine.submit(req.prompt_ids, params)
        except QueueFull as err:
            retry = max(1, math.ceil(getattr(err, "retry_after_s", 1) or 1))
            raise HttpError(
                429,
                f"the server's queue is full; retry in {retry} s",
                type_="rate_limit_exceeded",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            ) from err
        except EngineUnavailable as err:
            raise HttpError(503, str(err), type_="service_unavailable") from err
        except ContextTooLong as err:
            raise _bad(str(err), "max_tokens") from err
        except InvalidRequest as err:
            raise _bad(str(err), None) from err

    class Run:
        """One engine request as the answer sees it: text, finish reason, usage, timings."""

        def __init__(self, req: Request, stream: Any, arrival: float):
            self.req, self.stream = req, stream
            self.text = TextStream(tokenizer, req.stop)
            self.completion_tokens = 0
            self.finish_reason: Optional[str] = None
            self.error: Optional[str] = None
            self.start = arrival  # the request's arrival at this server (TTFT's start)
            self.last: Optional[float] = None
            metrics.prompt_tokens.inc(len(req.prompt_ids))

        async def deltas(self) -> AsyncIterator[str]:
            """Text deltas until the request ends (a stop string cancels it)."""
            async for event in self.stream:
                if event.token_ids:
                    now = time.monotonic()
                    if self.last is None:
                        metrics.ttft.observe(now - self.start)
                    else:
                        gap = (now - self.last) / len(event.token_ids)
                        for _ in event.token_ids:
                            metrics.itl.observe(gap)
                    self.last = now
                    self.completion_tokens += len(event.token_ids)
                    metrics.generation_tokens.inc(len(event.token_ids))
                    delta = self.text.add(list(event.token_ids))
                    if self.text.stopped:
                        engine.cancel(self.stream)
                        self.finish_reason = "stop"
                        if delta:
                            yield delta
                        break
                    if delta or self.text.ids_only:
                        yield delta
                if event.finish_reason is not None:
                    self.finish_reason = event.finish_reason
                    self.error = event.error
                    break
            if self.finish_reason != "error":
                tail = self.text.finish()
                if tail:
                    yield tail
            if self.finish_reason is None:  # the stream ended without saying why
                self.finish_reason = "abort"
            metrics.finished.labels(self.finish_reason).inc()
            metrics.e2e.observe(time.monotonic() - self.start)

        def abandon(self) -> None:
            """The client went away: cancel the engine request (frees its KV row)."""
            engine.cancel(self.stream)
            if self.finish_reason is None:
                self.finish_reason = "abort"
                metrics.finished.labels("client_gone").inc()

        def usage(self) -> dict[str, int]:
            prompt = len(self.req.prompt_ids)
            return {
                "prompt_tokens": prompt,
                "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens,
            }

    def engine_error(run: Run) -> HttpError:
        return HttpError(
            503,
            f"the engine failed during this request ({run.error or 'no reason given'})",
            type_="service_unavailable",
        )

    async def answer(request: HttpRequest, endpoint: str, chat: bool):
        arrival = time.monotonic()
        try:
            req = (parse_chat if chat else parse_completion)(await read_body(request))
            stream = submit(req)
        except HttpError as err:
            return error_response(err, endpoint)
        run = Run(req, stream, arrival)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if req.stream:
            metrics.requests.labels(endpoint, "200").inc()
            return StreamingResponse(
                sse(run, ident, chat),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            text = await until_done_or_gone(request, run)
        except ClientGone:
            return Response(status_code=499)
        if run.finish_reason == "error":
            return error_response(engine_error(run), endpoint)
        metrics.requests.labels(endpoint, "200").inc()
        finish = run.finish_reason if run.finish_reason in ("stop", "length") else "abort"
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [choice],
                "usage": run.usage(),
            }
        )

    async def until_done_or_gone(request: HttpRequest, run: Run) -> str:
        """The whole text; the engine request is cancelled if the client disconnects."""

        async def collect() -> str:
            return "".join([delta async for delta in run.deltas()])

        task = asyncio.ensure_future(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise ClientGone()
        except BaseException:  # the client left, or this handler was cancelled
            task.cancel()
            run.abandon()
            raise

    async def sse(run: Run, ident: str, chat: bool) -> AsyncIterator[str]:
        """Server-sent events: chunks, the last with its finish_reason, an optional usage
        chunk, ``[DONE]``; an engine failure sends an error event instead. A client that
        goes away cancels this generator, which cancels the engine request."""
        stamp = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: Optional[str], finish: Optional[str], first: bool = False) -> str:
            if chat:
                message = {} if delta is None else {"content": delta}
                if first:
                    message = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": message, "logprobs": None, "finish_reason": finish}
            else:
                choice = {
                    "index": 0,
                    "text": delta or "",
                    "logprobs": None,
                    "finish_reason": finish,
                }
            data = {"id": ident, "object": kind, "created": stamp, "model": model_name}
            data["choices"] = [choice]
            if run.req.include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        finished = False
        try:
            if chat:
                yield chunk(None, None, first=True)
            async for delta in run.deltas():
                yield chunk(delta, None)
            finished = True
            if run.finish_reason == "error":
                yield f"data: {json.dumps(engine_error(run).body())}\n\n"
                return
            finish = run.finish_reason if run.finish_reason in ("stop", "length") else "abort"
            yield chunk(None if chat else "", finish)
            if run.req.include_usage:
                usage = {"id": ident, "object": kind, "created": stamp, "model": model_name}
                usage.update(choices=[], usage=run.usage())
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (or the server is stopping)
                run.abandon()

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await answer(request, "completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await answer(request, "chat_completions", chat=True)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "moe_ext",
            "max_model_len": engine.max_context,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        stats = engine.stats()
        ok = stats.healthy and not stats.draining
        state = "ok" if ok else ("draining" if stats.healthy else "unhealthy")
        return JSONResponse({"status": state}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


class ClientGone(Exception):
    """The client of a non-streaming request disconnected."""


# ---- the server thread ------------------------------------------------------------------


class HttpServer:
    """uvicorn serving ``app`` in a background thread (rank 0 runs the engine in its main
    thread). ``start`` returns once the socket listens; ``stop`` ends it (bounded)."""

    def __init__(self, app: Any, host: str, port: int, log_level: str = "warning"):
        import uvicorn

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="moe_ext-http", daemon=True)
        self.host, self.port = host, port
        self.exit_code: Optional[int] = None  # uvicorn's, when it stopped itself

    def _serve(self) -> None:
        try:
            self.server.run()
        except SystemExit as exit:  # uvicorn exits when it cannot bind; start() reports it
            self.exit_code = exit.code if isinstance(exit.code, int) else 1

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise ServerStartError(
                    f"the HTTP server could not listen on {self.host}:{self.port} (its error is "
                    f"above); choose another server.port= or server.host="
                )
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"the HTTP server did not start on {self.host}:{self.port} within "
                    f"{timeout_s:.0f} s"
                )
            time.sleep(0.02)

    @property
    def bound_port(self) -> int:
        """The port listened on (``port=0`` picks a free one)."""
        for server in getattr(self.server, "servers", []):
            for sock in server.sockets:
                return sock.getsockname()[1]
        return self.port

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


class ServerStartError(MoeExtError):
    """The HTTP server could not start (one line: address and fix)."""

"""A fake serving engine (moe_ext.serve.engine.EngineClient) for HTTP tests: no model.

Its "model" continues every prompt with the bytes of REPLY from offset
``len(prompt) % len(REPLY)``, one id per event from a background thread, so a test knows
the exact text any request must get (``expected_ids``). Knobs: ``delay_s`` between tokens,
``eos_after`` (emit the byte tokenizer's EOS after that many tokens, finish "stop"),
``fail_after`` (an "error" event after that many tokens), ``refuse`` (an exception
``submit`` raises), ``draining`` / ``healthy`` (what ``stats`` says). Every submit is
recorded (``submitted``: prompt ids and SamplingParams) and every cancel too (``cancelled``,
an Event per request id), so tests can assert a disconnect freed its request.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

from moe_ext.serve.engine import (
    EngineClient,
    EngineStats,
    RequestStream,
    SamplingParams,
    TokenEvent,
)

REPLY = "Hello from the fake engine, héllo wörld ✓ and more text to go around. ".encode()
EOS = 257  # the byte tokenizer's EOS id


def expected_ids(prompt_len: int, max_tokens: int) -> list[int]:
    """The ids the fake generates for a prompt of ``prompt_len`` tokens (no EOS)."""
    start = prompt_len % len(REPLY)
    return [REPLY[(start + i) % len(REPLY)] for i in range(max_tokens)]


class FakeEngine(EngineClient):
    def __init__(self, model_name: str = "fake", max_context: int = 256):
        self.model_name = model_name
        self.max_context = max_context
        self.delay_s = 0.0
        self.eos_after: Optional[int] = None
        self.fail_after: Optional[int] = None
        self.refuse: Optional[Exception] = None
        self.draining = False
        self.healthy = True
        self.submitted: list[tuple[list[int], SamplingParams]] = []
        self.cancelled: dict[str, threading.Event] = {}
        self.running: set[str] = set()
        self._lock = threading.Lock()
        self._count = 0

    def reset(self) -> None:
        self.__init__(self.model_name, self.max_context)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        import asyncio

        if self.refuse is not None:
            raise self.refuse
        with self._lock:
            self._count += 1
            request_id = f"fake-{self._count}"
            self.submitted.append((list(prompt_ids), params))
            self.cancelled[request_id] = threading.Event()
            self.running.add(request_id)
        stream = RequestStream(request_id, len(prompt_ids), asyncio.get_running_loop())
        threading.Thread(
            target=self._generate, args=(stream, len(prompt_ids), params), daemon=True
        ).start()
        return stream

    def _generate(self, stream: RequestStream, prompt_len: int, params: SamplingParams) -> None:
        ids = expected_ids(prompt_len, params.max_tokens)
        cancelled = self.cancelled[stream.request_id]
        for i, token in enumerate(ids):
            if cancelled.wait(self.delay_s) if self.delay_s else cancelled.is_set():
                return
            if self.fail_after is not None and i == self.fail_after:
                self._end(stream, TokenEvent([], "error", "rank 1 stopped answering"))
                return
            if self.eos_after is not None and i == self.eos_after and not params.ignore_eos:
                self._end(stream, TokenEvent([EOS], "stop"))
                return
            last = i == len(ids) - 1
            event = TokenEvent([token], "length" if last else None)
            if last:
                self._end(stream, event)
                return
            stream._push(event)

    def _end(self, stream: RequestStream, event: TokenEvent) -> None:
        with self._lock:
            if stream.request_id not in self.running:
                return
            self.running.discard(stream.request_id)
        stream._push(event)

    def cancel(self, stream: RequestStream) -> None:
        self.cancelled[stream.request_id].set()
        self._end(stream, TokenEvent([], "abort"))

    def wait_cancelled(self, request_index: int, timeout_s: float) -> bool:
        """Whether the ``request_index``-th request (0-based) gets cancelled in time."""
        return self.cancelled[f"fake-{request_index + 1}"].wait(timeout_s)

    def stats(self) -> EngineStats:
        with self._lock:
            running = len(self.running)
        return EngineStats(
            running=running,
            queued=0,
            kv_rows_used=running,
            kv_rows_total=8,
            kv_tokens_used=running * 10,
            kv_tokens_total=8 * self.max_context,
            healthy=self.healthy,
            draining=self.draining,
        )


def wait_until(condition, timeout_s: float, step_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step_s)
    return condition()

"""`RequestLimits`, the ASGI layer `recsys serve` puts in front of MLflow's scoring app, called directly."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from recsys.serving.app import RequestLimits
from recsys.serving.pyfunc_model import REQUEST_DEADLINE


class Inner:
    """A stand-in for MLflow's app: reads the body, notes the deadline, answers with a given status."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.bodies: list[bytes] = []
        self.deadlines: list[float | None] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        # the model runs in a thread MLflow's app starts with asyncio.to_thread: the deadline must reach it
        self.deadlines.append(await asyncio.to_thread(REQUEST_DEADLINE.get))
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def _call(app: RequestLimits, chunks: list[bytes], declared: int | None = None,
          path: str = "/invocations") -> tuple[int, dict[str, Any]]:
    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


def test_a_body_over_the_limit_is_413_before_the_app_sees_it() -> None:
    inner = Inner()
    app = RequestLimits(inner, max_request_bytes=100, request_timeout=60)
    status, answer = _call(app, [b"x" * 101], declared=101)
    assert status == 413 and answer["message"].startswith("the request body has 101 bytes, more than the limit "
                                                          "of 100 bytes")
    status, answer = _call(app, [b"x" * 60, b"x" * 60, b"x" * 60])  # no Content-Length: counted as it arrives
    assert status == 413 and "larger than the limit of 100 bytes" in answer["message"]
    assert inner.bodies == []
    assert drained_before_answer(app, [b"x" * 60] * 5, declared=300) == 5  # the client can send it all


def drained_before_answer(app: RequestLimits, chunks: list[bytes], declared: int) -> int:
    """How many chunks of the body the app had read when it sent its answer."""
    read = []

    async def receive() -> dict[str, Any]:
        read.append(1)
        return {"type": "http.request", "body": chunks[len(read) - 1], "more_body": len(read) < len(chunks)}

    answered_after: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answered_after.append(len(read))

    scope = {"type": "http", "method": "POST", "path": "/invocations",
             "headers": [(b"content-length", str(declared).encode())]}
    asyncio.run(app(scope, receive, send))
    return answered_after[0]


def test_a_body_within_the_limit_reaches_the_app_whole_with_a_deadline() -> None:
    inner = Inner()
    app = RequestLimits(inner, max_request_bytes=100, request_timeout=30)
    before = time.monotonic()
    status, _ = _call(app, [b'{"a": ', b"1}"], declared=8)
    assert status == 200 and inner.bodies == [b'{"a": 1}']
    (deadline,) = inner.deadlines
    assert deadline is not None and before + 30 <= deadline <= time.monotonic() + 30
    assert REQUEST_DEADLINE.get() is None  # only the request's own context holds it


def test_the_models_row_limit_answers_413() -> None:
    app = RequestLimits(Inner(status=429), max_request_bytes=100, request_timeout=60)
    assert _call(app, [b"{}"])[0] == 413
    assert _call(app, [b"{}"], path="/ping")[0] == 429  # only the model's answers are mapped

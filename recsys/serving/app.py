"""The web app `recsys serve` runs: MLflow's scoring server for the ranking model, with request limits.

MLflow's scoring app (`mlflow.pyfunc.scoring_server.init`, what `mlflow models serve` runs under
uvicorn: /invocations, /ping, /health, /version, its error answers and its request timeout) reads
any body whole and answers a timed-out request with 504 while the request's work goes on in its
thread. `RequestLimits` sits in front of it:

- a body larger than `max_request_bytes` is answered 413 without being kept (refused by its
  Content-Length, or as soon as it grows past the limit; the rest is read and dropped, so that the
  client, still sending, gets the answer);
- the ranking model refuses more than `max_request_rows` rows with REQUEST_LIMIT_EXCEEDED, which
  MLflow's table of codes answers 429; this app answers it 413, with the model's message;
- each request gets a deadline (`REQUEST_DEADLINE`, `request_timeout` seconds after it arrived)
  that the model checks between its steps, so a timed-out request stops using the CPU. The context
  variable reaches the model's thread: asyncio copies the context into the tasks and the thread
  MLflow's app runs `predict` in.

uvicorn imports `create_app` in each worker process (`--factory`); `recsys serve` passes the
downloaded model folder and the `ServeConfig` in the environment (`CONFIG_ENV`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from recsys.config import ServeConfig
from recsys.serving.pyfunc_model import REQUEST_DEADLINE, RankingModel
from recsys.serving.serve import CONFIG_ENV

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DRAIN_BYTES = 64 << 20
"""Most bytes of a refused body read (and dropped) before the 413 is sent; beyond, the connection is closed."""
TOO_MANY_ROWS_STATUS = 429
"""MLflow's status for REQUEST_LIMIT_EXCEEDED, which only the ranking model's row limit raises."""


class RequestLimits:
    """ASGI middleware: body size limit (413), 413 for too many rows, and a deadline per request."""

    def __init__(self, app: ASGIApp, max_request_bytes: int, request_timeout: float) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.request_timeout = request_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            await _drain(receive)
            await self._too_large(send, f"has {int(declared)} bytes, more")
            return
        body = await self._read_body(receive)
        if body is None:
            await _drain(receive)
            await self._too_large(send, "is larger")
            return
        token = REQUEST_DEADLINE.set(time.monotonic() + self.request_timeout)
        try:
            await self.app(scope, _replay(body, receive), _rows_limit_is_413(send, scope))
        finally:
            REQUEST_DEADLINE.reset(token)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole request body, or None as soon as it is larger than the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _too_large(self, send: Send, size: str) -> None:
        message = (f"the request body {size} than the limit of {self.max_request_bytes} bytes "
                   f"(recsys serve --max-request-bytes); send fewer rows per request")
        await _send_json(send, 413, {"error_code": "REQUEST_LIMIT_EXCEEDED", "message": message})


async def _drain(receive: Receive) -> None:
    """Read and drop the rest of a refused body (up to DRAIN_BYTES), holding none of it.

    An answer sent while the client is still sending, followed by closing the connection, reaches
    most clients as a broken pipe instead of the 413 (they read the answer only once all is sent).
    """
    drained = 0
    while drained < DRAIN_BYTES:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the already read body once, then waits for the client as usual."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _rows_limit_is_413(send: Send, scope: Scope) -> Send:
    """A `send` that turns MLflow's 429 for the model's row limit on /invocations into 413."""

    async def mapped(message: Message) -> None:
        if (message["type"] == "http.response.start" and message["status"] == TOO_MANY_ROWS_STATUS
                and scope.get("path") == "/invocations"):
            message = {**message, "status": 413}
        await send(message)

    return mapped


async def _send_json(send: Send, status: int, document: dict[str, str]) -> None:
    body = json.dumps(document).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app() -> ASGIApp:
    """MLflow's scoring app for the model and limits of `CONFIG_ENV`, behind `RequestLimits`."""
    from mlflow.pyfunc import load_model, scoring_server

    config = ServeConfig(**json.loads(os.environ[CONFIG_ENV]))
    assert config.model is not None, f"{CONFIG_ENV} names no model folder"
    # MLflow's app reads its timeout from here: it answers 504 then, the deadline stops the work.
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(config.request_timeout)
    model = load_model(config.model)
    python_model = model.unwrap_python_model()
    if isinstance(python_model, RankingModel):
        python_model.ranker.max_rows = config.max_request_rows
    return RequestLimits(scoring_server.init(model), config.max_request_bytes, config.request_timeout)

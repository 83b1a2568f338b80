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

When the model served is the version an alias names (`champion` by default), `FollowAlias` goes
in front of both: every `follow_every` seconds it looks which version the alias names, and a
new one is downloaded and loaded beside the one serving, then answers every later request
(`catalogue add` and `views add` reach REST without a restart). Each answer says in the header
`X-Recsys-Model-Version` which version gave it.

uvicorn imports `create_app` in each worker process (`--factory`); `recsys serve` passes the
downloaded model folder and the `ServeConfig` in the environment (`CONFIG_ENV`), and the alias
followed (`FOLLOWED_ENV`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from recsys.config import ServeConfig
from recsys.serving.pyfunc_model import REQUEST_DEADLINE, RankingModel
from recsys.serving.serve import CONFIG_ENV, FOLLOWED_ENV

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


VERSION_HEADER = b"x-recsys-model-version"
"""Response header naming the registered version that answered (when the model served is a registered one)."""


class FollowAlias:
    """ASGI app answering from the version a registry alias names now, looked up every `every` seconds.

    A thread of its own asks the registry. A version other than the one serving is downloaded into
    a new folder under `downloads` (the server's, which `recsys serve` removes when it stops) and
    loaded by `build` while the loaded one goes on answering; then it answers every request that
    comes after (those already running finish on the old one, whose folder goes at the next swap).
    A look or a load that fails is reported on stderr, and the loaded version keeps serving until a
    later look succeeds. Every answer names its version in `VERSION_HEADER`. `every` 0: no look,
    only the header.
    """

    def __init__(self, build: Callable[[str], ASGIApp], folder: str, name: str, alias: str, version: str,
                 every: float, downloads: str) -> None:
        self.build, self.name, self.alias, self.every, self.downloads = build, name, alias, every, downloads
        self.serving = (build(folder), version)  # one attribute: a request reads the app and its version together
        self.folders: list[Path] = []  # this worker's downloads, newest last (the first folder is the server's)
        if every:
            threading.Thread(target=self._follow, name="recsys-follow-alias", daemon=True).start()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app, version = self.serving  # one version for the whole request, even if a swap comes
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (VERSION_HEADER, version.encode())]}
            await send(message)

        await app(scope, receive, named)

    @property
    def version(self) -> str:
        """The version answering now."""
        return self.serving[1]

    def _follow(self) -> None:
        while True:
            time.sleep(self.every)
            try:
                self.look()
            except Exception as err:  # noqa: BLE001 - a registry or download hiccup must not stop the server
                print(f"recsys serve: could not look up or load models:/{self.name}@{self.alias} "
                      f"({type(err).__name__}: {err}); still serving version {self.version}", file=sys.stderr,
                      flush=True)

    def look(self) -> bool:
        """Serve the version the alias names now, if it is another than the one serving; whether it was."""
        import mlflow

        from recsys.serving.registry import aliased_version

        version = aliased_version(self.name, self.alias)
        if version == self.version:
            return False
        folder = Path(tempfile.mkdtemp(prefix=f"v{version}-", dir=self.downloads))
        try:
            downloaded = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{self.name}/{version}",
                                                             dst_path=str(folder))
            app = self.build(downloaded)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.serving = (app, version)
        self.folders.append(folder)
        for old in self.folders[:-2]:  # the one before the previous: no request can still read it
            shutil.rmtree(old, ignore_errors=True)
        del self.folders[:-2]
        print(f"recsys serve: now serving models:/{self.name}/{version} (alias {self.alias})", file=sys.stderr,
              flush=True)
        return True


def scoring_app(folder: str, config: ServeConfig) -> ASGIApp:
    """MLflow's scoring app for the model in `folder`, behind `RequestLimits` with the limits of `config`."""
    from mlflow.pyfunc import load_model, scoring_server

    model = load_model(folder)
    python_model = model.unwrap_python_model()
    if isinstance(python_model, RankingModel):
        python_model.ranker.max_rows = config.max_request_rows
    return RequestLimits(scoring_server.init(model), config.max_request_bytes, config.request_timeout)


def create_app() -> ASGIApp:
    """The app for the model, limits and followed alias of `CONFIG_ENV` and `FOLLOWED_ENV`."""
    config = ServeConfig(**json.loads(os.environ[CONFIG_ENV]))
    assert config.model is not None, f"{CONFIG_ENV} names no model folder"
    # MLflow's app reads its timeout from here: it answers 504 then, the deadline stops the work.
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(config.request_timeout)
    if FOLLOWED_ENV not in os.environ:
        return scoring_app(config.model, config)
    followed = json.loads(os.environ[FOLLOWED_ENV])
    return FollowAlias(lambda folder: scoring_app(folder, config), config.model, followed["name"],
                       followed["alias"], followed["version"], config.follow_every, followed["downloads"])

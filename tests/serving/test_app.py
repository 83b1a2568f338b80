"""`RequestLimits` and `FollowAlias`, the ASGI layers `recsys serve` puts in front of MLflow's scoring app, called
directly."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest

from recsys.serving import registry
from recsys.serving.app import VERSION_HEADER, FollowAlias, RequestLimits
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


def _status_and_version(app: FollowAlias) -> tuple[int, str]:
    """The status of a GET /ping answered by `app`, and the version its header names."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "GET", "path": "/ping", "headers": []}, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"])[VERSION_HEADER].decode()


def test_follow_alias_serves_the_version_the_alias_moves_to_and_keeps_the_old_through_a_failed_load(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    alias_names = {"version": "1"}
    monkeypatch.setattr(registry, "aliased_version", lambda name, alias: alias_names["version"])

    def download(artifact_uri: str, dst_path: str) -> str:
        if artifact_uri.endswith("/3"):
            raise OSError("no space left on device")
        folder = Path(dst_path) / "model"
        folder.mkdir()
        (folder / "uri").write_text(artifact_uri)
        return str(folder)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    built: list[str] = []

    def build(folder: str) -> Inner:
        built.append(folder)
        return Inner(status=200 + len(built))  # each loaded model answers with a status of its own

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    app = FollowAlias(build, "served-at-start", "recsys-x", "champion", "1", every=0, downloads=str(downloads))
    assert _status_and_version(app) == (201, "1")
    assert not app.look() and len(built) == 1  # the alias has not moved: nothing is downloaded

    alias_names["version"] = "2"
    assert app.look()
    assert Path(built[-1], "uri").read_text() == "models:/recsys-x/2"  # by number, not by the alias
    assert _status_and_version(app) == (202, "2")

    alias_names["version"] = "3"  # its download fails: version 2 goes on answering, no half-written folder stays
    with pytest.raises(OSError, match="no space left"):
        app.look()
    assert _status_and_version(app) == (202, "2")
    assert len(list(downloads.iterdir())) == 1

    for version in ("4", "5"):
        alias_names["version"] = version
        assert app.look()
    assert _status_and_version(app) == (204, "5")
    assert sorted(p.name.split("-")[0] for p in downloads.iterdir()) == ["v4", "v5"]  # older downloads are gone

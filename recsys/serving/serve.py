"""Serving the exported ranking model over REST with MLflow's model server, on loopback by default.

`recsys serve` runs `mlflow models serve --env-manager local` on the registered model (the
`champion` of `recsys-<dataset>` unless a model URI is given). The server runs `uvicorn` from
PATH, so the interpreter's own bin folder is put first on PATH: the venv that runs recsys also
runs the server. `ServerProcess` starts such a server (or MLflow's tracking server) in its own
process group, waits for it to answer and always stops it; tests and notebooks use it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from recsys.config import ServeConfig
from recsys.errors import MissingInputError, RecsysError


class ServerError(RecsysError):
    """A server process exited early or did not answer in time; the message holds its last output."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment with this interpreter's bin folder first on PATH (for mlflow, uvicorn)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def mlflow_bin() -> str:
    """The `mlflow` executable beside this interpreter."""
    path = Path(sys.executable).parent / "mlflow"
    if not path.exists():
        raise MissingInputError(f"{path} not found: install recsys into this environment (`make install`)")
    return str(path)


def model_serve_command(model_uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    """`mlflow models serve` for a model URI in the local environment (no conda/virtualenv build)."""
    return [
        mlflow_bin(), "models", "serve", "--model-uri", model_uri, "--env-manager", "local",
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]


def tracking_server_command(backend_store_uri: str, artifact_root: str, host: str, port: int) -> list[str]:
    """`mlflow server` (tracking UI and REST API) over a store."""
    return [
        mlflow_bin(), "server", "--backend-store-uri", backend_store_uri,
        "--default-artifact-root", artifact_root, "--host", host, "--port", str(port), "--workers", "1",
    ]


class ServerProcess:
    """A server subprocess in its own process group; a context manager that always stops it.

    Output goes to a log file (not a pipe a full buffer could block); `wait_ready` polls a URL
    until it answers 200, fails fast when the process dies and raises after `timeout` seconds.
    """

    def __init__(self, command: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.command = list(command)
        self.log_path = Path(log_path)
        self.env = env or venv_env()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return self

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def wait_ready(self, url: str, timeout: float = 120.0) -> None:
        """Poll `url` until it answers 200; ServerError when the process exits or time runs out."""
        assert self.process is not None, "start() the server first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"server exited with code {self.process.returncode} before answering {url}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise ServerError(f"server did not answer {url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever of it outlives `grace` seconds."""
        if self.process is None:
            return
        group = self.process.pid  # the leader of its own session, so its pid is the group id
        if self.process.poll() is None:
            _signal_group(group, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # the model server's worker (uvicorn) is a child in the same group and may outlive the leader
        _signal_group(group, signal.SIGKILL)
        self.process.wait(timeout=grace)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass  # the whole group has exited already


def resolve_model_uri(model: str | None, dataset: str) -> str:
    """The URI to serve: the given one, else the dataset's champion (checked to exist)."""
    from recsys.serving.registry import champion_uri, require_champion

    if model is not None:
        return model
    require_champion(dataset)
    return champion_uri(dataset)


def example_request(model_uri: str) -> str:
    """A JSON request body for the model's /invocations: the first row of its logged input example."""
    import json

    import mlflow

    # input_example.json is a pandas "split" table: {"columns": [...], "data": [[...], ...]}
    example = json.loads(Path(mlflow.artifacts.download_artifacts(f"{model_uri}/input_example.json")).read_text())
    return json.dumps({"dataframe_records": [dict(zip(example["columns"], example["data"][0], strict=True))]})


def serve(config: ServeConfig) -> int:
    """Run MLflow's model server on the ranking model in the foreground until Ctrl+C; its exit code."""
    from recsys.tracking.store import configure

    uri = resolve_model_uri(config.model, config.dataset)
    # The server resolves models:/ URIs itself, so it must see the same tracking store.
    env = venv_env({"MLFLOW_TRACKING_URI": configure()})
    command = model_serve_command(uri, config.host, config.port, config.workers)
    url = f"http://{config.host}:{config.port}"
    print(f"serving {uri} at {url}/invocations (Ctrl+C stops it); try:\n"
          f"  curl -s {url}/invocations -H 'Content-Type: application/json' -d '{example_request(uri)}'", flush=True)
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 130

"""Serving the exported ranking model over REST with MLflow's scoring server, on loopback by default.

`recsys serve` downloads the registered model (the `champion` of `recsys-<dataset>` unless a model
URI is given) once, then runs uvicorn on `recsys.serving.app`: MLflow's scoring app, as `mlflow
models serve --env-manager local` would run it, behind limits on request size and time. uvicorn
runs from this interpreter (`python -m uvicorn`), so the venv that runs recsys also runs the server.

The server runs in its own process group, and `recsys serve` owns it: SIGTERM, SIGINT (Ctrl+C) or
SIGHUP to `recsys serve` stops the whole group (SIGTERM, SIGKILL for what outlives
`STOP_GRACE_S`) and then exits, so no worker is left answering on the port. `ServerProcess` starts
such a server (or MLflow's tracking server) in its own process group, waits for it to answer and
always stops it; tests and notebooks use it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType, TracebackType

from recsys.config import ServeConfig, to_dict
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


APP_FACTORY = "recsys.serving.app:create_app"
"""What uvicorn runs (with --factory) in each worker."""
CONFIG_ENV = "RECSYS_SERVE_CONFIG"
"""Environment variable passing the `ServeConfig` to the workers as JSON, `model` being the downloaded folder."""
FOLLOWED_ENV = "RECSYS_SERVE_FOLLOWED"
"""Environment variable passing the workers the served alias as JSON (name, alias, version loaded), when the
model served is one an alias names (`recsys.serving.app.FollowAlias`)."""
STOP_GRACE_S = 3.0
"""Seconds the server may take to stop after SIGTERM before it is killed (uvicorn gets 2 to finish requests)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that make `recsys serve` stop its server."""


def scoring_server_command(host: str, port: int, workers: int = 1) -> list[str]:
    """uvicorn on MLflow's scoring app with recsys' request limits (`recsys.serving.app`)."""
    return [
        sys.executable, "-m", "uvicorn", "--factory", APP_FACTORY, "--host", host, "--port", str(port),
        "--workers", str(workers), "--timeout-graceful-shutdown", str(int(STOP_GRACE_S) - 1),
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


def example_request(model_folder: Path) -> str:
    """A JSON request body for the model's /invocations: the first row of its logged input example."""
    # input_example.json is a pandas "split" table: {"columns": [...], "data": [[...], ...]}
    example = json.loads((Path(model_folder) / "input_example.json").read_text())
    return json.dumps({"dataframe_records": [dict(zip(example["columns"], example["data"][0], strict=True))]})


def run_owned(command: Sequence[str], env: dict[str, str], grace: float = STOP_GRACE_S) -> int:
    """Run `command` in its own process group until it exits or this process is told to stop; its exit code.

    SIGTERM, SIGINT or SIGHUP to this process is passed to the whole group as SIGTERM; what still
    runs `grace` seconds later is killed. Whatever the group's leader leaves behind when it exits
    is killed too. A stop by signal returns 128 + the signal's number, as a shell reports it.
    """
    stop: list[int] = []
    started: list[subprocess.Popen[bytes]] = []

    def on_signal(number: int, frame: FrameType | None) -> None:
        if not stop:
            stop.append(number)
            if started:
                _signal_group(started[0].pid, signal.SIGTERM)

    # Handlers first: a signal that comes while the server starts must still stop it.
    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        process = subprocess.Popen(list(command), env=env, start_new_session=True)
        started.append(process)
        if stop:
            _signal_group(process.pid, signal.SIGTERM)
        deadline = None
        while process.poll() is None:
            if stop and deadline is None:
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                _signal_group(process.pid, signal.SIGKILL)
            time.sleep(0.05)
        _signal_group(process.pid, signal.SIGKILL)  # e.g. a uvicorn worker that outlived its supervisor
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + stop[0] if stop else process.returncode


def serve(config: ServeConfig) -> int:
    """Run the scoring server on the ranking model in the foreground until stopped; its exit code."""
    import mlflow

    from recsys.serving.registry import alias_of, aliased_version
    from recsys.tracking.store import configure

    uri = resolve_model_uri(config.model, config.dataset)
    # The model is fetched once here, not by every worker (models:/ URIs resolve in this store).
    env = venv_env({"MLFLOW_TRACKING_URI": configure()})
    url = f"http://{config.host}:{config.port}"
    served, what, followed = uri, uri, alias_of(uri)
    if followed is not None:  # the version the alias names now, by number: what later looks compare with
        name, alias = followed
        version = aliased_version(name, alias)
        served = f"models:/{name}/{version}"
        what = f"{served} (alias {alias}" + (f"; a move of the alias is served within {config.follow_every} s)"
                                              if config.follow_every else ")")
    with tempfile.TemporaryDirectory(prefix="recsys-serve-") as tmp:
        if followed is not None:
            env[FOLLOWED_ENV] = json.dumps({"name": name, "alias": alias, "version": version, "downloads": tmp})
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=served, dst_path=tmp))
        env[CONFIG_ENV] = json.dumps(to_dict(replace(config, model=str(folder))))
        print(f"serving {what} at {url}/invocations (Ctrl+C or SIGTERM stops it; at most "
              f"{config.max_request_rows} rows and {config.max_request_bytes} bytes per request); try:\n"
              f"  curl -s {url}/invocations -H 'Content-Type: application/json' -d '{example_request(folder)}'",
              flush=True)
        return run_owned(scoring_server_command(config.host, config.port, config.workers), env)

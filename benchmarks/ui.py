"""The MLflow UI as a person sees it: a real headless Chromium over the demo's store.

Starts `mlflow server` on the store (loopback, a free port), opens the address the demo prints
(the synth experiment's runs), expands the demo's run to its nested steps, opens the compare view
of two training runs and the registered model with its champion, saves a screenshot of each
under docs/ and checks from the rendered DOM that the UI shows:

- the experiment's training runs (its Runs page, not the GenAI overview) and its description;
- the demo's run with one nested run per pipeline step, each named by what differs;
- the datasets each run read (the Dataset column), with their digests;
- the two training runs side by side: their names, the params that differ, the stable metrics;
- the registered model `recsys-synth` with the `champion` alias, and the version's description.

The store is `--tracking-uri` (default: the repository's `sqlite:///mlflow/mlflow.db`, what
`make demo` writes). Without a demo in it, the full run makes one first (the small preset, in a
temporary folder and store) and `--quick` stops with a message. With one training run only, the
full run trains a second (`--content none`, few epochs) into the same store, so there are two
to compare. Needs Chromium (`chromium` on PATH, Debian's package; `make ui-check` installs it):
without it the result says so and `target_met` is false.

    .venv/bin/python benchmarks/ui.py [--quick] [--tracking-uri URI] [--docs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parents[1] / "docs"
DATASET = "synth"
WIDTH, HEIGHT = 1360, 820
"""Browser window: wide enough for the runs table's Dataset column beside the run names."""
MODEL_TRAINING = "workflowType=machine_learning"
"""The UI's sidebar switch set to *Model training* for one page (what a person picks once; the browser keeps it)."""
STEP_NAMES = ("synth ", "prepare ", "ingest ", "content ", "train_retrieval ", "evaluate ", "export ")
"""How the name of each nested step run starts (the rest says what differs: sizes, encoder, seed)."""


@dataclass
class Check:
    """One assertion on the rendered page."""

    page: str
    what: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    screenshots: list[str] = field(default_factory=list)

    def shot(self, path: Path) -> None:
        """Record a saved screenshot (relative to the repository when it is inside it)."""
        root = DOCS.parent
        self.screenshots.append(str(path.resolve().relative_to(root) if path.resolve().is_relative_to(root) else path))

    def check(self, page: str, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(page, what, bool(ok), detail))
        print(f"  [{'ok' if ok else 'FAIL'}] {page}: {what}" + (f" ({detail})" if detail and not ok else ""),
              flush=True)
        return bool(ok)


# --------------------------------------------------------------------------------------------
# Chromium over the DevTools protocol (a websocket; aiohttp comes with MLflow)


def chromium_binary() -> str | None:
    """Debian's `chromium` (or another Chrome) on PATH, else None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium tab driven over the DevTools protocol."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.profile = Path(tempfile.mkdtemp(prefix="recsys-ui-chromium-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._ids = 0

    async def __aenter__(self) -> Browser:
        import aiohttp

        self.process = subprocess.Popen(
            [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.binary} did not start (exit code {self.process.poll()})")
            await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json") as response:
            targets = await response.json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Page.enable")
        await self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                        mobile=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.session.close()
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._ids += 1
        ident = self._ids
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:  # events (no id) arrive in between and are not needed
            message = await self.ws.receive_json(timeout=120)
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def text(self) -> str:
        return await self.js("document.body ? document.body.innerText : ''") or ""

    async def wait_for(self, expression: str, timeout: float = 90) -> bool:
        """Poll a JavaScript condition until it holds (the UI renders from API calls after the load)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if await self.js(f"Boolean({expression})"):
                    return True
            except RuntimeError:
                pass  # the page is between documents
            await asyncio.sleep(0.5)
        return False

    async def wait_text(self, *texts: str, timeout: float = 90) -> bool:
        body = "(document.body ? document.body.innerText : '')"
        return await self.wait_for(" && ".join(f"{body}.includes({json.dumps(t)})" for t in texts), timeout)

    async def click_text(self, text: str, selector: str = "button, [role=button], a") -> bool:
        """Click the first element matching `selector` whose visible text is `text`."""
        return bool(await self.js(
            f"(() => {{ const e = [...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => e.innerText && e.innerText.trim() === {json.dumps(text)});"
            " if (e) { e.click(); return true; } return false; })()"))

    async def drag(self, x: float, y: float, dx: float) -> None:
        """Press the mouse at (x, y), move it `dx` to the right and release it (a column resize)."""
        steps = [("mousePressed", x, 1), ("mouseMoved", x + dx / 2, 1), ("mouseMoved", x + dx, 1),
                 ("mouseReleased", x + dx, 0)]
        for kind, at, buttons in steps:
            await self.call("Input.dispatchMouseEvent", type=kind, x=at, y=y, button="left", buttons=buttons,
                            clickCount=1)
            await asyncio.sleep(0.2)

    async def screenshot(self, path: Path, height: int = HEIGHT) -> None:
        """A PNG of the viewport (`height` tall), reduced to a 256-colour palette: legible and small."""
        from PIL import Image

        if height != HEIGHT:
            await self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1,
                            mobile=False)
            await asyncio.sleep(1.5)  # the page lays itself out again
        shot = await self.call("Page.captureScreenshot", format="png")
        if height != HEIGHT:
            await self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                            mobile=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = path.with_suffix(".raw.png")
        raw.write_bytes(base64.b64decode(shot["data"]))
        with Image.open(raw) as image:
            image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        raw.unlink()


# --------------------------------------------------------------------------------------------
# The store: a demo, two training runs


def store_facts(tracking_uri: str) -> dict[str, Any] | None:
    """The newest demo run of the store's synth experiment, its nested steps and training runs; None without one."""
    from mlflow import MlflowClient

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from recsys.tracking.store import configure

    configure()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(DATASET)
    if experiment is None:
        return None
    demos = client.search_runs([experiment.experiment_id], "tags.`recsys.step` = 'demo' and status = 'FINISHED'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if not demos:
        return None
    demo = demos[0]
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{demo.info.run_id}'")
    training = client.search_runs([experiment.experiment_id],
                                  "tags.`recsys.step` = 'train_retrieval' and status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=2)
    return {"experiment_id": experiment.experiment_id, "demo": demo, "children": children, "training": training,
            "processed_dir": next((r.data.params.get("processed_dir") for r in children
                                   if r.data.tags.get("recsys.step") == "train_retrieval"), None)}


def make_demo(root: Path) -> str:
    """The small demo into a folder of its own; returns its tracking URI."""
    from recsys.config import DemoConfig
    from recsys.demo import demo

    uri = f"sqlite:///{root}/mlflow/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    print(f"no demo in the store: running the small demo into {root} (a few minutes)", flush=True)
    demo(DemoConfig(preset="small", raw_dir=root / "raw", processed_dir=root / "processed"))
    return uri


def second_training_run(processed_dir: str) -> None:
    """A second training run to compare with the demo's: the same model without content (the ablation),
    evaluated so it carries test metrics too."""
    from recsys.config import EvaluateConfig, RetrievalConfig
    from recsys.evaluation.evaluate import evaluate
    from recsys.twotower.train import train_retrieval

    print("one training run in the store: training a second (--content none) to compare", flush=True)
    trained = train_retrieval(RetrievalConfig(dataset=DATASET, processed_dir=Path(processed_dir), content="none",
                                              max_epochs=8, progress_bar=False))
    evaluate(EvaluateConfig(dataset=DATASET, processed_dir=Path(processed_dir), run_ids=(trained.run_id,),
                            baselines=(), oracle=False))


# --------------------------------------------------------------------------------------------
# The pages


async def close_assistant(browser: Browser) -> None:
    """Fold away MLflow's assistant side panel, which opens by itself on a first visit (screenshots only)."""
    await browser.wait_for("document.querySelector('button[aria-label=Close]')", timeout=10)
    await browser.js("document.querySelector('button[aria-label=Close]')?.click()")


async def experiment_page(browser: Browser, base: str, facts: dict[str, Any], report: Report, docs: Path) -> None:
    from recsys.demo import ui_url
    from recsys.tracking.inputs import input_digests
    from recsys.tracking.store import experiment_tags

    page = "experiment"
    url = ui_url(facts["experiment_id"], base)
    await browser.goto(url)
    demo_name = facts["demo"].info.run_name
    loaded = await browser.wait_text(demo_name, "Run Name", timeout=150)
    report.check(page, f"the runs table lists the demo run {demo_name!r}", loaded)
    location = await browser.js("location.href")
    report.check(page, "opens on the Runs page, not the GenAI overview",
                 "/runs" in location and "/overview" not in location, location)
    text = await browser.text()
    report.check(page, "no GenAI panels (traces, token usage)", "Token Usage" not in text and "Latency" not in text)
    description = experiment_tags(DATASET)["mlflow.note.content"]
    report.check(page, "shows the experiment's description", description[:60] in text)

    # The demo's row folds its steps; its expander is the button in the row of the run's name.
    expanded = await browser.js(
        "(() => { const link = [...document.querySelectorAll('a')].find(a => a.innerText.trim() === "
        f"{json.dumps(demo_name)}); if (!link) return false; let row = link; "
        "while (row && !row.querySelector('button')) row = row.parentElement; "
        "const button = row && row.querySelector('button'); if (button) { button.click(); return true; } "
        "return false; })()")
    child_names = [r.info.run_name for r in facts["children"]]
    shown = await browser.wait_text(*child_names, timeout=60)
    text = await browser.text()
    report.check(page, f"the demo run expands to its {len(child_names)} nested step runs", expanded and shown,
                 "missing: " + ", ".join(n for n in child_names if n not in text))
    for prefix in STEP_NAMES:
        report.check(page, f"a nested run named {prefix.strip()} ...",
                     any(n.startswith(prefix) for n in child_names), ", ".join(child_names))
    training = next((r for r in facts["children"] if r.data.tags.get("recsys.step") == "train_retrieval"), None)
    text = await browser.text()
    report.check(page, "the training run's name says encoder, content, size and seed",
                 training is not None and training.info.run_name in text and " d" in training.info.run_name)
    datasets = [f"{DATASET}/train", f"{DATASET}/valid", f"{DATASET}/catalogue", f"{DATASET}/interactions"]
    report.check(page, "the Dataset column shows the runs' datasets", all(d in text for d in datasets),
                 "missing: " + ", ".join(d for d in datasets if d not in text))
    digest = input_digests(training).get("train", "?") if training is not None else "?"
    report.check(page, "the training run's train split shows with its digest", f"{DATASET}/train ({digest})" in text,
                 digest)
    await close_assistant(browser)
    # Widen the Run Name column as a person would (drag its edge), so the screenshot shows whole names.
    edge = await browser.js("(() => { const h = [...document.querySelectorAll('.ag-header-cell')].find("
                            "h => h.innerText.trim() === 'Run Name'); if (!h) return null; "
                            "const r = h.getBoundingClientRect(); return [r.right - 2, r.top + r.height / 2]; })()")
    if edge:
        await browser.drag(edge[0], edge[1], 150)
    await asyncio.sleep(1)
    await browser.screenshot(docs / "ui-runs.png")
    report.shot(docs / "ui-runs.png")


async def run_page(browser: Browser, base: str, facts: dict[str, Any], report: Report) -> None:
    """The run page of the demo's training run: its datasets, its parent, its metrics."""
    from recsys.tracking.inputs import input_digests

    page = "training run"
    training = next(r for r in facts["children"] if r.data.tags.get("recsys.step") == "train_retrieval")
    await browser.goto(f"{base}/#/experiments/{facts['experiment_id']}/runs/{training.info.run_id}")
    digest = input_digests(training).get("train", "?")
    ok = await browser.wait_text(training.info.run_name, f"{DATASET}/train ({digest})", timeout=90)
    report.check(page, "the run page names the run and lists its train split with its digest", ok, digest)
    parent = json.dumps(facts["demo"].info.run_name)
    linked = await browser.wait_for("(() => { const t = document.body.innerText.split('Parent run')[1] || ''; "
                                    f"return t.replace(/^[\\s:]+/, '').startsWith({parent}); }})()", timeout=60)
    report.check(page, "the run page links the parent (demo) run", linked)
    text = await browser.text()
    report.check(page, "the run page shows its test metrics", "test_ndcg_10" in text and "val_ndcg_10" in text)


async def compare_page(browser: Browser, base: str, facts: dict[str, Any], report: Report, docs: Path) -> None:
    page = "compare"
    runs = facts["training"][:2]
    ids = json.dumps([r.info.run_id for r in runs])
    await browser.goto(f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([facts['experiment_id']])}"
                       f"&{MODEL_TRAINING}")
    names = [r.info.run_name for r in runs]
    ok = await browser.wait_text(*names, timeout=120)
    report.check(page, "the compare view names both training runs", ok, " / ".join(names))
    text = await browser.text()
    differing = [k for k in runs[0].data.params if runs[0].data.params[k] != runs[1].data.params.get(k)]
    report.check(page, "the params that differ are listed", bool(differing) and all(k in text for k in differing),
                 ", ".join(differing))
    wanted = ["best_val_ndcg_10", "val_ndcg_10", "test_ndcg_10", "test_hr_10", "test_mrr_10", "test_coverage_10"]
    report.check(page, "the stable metrics are listed for both", all(m in text for m in wanted),
                 "missing: " + ", ".join(m for m in wanted if m not in text))
    from recsys.tracking.runs import compare_runs

    comparison = compare_runs(runs[0].info.run_id, runs[1].info.run_id)
    value = comparison.metrics.filter(comparison.metrics["metric"] == "test_ndcg_10")
    # The compare view rounds to 3 decimals (MLflow's formatMetric); `recsys runs compare` prints 4.
    figures = [repr(round(v, 3)) for v in (value["a"][0], value["b"][0]) if v is not None] if value.height else []
    report.check(page, "test_ndcg_10 shows the figures `recsys runs compare` prints",
                 len(figures) == 2 and all(f in text for f in figures), ", ".join(figures))
    await close_assistant(browser)
    # The params and tags tables: only rows that differ (metrics: all, to compare them).
    await browser.js("['Parameters', 'Tags'].forEach(t => document.querySelector("
                     "`button[aria-label='${t} - Show diff only']`)?.click())")
    # Fold the parallel-coordinates plot away (its header toggles it): the tables below are what is compared.
    await browser.js("[...document.querySelectorAll('*')].filter(e => e.innerText && e.innerText.trim() === "
                     "'Visualizations').pop()?.click()")
    await asyncio.sleep(2)
    await browser.screenshot(docs / "ui-compare.png", height=1400)
    report.shot(docs / "ui-compare.png")


async def model_page(browser: Browser, base: str, report: Report, docs: Path) -> None:
    from mlflow import MlflowClient

    from recsys.serving.registry import CHAMPION, model_name

    page = "model"
    name = model_name(DATASET)
    champion = MlflowClient().get_model_version_by_alias(name, CHAMPION)
    await browser.goto(f"{base}/#/models/{name}?{MODEL_TRAINING}")
    ok = await browser.wait_text(name, f"Version {champion.version}", timeout=90)
    report.check(page, f"the registered model {name} lists its versions", ok)
    text = await browser.text()
    report.check(page, f"the alias {CHAMPION!r} is shown", f"@ {CHAMPION}" in text or CHAMPION in text)
    report.check(page, "the model's description is shown", "champion" in text and "pyfunc" in text)
    await close_assistant(browser)
    await asyncio.sleep(1)
    await browser.screenshot(docs / "ui-model.png")
    report.shot(docs / "ui-model.png")

    page = "model version"
    await browser.goto(f"{base}/#/models/{name}/versions/{champion.version}?{MODEL_TRAINING}")
    export_run = MlflowClient().get_run(champion.run_id).info.run_name
    ok = await browser.wait_text(f"Version {champion.version}", "Two-tower ranking model", export_run, timeout=90)
    report.check(page, "the champion version shows its description with its metrics", ok)
    text = await browser.text()
    report.check(page, "the description carries val_ndcg_10 and test_ndcg_10",
                 "val_ndcg_10" in text and "test_ndcg_10" in text)
    report.check(page, "the version page shows the champion alias", CHAMPION in text)
    report.check(page, "the version page links its export run", export_run in text, export_run)
    await close_assistant(browser)
    await asyncio.sleep(1)
    await browser.screenshot(docs / "ui-model-version.png")
    report.shot(docs / "ui-model-version.png")


async def drive(binary: str, base: str, facts: dict[str, Any], report: Report, docs: Path) -> None:
    async with Browser(binary) as browser:
        facts["base"] = base
        print("experiment page and runs table", flush=True)
        await experiment_page(browser, base, facts, report, docs)
        print("training run page", flush=True)
        await run_page(browser, base, facts, report)
        print("compare view", flush=True)
        await compare_page(browser, base, facts, report, docs)
        print("registered model", flush=True)
        await model_page(browser, base, report, docs)


# --------------------------------------------------------------------------------------------


def result_json(report: Report, started: float, **extra: Any) -> dict[str, Any]:
    passed = sum(c.ok for c in report.checks)
    return {
        "checks": len(report.checks),
        "checks_passed": passed,
        "seconds": round(time.perf_counter() - started, 1),
        **extra,
        "screenshots": report.screenshots,
        "failed": [asdict(c) for c in report.checks if not c.ok],
        "target_met": bool(report.checks) and passed == len(report.checks),
    }


def write(result: dict[str, Any]) -> None:
    """benchmarks/results/ui.json, and the same JSON as the last line of output."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ui.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, default=str))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="check the store as it is: no demo and no second training run are made (under 2 min)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow/mlflow.db"),
                        help="the store to look at (default: MLFLOW_TRACKING_URI, else the repository's)")
    parser.add_argument("--docs", type=Path, default=DOCS, help="folder the screenshots are written to")
    args = parser.parse_args()
    started = time.perf_counter()
    report = Report()
    binary = chromium_binary()
    if binary is None:
        print("ui check skipped: no Chromium on PATH (Debian: apt-get install chromium; `make ui-check` does it)")
        write(result_json(report, started, skipped="no chromium"))
        return 0

    from recsys.serving.serve import ServerProcess, free_port, tracking_server_command
    from recsys.tracking.store import artifact_root

    with tempfile.TemporaryDirectory(prefix="recsys-ui-check-") as tmp:
        uri = args.tracking_uri
        facts = store_facts(uri)
        if facts is None and args.quick:
            print(f"ui check skipped: no finished demo run in {uri}; run `make demo` first (or drop --quick)")
            write(result_json(report, started, skipped="no demo in the store", tracking_uri=uri))
            return 0
        if facts is None:
            uri = make_demo(Path(tmp))
            facts = store_facts(uri)
            assert facts is not None
        if len(facts["training"]) < 2 and not args.quick and facts["processed_dir"]:
            second_training_run(facts["processed_dir"])
            facts = store_facts(uri)
            assert facts is not None
        if len(facts["training"]) < 2:
            report.check("store", "two finished training runs to compare", False, f"{len(facts['training'])} found")

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        root = artifact_root(uri)
        command = tracking_server_command(uri, root.resolve().as_uri() if root else "./mlartifacts", "127.0.0.1",
                                          port)
        print(f"mlflow server on {base} over {uri}", flush=True)
        with ServerProcess(command, Path(tmp) / "server.log") as server:
            server.wait_ready(f"{base}/health", timeout=240)
            asyncio.run(drive(binary, base, facts, report, args.docs))
    write(result_json(report, started, tracking_uri=args.tracking_uri, experiment_id=facts["experiment_id"],
                      demo_run=facts["demo"].info.run_name, nested_runs=len(facts["children"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`recsys demo` on the small synthetic corpus, then every notebook executed over what it produced.

Each executed notebook is also rendered to HTML in notebooks/html/ (git-ignored), so its plots can
be looked at without Jupyter (CI keeps the folder).
"""

from __future__ import annotations

import io
from pathlib import Path

import nbformat
import polars as pl
import pytest
from mlflow import MlflowClient
from nbclient import NotebookClient
from nbconvert import HTMLExporter

from recsys.config import DemoConfig
from recsys.demo import STEPS, DemoResult, demo
from recsys.tracking.runs import runs_table

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
HTML_DIR = NOTEBOOKS_DIR / "html"
NOTEBOOKS = ("01_explore_data", "02_recommend_for_a_user", "03_compare_runs")
PRINTS = {
    "01_explore_data": "the most popular 20% of videos get",
    "02_recommend_for_a_user": "users: ",  # the cold-start video's audience
    "03_compare_runs": "logged by export run",
}
"""A line each notebook prints only when its last section ran on real results."""


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoResult, str]:
    """The demo on the small preset in a temporary folder: (root, result, printed log)."""
    root = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    result = demo(DemoConfig(preset="small", raw_dir=root / "raw", processed_dir=root / "processed", workers=2),
                  out=out)
    return root, result, out.getvalue()


@pytest.mark.slow
def test_demo_runs_every_step_and_groups_its_runs(demo_run: tuple[Path, DemoResult, str]) -> None:
    root, result, log = demo_run
    assert list(result.seconds) == list(STEPS) == list(result.cpu_seconds)
    for number, step in enumerate(STEPS, start=1):
        assert f"[{number}/{len(STEPS)}] {step} done in" in log
    assert "mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db" in log and "03_compare_runs.ipynb" in log

    models = result.quality.get_column("model").to_list()
    assert "popularity" in models and any(m.startswith("two-tower") for m in models)
    assert result.quality.get_column("ndcg@10").is_between(0, 1).all()

    top = result.recommendations
    assert top.get_column("rank").to_list() == list(range(1, 11))
    assert top.get_column("user_id").unique().to_list() == [result.user_id]
    assert top.get_column("title").dtype == pl.String
    assert f"Top-10 for user {result.user_id}" in log
    for item_id in top.get_column("item_id"):
        assert item_id in log  # the printed list shows every recommended video

    grouped = runs_table("synth").filter(pl.col("pipeline") == result.pipeline)
    steps = set(grouped.get_column("step"))
    assert {"prepare", "ingest", "train_retrieval", "evaluate", "export", "demo"} <= steps
    demo_row = grouped.filter(pl.col("step") == "demo")
    assert demo_row.get_column("metrics.seconds.total").item() == pytest.approx(sum(result.seconds.values()))

    # One parent run per invocation, every step's run nested under it and named by what differs
    assert demo_row.get_column("run_id").item() == result.run_id
    assert demo_row.get_column("run_name").item() == "demo small s0"
    steps = grouped.filter(pl.col("step") != "demo")
    assert set(steps.get_column("parent_run_id")) == {result.run_id}
    names = dict(zip(steps.get_column("step"), steps.get_column("run_name"), strict=True))
    assert names["train_retrieval"] == "train_retrieval gru fused d64 s0"
    assert names["prepare"] == "prepare leave-one-out u5 i5" and names["content"].startswith("content small gru")
    assert names["export"] == f"export v{result.export.version} gru fused d64 s0"
    # the training run and the evaluation read the same splits: equal digests
    training = steps.filter(pl.col("step") == "train_retrieval").row(0, named=True)
    evaluation = steps.filter(pl.col("step") == "evaluate").row(0, named=True)
    assert training["datasets.train"] == evaluation["datasets.train"] is not None
    assert evaluation["datasets.test"] is not None and training["datasets.catalogue"] is not None
    # evaluate logs the test figures into the training run under stable names; export carries them on
    two_tower = result.quality.filter(pl.col("run_id") == training["run_id"]).row(0, named=True)
    assert training["metrics.test_ndcg_10"] == pytest.approx(two_tower["ndcg@10"])
    assert training["metrics.test_coverage_10"] == pytest.approx(two_tower["coverage@10"])
    client = MlflowClient()
    version = client.get_model_version("recsys-synth", result.export.version)
    assert f"test_ndcg_10 {two_tower['ndcg@10']:.4f}" in version.description
    assert client.get_experiment_by_name("synth").tags["mlflow.experimentKind"] == "custom_model_development"


def test_notebooks_are_stored_without_outputs() -> None:
    for name in NOTEBOOKS:
        notebook = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code, name
        assert all(not cell.outputs and cell.execution_count is None for cell in code), name


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_without_error(
    name: str, demo_run: tuple[Path, DemoResult, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, result, _ = demo_run
    # The kernel is a child process: it reads its data and store locations (MLFLOW_TRACKING_URI: the
    # session's store) from the environment.
    monkeypatch.setenv("RECSYS_DATASET", "synth")
    monkeypatch.setenv("RECSYS_PROCESSED_DIR", str(root / "processed"))
    monkeypatch.setenv("RECSYS_RAW_DIR", str(root / "raw"))
    monkeypatch.setenv("RECSYS_USER", result.user_id)
    notebook = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    HTML_DIR.mkdir(exist_ok=True)
    (HTML_DIR / f"{name}.html").write_text(HTMLExporter().from_notebook_node(notebook)[0])
    outputs = [out for cell in notebook.cells for out in cell.get("outputs", [])]
    text = "".join(out.get("text", "") for out in outputs)
    assert PRINTS[name] in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert images, f"{name} drew no figure"
    # What a person reads has no warnings or progress bars in it (stderr: warnings, tqdm, logging)
    noise = [out.get("text", "")[:300] for out in outputs if out.get("name") == "stderr" or "Warning" in
             out.get("text", "") or "%|" in out.get("data", {}).get("text/plain", "")]
    assert not noise, f"{name} printed: {noise}"
    if name == "03_compare_runs":  # training runs labelled by what differs and their data's digest
        digest = runs_table("synth", step="train_retrieval").get_column("datasets.train")[0]
        html = "".join(str(out.get("data", {}).get("text/html", "")) + str(out.get("data", {}).get("text/plain", ""))
                       for out in outputs)
        assert f"train {digest[:6]}" in html

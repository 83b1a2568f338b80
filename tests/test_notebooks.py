"""`recsys demo` on the small synthetic corpus, then every notebook executed over what it produced."""

from __future__ import annotations

import io
from pathlib import Path

import nbformat
import polars as pl
import pytest
from nbclient import NotebookClient

from recsys.config import DemoConfig
from recsys.demo import STEPS, DemoResult, demo
from recsys.tracking.runs import runs_table

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
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
    text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    assert PRINTS[name] in text
    images = [out for cell in notebook.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert images, f"{name} drew no figure"

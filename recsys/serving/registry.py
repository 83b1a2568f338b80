"""The MLflow Model Registry for ranking models: one registered model per dataset, one champion.

`recsys-<dataset>` holds every exported version; the alias `champion` names the version that
`recommend`, `serve` and notebooks load (`models:/recsys-<dataset>@champion`). A new version
takes the alias only when its validation NDCG@10 is strictly higher than the champion's; the
decision and its reason are recorded on the version and in the export run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

from recsys.errors import MissingInputError
from recsys.tracking.store import configure

CHAMPION = "champion"
VAL_NDCG_TAG = "recsys.val_ndcg_10"
"""Model version tag: the version's NDCG@10 on the validation split (what champions are compared on)."""
TRAIN_RUN_TAG = "recsys.train_run"
EXPORT_RUN_TAG = "recsys.export_run"
DECISION_TAG = "recsys.champion_decision"
UPDATE_OF_TAG = "recsys.update_of"
"""Model version tag: the version this one adds videos or views to (`recsys catalogue add`, `recsys views add`)."""


def model_name(dataset: str) -> str:
    """Registered model name of a dataset's ranking model."""
    return f"recsys-{dataset}"


def champion_uri(dataset: str) -> str:
    """URI that loads a dataset's champion with `mlflow.pyfunc.load_model`."""
    return f"models:/{model_name(dataset)}@{CHAMPION}"


def alias_of(uri: str) -> tuple[str, str] | None:
    """(registered model name, alias) of a `models:/NAME@ALIAS` URI; None for any other URI."""
    if not uri.startswith("models:/") or "@" not in uri:
        return None
    name, alias = uri.removeprefix("models:/").rsplit("@", 1)
    return name, alias


def aliased_version(name: str, alias: str) -> str:
    """The number of the version of registered model `name` that `alias` names now (MissingInputError if none)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        raise MissingInputError(f"no registered model {name} with alias {alias!r} in the store at {configure()}"
                                ) from None


def registered_version(dataset: str, version: str | None = None, alias: str = CHAMPION) -> Any:
    """The ModelVersion named by `version` (a number), else by `alias`; a MissingInputError says how to make one."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    store = configure()
    client = MlflowClient()
    name = model_name(dataset)
    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        what = f"version {version}" if version is not None else f"alias {alias!r}"
        raise MissingInputError(
            f"no registered model {name} with {what} in the store at {store}: train a model "
            f"(`recsys train retrieval {dataset}`) and export it (`recsys export {dataset}`), or pass --run-id "
            "to use a trained model that was never exported"
        ) from None


def champion_version(dataset: str) -> Any | None:
    """The champion's ModelVersion, or None when the dataset has no registered champion yet."""
    try:
        return registered_version(dataset)
    except MissingInputError:
        return None


def require_champion(dataset: str) -> Any:
    """The champion's ModelVersion, or a MissingInputError saying how to make one."""
    version = champion_version(dataset)
    if version is None:
        raise MissingInputError(
            f"no champion model for {dataset} in the registry at {configure()}: "
            f"train one (`recsys train retrieval {dataset}`) and export it (`recsys export {dataset}`)"
        )
    return version


def version_score(version: Any) -> float | None:
    """A version's validation NDCG@10: its tag, else the metric of the run that logged it."""
    if VAL_NDCG_TAG in version.tags:
        return float(version.tags[VAL_NDCG_TAG])
    if version.run_id:
        from mlflow import MlflowClient

        metrics = MlflowClient().get_run(version.run_id).data.metrics
        if "val_ndcg_10" in metrics:
            return float(metrics["val_ndcg_10"])
    return None


@dataclass
class ChampionDecision:
    """Whether a new version became the champion, and why."""

    model_name: str
    version: str
    val_ndcg_10: float
    previous_version: str | None
    previous_val_ndcg_10: float | None
    promoted: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    name: str, version: str, score: float, previous_version: str | None, previous_score: float | None
) -> ChampionDecision:
    """The rule: promote when there is no champion, or when the new score is strictly higher."""
    if math.isnan(score):
        promoted, reason = False, "validation NDCG@10 is NaN: a broken model never becomes champion"
    elif previous_version is None:
        promoted, reason = True, f"first champion (validation NDCG@10 {score:.4f})"
    elif previous_score is None:
        promoted, reason = True, (f"champion v{previous_version} has no recorded validation NDCG@10; "
                                  f"v{version} ({score:.4f}) replaces it")
    elif score > previous_score:
        promoted, reason = True, (f"v{version} beats champion v{previous_version} on validation NDCG@10: "
                                  f"{score:.4f} > {previous_score:.4f}")
    else:
        promoted, reason = False, (f"v{version} does not beat champion v{previous_version} on validation "
                                   f"NDCG@10: {score:.4f} <= {previous_score:.4f}; the champion stays")
    return ChampionDecision(name, version, score, previous_version, previous_score, promoted, reason)


def model_description(dataset: str) -> str:
    """The registered model's description: what it is and how to load its champion."""
    return (f"Ranking model of the {dataset} dataset (one version per `recsys export`). The alias `{CHAMPION}` "
            f"names the served version: it moves only to a version with a higher validation NDCG@10. Load it "
            f"with mlflow.pyfunc.load_model('{champion_uri(dataset)}'); input user_id (optional k, history), "
            "output user_id, rank, item_id, score, title.")


def register(
    model_uri: str, dataset: str, val_ndcg_10: float, train_run_id: str, export_run_id: str, description: str = "",
    update_of: str | None = None,
) -> ChampionDecision:
    """Register a logged model as a new version of `recsys-<dataset>` and move `champion` if it wins.

    `description` goes on the version, followed by the champion decision. `update_of`: the version
    this one updates with new videos or views (`recsys.serving.live_catalogue`): it takes the
    champion alias when that version held it, whatever its validation score, because it is the
    champion with a fresher catalogue, not a rival model.
    """
    import mlflow
    from mlflow import MlflowClient

    configure()
    client = MlflowClient()
    name = model_name(dataset)
    current = champion_version(dataset)
    previous_score = version_score(current) if current is not None else None
    tags = {VAL_NDCG_TAG: repr(float(val_ndcg_10)), TRAIN_RUN_TAG: train_run_id, EXPORT_RUN_TAG: export_run_id}
    if update_of is not None:
        tags[UPDATE_OF_TAG] = str(update_of)
    version = mlflow.register_model(model_uri, name, tags=tags)
    decision = decide(name, str(version.version), float(val_ndcg_10),
                      None if current is None else str(current.version), previous_score)
    if update_of is not None:
        holds = current is not None and str(current.version) == str(update_of)
        decision = dataclasses.replace(decision, promoted=holds, reason=(
            f"v{version.version} updates champion v{update_of} (same model, fresher catalogue)" if holds else
            f"v{version.version} updates v{update_of}, which is not the champion; the champion stays"))
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    client.set_model_version_tag(name, version.version, DECISION_TAG, decision.reason)
    client.update_model_version(name, version.version, description=" ".join(
        [description, f"Champion decision: {decision.reason}."]).strip())
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=model_description(dataset))
    return decision

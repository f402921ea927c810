"""End-to-end: the training flow on a tiny generated dataset, against a real Prefect test server
and a real MLflow sqlite store, asserting the run, its params, metrics, artifacts and the
registered version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_training_flow_end_to_end(project: Path, tiny_dataset: Path, prefect_server) -> None:
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from vggflow.flows.train import train_flow

    summary = train_flow(overrides=tiny_overrides(), data_dir=str(tiny_dataset))

    client = MlflowClient()
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    # Provenance and the whole config.
    assert params["backbone.weights"] == "none" and params["backbone.image_size"] == "32"
    assert params["seed"] == "42" and "package.tensorflow" in params and "git_commit" in params
    assert tags["vggflow.random_init"] == "true"
    assert tags["vggflow.data_version"].startswith("untracked-")
    # The chosen freeze configuration.
    assert params["chosen.stage"] == summary.freeze_configuration["stage"]
    assert params["chosen.stage"] in {"head", "block5", "block4", "all"}
    for key in ("first_trainable_layer", "trainable_layers", "trainable_params", "learning_rate"):
        assert f"chosen.{key}" in params
    # Test metrics.
    for key in ("test_accuracy", "test_macro_f1"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["test_accuracy"] == pytest.approx(summary.test_metrics["accuracy"])
    # One nested run per stage, with per-epoch history.
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{summary.run_id}'"
    )
    assert sorted(c.data.tags["vggflow.stage"] for c in children) == ["all", "block4", "block5", "head"]
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert len(history) >= 1 and child.info.status == "FINISHED"
    # Artifacts.
    artifacts = {
        a.path
        for folder in ("", "stages", "evaluation", "validation", "config")
        for a in client.list_artifacts(summary.run_id, folder)
    }
    for expected in (
        "stages/learning_curves.png",
        "stages/stage_comparison.json",
        "evaluation/confusion_matrix.png",
        "evaluation/per_class_metrics.csv",
        "validation/report.json",
        "validation/manifest.csv",
        "config/effective_config.yaml",
        "model_card.md",
    ):
        assert expected in artifacts, expected
    comparison = mlflow.artifacts.load_dict(f"runs:/{summary.run_id}/stages/stage_comparison.json")
    assert [s["stage"] for s in comparison["stages"]] == ["head", "block5", "block4", "all"]
    assert sum(s["chosen"] for s in comparison["stages"]) == 1
    # The test set was scored from the chosen model's cached frozen part, if it has one.
    chosen = next(s for s in comparison["stages"] if s["chosen"])
    route = "images" if chosen["prefix_cache"] in (None, "input_layer") else f"cached {chosen['prefix_cache']}"
    assert tags["vggflow.test_scored_from"].startswith(route), tags["vggflow.test_scored_from"]
    # The registered version, promoted as the first champion.
    version = client.get_model_version("vgg19-classifier", summary.model_version)
    assert version.run_id == summary.run_id
    assert version.tags["vggflow.data_version"] == tags["vggflow.data_version"]
    assert json.loads(version.tags["vggflow.freeze_configuration"])["stage"] == params["chosen.stage"]
    assert str(client.get_model_version_by_alias("vgg19-classifier", "champion").version) == summary.model_version
    assert summary.decision.promoted and "no champion yet" in summary.decision.reason
    assert "randomly initialised" in version.description
    # The logged model lives in the run's experiment and under the configured artifact root (not
    # in MLflow's default experiment, whose artifacts would land in ./mlruns).
    logged = client.get_logged_model(summary.model_uri.removeprefix("models:/"))
    assert logged.experiment_id == run.info.experiment_id
    artifact_root = client.get_experiment(run.info.experiment_id).artifact_location
    assert logged.artifact_location.startswith(artifact_root), (logged.artifact_location, artifact_root)
    assert not (project / "mlruns").exists()

    # The flow run's Prefect artifacts, read back from the server: the summary and the stage table.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run_id = tags["vggflow.prefect_flow_run_id"]
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_type = {artifact.type: artifact for artifact in artifacts}
    markdown = by_type["markdown"]
    assert markdown.key == "vgg19-classifier-training"
    assert f"v{summary.model_version}: promoted to @champion" in markdown.data
    assert f"**Chosen freeze configuration**: `{summary.freeze_configuration['stage']}`" in markdown.data
    assert f"accuracy {summary.test_metrics['accuracy']:.4f}" in markdown.data and summary.run_id in markdown.data
    table = by_type["table"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.key == "vgg19-classifier-stages" and [r["stage"] for r in rows] == ["head", "block5", "block4", "all"]
    assert [r["chosen"] for r in rows].count("yes") == 1

"""Issue 3's last point: training on a dirty real-world-like folder completes, and the run's
validation report lists every bad file by path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from tests.test_validate import build_dirty_corpus

pytestmark = pytest.mark.slow


def test_training_on_the_dirty_corpus_completes(project: Path, prefect_server) -> None:
    import mlflow.artifacts

    from vggflow.flows.train import train_flow

    data, expected, counts = build_dirty_corpus(project / "corpus")
    summary = train_flow(
        overrides=tiny_overrides(**{"validation.drop_small_classes": "true", "validation.min_side": "8"}),
        data_dir=str(data),
    )
    report = mlflow.artifacts.load_dict(f"runs:/{summary.run_id}/validation/report.json")
    assert report["summary"]["n_valid"] == sum(counts.values())
    listed = {(issue["path"], issue["kind"]) for issue in report["issues"]}
    assert set(expected.items()) <= listed
    assert summary.model_version == "1" and 0.0 <= summary.test_metrics["accuracy"] <= 1.0

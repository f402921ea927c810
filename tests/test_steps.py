"""Unit tests of the steps' pure functions: cache keys, prefix-cache plan, stage choice, scoring,
the promotion gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vggflow.caching import directory_fingerprint, key_when_valid
from vggflow.config import FinetuneConfig, RegistryConfig, StageConfig
from vggflow.hashing import stable_hash
from vggflow.promotion import decide, gate_thresholds
from vggflow.scoring import score
from vggflow.stages import plan_prefix_caches, prefix_bytes, prefix_layer
from vggflow.tasks.select import choose_freeze_configuration
from vggflow.training import StageResult, TrainedStages, is_better


def stage(name: str, val_accuracy: float, val_loss: float = 1.0) -> StageResult:
    return StageResult(
        stage=name,
        unfreeze_from=None if name == "head" else name,
        learning_rate=1e-3,
        checkpoint=Path(f"{name}.keras"),
        checkpoint_sha256="x",
        history=[],
        best_epoch=0,
        best_val_accuracy=val_accuracy,
        best_val_loss=val_loss,
        first_trainable_layer="head_dense",
        trainable_layers=2,
        trainable_params=10,
        epochs_run=1,
        seconds=1.0,
        images_per_second=1.0,
    )


def test_prefix_layers_and_sizes():
    assert prefix_layer("block5") == "block4_pool"
    assert prefix_layer("block1") == prefix_layer("all") == "input_layer"
    assert prefix_bytes("block5", 224, 1) == 4 * 14 * 14 * 512
    assert prefix_bytes("block4", 64, 10) == 4 * 10 * 8 * 8 * 256
    assert prefix_bytes("all", 32, 1) == 4 * 32 * 32 * 3


def test_prefix_cache_plan_only_uses_untouched_blocks():
    three = [StageConfig(unfreeze_from=block, learning_rate=1e-4) for block in ("block5", "block4", "all")]
    descending = FinetuneConfig(stages=three)
    assert plan_prefix_caches(descending, 64, 100) == {
        "block5": "block4_pool",
        "block4": "block3_pool",
        "all": "input_layer",
    }
    # block5 after block4: block4 was already trained, so block4_pool from the original base is stale.
    ascending = FinetuneConfig(
        stages=[
            StageConfig(unfreeze_from="block4", learning_rate=1e-4),
            StageConfig(unfreeze_from="block5", learning_rate=1e-5),
        ]
    )
    assert plan_prefix_caches(ascending, 64, 100) == {"block4": "block3_pool", "block5": None}
    assert plan_prefix_caches(FinetuneConfig(stages=three, cache_frozen_prefix=False), 64, 100) == {
        "block5": None,
        "block4": None,
        "all": None,
    }
    small_budget = FinetuneConfig(stages=three, prefix_cache_max_gb=0.001)  # 1 MB
    assert plan_prefix_caches(small_budget, 224, 100)["block4"] is None


def test_choose_freeze_configuration_head_included_and_ties_keep_earlier():
    results = TrainedStages(results=[stage("head", 0.80, 0.5), stage("block5", 0.85, 0.6), stage("block4", 0.85, 0.4)])
    assert choose_freeze_configuration(results, "val_accuracy").stage == "block5"
    assert choose_freeze_configuration(results, "val_loss").stage == "block4"
    first_wins = TrainedStages(results=[stage("head", 0.9), stage("block5", 0.1)])
    assert choose_freeze_configuration(first_wins, "val_accuracy").stage == "head"
    assert not is_better(float("nan"), 0.1, "val_accuracy")


def test_by_default_the_lower_validation_loss_wins_over_a_higher_accuracy():
    # The benchmark's case: a fine-tuned block5 more confident where it is right, one image behind.
    head, block5 = stage("head", 0.797, 0.790), stage("block5", 0.791, 0.719)
    default = FinetuneConfig()
    assert default.selection_metric == "val_loss"
    assert [s.unfreeze_from for s in default.stages] == ["block5"]
    chosen = choose_freeze_configuration(TrainedStages(results=[head, block5]), default.selection_metric)
    assert chosen.stage == "block5"


def test_score_matches_hand_computed_values():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, -1])  # -1: a label outside the class list
    metrics, confusion = score(y_true, y_pred, 3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # F1 per class: c0 = 2*1*0.5/1.5 = 2/3; c1 = 2*(2/3)*1/(5/3) = 0.8; c2 = 2*1*0.5/1.5 = 2/3.
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 2 / 3) / 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]


@pytest.fixture
def registry() -> RegistryConfig:
    return RegistryConfig(thresholds={"accuracy": 0.6}, min_delta=0.01)


def test_gate_first_model_passes_on_thresholds_alone(registry):
    decision = decide({"accuracy": 0.7, "macro_f1": 0.6}, None, registry, "1", None)
    assert decision.promoted and "no champion yet" in decision.reason


def test_gate_rejects_below_threshold_even_without_champion(registry):
    decision = decide({"accuracy": 0.5, "macro_f1": 0.6}, None, registry, "1", None)
    assert not decision.promoted and decision.failed_thresholds == {"accuracy": 0.5}
    assert "accuracy 0.5000 < 0.6" in decision.reason


def test_gate_compares_with_champion_and_min_delta(registry):
    better = decide({"accuracy": 0.80}, {"accuracy": 0.75}, registry, "3", "2")
    assert better.promoted and better.delta == pytest.approx(0.05) and better.champion_version == "2"
    marginal = decide({"accuracy": 0.755}, {"accuracy": 0.75}, registry, "3", "2")
    assert not marginal.promoted and "does not beat champion v2" in marginal.reason
    tie = decide({"accuracy": 0.75}, {"accuracy": 0.75}, RegistryConfig(thresholds={}), "3", "2")
    assert not tie.promoted  # a tie keeps the champion


def test_stable_hash_is_order_independent_for_dicts_and_accepts_models(tmp_path):
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash(RegistryConfig()) != stable_hash(RegistryConfig(min_delta=0.1))
    assert stable_hash(tmp_path) == stable_hash(str(tmp_path))


def test_directory_fingerprint_sees_added_changed_and_removed_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"1")
    first = directory_fingerprint(tmp_path)
    (tmp_path / "a" / "y.png").write_bytes(b"2")
    second = directory_fingerprint(tmp_path)
    (tmp_path / "a" / "y.png").write_bytes(b"22")
    third = directory_fingerprint(tmp_path)
    (tmp_path / "a" / "y.png").unlink()
    assert len({first, second, third}) == 3 and directory_fingerprint(tmp_path) == first


def test_cache_key_is_withheld_when_outputs_are_invalid():
    key_fn = key_when_valid("step", lambda params: params["cache_key"], lambda params: params["ok"])
    assert key_fn(None, {"cache_key": "abc", "ok": True}) == "step-abc"
    assert key_fn(None, {"cache_key": "abc", "ok": False}) is None


def test_gate_is_mlflow_metric_thresholds(registry):
    thresholds = gate_thresholds(registry, against_champion=True)
    assert set(thresholds) == {"accuracy_score"}
    accuracy = thresholds["accuracy_score"]
    assert accuracy.threshold == 0.6 and accuracy.min_absolute_change == 0.01 and accuracy.greater_is_better
    alone = gate_thresholds(RegistryConfig(thresholds={"macro_f1": 0.2}), against_champion=False)
    assert set(alone) == {"f1_score"} and alone["f1_score"].min_absolute_change is None


def test_mlflow_evaluation_gives_the_evaluation_steps_numbers(project):
    """The gate's metrics (MLflow's evaluator) equal vggflow's own scoring of the same predictions."""
    import matplotlib.pyplot as plt

    from vggflow.config import TrackingConfig
    from vggflow.scoring import EVALUATION_DATASET, mlflow_evaluation
    from vggflow.tracking import connect

    client, experiment_id = connect(TrackingConfig())
    run_id = client.create_run(experiment_id).info.run_id
    classes = ["cat", "dog", "eel", "fox"]  # fox is never predicted nor present: macro averages over all four
    labels = ["cat", "cat", "dog", "dog", "eel", "eel", "cat"]
    predicted = ["cat", "dog", "dog", "dog", "eel", "cat", "(not a class of this data)"]
    gate = mlflow_evaluation(run_id, labels, predicted, classes)
    index = {name: i for i, name in enumerate(classes)}
    ours, _ = score(np.array([index[x] for x in labels]), np.array([index.get(x, -1) for x in predicted]), 4)
    assert gate["accuracy"] == pytest.approx(ours["accuracy"]) and gate["macro_f1"] == pytest.approx(ours["macro_f1"])
    logged = client.get_run(run_id)
    assert logged.data.metrics["accuracy_score"] == pytest.approx(ours["accuracy"])
    assert [d.dataset.name for d in logged.inputs.dataset_inputs] == [EVALUATION_DATASET]  # named, not "dataset"
    assert plt.get_fignums() == []  # MLflow's evaluator leaves a pyplot figure open: closed
    assert logged.info.status == "FINISHED"  # a run of its own (the champion's gate run) is closed
    training_run = client.create_run(experiment_id).info.run_id
    mlflow_evaluation(training_run, labels, predicted, classes, leave_running=True)
    assert client.get_run(training_run).info.status == "RUNNING"  # the training flow closes its own run

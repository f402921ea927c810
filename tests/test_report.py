"""Tests of the per-run report artifacts (vggflow/reports/): fast, no TensorFlow/MLflow/Prefect."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from vggflow.reports import evaluation_figures, stage_figures
from vggflow.reports.model_card import TEMPLATE, ModelCardInfo, render_model_card
from vggflow.training import StageResult, TrainedStages

REPO = Path(__file__).resolve().parents[1]


def assert_png(path: Path, min_width: int = 500, max_width: int = 3000) -> tuple[int, int]:
    assert path.is_file()
    with Image.open(path) as image:
        image.load()  # decodes fully: a truncated file fails here
        assert image.format == "PNG"
        width, height = image.size
    assert min_width <= width <= max_width, (path.name, width)
    assert 200 <= height <= 4000, (path.name, height)
    return width, height


def assert_no_temp_files(directory: Path) -> None:
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


def fake_predictions(n_classes: int, n_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, n_classes, n_samples)
    y_pred = np.where(rng.random(n_samples) < 0.7, y_true, rng.integers(0, n_classes, n_samples))
    return y_true, y_pred


def class_names(n: int) -> list[str]:
    # Every third name is long and contains a pipe, like a messy folder name.
    return [f"class {i}" if i % 3 else f"a rather long class name number {i} | variant" for i in range(n)]


def history_frame(stages: dict[str, int]) -> pd.DataFrame:
    rows = []
    for stage, epochs in stages.items():
        for epoch in range(epochs):
            rows.append(
                {
                    "stage": stage,
                    "epoch": epoch,
                    "loss": 1.0 / (epoch + 1),
                    "accuracy": 0.5 + 0.04 * epoch,
                    "val_loss": 1.1 / (epoch + 1),
                    "val_accuracy": 0.45 + 0.04 * epoch,
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- figures


@pytest.mark.parametrize("n_classes", [2, 10, 60])
def test_confusion_and_per_class_figures_are_valid_pngs(tmp_path: Path, n_classes: int) -> None:
    y_true, y_pred = fake_predictions(n_classes, 40 * n_classes)
    names = class_names(n_classes)
    matrix = confusion_matrix(y_true, y_pred, labels=range(n_classes))

    png = evaluation_figures.plot_confusion_matrix(matrix, names, tmp_path / "confusion.png")
    table = evaluation_figures.per_class_metrics(y_true, y_pred, names)
    csv, bars = evaluation_figures.write_per_class_outputs(
        table, tmp_path / "per_class.csv", tmp_path / "per_class.png"
    )

    assert png == tmp_path / "confusion.png"
    assert_png(png)
    assert_png(bars)
    written = pd.read_csv(csv)
    assert list(written.columns) == ["class", "precision", "recall", "f1", "support"]
    assert written["class"].tolist() == names
    assert written["support"].tolist() == table["support"].tolist()
    assert_no_temp_files(tmp_path)


def test_confusion_matrix_with_an_absent_class_and_mismatched_names(tmp_path: Path) -> None:
    matrix = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 7]])  # class 1 has no test samples
    assert_png(evaluation_figures.plot_confusion_matrix(matrix, ["a", "b", "c"], tmp_path / "cm.png"))
    with pytest.raises(ValueError, match="class_names"):
        evaluation_figures.plot_confusion_matrix(matrix, ["a", "b"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize(
    ("stages", "chosen"),
    [
        ({"head": 6, "block5": 3, "all": 2}, "block5"),  # block4 skipped: simply absent
        ({"head": 4}, "head"),  # a single stage
        ({"head": 5, "block5": 1}, "block5"),  # a one-epoch stage
    ],
)
def test_learning_curves(tmp_path: Path, stages: dict[str, int], chosen: str) -> None:
    path = stage_figures.plot_learning_curves(history_frame(stages), chosen, tmp_path / "curves.png")
    assert_png(path)
    assert_no_temp_files(tmp_path)


def test_learning_curves_empty_history_and_missing_columns(tmp_path: Path) -> None:
    empty = pd.DataFrame(columns=stage_figures.HISTORY_COLUMNS)
    assert_png(stage_figures.plot_learning_curves(empty, "head", tmp_path / "empty.png"))
    no_validation = history_frame({"head": 2, "block5": 2}).drop(columns=["val_loss", "val_accuracy"])
    assert_png(stage_figures.plot_learning_curves(no_validation, "block5", tmp_path / "train_only.png"))
    with pytest.raises(ValueError, match="epoch"):
        stage_figures.plot_learning_curves(history_frame({"head": 2}).drop(columns="epoch"), "head", tmp_path / "x.png")


@pytest.mark.parametrize("metric", ["val_accuracy", "val_loss"])
def test_stage_comparison(tmp_path: Path, metric: str) -> None:
    stages = pd.DataFrame({"stage": ["head", "block5", "block4", "all"], metric: [0.8, 0.86, 0.85, np.nan]})
    assert_png(stage_figures.plot_stage_comparison(stages, metric, "block5", tmp_path / "stages.png"))
    assert_no_temp_files(tmp_path)


def test_misclassified_grid_mixed_sizes_and_empty(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(5)]
    images += [rng.integers(0, 256, (300, 180, 3), dtype=np.uint8), rng.integers(0, 256, (40, 64), dtype=np.uint8)]
    n = len(images)
    path = evaluation_figures.plot_misclassified_grid(
        images,
        ["T-shirt/top"] * n,
        ["an extremely long predicted class name, really"] * n,
        [0.87] * n,
        tmp_path / "grid.png",
    )
    assert_png(path)
    empty = evaluation_figures.plot_misclassified_grid([], [], [], [], tmp_path / "none.png")
    assert_png(empty)
    with pytest.raises(ValueError, match="same length"):
        evaluation_figures.plot_misclassified_grid(images, ["x"], ["y"], [0.5], tmp_path / "bad.png")
    assert_no_temp_files(tmp_path)


def test_large_photos_are_shrunk_before_drawing(tmp_path: Path) -> None:
    """Sixteen 12-megapixel photos took matplotlib 14.6 s to draw at full size."""
    photo = np.zeros((3000, 4000, 3), dtype=np.uint8)
    photo[:, 2000:] = 200  # right half bright: still the right half after shrinking
    small = evaluation_figures.shrink_for_figure(photo)
    assert small.shape == (540, evaluation_figures.FIGURE_IMAGE_MAX_SIDE, 3) and small.dtype == np.uint8
    assert small[:, :350].max() == 0 and small[:, 370:].min() == 200
    assert evaluation_figures.shrink_for_figure(np.zeros((4000, 30, 4), dtype=np.uint8)).shape == (720, 5, 4)
    thumbnail = np.ones((28, 28, 3), dtype=np.uint8)
    assert evaluation_figures.shrink_for_figure(thumbnail) is thumbnail
    assert_png(
        evaluation_figures.plot_misclassified_grid(
            [photo, thumbnail], ["a", "b"], ["b", "a"], [0.9, 0.8], tmp_path / "grid.png"
        )
    )


def test_repeated_plots_do_not_leak_figures(tmp_path: Path) -> None:
    import gc

    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    def live_figures() -> int:
        gc.collect()
        return sum(isinstance(obj, Figure) for obj in gc.get_objects())

    matrix = np.array([[3, 1], [0, 4]])
    evaluation_figures.plot_confusion_matrix(matrix, ["cat", "dog"], tmp_path / "cm.png")  # warm-up
    before = live_figures()
    for i in range(20):
        evaluation_figures.plot_confusion_matrix(matrix, ["cat", "dog"], tmp_path / "cm.png")
        if i % 5 == 0:
            stage_figures.plot_learning_curves(history_frame({"head": 3}), "head", tmp_path / "lc.png")
            evaluation_figures.plot_misclassified_grid([], [], [], [], tmp_path / "grid.png")
    assert plt.get_fignums() == []
    assert live_figures() <= before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "grid.png", "lc.png"]


def test_report_files_are_readable_by_others_and_a_failed_figure_keeps_the_old_file(tmp_path: Path) -> None:
    """Artifacts go through vggflow.files: 0644 under the usual umask (a tracking server running
    as another user reads them), no temporary file left, the old file kept when drawing fails."""
    previous = os.umask(0o022)
    try:
        table = evaluation_figures.per_class_metrics(np.array([0, 1]), np.array([0, 0]), ["a", "b"])
        written = evaluation_figures.write_per_class_outputs(table, tmp_path / "pc.csv", tmp_path / "pc.png")
        written += (stage_figures.plot_learning_curves(history_frame({"head": 2}), "head", tmp_path / "lc.png"),)
    finally:
        os.umask(previous)
    assert [stat.S_IMODE(path.stat().st_mode) for path in written] == [0o644] * 3
    target = tmp_path / "grid.png"
    target.write_bytes(b"previous")
    with pytest.raises(ValueError, match="RGB"):
        evaluation_figures.plot_misclassified_grid([np.zeros((4, 4, 2), np.uint8)], ["a"], ["b"], [0.5], target)
    assert target.read_bytes() == b"previous"
    assert_no_temp_files(tmp_path)


def test_module_imports_without_heavy_dependencies() -> None:
    code = (
        "import sys; import vggflow.reports.evaluation_figures, vggflow.reports.stage_figures, "
        "vggflow.reports.model_card; "
        "heavy = {'tensorflow', 'keras', 'prefect', 'mlflow', 'matplotlib', 'jinja2'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --------------------------------------------------------------------------- numbers


def test_per_class_metrics_match_hand_computed_and_sklearn_values() -> None:
    # Class 2 ("bird") is never predicted; class 3 ("fish") is absent from both.
    y_true = np.array([0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 0, 1, 0])
    names = ["cat", "dog", "bird", "fish"]

    table = evaluation_figures.per_class_metrics(y_true, y_pred, names)

    assert list(table.columns) == ["class", "precision", "recall", "f1", "support"]
    assert table["class"].tolist() == names
    # cat: 2 right of 4 predicted, 2 of 3 found; dog: 1 of 3 predicted, 1 of 2 found.
    np.testing.assert_allclose(table["precision"], [2 / 4, 1 / 3, 0.0, 0.0])
    np.testing.assert_allclose(table["recall"], [2 / 3, 1 / 2, 0.0, 0.0])
    np.testing.assert_allclose(table["f1"], [4 / 7, 2 / 5, 0.0, 0.0])
    assert table["support"].tolist() == [3, 2, 2, 0]
    expected = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2, 3], zero_division=0)
    for column, values in zip(["precision", "recall", "f1", "support"], expected, strict=True):
        np.testing.assert_allclose(table[column].to_numpy(dtype=float), values)


def test_per_class_metrics_rejects_indices_outside_the_class_list() -> None:
    with pytest.raises(ValueError, match="outside"):
        evaluation_figures.per_class_metrics(np.array([0, 3]), np.array([0, 1]), ["a", "b"])


def test_worst_misclassified_orders_by_confidence_of_the_mistake() -> None:
    y_true = np.array([0, 1, 2, 0, 1, 2])
    probabilities = np.array(
        [
            [0.90, 0.05, 0.05],  # 0: correct
            [0.60, 0.30, 0.10],  # 1: wrong, 0.60
            [0.05, 0.90, 0.05],  # 2: wrong, 0.90
            [0.20, 0.70, 0.10],  # 3: wrong, 0.70
            [0.10, 0.80, 0.10],  # 4: correct
            [0.60, 0.20, 0.20],  # 5: wrong, 0.60 (tie with 1: sample order kept)
        ]
    )
    assert evaluation_figures.worst_misclassified(y_true, probabilities, 10) == [2, 3, 1, 5]
    assert evaluation_figures.worst_misclassified(y_true, probabilities, 2) == [2, 3]
    assert evaluation_figures.worst_misclassified(y_true, probabilities, 0) == []
    assert evaluation_figures.worst_misclassified(np.array([0]), np.array([[1.0, 0.0]]), 5) == []


# --------------------------------------------------------------------------- model card


def stage_result(stage: str, val_accuracy: float, val_loss: float, epochs: int) -> StageResult:
    return StageResult(
        stage=stage,
        unfreeze_from=None if stage == "head" else f"{stage}_conv1",
        learning_rate=1e-3 if stage == "head" else 1e-4,
        checkpoint=Path(f"{stage}.keras"),
        checkpoint_sha256="0" * 64,
        history=[],
        best_epoch=max(epochs - 1, 0),
        best_val_accuracy=val_accuracy,
        best_val_loss=val_loss,
        first_trainable_layer="head_dense" if stage == "head" else f"{stage}_conv1",
        trainable_layers=2 if stage == "head" else 6,
        trainable_params=1_000 if stage == "head" else 9_439_232,
        epochs_run=epochs,
        seconds=1.234,
        images_per_second=812.34,
    )


def stage_row(
    stage: str, val_accuracy: float | None, val_loss: float | None, epochs: int, chosen: bool = False
) -> dict[str, object]:
    """A row as the stage-comparison table has it; None values stand for a stage that never ran."""
    row: dict[str, object] = stage_result(stage, 0.0, 0.0, epochs).summary() | {"chosen": chosen}
    return row | {"best_val_accuracy": val_accuracy, "best_val_loss": val_loss}


def card_info(**overrides: object) -> ModelCardInfo:
    per_class = pd.DataFrame(
        {
            "class": ["cat", "dog | wolf", "bird"],
            "precision": [0.9, 0.8, 0.0],
            "recall": [0.85, 0.75, 0.0],
            "f1": [0.874, 0.774, 0.0],
            "support": [20, 16, 0],
        }
    )
    values: dict[str, object] = {
        "model_name": "vgg19-classifier",
        "version": "3",
        "run_id": "abc123",
        "created": "2025-01-01T03:00:00Z",
        "data_version": "d41d8cd98f00b204e9800998ecf8427e.dir",
        "data_matches_dvc": True,
        "class_counts": {
            "cat": {"train": 70, "val": 15, "test": 20},
            "dog | wolf": {"train": 60, "val": 12, "test": 16},
            "bird": {"train": 5, "val": 1},
        },
        "image_size": 64,
        "backbone_weights": "imagenet",
        "random_init": False,
        "freeze_configuration": {
            "stage": "block5",
            "first_trainable_layer": "block5_conv1",
            "trainable_layers": 4,
            "trainable_params": 9_439_232,
            "learning_rate": 1e-4,
        },
        "stages": [
            stage_row("head", 0.81, 0.52, 12),
            stage_row("block5", 0.86, 0.41, 5, chosen=True),
            stage_row("block4", None, None, 0),
        ],
        "test_metrics": {"accuracy": 0.8333, "macro_f1": 0.5493},
        "per_class": per_class,
        "promotion": {
            "decision": "promoted",
            "reason": "beats the champion",
            "metric": "accuracy",
            "candidate_metric": 0.8333,
            "champion_metric": 0.8,
            "delta": 0.0333,
        },
        "config_yaml": "seed: 42\nbackbone:\n  weights: imagenet\n",
        "git_commit": "26da51d",
        "git_dirty": False,
    }
    values.update(overrides)
    return ModelCardInfo(**values)  # type: ignore[arg-type]


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def tables(markdown: str) -> list[list[str]]:
    found: list[list[str]] = []
    current: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    if current:
        found.append(current)
    return found


def test_model_card_sections_and_content() -> None:
    card = render_model_card(card_info())
    headings = [line for line in card.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Summary",
        "## Intended use",
        "## Limitations",
        "## Training data",
        "## Training procedure",
        "## Evaluation",
        "## Promotion decision",
        "## Reproduce",
    ]
    assert "version 3" in card
    assert "trained on only 135 images" in card.lower()
    assert "64×64" in card
    assert "forced into one of the 3 classes" in card
    assert "calibration" in card
    assert "26da51d" in card and "vggflow train --config" in card
    assert "<details>" in card and "```yaml\nseed: 42" in card and "</details>" in card
    assert "+0.0333" in card and "promoted" in card
    assert "skipped" in card  # block4 had no epochs
    assert "**block5** (kept)" in card


def test_model_card_random_init_warning_only_when_random_init() -> None:
    warning = (
        "the backbone was randomly initialised (no imagenet weights): this model is for pipeline demonstration only"
    )
    assert warning not in render_model_card(card_info()).lower()
    card = render_model_card(card_info(random_init=True, backbone_weights="none"))
    assert warning in card.lower()
    # Loud: before the first section and again in Limitations.
    assert card.lower().index(warning) < card.index("## Summary")
    limitations = card[card.index("## Limitations") : card.index("## Training data")]
    assert warning in limitations.lower()


def test_model_card_tables_are_valid_and_escape_pipes() -> None:
    card = render_model_card(card_info())
    found = tables(card)
    assert len(found) >= 5  # counts, freeze, stages, metrics, per class, promotion
    for table in found:
        counts = {unescaped_pipes(row) for row in table}
        assert len(counts) == 1, table
        assert re.fullmatch(r"\|( :?-+:? \|)+", table[1]), table[1]
    assert "dog \\| wolf" in card
    assert "dog | wolf" not in card


def test_model_card_optional_parts() -> None:
    card = render_model_card(
        card_info(
            version=None,
            promotion=None,
            data_matches_dvc=False,
            git_dirty=True,
            class_counts={"cat": 10, "dog": 12},
            per_class=[{"class": "cat", "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3}],
            config_yaml="note: |\n  ```not a fence```\n",
        )
    )
    assert "not registered" in card
    assert "No promotion gate ran" in card
    assert "did not match the DVC-tracked version" in card
    assert "uncommitted changes" in card
    assert "````yaml" in card  # fence longer than the backticks inside the config
    for table in tables(card):
        assert len({unescaped_pipes(row) for row in table}) == 1, table


def test_model_card_takes_the_stage_comparison_rows() -> None:
    results = [stage_result("head", 0.81, 0.52, 12), stage_result("block5", 0.86, 0.41, 5)]
    rows = TrainedStages(results=results).table(results[1])
    assert list(rows[0]) == [
        *results[0].freeze_configuration(),
        "best_val_accuracy",
        "best_val_loss",
        "best_epoch",
        "epochs_run",
        "seconds",
        "images_per_second",
        "prefix_cache",
        "chosen",
    ]
    assert rows[0]["seconds"] == 1.23 and rows[0]["images_per_second"] == 812.3
    card = render_model_card(card_info(stages=rows))
    assert "| head | 0.8100 | 0.5200 | 12 |" in card
    assert "| **block5** (kept) | 0.8600 | 0.4100 | 5 |" in card


def test_model_card_from_a_template_of_ones_own(tmp_path: Path) -> None:
    own = tmp_path / "card.md.j2"
    own.write_text(
        "# {{ info.model_name | md }} v{{ info.version }}\n"
        "{% for row in info.stages %}- {{ row.stage | md }}: {{ row.best_val_accuracy | fmt }}\n{% endfor %}"
        "{{ n_classes }} classes, {{ test_images | fmt }} test images\n",
        encoding="utf-8",
    )
    card = render_model_card(card_info(model_name="cats_|_dogs"), template=own)
    assert (
        card == "# cats\\_\\|\\_dogs v3\n- head: 0.8100\n- block5: 0.8600\n- block4: n/a\n3 classes, 36 test images\n"
    )
    own.write_text("{{ info.no_such_field }}", encoding="utf-8")
    with pytest.raises(Exception, match="no_such_field"):
        render_model_card(card_info(), template=own)
    assert TEMPLATE.is_file() and TEMPLATE.suffix == ".j2"  # shipped beside the module, for users to copy


def test_model_card_info_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="stage_results"):
        card_info(stage_results=[])

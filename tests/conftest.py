"""Shared fixtures: offline environment, tiny generated datasets, real local services.

No mocks of Prefect, MLflow, DVC or Keras: integration tests run against a real Prefect test
server (``prefect_test_harness``), real MLflow sqlite stores and real DVC repositories in
temporary folders.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggflow.runtime import configure_environment

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config) -> None:
    # Before TensorFlow/Prefect/MLflow are imported by any test module.
    # Prefect's result store in a throw-away folder, not the repository's .vggflow/.
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = tempfile.mkdtemp(prefix="vggflow-prefect-results-")
    configure_environment(PROJECT_ROOT)
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")


#: The test files that take longest (a few minutes each on 2 cores), longest first. They are
#: collected first so that pytest-xdist (`--dist loadfile`, which hands out whole files in
#: collection order) starts them early and its two workers finish close together.
LONGEST_FILES = (
    "test_stack.py",
    "test_reliability.py",
    "test_retrain.py",
    "test_flow_e2e.py",
    "test_schedule.py",
    "test_dvc_pipeline.py",
    "test_lineage.py",
    "test_executors_local.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: file order kept


def make_image(label_index: int, variant: int, size: int = 32) -> Image.Image:
    """A small RGB image whose class is easy to learn: a coloured shape on a noisy background."""
    rng = np.random.default_rng(1000 * label_index + variant)
    pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    colour = np.zeros(3, dtype=np.uint8)
    colour[label_index % 3] = 200 + label_index * 10 % 55
    lo, hi = size // 4 + variant % 3, 3 * size // 4 - variant % 2
    if label_index % 3 == 0:
        pixels[lo:hi, lo:hi] = colour  # square
    elif label_index % 3 == 1:
        pixels[lo:hi, size // 2 - 2 : size // 2 + 2] = colour  # vertical bar
        pixels[size // 2 - 2 : size // 2 + 2, lo:hi] = colour  # + horizontal bar
    else:
        yy, xx = np.mgrid[:size, :size]
        pixels[(yy - size // 2) ** 2 + (xx - size // 2) ** 2 < (size // 4) ** 2] = colour  # disc
    return Image.fromarray(pixels, "RGB")


def write_dataset(root: Path, classes: int = 3, per_class: int = 12, size: int = 32, start: int = 0) -> Path:
    """``root/<class_k>/img_XXX.png`` with ``per_class`` distinct images per class."""
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for variant in range(start, start + per_class):
            make_image(label, variant, size).save(folder / f"img_{variant:03d}.png")
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """3 classes x 12 images, 32x32 PNG."""
    return write_dataset(tmp_path / "data")


def stage_config(data_dir: Path, precision: str = "float32", **sections):
    """A config for fine-tuning stages on the tiny dataset: 32x32, random base, seed 7, batches of 8."""
    from vggflow.config import Config

    backbone = {"weights": "none", "image_size": 32, "precision": precision}
    return Config(seed=7, data={"dir": str(data_dir)}, backbone=backbone, **{"finetune": {"batch_size": 8}, **sections})


@pytest.fixture
def features(tmp_path: Path, tiny_dataset: Path):
    """The tiny dataset's cached features (avg_pool and block4_pool; 2/3 train, 1/3 val) and its random weights."""
    import pandas as pd

    from vggflow.config import BackboneConfig
    from vggflow.model import resolve_weights
    from vggflow.tasks.features import compute_features

    paths = sorted(p.relative_to(tiny_dataset).as_posix() for p in tiny_dataset.rglob("*.png"))
    rows = pd.DataFrame(
        {"path": paths, "label": [p.split("/")[0] for p in paths], "split": ["train", "train", "val"] * 12}
    )
    weights = resolve_weights(BackboneConfig(weights="none", image_size=32), tmp_path, seed=1)
    classes = sorted(rows["label"].unique())
    fs = compute_features(rows, tiny_dataset, weights, 32, 12, tmp_path / "cache", "fp", ["block4_pool"], classes)
    return fs, weights


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throw-away project folder as the cwd, with its own MLflow sqlite store."""
    folder = tmp_path / "project"
    folder.mkdir()
    monkeypatch.chdir(folder)
    uri = f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if "mlflow" in sys.modules:
        # An earlier test's connect() set MLflow's process-wide URI; this test's store wins.
        sys.modules["mlflow"].set_tracking_uri(uri)
    return folder


@pytest.fixture(scope="session")
def prefect_server():
    """A real, temporary Prefect server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def tiny_overrides(**extra: str) -> list[str]:
    """Config overrides for a fast end-to-end run: 32x32, random backbone, one epoch per stage."""
    values = {
        "backbone.weights": "none",
        "backbone.image_size": "32",
        "features.batch_size": "16",
        "head.epochs": "2",
        "head.batch_size": "8",
        "finetune.batch_size": "8",
        "finetune.stages": "[{unfreeze_from: block5, learning_rate: 1.0e-4, epochs: 1},"
        " {unfreeze_from: block4, learning_rate: 1.0e-5, epochs: 1},"
        " {unfreeze_from: all, learning_rate: 1.0e-5, epochs: 1}]",
        "finetune.warmup_epochs": "0",  # one-epoch stages: no room for a warm-up
        "finetune.stop_when_no_improvement": "false",
        "registry.thresholds": "{accuracy: 0.0}",
        "validation.min_images_per_class": "3",
        "evaluate.worst_examples": "4",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]

"""Step 6b: log the run's results and the model, and register it as a new version.

The logged model is an MLflow pyfunc built from code (``vggflow/pyfunc_model.py``) around the
chosen Keras classifier (``.keras`` file) and its class names: it takes raw RGB images and
returns class names and probabilities, with no pickle and no vggflow import on the client.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from prefect import task

from vggflow import mlflow_tags
from vggflow.config import Config, RegistryConfig
from vggflow.files import atomic_write_text, read_rows
from vggflow.promotion import RegisteredVersion
from vggflow.runs import TrainingRun, mlflow_client
from vggflow.scoring import Evaluation
from vggflow.training import StageResult

if TYPE_CHECKING:
    from vggflow.validation import ValidatedData

#: The pyfunc model's code file, logged with every model (found without importing it).
MODEL_CODE = Path(importlib.util.find_spec("vggflow.pyfunc_model").origin)
#: What the registered model needs at inference, pinned to the versions it was trained with.
MODEL_PACKAGES = ("tensorflow", "keras", "mlflow", "numpy", "pandas")


def pinned_requirements() -> list[str]:
    """Pinned pip requirements from the installed versions (inferring them costs ~20 s)."""
    import importlib.metadata

    return [f"{name}=={importlib.metadata.version(name)}" for name in MODEL_PACKAGES]


def model_signature(class_names: list[str]):
    """Input: a batch of raw RGB images, uint8, any size (-1 = variable); output: one row per image.

    The output columns are the pyfunc model's: ``label``, ``confidence`` and ``probabilities``
    (an object with one probability per class name).
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Object, Property, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("double", "confidence"),
                ColSpec(Object([Property(name, "double") for name in class_names]), "probabilities"),
            ]
        ),
    )


#: Largest side of the input example: any size is accepted, and a small one keeps the example small.
EXAMPLE_MAX_SIDE = 64


def input_example(image: Path) -> np.ndarray:
    """One real training image as the model takes it: a uint8 ``(1, H, W, 3)`` batch, at most 64 pixels a side."""
    from PIL import Image

    from vggflow.images import load_rgb

    pixels = load_rgb(image)
    picture = Image.fromarray(pixels)
    picture.thumbnail((EXAMPLE_MAX_SIDE, EXAMPLE_MAX_SIDE))
    return np.asarray(picture, dtype=np.uint8)[np.newaxis]


class _PyfuncWithKerasFlavor:
    """A flavor module for ``mlflow.models.Model.log``: the pyfunc model from code, plus the keras
    flavour pointing at the same ``.keras`` file.

    So ``mlflow.pyfunc.load_model`` gives the raw-image, class-named interface and
    ``mlflow.keras.load_model`` gives the Keras classifier itself, from one logged model.
    """

    @staticmethod
    def save_model(path, mlflow_model, **kwargs) -> None:
        import keras
        import mlflow

        mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **kwargs)
        # mlflow.keras loads <path>/<data>/model.keras: the classifier artifact is copied as artifacts/model.keras.
        mlflow_model.add_flavor(
            "keras", data="artifacts", keras_module="keras", keras_version=keras.__version__, save_exported_model=False
        )
        mlflow_model.save(str(Path(path) / "MLmodel"))


def log_classifier(
    run_id: str, checkpoint: Path, class_names: list[str], image_size: int, work_dir: Path, example: np.ndarray
) -> str:
    """Log the chosen classifier as the run's model, with its signature and an input example; returns its URI.

    MLflow saves the example (``input_example.json``, ``serving_input_example.json``) and checks
    that the model answers it before the model is logged.
    """
    import shutil

    import mlflow
    from mlflow.models import Model

    from vggflow.tracking import without_type_hint_advice

    package = work_dir / "model-package"
    package.mkdir(parents=True, exist_ok=True)
    (package / "model.keras").unlink(missing_ok=True)
    try:
        os.link(checkpoint, package / "model.keras")  # MLflow copies it into the store anyway
    except OSError:
        shutil.copyfile(checkpoint, package / "model.keras")
    classes = atomic_write_text(
        package / "classes.json", json.dumps({"class_names": class_names, "image_size": image_size}, indent=1)
    )
    # MLflow 3 files a logged model under the *active* experiment, not its source run's: without
    # this it lands in "Default" (experiment 0), its artifacts in ./mlruns of whatever folder the
    # command ran from, outside the configured store.
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    with without_type_hint_advice():
        info = Model.log(
            None,  # artifact_path: deprecated in favour of name, still positional
            name="model",
            flavor=_PyfuncWithKerasFlavor,
            run_id=run_id,
            python_model=str(MODEL_CODE),
            artifacts={"classifier": str(package / "model.keras"), "classes": str(classes)},
            signature=model_signature(class_names),
            input_example=example,
            pip_requirements=pinned_requirements(),
            metadata={"class_names": class_names, "image_size": image_size, "input": "uint8 RGB (N, H, W, 3)"},
        )
    return info.model_uri


def register_version(model_uri: str, cfg: RegistryConfig, run_id: str, tags: dict[str, str]) -> RegisteredVersion:
    """Register ``model_uri`` as a new version of ``cfg.model_name`` with its provenance tags."""
    import mlflow

    version = mlflow.register_model(model_uri, cfg.model_name, tags=tags)
    return RegisteredVersion(name=cfg.model_name, version=str(version.version), model_uri=model_uri, run_id=run_id)


def version_tags(run_tags: dict[str, str], run_id: str, chosen: StageResult, evaluation: Evaluation) -> dict[str, str]:
    """Tags of a registered version: data version, git commit, run id, freeze configuration, metrics."""
    tags = {
        mlflow_tags.DATA_VERSION: run_tags.get(mlflow_tags.DATA_VERSION, "unknown"),
        mlflow_tags.GIT_COMMIT: run_tags.get(mlflow_tags.MLFLOW_GIT_COMMIT, "unknown"),
        mlflow_tags.RUN_ID: run_id,
        mlflow_tags.FREEZE_CONFIGURATION: json.dumps(chosen.freeze_configuration()),
        mlflow_tags.RANDOM_INIT: run_tags.get(mlflow_tags.RANDOM_INIT, "unknown"),
    }
    for key in ("accuracy", "macro_f1"):
        tags[mlflow_tags.test_metric(key)] = f"{evaluation.metrics[key]:.6f}"
    return tags


@task(name="log-model")
def log_model_task(cfg: Config, run: TrainingRun, chosen: StageResult, validated: ValidatedData) -> str:
    """Log the chosen classifier as the run's pyfunc model (not retried: a retry would log a second model)."""
    first_image = Path(cfg.data.dir) / read_rows(validated.rows_file)["path"].iloc[0]
    return log_classifier(
        run.run_id,
        chosen.checkpoint,
        validated.class_names,
        cfg.backbone.image_size,
        run.report_dir,
        input_example(first_image),
    )


@task(name="register-model", retries=3, retry_delay_seconds=5)
def register_task(
    cfg: Config, run: TrainingRun, model_uri: str, chosen: StageResult, evaluation: Evaluation
) -> RegisteredVersion:
    """Register the logged model as a new version with its provenance tags (registry I/O: retried)."""
    run_tags = mlflow_client().get_run(run.run_id).data.tags
    return register_version(model_uri, cfg.registry, run.run_id, version_tags(run_tags, run.run_id, chosen, evaluation))

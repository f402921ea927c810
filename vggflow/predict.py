"""`vggflow predict`: label image files with a registered model, as any client would.

Files are decoded with the shared decoder (any format, any mode → RGB) and handed to the
model as raw uint8 batches; the model resizes and preprocesses. An unreadable file is reported
and skipped, never fatal for the others.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vggflow.images import ImageDecodeError, batch_has_room, load_rgb


@dataclass(frozen=True)
class Prediction:
    """Top-k labels of one file, or why it could not be read."""

    path: str
    top: list[tuple[str, float]]
    error: str | None = None


def expand_inputs(inputs: list[str]) -> Iterator[Path]:
    """Files given directly, and every non-hidden file under given folders (sorted)."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield Path(folder) / name
        else:
            yield path


def predict_files(model, paths: list[Path], top_k: int, batch_size: int = 16) -> Iterator[Prediction]:
    """Predictions for ``paths`` with a loaded pyfunc model, in input order.

    Consecutive same-sized images share a batch (:func:`vggflow.images.batch_has_room`: the
    model resizes in float32); a file that cannot be decoded yields a :class:`Prediction` with
    ``error`` set.
    """
    batch: list[tuple[Path, np.ndarray]] = []

    def flush() -> Iterator[Prediction]:
        if not batch:
            return
        frame = model.predict(np.stack([image for _, image in batch]))
        for (path, _), probabilities in zip(batch, frame["probabilities"]):
            ranked = sorted(probabilities.items(), key=lambda item: item[1], reverse=True)[:top_k]
            yield Prediction(str(path), [(label, float(p)) for label, p in ranked])
        batch.clear()

    for path in paths:
        try:
            image = load_rgb(path)
        except ImageDecodeError as err:
            yield from flush()
            yield Prediction(str(path), [], f"{err.kind}: {err}")
            continue
        except OSError as err:
            yield from flush()
            yield Prediction(str(path), [], f"unreadable: {err.strerror or err}")
            continue
        if batch and batch[0][1].shape != image.shape:
            yield from flush()
        batch.append((path, image))
        if not batch_has_room(len(batch), image.shape, batch_size):
            yield from flush()
    yield from flush()


def prediction_json(prediction: Prediction) -> dict:
    """One image's result for ``vggflow predict --json``: its top label and the top k, or the error."""
    best = prediction.top[0] if prediction.top else (None, None)
    return {
        "path": prediction.path,
        "label": best[0],
        "confidence": best[1],
        "top_k": [{"label": label, "probability": p} for label, p in prediction.top],
        "error": prediction.error,
    }


def format_prediction(prediction: Prediction) -> str:
    """``path<TAB>label p  label p …`` (or the error)."""
    if prediction.error:
        return f"{prediction.path}\tERROR {prediction.error}"
    return f"{prediction.path}\t" + "  ".join(f"{label} {p:.3f}" for label, p in prediction.top)

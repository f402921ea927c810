"""The registered model's Python code (MLflow "models from code": copied into every model).

Self-contained on purpose: a client loading ``models:/vgg19-classifier@champion`` needs MLflow,
Keras/TensorFlow, numpy and pandas, not vggflow. The Keras classifier it wraps carries its own
resize and VGG19 ``preprocess_input``; this wrapper adds the class names and accepts raw RGB
images. Nothing is unpickled: the model is a ``.keras`` file (loaded in Keras's safe mode) and a
JSON list of class names.

Input: a uint8 array ``(N, H, W, 3)`` (one batch of same-sized RGB images) or ``(H, W, 3)``.
Output: a DataFrame with one row per image: ``label``, ``confidence`` and ``probabilities``
(a dict class name → probability).
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd


class VggflowClassifier(mlflow.pyfunc.PythonModel):
    """Raw RGB images in, class names and probabilities out."""

    #: Pixels (all images together) per call of the Keras model, as vggflow's own batching
    #: (``vggflow.images.BATCH_MAX_PIXELS``): the model resizes in float32, and a batch of 32
    #: photos of 12 megapixels made a process grow by 15 GB. Larger inputs run in slices.
    max_pixels_per_call = 4_000_000

    def load_context(self, context) -> None:
        import keras

        self.model = keras.saving.load_model(context.artifacts["classifier"], compile=False)
        with open(context.artifacts["classes"], encoding="utf-8") as handle:
            self.class_names = list(json.load(handle)["class_names"])

    def predict_proba(self, images) -> np.ndarray:
        """Class probabilities ``(N, n_classes)`` for a batch of raw RGB images."""
        if isinstance(images, dict):  # a named tensor input ({"image": ...})
            images = next(iter(images.values()))
        if isinstance(images, pd.DataFrame):
            images = np.stack([np.asarray(value) for value in images.iloc[:, 0]])
        batch = np.asarray(images)
        if batch.ndim == 3:
            batch = batch[np.newaxis]
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected RGB images shaped (N, H, W, 3) or (H, W, 3), got {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        step = max(1, self.max_pixels_per_call // max(1, batch.shape[1] * batch.shape[2]))
        return np.concatenate(
            [
                np.asarray(self.model.predict_on_batch(batch[start : start + step].astype(np.float32)))
                for start in range(0, len(batch), step)
            ]
        )

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        """Label a batch: one row per image (``label``, ``confidence``, ``probabilities``).

        The type hint tells MLflow the input is the array its signature describes (checked against
        that signature, not converted from the hint).
        """
        probabilities = self.predict_proba(model_input)
        best = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, dtype=int)
        return pd.DataFrame(
            {
                "label": [self.class_names[i] for i in best],
                "confidence": [float(row[i]) for row, i in zip(probabilities, best)],
                "probabilities": [{name: float(p) for name, p in zip(self.class_names, row)} for row in probabilities],
            }
        )


mlflow.models.set_model(VggflowClassifier())

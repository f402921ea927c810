"""Compute precision: float32, or Keras's mixed_bfloat16 where the CPU runs bfloat16 natively.

On CPUs with AMX or AVX-512 BF16 (Intel Sapphire Rapids and later, AMD Zen 4 and later) oneDNN
runs VGG19's convolutions in bfloat16 much faster than in float32; elsewhere bfloat16 is emulated
and slower, so ``auto`` picks it only where the CPU flags say it is native. Only extraction and
training use it: the classifier that is saved, evaluated and registered always computes in
float32, so its numbers do not depend on the machine that serves it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FLOAT32, MIXED_BFLOAT16 = "float32", "mixed_bfloat16"

#: /proc/cpuinfo flags of native bfloat16 arithmetic.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})

#: Layers that stay float32 under mixed precision: the feature standardisation (subtracting a mean
#: in bfloat16 loses what the features' small spread holds) and the softmax output.
FLOAT32_LAYERS = frozenset({"head_norm", "predictions"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not readable)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(setting: str, flags: set[str] | None = None) -> str:
    """``float32`` or ``mixed_bfloat16``: ``auto`` is the latter only where bfloat16 is native."""
    if setting != "auto":
        return setting
    return MIXED_BFLOAT16 if (cpu_flags() if flags is None else flags) & NATIVE_BF16_FLAGS else FLOAT32


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Layers created in the block compute in ``precision`` (Keras's global policy, restored after)."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _with_policy(config: Any, precision: str) -> Any:
    """A model config whose layers compute in ``precision``, but for :data:`FLOAT32_LAYERS`."""
    if isinstance(config, list):
        return [_with_policy(item, precision) for item in config]
    if not isinstance(config, dict):
        return config
    out = {key: _with_policy(value, precision) for key, value in config.items()}
    if config.get("name") not in FLOAT32_LAYERS and isinstance(config.get("dtype"), dict):
        out["dtype"] = {**config["dtype"], "config": {**config["dtype"]["config"], "name": precision}}
    return out


def twin(model, precision: str):
    """``model`` itself in float32; else a copy of it computing in ``precision``, with the same weights.

    Train the copy, then :func:`copy_weights` back into ``model``: the saved model stays float32.
    """
    if precision == FLOAT32:
        return model
    copy = model.__class__.from_config(_with_policy(model.get_config(), precision))
    copy_weights(model, copy)
    return copy


def copy_weights(source, target) -> None:
    """Copy every weight of ``source`` into the same-shaped ``target`` (and refresh adapted layers)."""
    if source is target:
        return
    import keras

    target.set_weights(source.get_weights())
    for layer in target.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()  # its mean and variance are derived from the weights just set

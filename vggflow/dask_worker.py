"""Dask worker set-up for vggflow's distributed steps (``dask worker --preload vggflow.dask_worker``).

Run once in each worker process before its first task: the offline settings the CLI would apply,
TensorFlow imported (a first shard would otherwise pay for the import), and TensorFlow's thread
pools sized to the worker's Dask threads, so that N single-threaded workers on N cores do not
fight over them. Local clusters that vggflow starts preload it too.

What a worker keeps between shards lives here too: the frozen base and its compiled forward
pass, built and traced by the first shard and reused by the next ones.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path

from vggflow.errors import DataError
from vggflow.extraction import CompiledExtractor, compiled_extractor


def dask_setup(worker) -> None:
    """Dask's preload hook: called with the worker once it is created."""
    from vggflow.runtime import configure_environment, import_tensorflow_quietly

    configure_environment()
    import_tensorflow_quietly()
    import tensorflow as tf

    threads = max(1, int(getattr(worker.state, "nthreads", 1)))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


@functools.lru_cache(maxsize=1)
def worker_base(weights_json: str, image_size: int, precision: str):
    """The frozen base, built once per worker process (shards after the first reuse it)."""
    from vggflow.model import ResolvedWeights, build_base
    from vggflow.precision import dtype_policy

    weights = ResolvedWeights.model_validate_json(weights_json)
    if not weights.path.is_file():
        if not weights.identity.startswith("imagenet:"):
            raise DataError(
                f"the backbone weights {weights.path} are not on Dask worker {worker_name()}: put them where every "
                "worker reads them at the same path (a shared folder), or use backbone.weights=imagenet"
            )
        import keras

        from vggflow.model import IMAGENET_NOTOP_FILE, IMAGENET_NOTOP_MD5, IMAGENET_NOTOP_URL

        # This worker's own Keras cache (or a download), checked against the published hash.
        found = keras.utils.get_file(IMAGENET_NOTOP_FILE, IMAGENET_NOTOP_URL, file_hash=IMAGENET_NOTOP_MD5)
        weights = weights.model_copy(update={"path": Path(found)})
    with dtype_policy(precision):
        return build_base(weights, image_size)


@functools.lru_cache(maxsize=4)
def worker_extractor(weights_json: str, image_size: int, precision: str, layers: tuple[str, ...]) -> CompiledExtractor:
    """The base's compiled forward pass for ``layers``, traced once per worker, not once per shard."""
    return compiled_extractor(worker_base(weights_json, image_size, precision), list(layers), image_size)


def worker_name() -> str:
    """This Dask worker's name (the host's name outside a worker), for messages and shard records."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return socket.gethostname()

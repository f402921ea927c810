"""Dask worker set-up for vggflow's distributed steps (``dask worker --preload vggflow.dask_worker``).

Run once in each worker process before its first task: the offline settings the CLI would apply,
TensorFlow imported (a first shard would otherwise pay for the import), and TensorFlow's thread
pools sized to the worker's Dask threads, so that N single-threaded workers on N cores do not
fight over them. Local clusters that vggflow starts preload it too.
"""

from __future__ import annotations


def dask_setup(worker) -> None:
    """Dask's preload hook: called with the worker once it is created."""
    from vggflow.runtime import configure_environment, import_tensorflow_quietly

    configure_environment()
    import_tensorflow_quietly()
    import tensorflow as tf

    threads = max(1, int(getattr(worker.state, "nthreads", 1)))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)

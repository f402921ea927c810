"""Process-wide settings for a small, possibly offline machine.

Called once by the CLI (and by tests) *before* TensorFlow, Prefect or MLflow are imported; never
on import. Every value is a default: anything the user already set in the environment wins.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

OFFLINE_DEFAULTS = {
    # TensorFlow: quiet start-up; oneDNN is faster on these CPUs (BENCHMARKS.md, benchmark settings).
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TF_ENABLE_ONEDNN_OPTS": "1",
    # Prefect: no telemetry, and a temporary server that may take ~30 s to start on 2 cores.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_API_REQUEST_TIMEOUT": "120",
    # MLflow: no telemetry, no background job runner in servers we start.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # DVC: no analytics or update checks even in a repo whose config forgot them.
    "DVC_NO_ANALYTICS": "1",
    "GIT_PYTHON_REFRESH": "quiet",
}


def configure_environment(project_dir: str | Path | None = None) -> None:
    """Set offline-friendly defaults for TF, Prefect, MLflow and DVC in ``os.environ``.

    Args:
        project_dir: where Prefect's task-result cache lives (``<project_dir>/.vggflow/prefect``),
            so scheduled and manual runs share it. Defaults to the current directory.
    """
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
    project = Path(project_dir or Path.cwd()).resolve()
    # One result store for manual runs, the scheduler and workers started from this project.
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(project / ".vggflow" / "prefect" / "results"))


def installed_version() -> str:
    """vggflow's version as installed (the package metadata), e.g. ``0.1.0``."""
    import importlib.metadata

    try:
        return importlib.metadata.version("vggflow")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from vggflow import __version__

        return __version__


def configure_verbosity(level: int) -> None:
    """``vggflow -q`` (-1), the default (0) or ``-v`` (1), for this process and what it starts.

    Quiet: Prefect's and MLflow's console logs only from WARNING (the Prefect server still
    receives every log line, so its UI shows them), no progress bars. Verbose: Prefect's DEBUG
    logs, and a log line for every epoch. Set before Prefect is imported, through Prefect's own
    ``PREFECT_LOGGING_…`` variables; when it already is, its console handlers change directly.
    """
    import logging

    from vggflow import progress

    if level == 0:
        return
    progress.configure(bars=False if level < 0 else None, every_epoch=level > 0)
    if level < 0:
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
        os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    else:
        os.environ["PREFECT_LOGGING_LEVEL"] = "DEBUG"
    if "prefect" in sys.modules:
        for handler in logging.getLogger().handlers:
            if type(handler).__name__ == "PrefectConsoleHandler":
                handler.setLevel(logging.WARNING if level < 0 else logging.NOTSET)
        if level > 0:
            logging.getLogger("prefect").setLevel(logging.DEBUG)


#: TensorFlow's start-up lines on a CPU-only machine. They are logged before absl's logging is
#: initialised, so TF_CPP_MIN_LOG_LEVEL does not hide them, and they say nothing a user can act
#: on (one reads "CUDA error: Failed call to cuInit", which looks like a failure and is not).
_TF_STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|\] oneDNN custom operations are on"
    r"|\] Could not find cuda drivers on your machine"
    r"|\] failed call to cuInit"
)


def drop_tensorflow_startup_noise(text: str) -> str:
    """``text`` without TensorFlow's CPU-only start-up lines (see ``_TF_STARTUP_NOISE``)."""
    return "".join(line for line in text.splitlines(keepends=True) if not _TF_STARTUP_NOISE.search(line))


@contextlib.contextmanager
def stderr_without_tensorflow_noise() -> Iterator[None]:
    """While inside, file descriptor 2 goes to a temporary file; on leaving, every line written to
    it meanwhile except TensorFlow's start-up noise is written to stderr (nothing else is lost,
    only delayed). Use it from the main thread, around work no other thread is logging through.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                capture.seek(0)
                kept = drop_tensorflow_startup_noise(capture.read().decode(errors="replace"))
                if kept:
                    sys.stderr.write(kept)
                    sys.stderr.flush()
    finally:
        os.close(saved)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and Keras and discover devices, without their start-up noise on stderr.

    TensorFlow's C++ code writes to file descriptor 2 directly (see
    :func:`stderr_without_tensorflow_noise`). Does nothing when TensorFlow is already imported.
    """
    if "tensorflow" in sys.modules:
        return
    with stderr_without_tensorflow_noise():
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()  # device discovery logs here, not at some later op


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """Import the big libraries with Python's cyclic garbage collector paused, then freeze them.

    TensorFlow, Keras and MLflow leave hundreds of thousands of long-lived objects, and every full
    collection during their import walks all that is loaded so far. Imports create almost no
    cyclic garbage; :func:`gc.freeze` then moves everything created here out of the collector's
    view, so later full collections only walk what the command itself allocates (BENCHMARKS.md,
    the CLI start-up section). A caller's disabled collector stays disabled.
    """
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()

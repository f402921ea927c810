"""Each benchmark script runs end to end in its tiny ``--smoke`` mode (no timing is asserted).

The benchmarks themselves never run in the test suite: they take minutes to hours and are only
meaningful on a quiet machine (see BENCHMARKS.md). This only checks that every script still
works against the current code: it runs each ``main(["--smoke", ...])`` in this process (one
TensorFlow start-up for all), with data and caches in a temporary folder, and checks that a
results file is written. A tier of its own: ``make test-benchmarks`` (CI runs it after ``make test``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras")

pytestmark = [pytest.mark.slow, pytest.mark.benchmarks]

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = [
    "bench_extraction",
    "bench_example1",
    "bench_finetune",
    "bench_settings",
    "bench_memory",
    "bench_rerun",
    "bench_photos",
    "bench_cli",
    "bench_recipe",
    "bench_precision",
]
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory) -> Path:
    if not any(FASHION.glob("train-images-idx3-ubyte*")):
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    sys.path.insert(0, str(BENCHMARKS))
    yield tmp_path_factory.mktemp("bench-cache")
    sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_runs_in_smoke_mode(name: str, bench_cache: Path, tmp_path: Path) -> None:
    module = importlib.import_module(name)
    out = tmp_path / f"{name}.md"
    assert module.main(["--smoke", "--cache", str(bench_cache), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# ") and "Machine:" in text

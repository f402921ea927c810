"""Shared helpers of the benchmark scripts (``benchmarks/bench_*.py``).

- machine and load information (benchmarks on a shared 2-core box are only meaningful as ratios
  measured in one run, with the variants alternated: A, B, A, B, …, medians);
- an alternating runner, medians;
- child processes with their peak RSS (``wait4``'s ``ru_maxrss`` plus a psutil sampler of the
  whole process tree, anonymous vs file-backed pages);
- Fashion-MNIST PNG folders of any size (from Debian's ``dataset-fashion-mnist``), generated once
  into a cache folder outside git (``~/.cache/vggflow-bench`` or ``$VGGFLOW_BENCH_CACHE``), and
  their rows/splits exactly as vggflow's validation assigns them (content-hash split);
- VGG19's analytic conv FLOPs and an FMA (matmul) micro-benchmark for the machine's peak.

Importing this module sets vggflow's runtime defaults (oneDNN on, quiet TF) *before* TensorFlow
is imported, exactly as the CLI does; it does not import TensorFlow itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout, without installing the package
sys.path.insert(0, str(ROOT / "scripts"))

from vggflow.runtime import configure_environment  # noqa: E402

configure_environment(ROOT)

RESULTS_DIR = ROOT / "benchmarks" / "results"
PYTHON = sys.executable
FASHION_SOURCE = Path("/usr/share/datasets/fashion-mnist")


def cache_root() -> Path:
    """Where generated datasets and scratch caches live (outside git)."""
    return Path(os.environ.get("VGGFLOW_BENCH_CACHE") or Path.home() / ".cache" / "vggflow-bench")


# ---------------------------------------------------------------------------------------------
# Machine, load, statistics


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def wait_for_low_load(max_load: float, max_wait: float, poll: float = 20.0, log=print) -> float:
    """Wait (up to ``max_wait`` s) until the 1-minute load average is at most ``max_load``.

    Returns the load average when the wait ended (it may still be high after ``max_wait``).
    """
    started = time.monotonic()
    while True:
        load = load_average()[0]
        if load <= max_load or time.monotonic() - started >= max_wait:
            return load
        log(f"  load average {load:.2f} > {max_load}: waiting ({time.monotonic() - started:.0f} s so far)")
        time.sleep(poll)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(extra: dict[str, str] | None = None) -> str:
    """One line describing the machine and the software versions that matter."""
    import numpy as np

    parts = [
        f"{os.cpu_count()} cores ({cpu_model()}, {platform.machine()})",
        f"Linux {platform.release()}",
        f"Python {platform.python_version()}",
        f"NumPy {np.__version__}",
    ]
    from importlib.metadata import PackageNotFoundError, version

    try:
        parts.append(f"TensorFlow {version('tensorflow')}, Keras {version('keras')}")
    except PackageNotFoundError:
        pass
    parts.append(f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}")
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        parts.append(f"{mem:.0f} GiB RAM")
    except (ValueError, OSError):
        pass
    for key, value in (extra or {}).items():
        parts.append(f"{key} {value}")
    return "; ".join(parts)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


#: Before each measurement, wait until other processes use at most QUIET["cores"] cores (up to
#: QUIET["wait"] s). Set by :func:`start` from ``--quiet-cores``/``--quiet-wait``; off in smoke runs.
QUIET = {"cores": None, "wait": 0.0}


def system_busy_seconds() -> float:
    """CPU-seconds used by everything on the machine so far (all cores; idle and iowait excluded)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU-seconds of this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def others_cores(seconds: float = 2.0) -> float:
    """Cores used by other processes (not this one or its finished children) over ``seconds``."""
    b0, o0 = system_busy_seconds(), own_cpu_seconds()
    time.sleep(seconds)
    return max(0.0, (system_busy_seconds() - b0) - (own_cpu_seconds() - o0)) / seconds


def wait_until_quiet(log=print) -> float:
    """Wait while other processes use more than QUIET["cores"]; returns their last usage."""
    if QUIET["cores"] is None:
        return float("nan")
    started = time.monotonic()
    while True:
        used = others_cores()
        if used <= QUIET["cores"] or time.monotonic() - started >= QUIET["wait"]:
            return used
        log(f"  other processes use {used:.2f} cores: waiting ({time.monotonic() - started:.0f} s)")


def alternate(variants: dict[str, Callable[[], dict]], rounds: int, log=print) -> dict[str, list[dict]]:
    """Run ``variants`` in turn (A, B, C, A, B, C, …) for ``rounds`` rounds; each returns a dict.

    The order within a round rotates every round (A B C, B C A, …) so no variant always runs right
    after the same one (warm caches, thermal or neighbour effects). Before each measurement it
    waits for other processes to be quiet (see :data:`QUIET`); each result records ``others_cores``,
    the cores other processes used *during* the measurement (0 = undisturbed; this machine is shared).
    """
    names = list(variants)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            result = measure_once(variants[name], log)
            results[name].append(result)
            log(
                f"  round {index + 1}/{rounds} {name}: "
                + ", ".join(f"{k}={_short(v)}" for k, v in result.items() if not isinstance(v, (list, dict)))
            )
    return results


def measure_once(run: Callable[[], dict], log=print) -> dict:
    """Wait for quiet, run, and add ``wall_s``, ``cpu_per_wall``, ``others_cores`` and ``load1``."""
    wait_until_quiet(log)
    busy0, own0 = system_busy_seconds(), own_cpu_seconds()
    started = time.perf_counter()
    result = run()
    wall = time.perf_counter() - started
    own = own_cpu_seconds() - own0
    result.setdefault("wall_s", wall)
    # CPU seconds of this process (and its finished children) per wall second: ~2.0 = both cores were ours.
    result.setdefault("cpu_per_wall", own / max(wall, 1e-9))
    result["others_cores"] = max(0.0, system_busy_seconds() - busy0 - own) / max(wall, 1e-9)
    result["load1"] = load_average()[0]
    return result


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def med(results: list[dict], key: str) -> float:
    return median([r[key] for r in results if key in r])


def best(results: list[dict], key: str, lowest: bool = True) -> float:
    """The least disturbed round: the lowest time (or, ``lowest=False``, the highest rate)."""
    values = [r[key] for r in results if key in r]
    return (min(values) if lowest else max(values)) if values else float("nan")


def save_raw(out: Path, results) -> None:
    """The raw per-round results beside the Markdown report (``<name>.json``)."""
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))


# ---------------------------------------------------------------------------------------------
# Child processes and their memory


def _tree(pid: int):
    import psutil

    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return []


def _rss_parts(proc) -> tuple[int, int, int]:
    """(rss, anonymous, file-backed) bytes of one process, from /proc/<pid>/status."""
    rss = anon = file = 0
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, anon, file


class RssSampler(threading.Thread):
    """Samples a process (and its descendants) every ``interval`` s; keeps the peaks.

    ``wrapped``: ``pid`` is a wrapper (``/usr/bin/time``) and the measured command is its child.
    """

    def __init__(self, pid: int, interval: float = 0.2, wrapped: bool = False) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.wrapped = pid, interval, wrapped
        self.peak_main = self.peak_main_anon = self.peak_main_file = self.peak_tree = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            procs = _tree(self.pid)[1 if self.wrapped else 0 :]
            if procs:
                rss, anon, file = _rss_parts(procs[0])
                self.peak_main = max(self.peak_main, rss)
                self.peak_main_anon = max(self.peak_main_anon, anon)
                self.peak_main_file = max(self.peak_main_file, file)
                self.peak_tree = max(self.peak_tree, sum(_rss_parts(p)[0] for p in procs))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


GNU_TIME = Path("/usr/bin/time")


def run_process(
    argv: Sequence[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    log_file: Path | None = None,
    timeout: float | None = None,
) -> dict:
    """Run a command; wall time, exit code, peak RSS and sampled peaks.

    ``maxrss_mb`` is GNU time's ``%M`` (the command's peak resident set, from ``wait4``; the
    command is started by ``/usr/bin/time``, so the measure is not inflated by this Python
    process's pages before ``exec``). The sampler adds the peak of the whole tree's sum (e.g. a
    Prefect server subprocess, validation workers) and the main process's anonymous vs
    file-backed split.
    """
    import tempfile

    wrapped = GNU_TIME.exists()
    stats = Path(tempfile.mkstemp(prefix="rss-")[1])
    command = [str(GNU_TIME), "-f", "%M %U %S", "-o", str(stats), *argv] if wrapped else list(argv)
    out = open(log_file, "wb") if log_file else subprocess.DEVNULL
    started = time.perf_counter()
    try:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        sampler = RssSampler(proc.pid, wrapped=wrapped)
        sampler.start()
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            sampler.stop()
    finally:
        if log_file:
            out.close()
    wall = time.perf_counter() - started
    maxrss_kib, cpu = float("nan"), float("nan")
    if wrapped:
        try:
            fields = stats.read_text().split()[-3:]
            maxrss_kib, cpu = float(fields[0]), float(fields[1]) + float(fields[2])
        except (OSError, ValueError, IndexError):
            pass
    stats.unlink(missing_ok=True)
    return {
        "wall_s": wall,
        "returncode": proc.returncode,
        "cpu_s": cpu,
        "maxrss_mb": maxrss_kib / 1024 if maxrss_kib == maxrss_kib else sampler.peak_main / 2**20,
        "peak_main_mb": sampler.peak_main / 2**20,
        "peak_main_anon_mb": sampler.peak_main_anon / 2**20,
        "peak_main_file_mb": sampler.peak_main_file / 2**20,
        "peak_tree_mb": sampler.peak_tree / 2**20,
    }


def run_child(script: Path, args: Sequence[str], env: dict[str, str] | None = None) -> dict:
    """Run ``python script --child …``: its last stdout line is a JSON dict of results."""
    env = {**os.environ, **(env or {})}
    proc = subprocess.run([PYTHON, str(script), *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {script.name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def emit(result: dict) -> None:
    """A child's result: one JSON line on stdout."""
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Data


def fashion_mnist_folder(n_images: int, root: Path | None = None, seed: int = 1) -> Path:
    """``n_images`` real Fashion-MNIST training images (28x28 PNG, class-balanced) in ``DIR/<class>/``.

    Written once (deterministic selection and encoding) and reused; the same ``n_images`` always
    gives the same files, and a larger set contains every image of a smaller one.
    """
    import numpy as np
    from build_demo_data import CLASS_NAMES, read_idx
    from PIL import Image

    folder = (root or cache_root()) / f"fashion-{n_images}"
    done = folder / ".complete"
    if done.exists() and done.read_text().strip() == str(n_images):
        return folder
    images = read_idx(FASHION_SOURCE, "train-images-idx3-ubyte")
    labels = read_idx(FASHION_SOURCE, "train-labels-idx1-ubyte")
    order = np.random.default_rng(seed).permutation(len(labels))
    per_class = -(-n_images // len(CLASS_NAMES))
    written = 0
    for cls, name in enumerate(CLASS_NAMES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        take = min(per_class, n_images - written)
        for index in order[labels[order] == cls][:take]:
            Image.fromarray(images[index]).save(
                folder / name / f"{name}_{int(index):05d}.png", optimize=False, compress_level=6
            )
        written += take
    done.write_text(str(n_images))
    return folder


def dataset_rows(folder: Path):
    """The rows vggflow would use (``vggflow.files.ROWS_COLUMNS``): split by content hash and
    measured (height, width) as validation does."""
    import pandas as pd

    from vggflow.config import DataConfig
    from vggflow.validation import split_of

    cfg = DataConfig()
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*.png"))
    splits = [split_of(hashlib.sha256((folder / p).read_bytes()).hexdigest(), cfg) for p in paths]
    rows = pd.DataFrame({"path": paths, "label": [p.split("/")[0] for p in paths], "split": splits})
    return with_measured_sizes(rows, folder)


def with_measured_sizes(rows, folder: Path):
    """``rows`` plus each image's ``height`` and ``width``, as validation hands them to training."""
    from PIL import Image

    sizes = []
    for path in rows["path"]:
        with Image.open(folder / path) as image:
            sizes.append(image.size)
    return rows.assign(height=[h for _, h in sizes], width=[w for w, _ in sizes])


def fingerprint(rows) -> str:
    return hashlib.sha256("\n".join(rows["path"] + "\t" + rows["label"]).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Compute: analytic FLOPs and the machine's FMA peak

#: VGG19's conv layers per block: (number of 3x3 convs, output channels).
VGG19_CONVS = ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512))


def vgg19_conv_macs(image_size: int) -> int:
    """Multiply-accumulates of VGG19's conv base for one square image (3x3 'same' convs)."""
    side, channels, macs = image_size, 3, 0
    for convs, out in VGG19_CONVS:
        for _ in range(convs):
            macs += side * side * 9 * channels * out
            channels = out
        side //= 2  # 2x2 max pooling, stride 2
    return macs


def vgg19_gflop_per_image(image_size: int) -> float:
    """2 x MACs, in GFLOP (bias, ReLU and pooling are < 0.5 % and not counted)."""
    return 2 * vgg19_conv_macs(image_size) / 1e9


def fma_peak(sizes: Sequence[int] = (1024, 2048, 3072), seconds: float = 2.0, log=print) -> dict:
    """Best float32 matmul GFLOP/s (TensorFlow, compiled loop) and NumPy's, per size.

    A large matmul is FMA-bound: its rate is the practical compute peak that conv layers can
    approach. Returns ``{"tf": {n: gflops}, "numpy": {n: gflops}, "peak": best}``.
    """
    import numpy as np
    import tensorflow as tf

    found: dict[str, dict[int, float]] = {"tf": {}, "numpy": {}}
    for n in sizes:
        a = tf.random.uniform((n, n), dtype=tf.float32)
        b = tf.random.uniform((n, n), dtype=tf.float32)
        step = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)[:1, :1]))
        step(a, b).numpy()
        best = 0.0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            step(a, b).numpy()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
        found["tf"][n] = best
        x, y = np.asarray(a), np.asarray(b)
        best = 0.0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            x @ y
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
        found["numpy"][n] = best
        log(f"  FMA micro-benchmark n={n}: TF {found['tf'][n]:.1f}, NumPy {found['numpy'][n]:.1f} GFLOP/s")
    peak = max(max(found["tf"].values()), max(found["numpy"].values()))
    return {"tf": found["tf"], "numpy": found["numpy"], "peak": peak}


# ---------------------------------------------------------------------------------------------
# Output


def write_results(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` is one char per column (l/r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def publish(out: Path, text: str, info: dict, results: dict[str, list[dict]], raw=None) -> None:
    """End a report with the machine and load line; write it (``<name>.md``) and the raw results (``<name>.json``).

    Args:
        results: label → per-round measurements (their neighbours' CPU goes into the load line).
        raw: what to save as JSON, when it is not ``results`` itself.
    """
    write_results(out, text + f"\nMachine: {machine_info()}. {load_line(info, results)}\n")
    save_raw(out, results if raw is None else raw)


def header(title: str, command: str, what: str) -> str:
    return f"# {title}\n\nProduced by `{command}`.\n\n{what}\n"


def base_args(parser, default_rounds: int) -> None:
    parser.add_argument("--rounds", type=int, default=default_rounds, help="alternating rounds (medians over them)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny, fast run that only checks the script works (no results file)"
    )
    parser.add_argument(
        "--out", type=Path, help="results file (default: benchmarks/results/<name>.md; with --smoke, a temp file)"
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=1.5,
        help="wait for the 1-minute load average to drop to this before measuring",
    )
    parser.add_argument(
        "--max-wait", type=float, default=1800, help="give up waiting for a low load after this many seconds"
    )
    parser.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        help="before each measurement, wait until other processes use at most this many cores",
    )
    parser.add_argument("--quiet-wait", type=float, default=300, help="…for at most this many seconds per measurement")
    parser.add_argument(
        "--cache", type=Path, help="dataset/scratch cache (default: ~/.cache/vggflow-bench or $VGGFLOW_BENCH_CACHE)"
    )


def resolve_out(args, name: str) -> Path:
    if args.out:
        return args.out
    if args.smoke:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="vggflow-bench-smoke-")) / f"{name}.md"
    return RESULTS_DIR / f"{name}.md"


def start(args, log=print) -> dict:
    """Before measuring: cache folder, optional wait for a low load; returns load info."""
    if args.cache:
        os.environ["VGGFLOW_BENCH_CACHE"] = str(args.cache)
    cache_root().mkdir(parents=True, exist_ok=True)
    before = load_average()[0]
    if args.smoke:
        return {"load_before": before, "load_start": before}
    QUIET.update(cores=args.quiet_cores, wait=args.quiet_wait)
    load = wait_for_low_load(args.max_load, args.max_wait, log=log)
    return {"load_before": before, "load_start": load}


def load_line(info: dict, results: dict[str, list[dict]] | None = None) -> str:
    end = load_average()
    text = (
        f"1-minute load average {info['load_start']:.2f} when measuring started (this run's own work then raises it), "
        f"{end[0]:.2f} at the end (5-minute {end[1]:.2f})."
    )
    if results:
        used = [r["others_cores"] for runs in results.values() for r in runs if "others_cores" in r]
        if used:
            text += (
                f" Other processes on this shared machine used {median(used):.2f} cores (median; max {max(used):.2f}) "
                f"of the 2 during the measurements; each measurement waited for them to drop below "
                f"{QUIET['cores']} cores first (at most {QUIET['wait']:.0f} s)."
            )
    return text + " Only ratios measured in one run, alternated, mean anything here."


# ---------------------------------------------------------------------------------------------
# The real CLI: `vggflow train` in a throw-away project folder

VGGFLOW = Path(PYTHON).parent / "vggflow"

#: A demo-like configuration at 64² with a random backbone (ImageNet weights are not downloadable
#: here; same compute). Every stage runs (no early end of the sequence), one epoch each.
BENCH_TRAIN_CONFIG = """\
# benchmarks: demo-like run at 64x64, random backbone (same compute as ImageNet weights)
seed: 42
backbone:
  weights: none
  allow_random_init: true
  image_size: 64
head:
  epochs: 10
  patience: 10
finetune:
  stop_when_no_improvement: false
  patience: 2
  stages:
    - {unfreeze_from: block5, learning_rate: 1.0e-4, epochs: 1}
    - {unfreeze_from: block4, learning_rate: 1.0e-5, epochs: 1}
    - {unfreeze_from: all, learning_rate: 1.0e-5, epochs: 1}
registry:
  thresholds: {accuracy: 0.0}
"""


def new_project(parent: Path, name: str) -> Path:
    """A fresh project folder (cwd of the CLI) with the benchmark config in it."""
    import shutil

    folder = parent / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "bench.yaml").write_text(BENCH_TRAIN_CONFIG)
    return folder


def project_env(project: Path) -> dict[str, str]:
    """Everything the CLI writes stays in ``project``: Prefect home/results, MLflow store, caches."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(
        {
            "PREFECT_HOME": str(project / "prefect-home"),
            "PREFECT_LOCAL_STORAGE_PATH": str(project / ".vggflow" / "prefect" / "results"),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow' / 'mlflow.db'}",
        }
    )
    return env


def vggflow_train(
    project: Path, data_dir: Path, overrides: Sequence[str] = (), log_name: str = "train.log", command: str = "train"
) -> dict:
    """Run ``vggflow train --config bench.yaml --data DIR [--set …]`` in ``project``; time and memory.

    ``command="config"`` runs ``vggflow config`` with the same arguments instead (a second, for smoke tests).
    """
    argv = [str(VGGFLOW), command, "--config", "bench.yaml"]
    if command == "train":
        argv += ["--data", str(data_dir), "--no-promote"]
    for item in overrides:
        argv += ["--set", item]
    result = run_process(argv, env=project_env(project), cwd=project, log_file=project / log_name)
    if result["returncode"] != 0:
        tail = (project / log_name).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"vggflow {command} failed ({result['returncode']}):\n{tail}")
    return result


def task_runs(project: Path) -> list[dict]:
    """Task runs of the latest flow run recorded by the project's Prefect server, in start order.

    Each: ``name`` (Prefect's random suffix dropped), ``state`` (Completed, Cached, …), ``seconds``.
    """
    import sqlite3
    from datetime import datetime

    db = project / "prefect-home" / "prefect.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        last = conn.execute("SELECT id FROM flow_run ORDER BY expected_start_time DESC LIMIT 1").fetchone()
        if last is None:
            return []
        rows = conn.execute(
            "SELECT name, state_name, total_run_time FROM task_run WHERE flow_run_id = ? ORDER BY expected_start_time",
            (last["id"],),
        ).fetchall()
    out = []
    for row in rows:
        name = row["name"]
        if len(name) > 4 and name[-4] == "-" and all(c in "0123456789abcdef" for c in name[-3:]):
            name = name[:-4]
        value = row["total_run_time"]
        if isinstance(value, str):  # an interval stored as a timestamp after the epoch
            value = (datetime.fromisoformat(value) - datetime(1970, 1, 1)).total_seconds()
        out.append({"name": name, "state": row["state_name"], "seconds": float(value or 0.0)})
    return out

"""Validation throughput against a plain single-process Pillow loop over the same files.

Run (from the repository root; writes benchmarks/results/validation.md)::

    .venv/bin/python benchmarks/bench_validation.py              # 10,000 files, 3 rounds
    .venv/bin/python benchmarks/bench_validation.py --files 20000 --rounds 5 --cache /tmp/bench

The image folder is generated once (deterministically) under ``--cache`` (default
``~/.cache/vggflow/bench_validation``, outside git) and reused by later runs. Each round times, in
turn: the baseline ``Image.open(p).load()`` loop, ``validate_dataset`` with one process, and
``validate_dataset`` with one worker per core, each twice: with the files in the page cache (warm:
decode throughput) and right after evicting them with ``posix_fadvise(DONTNEED)`` (cold: files
come from disk, as on a first run). The tables report the median and the best round of each run.
On a shared machine each timed run first waits (``--wait-idle``) for the CPUs to be idle, and the
best round is the one least disturbed by other jobs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout, without installing the package
# vggflow.validation is imported inside main(): spawned workers re-import this script as __mp_main__,
# and should not pay for what it imports (pandas, the config models).

N_CLASSES = 10
RESULTS = ROOT / "benchmarks" / "results" / "validation.md"


def generate(folder: Path, n_files: int) -> list[Path]:
    """Write ``n_files`` images (PNG and JPEG, 64..256 px, RGB and L) in 10 class folders, once."""
    done = folder / ".complete"
    if done.exists() and int(done.read_text()) == n_files:
        return sorted(p for p in folder.glob("*/*") if p.is_file())
    rng = np.random.default_rng(0)
    for index in range(n_files):
        label = folder / f"class_{index % N_CLASSES}"
        label.mkdir(parents=True, exist_ok=True)
        width, height = (int(v) for v in rng.integers(64, 257, 2))
        # Smooth shapes plus fine noise: compresses like a photo, unlike flat colour or pure noise.
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB").resize(
            (width, height), Image.Resampling.BICUBIC
        )
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        if index % 7 == 0:
            image = image.convert("L")
        if index % 2:
            image.save(label / f"img_{index:06d}.jpg", quality=90)
        else:
            image.save(label / f"img_{index:06d}.png")
    done.write_text(str(n_files))
    return sorted(p for p in folder.glob("*/*") if p.is_file())


def plain_pillow_loop(paths: list[Path]) -> None:
    """The baseline: decode every file once, one process, no checks."""
    for path in paths:
        with Image.open(path) as image:
            image.load()


def evict_from_page_cache(paths: list[Path]) -> None:
    """Drop the files' cached pages (no privileges needed), so the next read hits the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cpu_idle_share(seconds: float) -> float:
    """Share of CPU time idle over the next ``seconds`` (Linux /proc/stat), all cores together."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat_file:
            ticks = [int(value) for value in stat_file.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, total

    idle_before, total_before = sample()
    time.sleep(seconds)
    idle_after, total_after = sample()
    return (idle_after - idle_before) / max(1, total_after - total_before)


def wait_until_idle(max_wait: float, threshold: float = 0.9) -> None:
    """On a shared machine, start a timed run only when the other jobs are quiet (bounded wait)."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline and cpu_idle_share(1.0) < threshold:
        pass


def timed(action, paths: list[Path], cold: bool, max_wait: float) -> float:
    if max_wait > 0 and os.path.exists("/proc/stat"):
        wait_until_idle(max_wait)
    if cold:
        evict_from_page_cache(paths)
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def check(result, n_files: int) -> None:
    """Every generated file must be usable, or the benchmark measured the wrong thing."""
    assert result.report["summary"]["n_valid"] == n_files, result.report["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vggflow" / "bench_validation")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="before each timed run, wait up to this long for the CPUs to be >= 90%% idle (0: never)",
    )
    args = parser.parse_args()
    from vggflow.config import DataConfig, ValidationConfig
    from vggflow.validation import validate_dataset

    folder = args.cache / f"n{args.files}"
    started = time.perf_counter()
    paths = generate(folder, args.files)
    print(f"{len(paths):,} files in {folder} (ready in {time.perf_counter() - started:.1f} s)")
    total_bytes = sum(p.stat().st_size for p in paths)
    cores = os.cpu_count() or 1
    data_cfg = DataConfig()
    baseline_name = "plain Pillow `open().load()` loop, 1 process"
    runs = {
        baseline_name: lambda: plain_pillow_loop(paths),
        "`validate_dataset`, 1 process": lambda: check(
            validate_dataset(folder, data_cfg, ValidationConfig(workers=1)), len(paths)
        ),
        f"`validate_dataset`, {cores} worker processes": lambda: check(
            validate_dataset(folder, data_cfg, ValidationConfig(workers=cores)), len(paths)
        ),
    }
    plain_pillow_loop(paths)  # warm the page cache; untimed
    load_before = os.getloadavg()
    times = {(cache, name): [] for cache in ("warm", "cold") for name in runs}
    for round_index in range(args.rounds):
        for cache in ("warm", "cold"):
            for name, action in runs.items():
                times[cache, name].append(timed(action, paths, cold=cache == "cold", max_wait=args.wait_idle))
            print(f"round {round_index + 1}, {cache}: " + ", ".join(f"{times[cache, n][-1]:.2f} s" for n in runs))
    load_after = os.getloadavg()

    import imagehash
    import PIL

    lines = [
        "# Validation throughput",
        "",
        "`validate_dataset` (sha256, decode with the shared decoder, RGB conversion, pHash, then the dataset",
        f"rules) against a plain single-process `Image.open(p).load()` loop over the same {len(paths):,} files.",
        f"{args.rounds} alternating rounds. Produced by `benchmarks/bench_validation.py --rounds {args.rounds}`.",
    ]
    for cache, title in (
        ("warm", "Warm page cache (decode-bound)"),
        ("cold", "Cold page cache (files evicted before each run)"),
    ):
        baseline = len(paths) / statistics.median(times[cache, baseline_name])
        best_baseline = len(paths) / min(times[cache, baseline_name])
        lines += [
            "",
            f"## {title}",
            "",
            "| run | median s | files/s (median) | vs plain loop | best s | files/s (best) | vs plain loop |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in runs:
            median, best = statistics.median(times[cache, name]), min(times[cache, name])
            rate, best_rate = len(paths) / median, len(paths) / best
            lines.append(
                f"| {name} | {median:.2f} | {rate:,.0f} | {rate / baseline:.2f}x "
                f"| {best:.2f} | {best_rate:,.0f} | {best_rate / best_baseline:.2f}x |"
            )
    work_ratio = min(times["warm", "`validate_dataset`, 1 process"]) / min(times["warm", baseline_name])
    lines += [
        "",
        "## Reading the numbers",
        "",
        f"Per file, validation does {work_ratio:.1f}x the work of the bare loop (warm, one process): it also reads the",
        "bytes for the sha256, applies EXIF orientation, converts to RGB exactly as training does, makes a 32x32",
        "thumbnail and its pHash, then runs the dataset rules (duplicates, splits, near-duplicates) in the parent.",
        f"The worker processes (spawned, ~0.5-1 s to start) divide the per-file work by up to {cores}; with {cores} "
        f"cores",
        "that does not make up for the extra work, so validation is slower than a bare decode loop that checks",
        "nothing. It scales with cores (`validation.workers`, default one per core); when reading dominates",
        "(network storage), more workers than cores also help.",
    ]
    lines += [
        "",
        f"Files: {len(paths):,} in {N_CLASSES} classes, half PNG / half JPEG (every 7th greyscale), 64-256 px a side, "
        f"{total_bytes / 1e6:.0f} MB in total.",
        "",
        f"Machine: {cores} cores ({platform.machine()}), Linux {platform.release()}; Python "
        f"{platform.python_version()}, "
        f"Pillow {PIL.__version__}, NumPy {np.__version__}, ImageHash {imagehash.__version__}. "
        f"Load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (a shared machine).",
        "",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()

"""Large photos (12-megapixel JPEGs): decoding, the memory caps and the report's grid, each against its old path.

Run (from the repository root; writes benchmarks/results/photos.md)::

    .venv/bin/python benchmarks/bench_photos.py              # 16 photos of 4000x3000, 3 alternating rounds (~6 min)
    .venv/bin/python benchmarks/bench_photos.py --photos 8 --rounds 5
    .venv/bin/python benchmarks/bench_photos.py --smoke      # tiny photos, one child process: checks the script works

Benchmark 2's files are small PNGs. Users' folders are often camera photos, where decoding and
resizing cost as much as VGG19's forward pass at 224² and a batch of images is gigabytes. The
photos are generated once into the benchmark cache: upsampled random noise saved as JPEG quality
90 (it compresses like a photo, ~2.4 MB each, not like white noise), in two class folders.

Four pairs, alternated within each round, each measurement in its own child process (its memory
is its own; a fresh TensorFlow each time):

- **decode**: ``vggflow.images.load_rgb`` vs the copying path it replaced (``ImageOps.exif_transpose``
  returned a copy of every image without an orientation tag, ``convert("RGB")`` copied RGB
  images). CPU ms per photo; the pixels must be identical.
- **extract**: ``vggflow.extraction.extract_features`` at 224² with vggflow's pixel cap
  (``vggflow.images.BATCH_MAX_PIXELS``: decode groups over 4 MP are resized image by image) vs
  without it (the cap raised, so a group of 8 photos is resized in one op, on a float32 copy of
  the group). Wall time and the process's growth in peak RSS; the features must be identical.
- **score**: evaluation's scoring (``vggflow.datasets.predict_in_batches`` through the whole
  classifier, which resizes inside, in float32) with the cap (batches of at most 4 MP: one photo
  here) vs without it (batches of ``evaluate.batch_size`` = 32 photos, all of them here). Wall
  time and growth in peak RSS; the probabilities must be identical.
- **grid**: the report's grid of the 16 worst mistakes (``vggflow.reports.evaluation_figures.plot_misclassified_grid``)
  with each photo shrunk to 720 px on its longest side vs drawn at full size (the shrinking
  turned off). Seconds in the plotting call.

Peak RSS growth is the child's ``VmHWM`` after the measurement minus its ``VmRSS`` just before
(the peak is reset first, through ``/proc/self/clear_refs``), so TensorFlow's own start-up memory
is not counted. The uncapped ``score`` variant needs ~8 GB for 16 photos: keep ``--photos`` ≤ 16
on a 24 GB machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common
from common import alternate, base_args, header, med, publish, resolve_out, start, table

NAME = "photos"
SCRIPT = Path(__file__).resolve()
KINDS = ("decode", "extract", "score", "grid")
#: The two variants of each kind: (vggflow's current path, the path it replaced).
VARIANTS = {
    "decode": ("load_rgb", "copying decode"),
    "extract": ("capped", "uncapped"),
    "score": ("capped", "uncapped"),
    "grid": ("shrunk", "full size"),
}


# ---------------------------------------------------------------------------------------------
# Data


def photo_folder(n_photos: int, width: int, height: int, seed: int = 0) -> Path:
    """``n_photos`` generated JPEG photos (``width`` x ``height``, quality 90) in ``DIR/{a,b}/``, made once."""
    import numpy as np
    from PIL import Image

    folder = common.cache_root() / f"photos-{width}x{height}-seed{seed}"
    rng = np.random.default_rng(seed)
    for i in range(n_photos):
        path = folder / "ab"[i % 2] / f"{i:04d}.jpg"
        # Drawn for every index (written or not), so photo i is the same whatever n_photos is.
        small = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).save(
                tmp, format="JPEG", quality=90
            )
            os.replace(tmp, path)
    return folder


def photo_paths(folder: Path, n_photos: int) -> list[Path]:
    return sorted(folder.glob("*/*.jpg"), key=lambda p: p.name)[:n_photos]


# ---------------------------------------------------------------------------------------------
# The child: one or more measurements in this process


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def copying_load(path: Path):
    """The decode before vggflow's two copies were removed (same pixels, two more full-image copies)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        decoded = ImageOps.exif_transpose(image)  # a copy when there is no orientation tag
    return np.asarray(decoded.convert("RGB"), dtype=np.uint8)  # convert("RGB") copies an RGB image


def measure_decode(variant: str, paths: list[Path], scratch: Path) -> dict:
    from vggflow.images import load_rgb

    load = load_rgb if variant == "load_rgb" else copying_load
    digest = hashlib.sha256()
    load(paths[0])  # warm the file cache and Pillow's plugins
    cpu = wall = 0.0
    for path in paths:
        c0, w0 = time.process_time(), time.perf_counter()
        pixels = load(path)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        digest.update(pixels.tobytes())
        del pixels
    return {
        "ms_cpu_per_photo": 1000 * cpu / len(paths),
        "ms_wall_per_photo": 1000 * wall / len(paths),
        "digest": digest.hexdigest()[:16],
    }


_DEFAULT_CAP: list[int] = []


def _set_cap(capped: bool) -> None:
    import vggflow.images

    if not _DEFAULT_CAP:
        _DEFAULT_CAP.append(vggflow.images.BATCH_MAX_PIXELS)
    # `batch_has_room` reads it when `image_dataset` builds a pipeline (each extract_features call)
    # and, in predict_in_batches, for every image: raised, it restores the batching before the cap.
    vggflow.images.BATCH_MAX_PIXELS = _DEFAULT_CAP[0] if capped else 10**15


def _base(image_size: int, scratch: Path):
    from vggflow.config import BackboneConfig
    from vggflow.model import build_base, resolve_weights

    weights = resolve_weights(BackboneConfig(weights="none", image_size=image_size), scratch / "weights", seed=42)
    return build_base(weights, image_size)


def measure_extract(variant: str, paths: list[Path], scratch: Path, image_size: int, folder: Path) -> dict:
    import numpy as np
    import pandas as pd

    from vggflow.extraction import extract_features

    _set_cap(variant == "capped")
    base = _base(image_size, scratch)
    # As validation hands them over: with each photo's measured size (all alike here).
    rows = common.with_measured_sizes(
        pd.DataFrame(
            {"path": [p.relative_to(folder).as_posix() for p in paths], "label": [p.parent.name for p in paths]}
        ),
        folder,
    )
    target = Path(tempfile.mkdtemp(dir=scratch))
    rss0 = _memory_kib("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    extract_features(rows, folder, base, ["avg_pool"], image_size, 32, target)
    seconds = time.perf_counter() - t0
    grew = (_memory_kib("VmHWM") - rss0) / 1024
    features = np.load(target / "avg_pool.npy")
    np.save(scratch / f"extract-{variant}.npy", features)
    shutil.rmtree(target)
    return {"seconds": seconds, "photos_per_s": len(paths) / seconds, "grew_mb": grew, "peak_reset": reset}


def measure_score(variant: str, paths: list[Path], scratch: Path, image_size: int) -> dict:
    import keras
    import numpy as np

    from vggflow.config import EvaluateConfig, HeadConfig
    from vggflow.datasets import predict_in_batches
    from vggflow.model import build_classifier

    _set_cap(variant == "capped")
    keras.utils.set_random_seed(42)  # the same head in every process, so the probabilities can be compared
    model = build_classifier(_base(image_size, scratch), 2, HeadConfig(), image_size)
    model.predict_on_batch(
        np.zeros((1, image_size, image_size, 3), np.float32)
    )  # build, as evaluate's first batch would
    rss0 = _memory_kib("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    # Exactly evaluate's call (tasks/evaluate.py): uint8 batches, cast to float32 for the model.
    probabilities = predict_in_batches(
        lambda batch: model.predict_on_batch(batch.astype(np.float32)), paths, EvaluateConfig().batch_size
    )
    seconds = time.perf_counter() - t0
    grew = (_memory_kib("VmHWM") - rss0) / 1024
    np.save(scratch / f"score-{variant}.npy", probabilities)
    return {"seconds": seconds, "photos_per_s": len(paths) / seconds, "grew_mb": grew, "peak_reset": reset}


def measure_grid(variant: str, paths: list[Path], scratch: Path) -> dict:
    from vggflow.images import load_rgb
    from vggflow.reports import evaluation_figures

    shown = paths[:16]
    images = [load_rgb(p) for p in shown]
    shrink = evaluation_figures.shrink_for_figure
    if variant == "shrunk":
        images = [shrink(i) for i in images]  # as evaluate does when it loads them
    else:
        evaluation_figures.shrink_for_figure = lambda pixels, max_side=0: pixels  # the grid function's own shrink, off
    out = scratch / f"grid-{variant.replace(' ', '-')}.png"
    try:
        t0 = time.perf_counter()
        evaluation_figures.plot_misclassified_grid(
            images, ["a"] * len(shown), ["b"] * len(shown), [0.9] * len(shown), out
        )
        seconds = time.perf_counter() - t0
    finally:
        evaluation_figures.shrink_for_figure = shrink  # later measurements in this process (--smoke) get the real one
    return {"seconds": seconds, "png_kb": out.stat().st_size / 1024}


def child(args) -> int:
    """Run the measurements named in ``--child`` (``kind:variant``, comma-separated) in this process."""
    paths = photo_paths(args.folder, args.photos)
    results = {}
    for item in args.child.split(","):
        kind, variant = item.split(":", 1)
        if kind == "decode":
            results[item] = measure_decode(variant, paths, args.scratch)
        elif kind == "extract":
            results[item] = measure_extract(variant, paths, args.scratch, args.image_size, args.folder)
        elif kind == "score":
            results[item] = measure_score(variant, paths, args.scratch, args.image_size)
        else:
            results[item] = measure_grid(variant, paths, args.scratch)
    common.emit(results)
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: alternate the variants, compare, report


def max_abs_difference(scratch: Path, kind: str) -> float:
    import numpy as np

    current, previous = (np.load(scratch / f"{kind}-{v}.npy") for v in VARIANTS[kind])
    return float(np.max(np.abs(current - previous))) if current.size else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    base_args(parser, default_rounds=3)
    parser.add_argument(
        "--photos", type=int, default=16, help="photos (≤ 16 on 24 GB: the uncapped scoring needs ~0.5 GB each)"
    )
    parser.add_argument("--size", type=int, nargs=2, default=[4000, 3000], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--image-size", type=int, default=224, help="the backbone's input side (vggflow's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.smoke:
        args.photos, args.size, args.image_size, args.rounds = 4, [640, 480], 32, 1
    info = start(args)
    out = resolve_out(args, NAME)
    width, height = args.size
    folder = photo_folder(args.photos, width, height)
    scratch = Path(tempfile.mkdtemp(prefix="photos-", dir=common.cache_root()))
    child_args = [
        "--child",
        "",
        "--folder",
        str(folder),
        "--scratch",
        str(scratch),
        "--photos",
        str(args.photos),
        "--image-size",
        str(args.image_size),
    ]

    def run(items: list[str]):
        def go() -> dict:
            child_args[1] = ",".join(items)
            return common.run_child(SCRIPT, child_args)

        return go

    try:
        if args.smoke:
            # Every measurement once, in one process (one TensorFlow start-up): only checks they run.
            items = [f"{k}:{v}" for k in KINDS for v in VARIANTS[k]]
            one = run(items)()
            results = {item: [one[item]] for item in items}
        else:
            results = {}
            for kind in KINDS:
                print(f"{kind}:")
                measured = alternate({f"{kind}:{v}": run([f"{kind}:{v}"]) for v in VARIANTS[kind]}, args.rounds)
                results.update({k: [r[k] | {"wall_s": r["wall_s"]} for r in runs] for k, runs in measured.items()})
                # alternate() adds the load figures to the child's outer dict: keep them per measurement.
                for k, runs in measured.items():
                    for r, row in zip(runs, results[k]):
                        row.update({key: r[key] for key in ("others_cores", "load1")})
        differences = {kind: max_abs_difference(scratch, kind) for kind in ("extract", "score")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def cell(kind: str, variant: str, key: str, digits: int = 1) -> str:
        return f"{med(results[f'{kind}:{variant}'], key):,.{digits}f}"

    def ratio(kind: str, key: str) -> str:
        new, old = (med(results[f"{kind}:{v}"], key) for v in VARIANTS[kind])
        return f"**{old / new:.2f}x**" if new else "n/a"

    decode_same = {r["digest"] for v in VARIANTS["decode"] for r in results[f"decode:{v}"]}
    rows = [
        [
            "decode one photo: CPU ms (`load_rgb` vs the copying decode)",
            cell("decode", "load_rgb", "ms_cpu_per_photo"),
            cell("decode", "copying decode", "ms_cpu_per_photo"),
            ratio("decode", "ms_cpu_per_photo"),
            "identical" if len(decode_same) == 1 else f"**differ** ({len(decode_same)} digests)",
        ],
        [
            f"`extract_features` at {args.image_size}²: seconds (capped vs uncapped)",
            cell("extract", "capped", "seconds"),
            cell("extract", "uncapped", "seconds"),
            ratio("extract", "seconds"),
            f"max abs diff {differences['extract']:.3g}",
        ],
        [
            "… peak RSS growth, MB",
            cell("extract", "capped", "grew_mb", 0),
            cell("extract", "uncapped", "grew_mb", 0),
            ratio("extract", "grew_mb"),
            "",
        ],
        [
            "evaluation's scoring: seconds (capped vs uncapped)",
            cell("score", "capped", "seconds"),
            cell("score", "uncapped", "seconds"),
            ratio("score", "seconds"),
            f"max abs diff {differences['score']:.3g}",
        ],
        [
            "… peak RSS growth, MB",
            cell("score", "capped", "grew_mb", 0),
            cell("score", "uncapped", "grew_mb", 0),
            ratio("score", "grew_mb"),
            "",
        ],
        [
            f"report grid of {min(16, args.photos)}: seconds in the plot (shrunk vs full size)",
            cell("grid", "shrunk", "seconds", 2),
            cell("grid", "full size", "seconds", 2),
            ratio("grid", "seconds"),
            "shrunk on purpose",
        ],
    ]
    command = "python benchmarks/bench_photos.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = header(
        f"Large photos: {args.photos} JPEGs of {width}x{height} ({width * height / 1e6:.1f} MP)",
        command.strip(),
        "Each measurement in its own child process; vggflow's path vs the one it replaced, alternated, "
        f"{args.rounds} rounds, medians. Peak RSS growth: the child's peak during the call minus its RSS just before. "
        "See the script's docstring for what each variant is.",
    )
    text += (
        "\n## Results (medians)\n\n"
        + table(["measure", "vggflow", "before", "before / vggflow", "output"], rows, align="lrrrl")
        + "\n"
    )
    text += (
        "\n- Per round (vggflow / before): "
        + "; ".join(
            f"{kind} "
            + ", ".join(f"{a[key]:.3g}/{b[key]:.3g}" for a, b in zip(*(results[f"{kind}:{v}"] for v in VARIANTS[kind])))
            for kind, key in (
                ("decode", "ms_cpu_per_photo"),
                ("extract", "seconds"),
                ("score", "seconds"),
                ("grid", "seconds"),
            )
        )
        + ".\n"
    )
    publish(out, text, info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

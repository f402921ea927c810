"""Compute precision: VGG19's forward pass and training step in mixed_bfloat16 against float32.

Run (from the repository root; writes benchmarks/results/precision.md)::

    .venv/bin/python benchmarks/bench_precision.py            # 3 alternated rounds, a few minutes
    .venv/bin/python benchmarks/bench_precision.py --smoke    # seconds; checks the script runs

Each round builds a random-init VGG19 (64², the recipe benchmark's size) + GAP + a 10-class head
under each policy and times, in this process, a compiled forward pass and a training step (every
layer trainable, Adam) over the same batches of 32. Throughput is counted per CPU-second of this
process as well as per wall-second: on a shared machine the wall clock depends on the neighbours,
the CPU time much less. The CPU's bfloat16 flags are named in the results.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import base_args, header, measure_once, publish, resolve_out, start, table

NAME = "precision"
SIZE = 64
BATCH = 32


def _model(policy: str):
    import keras

    from vggflow.precision import dtype_policy

    with dtype_policy(policy):
        base = keras.applications.VGG19(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
        x = keras.layers.GlobalAveragePooling2D()(base.output)
        x = keras.layers.Dense(128, activation="relu")(x)
        outputs = keras.layers.Dense(10, activation="softmax", dtype="float32")(x)
        model = keras.Model(base.input, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    return model


def measure(policy: str, batches: int) -> dict:
    """Images per wall-second and per CPU-second of a forward pass and of a training step."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (BATCH * batches, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, 10, BATCH * batches)
    model = _model(policy)
    model.predict(x[:BATCH], batch_size=BATCH, verbose=0)  # compile outside the timing
    model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, verbose=0)
    result = {}
    for kind, run in (
        ("forward", lambda: model.predict(x, batch_size=BATCH, verbose=0)),
        ("train", lambda: model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)),
    ):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        result[f"{kind}_images_per_s"] = len(x) / wall
        result[f"{kind}_images_per_cpu_s"] = len(x) / cpu
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    base_args(parser, default_rounds=3)
    parser.add_argument("--batches", type=int, default=16, help="batches of 32 per measurement")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.batches = 1, 1
    from vggflow.precision import NATIVE_BF16_FLAGS, cpu_flags

    info = start(args)
    out = resolve_out(args, NAME)
    policies = ["float32", "mixed_bfloat16"]
    results: dict[str, list[dict]] = {policy: [] for policy in policies}
    for round_index in range(args.rounds):  # alternated: A B, B A, …
        for policy in policies if round_index % 2 == 0 else policies[::-1]:
            results[policy].append(measure_once(lambda p=policy: measure(p, args.batches)))

    def median(policy: str, key: str) -> float:
        import numpy as np

        return float(np.median([r[key] for r in results[policy]]))

    rows = []
    for kind in ("forward", "train"):
        for unit in ("images_per_cpu_s", "images_per_s"):
            key = f"{kind}_{unit}"
            f32, bf16 = median("float32", key), median("mixed_bfloat16", key)
            per = "CPU-second" if unit == "images_per_cpu_s" else "wall-second"
            rows.append([f"{kind}, images per {per}", f"{f32:.1f}", f"{bf16:.1f}", f"**{bf16 / f32:.2f}×**"])
    native = sorted(cpu_flags() & NATIVE_BF16_FLAGS) or ["none"]
    body = header(
        "Compute precision: mixed_bfloat16 vs float32",
        "python benchmarks/bench_precision.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        f"VGG19 (random init) + GAP + Dense(128) + softmax at {SIZE}², batches of {BATCH}, {args.batches} batches "
        f"per measurement, {args.rounds} alternated rounds; medians. The CPU's native bfloat16 flags: "
        f"{', '.join(native)}.",
    )
    body += "\n## Results\n\n" + table(["measure", "float32", "mixed_bfloat16", "ratio"], rows) + "\n"
    publish(out, body, info, results)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

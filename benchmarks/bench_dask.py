"""Distributed feature extraction on Dask vs the single-process pass; per-shard cost; object-store throughput.

Run (from the repository root; writes benchmarks/results/dask.md)::

    .venv/bin/python benchmarks/bench_dask.py                # 4,000 images at 64², 2 rounds
    .venv/bin/python benchmarks/bench_dask.py --images 1000 --rounds 1
    .venv/bin/python benchmarks/bench_dask.py --smoke        # about a minute; checks the script runs

In one run, alternating (medians over the rounds), the frozen VGG19 base (seeded random init: same
FLOPs as ImageNet weights) over the same Fashion-MNIST PNG files, pooled features only:

- **single process**: today's local pass (`vggflow.extraction.extract_features`) in a child
  process with TensorFlow's default threads (both cores);
- **dask, 1 worker** / **dask, 2 workers**: `flows.extract.extract_on_cluster` (the path of
  `features.executor: dask`) on a running cluster of 1 or 2 single-threaded workers (`dask worker
  --nthreads 1 --preload vggflow.dask_worker`, as `vggflow stack up --dask N` starts them), shards
  of `--shard-size` images written to the cache folder, then assembled;
- **dask, 2 workers, S3 shards**: the same, shards written to an `rclone serve s3` object store.

Excluded from every timing: importing TensorFlow and building the base (each worker did both in a
warm-up run; the single process before its timed call). Included: everything else, for the Dask
variants Prefect's flow and task runs, the shards' writes and the assembly.

Then: the **per-shard fixed cost** (one worker, the same images as 1 shard and as many small
shards), the **fixed cost of a run** (one shard of one batch), and the **object store's
throughput** (boto3 and s3fs, as shards use it) — and, from those figures, a scaling model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import common
from common import base_args, dataset_rows, fashion_mnist_folder, header, med, publish, resolve_out, start, table

NAME = "dask"


def child_single(args) -> None:
    """In a child: the local pass over the images, TensorFlow imported and the base built before timing."""
    from vggflow.runtime import import_tensorflow_quietly

    import_tensorflow_quietly()
    from vggflow.config import BackboneConfig
    from vggflow.extraction import extract_features
    from vggflow.model import build_base, resolve_weights

    folder = Path(args.folder)
    rows = dataset_rows(folder)
    weights = resolve_weights(BackboneConfig(weights="none", image_size=args.size), Path(args.scratch), seed=42)
    base = build_base(weights, args.size)
    with tempfile.TemporaryDirectory(dir=args.scratch) as warm:  # trace the loop once, untimed
        extract_features(rows.head(args.batch), folder, base, ["avg_pool"], args.size, args.batch, Path(warm))
    with tempfile.TemporaryDirectory(dir=args.scratch) as out:
        started = time.perf_counter()
        extract_features(rows, folder, base, ["avg_pool"], args.size, args.batch, Path(out))
        seconds = time.perf_counter() - started
        digest = hashlib.sha256((Path(out) / "avg_pool.npy").read_bytes()).hexdigest()
    common.emit({"seconds": seconds, "sha256": digest})


class Cluster:
    """A Dask scheduler and N single-threaded workers, started the way the stack starts them."""

    def __init__(self, root: Path, workers: int, store_env: dict[str, str]) -> None:
        from vggflow.config import StackConfig
        from vggflow.ports import free_port
        from vggflow.stack import dask_cluster
        from vggflow.stack.folder import StackFolder

        ports = {"dask": free_port()}
        self.folder = StackFolder(StackConfig(dir=root, ports=ports, dask_workers=workers))
        self.folder.choose_ports(lambda line: None)
        self.folder.state["dask_workers"] = workers
        self.processes = [dask_cluster.scheduler_process(self.folder)]
        self.processes += [dask_cluster.worker_process(self.folder, i, store_env) for i in range(workers)]
        self.address = dask_cluster.address(self.folder)
        self.health = lambda: dask_cluster.health(self.folder).ok

    def __enter__(self) -> Cluster:
        for process in self.processes:
            process.die_with_parent = True
            process.start()
        deadline = time.monotonic() + 600
        while not self.health():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Dask cluster at {self.address} did not come up")
            time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):
            process.stop()


def object_store(root: Path):
    """An ``rclone serve s3`` (the stack's object store) with a bucket; returns (process, folder)."""
    from vggflow.config import StackConfig
    from vggflow.ports import free_port
    from vggflow.stack import objectstore
    from vggflow.stack.folder import StackFolder

    folder = StackFolder(StackConfig(dir=root, ports={"s3": free_port()}))
    folder.choose_ports(lambda line: None)
    process = objectstore.process(folder)
    process.die_with_parent = True
    process.start().wait_until_healthy(120)
    objectstore.ensure_bucket(folder)
    return process, folder


def lscpu_line() -> str:
    """The CPU as ``lscpu`` names it, with the vector extensions that matter for these kernels."""
    import subprocess

    try:
        fields = dict(
            line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        )
    except (OSError, ValueError):
        return common.cpu_model()
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("Flags", "").split())
    vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"{fields.get('Model name', common.cpu_model())} (family {fields.get('CPU family', '?')}, model "
        f"{fields.get('Model', '?')}), {fields.get('CPU(s)', '?')} CPUs, {', '.join(vector) or 'no AVX2'}"
    )


def services_cpu() -> float:
    """CPU seconds used so far by every live descendant of this process (Prefect server, store, Dask processes).

    They are not waited-for children, so the shared measurement (``common.measure_once``) would
    count them as other processes' load: each variant records how much of it was its own.
    """
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def counted(variant):
    """``variant`` recording ``services_cpu_s``: what this run's own services used while it ran."""

    def run() -> dict:
        before = services_cpu()
        result = variant()
        result["services_cpu_s"] = services_cpu() - before
        return result

    return run


def own_load_removed(results: dict[str, list[dict]]) -> None:
    """``others_cores`` without this run's own services: what really was other processes' load."""
    for runs in results.values():
        for result in runs:
            mine = result.get("services_cpu_s", 0.0) / max(result["wall_s"], 1e-9)
            result["others_cores"] = max(0.0, result["others_cores"] - mine)


def store_throughput(folder, smoke: bool) -> dict:
    """boto3 put/get of large objects and of many 100 KB ones; s3fs put/cat of shard-sized files."""
    import fsspec

    from vggflow.stack import objectstore

    s3, bucket = objectstore.client(folder), folder.cfg.bucket
    big = os.urandom((4 if smoke else 64) << 20)
    small = os.urandom(100 << 10)
    shard = os.urandom(1 << 20)  # ≈ one shard of 512 images' pooled features (512 × 512 float32)
    out: dict[str, list[float]] = {k: [] for k in ("put_MBps", "get_MBps", "small_put_ms", "small_get_ms")}
    out |= {"s3fs_put_MBps": [], "s3fs_cat_MBps": []}
    for _ in range(1 if smoke else 3):
        started = time.perf_counter()
        s3.put_object(Bucket=bucket, Key="bench/big", Body=big)
        out["put_MBps"].append(len(big) / 2**20 / (time.perf_counter() - started))
        started = time.perf_counter()
        assert len(s3.get_object(Bucket=bucket, Key="bench/big")["Body"].read()) == len(big)
        out["get_MBps"].append(len(big) / 2**20 / (time.perf_counter() - started))
    count = 10 if smoke else 100
    started = time.perf_counter()
    for i in range(count):
        s3.put_object(Bucket=bucket, Key=f"bench/small/{i}", Body=small)
    out["small_put_ms"].append(1000 * (time.perf_counter() - started) / count)
    started = time.perf_counter()
    for i in range(count):
        s3.get_object(Bucket=bucket, Key=f"bench/small/{i}")["Body"].read()
    out["small_get_ms"].append(1000 * (time.perf_counter() - started) / count)
    fs = fsspec.filesystem("s3")
    with tempfile.NamedTemporaryFile() as local:
        local.write(shard)
        local.flush()
        for i in range(5 if smoke else 20):
            started = time.perf_counter()
            fs.put_file(local.name, f"{bucket}/bench/shard-{i}.npy")
            out["s3fs_put_MBps"].append(1 / (time.perf_counter() - started))
            started = time.perf_counter()
            assert len(fs.cat_file(f"{bucket}/bench/shard-{i}.npy")) == len(shard)
            out["s3fs_cat_MBps"].append(1 / (time.perf_counter() - started))
    return {key: common.median(values) for key, values in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base_args(parser, default_rounds=2)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--child", choices=["single"])
    parser.add_argument("--folder")
    parser.add_argument("--scratch")
    args = parser.parse_args(argv)
    if args.child:
        child_single(args)
        return 0
    if args.smoke:
        args.images, args.size, args.rounds, args.shard_size, args.batch = 96, 32, 1, 32, 16
    out = resolve_out(args, NAME)
    info = start(args)
    return run(args, out, info)


def run(args, out: Path, info: dict) -> int:
    from vggflow.warmup import start_local_prefect_server, wait_until_ready

    server = start_local_prefect_server()  # before Prefect is imported: the flows report to it
    folder = fashion_mnist_folder(args.images)
    scratch = Path(tempfile.mkdtemp(prefix="vggflow-bench-dask-", dir=common.cache_root()))
    store_process, store_folder = object_store(scratch / "store")
    try:
        from vggflow.stack import objectstore

        os.environ.update(objectstore.server_env(store_folder))  # this process assembles S3 shards
        wait_until_ready(server)
        return measure(args, out, info, folder, scratch, objectstore.server_env(store_folder), store_folder)
    finally:
        store_process.stop()
        if server is not None:
            server.stop()


def measure(args, out: Path, info: dict, folder: Path, scratch: Path, store_env: dict, store_folder) -> int:
    from vggflow.config import BackboneConfig, FeaturesConfig
    from vggflow.flows.extract import extract_on_cluster
    from vggflow.model import resolve_weights

    rows = dataset_rows(folder)
    weights = resolve_weights(BackboneConfig(weights="none", image_size=args.size), scratch, seed=42)
    digests: dict[str, set[str]] = {}

    def on_cluster(cluster: Cluster, label: str, rows_=rows, shard_size=args.shard_size, store=None):
        cfg = FeaturesConfig(
            executor="dask", dask_address=cluster.address, batch_size=args.batch, shard_size=shard_size,
            shard_store=store and f"s3://{store_folder.cfg.bucket}/shards-{uuid.uuid4().hex}",
        )  # fmt: skip
        target = scratch / f"out-{uuid.uuid4().hex}"

        def once() -> dict:
            started = time.perf_counter()
            extract_on_cluster(cfg, weights, args.size, rows_, folder, ["avg_pool"], target)
            seconds = time.perf_counter() - started
            digest = hashlib.sha256((target / "avg_pool.npy").read_bytes()).hexdigest()
            digests.setdefault(label, set()).add(digest)
            return {"seconds": seconds, "shards": -(-len(rows_) // (-(-shard_size // args.batch) * args.batch))}

        return once

    def single() -> dict:
        result = common.run_child(
            Path(__file__),
            ["--child", "single", "--folder", str(folder), "--scratch", str(scratch), "--size", str(args.size),
             "--batch", str(args.batch), "--images", str(args.images)],
        )  # fmt: skip
        digests.setdefault("single process", set()).add(result["sha256"])
        return {"seconds": result["seconds"]}

    with Cluster(scratch / "one", 1, store_env) as one, Cluster(scratch / "two", 2, store_env) as two:
        for cluster in (one, two):  # every worker imports TensorFlow (preload) and builds the base, untimed
            on_cluster(cluster, "warm-up", rows.head(args.batch * 4), args.batch)()
        variants = {
            "single process": counted(single),
            "dask, 1 worker": counted(lambda: on_cluster(one, "dask, 1 worker")()),
            "dask, 2 workers": counted(lambda: on_cluster(two, "dask, 2 workers")()),
            "dask, 2 workers, S3 shards": counted(lambda: on_cluster(two, "dask, 2 workers, S3 shards", store=True)()),
        }
        results = common.alternate(variants, args.rounds)
        few = rows.head(min(len(rows), 32 if args.smoke else 1024))
        fixed = common.alternate(
            {
                "1 shard": counted(lambda: on_cluster(one, "fixed", few, len(few))()),
                "many shards": counted(lambda: on_cluster(one, "fixed", few, args.batch)()),
                "one batch": counted(lambda: on_cluster(one, "fixed-batch", rows.head(args.batch), args.batch)()),
            },
            args.rounds,
        )
    own_load_removed(results)
    own_load_removed(fixed)
    throughput = store_throughput(store_folder, args.smoke)
    report(args, out, info, rows, results, fixed, throughput, digests)
    return 0


def report(args, out, info, rows, results, fixed, throughput, digests) -> None:
    n = len(rows)
    rate = {name: n / med(runs, "seconds") for name, runs in results.items()}
    single = rate["single process"]
    few = min(n, 32 if args.smoke else 1024)
    many = -(-few // args.batch)
    per_shard = (med(fixed["many shards"], "seconds") - med(fixed["1 shard"], "seconds")) / max(many - 1, 1)
    run_fixed = med(fixed["one batch"], "seconds") - per_shard
    worker_rate = rate["dask, 1 worker"]  # one single-threaded worker, overheads of its shards included
    compared = {name: digests.get(name, set()) for name in results}
    same = len(set().union(*compared.values())) == 1
    text = header(
        "Distributed feature extraction on Dask",
        "python benchmarks/bench_dask.py" + (" --smoke" if args.smoke else ""),
        f"{n} Fashion-MNIST images (28² PNG) through the frozen VGG19 base at {args.size}², batch {args.batch}, "
        f"shards of {args.shard_size} images (rounded up to whole batches), pooled features; {args.rounds} "
        "alternating round(s), medians. The Dask workers are single-threaded (`--nthreads 1`, TensorFlow's pools "
        "sized to match), started and warmed up before timing; the single process uses TensorFlow's default "
        f"threads. CPU (`lscpu`): {lscpu_line()}.",
    )
    rows_out = [
        [name, f"{med(runs, 'seconds'):.1f}", f"{rate[name]:.1f}", f"{rate[name] / single:.3f}",
         f"{med(runs, 'others_cores'):.2f}"]
        for name, runs in results.items()
    ]  # fmt: skip
    text += "\n## Results\n\n" + table(
        ["variant", "median s", "images/s", "vs single process", "other processes' cores"], rows_out
    )
    others = [r["others_cores"] for runs in results.values() for r in runs]
    if common.median(others) > 0.3:
        text += (
            f"\n\n**The machine was shared during this run**: other processes (another benchmark) used "
            f"{common.median(others):.2f} of the 2 cores (median over the measurements; max {max(others):.2f}), "
            "without this run's own services (the Prefect server, the object store, the Dask processes). "
            "Every variant ran under that contention, alternated; the ratios are what it left to measure, and the "
            "contended single process and single-threaded workers need not scale as on an idle machine.\n"
        )
    ratio = rate["dask, 2 workers"] / single
    text += (
        f"\n\n- **2 workers vs the single process: {ratio:.3f}** (goal ≥ 0.9: {'met' if ratio >= 0.9 else 'missed'}); "
        f"with S3 shards {rate['dask, 2 workers, S3 shards'] / single:.3f}; "
        f"1 worker {rate['dask, 1 worker'] / single:.3f}.\n"
        "- Features: "
        + (
            "bitwise identical in every variant and round"
            if same
            else "NOT identical: " + json.dumps({name: sorted(found) for name, found in compared.items()})
        )
        + ".\n"
    )
    text += (
        "\n## Fixed costs (one worker)\n\n"
        + table(
            ["run", "median s"],
            [
                [f"{few} images as 1 shard", f"{med(fixed['1 shard'], 'seconds'):.2f}"],
                [f"{few} images as {many} shards of {args.batch}", f"{med(fixed['many shards'], 'seconds'):.2f}"],
                [
                    f"{args.batch} images as 1 shard (a run's fixed cost + 1 shard)",
                    f"{med(fixed['one batch'], 'seconds'):.2f}",
                ],
            ],
        )  # fmt: skip
        + f"\n\n- **Per-shard fixed cost: {per_shard:.2f} s** ((many − 1 shard) / {many - 1}: a Prefect task run, "
        "its state updates through the API, the shard's writes and its part of the assembly).\n"
        f"- **A run's fixed cost: {run_fixed:.1f} s** (one batch as one shard, minus one shard's cost: the "
        "subflow run, connecting to the scheduler, assembling).\n"
    )
    text += "\n## Object store (rclone serve s3 on 127.0.0.1, one client)\n\n" + table(
        ["operation", "median"],
        [["boto3 put, large object", f"{throughput['put_MBps']:.0f} MB/s"],
         ["boto3 get, large object", f"{throughput['get_MBps']:.0f} MB/s"],
         ["boto3 put, 100 KB objects", f"{throughput['small_put_ms']:.1f} ms/object"],
         ["boto3 get, 100 KB objects", f"{throughput['small_get_ms']:.1f} ms/object"],
         ["s3fs put_file, 1 MB (a 512-image shard)", f"{throughput['s3fs_put_MBps']:.0f} MB/s"],
         ["s3fs cat_file, 1 MB", f"{throughput['s3fs_cat_MBps']:.0f} MB/s"]],
    )  # fmt: skip
    overhead_shard = 20 * per_shard * worker_rate
    assembly = 1_000_000 * 2048 / (throughput["s3fs_cat_MBps"] * 2**20)
    lines = []
    for machines in (1, 4, 16, 64):
        compute = 1_000_000 / (2 * machines * worker_rate)
        total = run_fixed + compute + assembly
        lines.append([machines, 2 * machines, f"{compute / 3600:.2f}", f"{assembly / 60:.1f}", f"{total / 3600:.2f}"])
    text += (
        "\n\n## Scaling model\n\n"
        f"From the figures above: one single-threaded worker extracts **r = {worker_rate:.1f} images/s** at "
        f"{args.size}² (its shards' fixed costs included), a shard costs **c = {per_shard:.2f} s** of fixed work, "
        f"a run **T0 = {run_fixed:.1f} s**, and the client reads shards back at "
        f"{throughput['s3fs_cat_MBps']:.0f} MB/s (2 KB of pooled features per image). On N machines of 2 cores "
        "(2 single-threaded workers each), with shards of s images:\n\n"
        "    T(1M) ≈ T0 + 1,000,000 / (2N · r) · (1 + c·r/s) + 1,000,000 · 2 KB / read throughput\n\n"
        f"The shard overhead c·r/s stays under 5 % for **s ≥ 20·c·r = {overhead_shard:.0f} images** per shard "
        f"(the default, 512, gives {100 * per_shard * worker_rate / 512:.1f} %). Extraction time for 1 million "
        f"images at {args.size}² with s = {args.shard_size} (compute from r; assembly on one client, sequential):\n\n"
        + table(["machines", "workers", "compute h", "assembly min", "total h"], lines)
        + "\n\nThe model assumes the images are on a path every worker reads at full speed and a scheduler that "
        "keeps every worker busy (shards ≥ 4 × workers); at 224² the per-image work grows ~12× (BENCHMARKS.md, "
        "extraction), so the same shard overhead allows shards ~12× smaller.\n"
    )
    publish(out, text, info, results, raw={"results": results, "fixed": fixed, "store": throughput})


if __name__ == "__main__":
    sys.exit(main())

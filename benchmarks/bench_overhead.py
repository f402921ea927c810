"""Benchmark 4: end-to-end `vggflow train` on the demo data — time per task and fixed overhead.

Fixed overhead = wall time of the whole command − TensorFlow compute (feature extraction, the test
images' pass through the chosen model's frozen part, every
stage's `fit`, test-set prediction; the run logs them as `seconds_*` metrics). It is what a user
waits for that is not the model: imports, Prefect's temporary server, the MLflow store, data
validation, DVC, logging and registering. Goal: ≤ 15 s.

Each round is a cold run in a fresh project folder (new MLflow store, empty caches). Two
variants alternate:
- ``ephemeral``: exactly what `make demo` does (no PREFECT_API_URL: Prefect starts a temporary server);
- ``server``: the same against a Prefect server started beforehand (as with `vggflow schedule`),
  which also lets us read the duration of every task from the Prefect API.

Run:  .venv/bin/python benchmarks/bench_overhead.py [--rounds 2] [--smoke]
Writes benchmarks/results/overhead.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vggflow.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
VGGFLOW = str(Path(sys.executable).with_name("vggflow"))
RESULTS = ROOT / "benchmarks" / "results" / "overhead.md"


def machine() -> str:
    import platform

    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores, Python {platform.python_version()}, load average at start {load:.2f}"


def fresh_project(base: Path, smoke: bool) -> Path:
    """A new project folder with the configs and the demo data (or a tiny subset for --smoke)."""
    project = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    shutil.copytree(ROOT / "configs", project / "configs")
    data = project / "data"
    if smoke:
        for folder in sorted((ROOT / "data").iterdir())[:3]:
            (data / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:8]:
                shutil.copy(image, data / folder.name / image.name)
    else:
        shutil.copytree(ROOT / "data", data)
    return project


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    import requests

    port = free_port()
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": ""}
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return server, url
        except requests.RequestException:
            time.sleep(1)
    server.kill()
    raise RuntimeError("prefect server did not start")


def run_train(project: Path, api_url: str | None, smoke: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    args = [VGGFLOW, "train", "--config", "configs/demo.yaml"]
    if smoke:
        args += [
            "--set",
            "head.epochs=1",
            "--set",
            "finetune.stages=[{unfreeze_from: block5, learning_rate: 1.0e-4, epochs: 1}]",
        ]
    started = time.perf_counter()
    done = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vggflow")
    run = client.search_runs([experiment.experiment_id], filter_string="tags.`vggflow.kind` = 'training'")[0]
    compute = {k.removeprefix("seconds_"): v for k, v in run.data.metrics.items() if k.startswith("seconds_")}
    return {
        "wall": wall,
        "compute": sum(compute.values()),
        "compute_parts": compute,
        "flow_run_id": run.data.tags.get("vggflow.prefect_flow_run_id"),
    }


async def task_durations(api_url: str, flow_run_id: str) -> dict[str, float]:
    """Seconds per task of one flow run, from the Prefect API."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with PrefectClient(api=api_url) as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        flow_run = await client.read_flow_run(flow_run_id)
    durations = {
        run.name: (run.end_time - run.start_time).total_seconds() for run in runs if run.start_time and run.end_time
    }
    durations["(whole flow)"] = flow_run.total_run_time.total_seconds() if flow_run.total_run_time else float("nan")
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny data, one epoch: checks the script runs")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    base = Path(tempfile.mkdtemp(prefix="vggflow-bench-overhead-"))
    header = machine()
    server, api_url = start_prefect_server(base / "prefect-home")
    results: dict[str, list[dict]] = {"ephemeral": [], "server": []}
    tasks: dict[str, list[float]] = {}
    try:
        for _ in range(1 if args.smoke else args.rounds):
            for variant in ("ephemeral", "server"):
                outcome = run_train(
                    fresh_project(base, args.smoke), api_url if variant == "server" else None, args.smoke
                )
                results[variant].append(outcome)
                if variant == "server" and outcome["flow_run_id"]:
                    for name, seconds in asyncio.run(task_durations(api_url, outcome["flow_run_id"])).items():
                        tasks.setdefault(name.rsplit("-", 1)[0] if name[-4:-3] == "-" else name, []).append(seconds)
                print(variant, json.dumps({k: round(v, 1) for k, v in outcome.items() if isinstance(v, float)}))
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(base, ignore_errors=True)

    lines = [
        "# Benchmark 4: end-to-end `vggflow train` on the demo — time per task, fixed overhead",
        "",
        f"Machine: {header}. Command: "
        f"`{' '.join(['.venv/bin/python', 'benchmarks/bench_overhead.py', f'--rounds {args.rounds}'])}`"
        + (" (smoke mode: not a measurement)" if args.smoke else ""),
        "",
        "Cold runs (fresh MLflow store, empty caches), medians over rounds; overhead = wall − TensorFlow compute.",
        "",
        "| variant | wall (s) | TF compute (s) | fixed overhead (s) | goal |",
        "|---|---:|---:|---:|---|",
    ]
    for variant, outcomes in results.items():
        wall = statistics.median(o["wall"] for o in outcomes)
        compute = statistics.median(o["compute"] for o in outcomes)
        overhead = statistics.median(o["wall"] - o["compute"] for o in outcomes)
        label = "no server configured (what `make demo` does)" if variant == "ephemeral" else "running Prefect server"
        lines.append(
            f"| {label} | {wall:.1f} | {compute:.1f} | {overhead:.1f} | ≤ 15 s: "
            f"{'met' if overhead <= 15 else 'missed'} |"
        )
    lines += ["", "Time per task (running-server variant, medians):", "", "| task | seconds |", "|---|---:|"]
    for name, values in sorted(tasks.items(), key=lambda item: -statistics.median(item[1])):
        lines.append(f"| {name} | {statistics.median(values):.2f} |")
    lines += [
        "",
        "TensorFlow compute parts (medians): "
        + ", ".join(
            f"{k} {statistics.median(o['compute_parts'].get(k, 0.0) for o in results['server']):.1f} s"
            for k in sorted(results["server"][0]["compute_parts"])
        ),
    ]
    # A smoke run is not a measurement: it must not replace the results file.
    out = Path(tempfile.mkdtemp(prefix="vggflow-bench-smoke-")) / RESULTS.name if args.smoke else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

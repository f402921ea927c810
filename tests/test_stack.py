"""The shared production stack for real: PostgreSQL, the S3 server, MLflow's and Prefect's servers, a
worker and a Dask cluster started by `vggflow stack up` in a temporary folder, used by the same
commands as the embedded store, then stopped by `vggflow stack down`.

One stack serves the whole module (it takes a minute to start on 2 cores); the tests run in file
order and the last one takes it down. Skipped where PostgreSQL is not installed (.ci/run installs
Debian's `postgresql`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, tiny_overrides, write_dataset
from vggflow.config import load_config
from vggflow.precision import resolve_precision
from vggflow.stack import objectstore, postgres
from vggflow.stack.folder import MARKER, StackError, StackFolder, tcp_open

pytestmark = [pytest.mark.slow, pytest.mark.stack]

BIN = Path(sys.executable).parent
MODEL = "vgg19-classifier"
#: The client's own environment must not point anywhere else.
FOREIGN = ("MLFLOW_", "PREFECT_API", "AWS_", "VGGFLOW__", "PGPASSFILE")


class Stack:
    """The test project (git + DVC, tiny data, prefect.yaml) and the running stack's client settings."""

    def __init__(self, base: Path, busy_port: int) -> None:
        self.base, self.busy_port = base, busy_port
        self.project = base / "project"
        self.config = self.project / "stack.yaml"
        self.env: dict[str, str] = {}
        self.up_output = ""

    @property
    def folder(self) -> StackFolder:
        return StackFolder(load_config(self.config, environ={}).stack)

    def run(self, *args: str, check: bool = True, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
        """``vggflow ARGS --config stack.yaml`` in the project, as a client of the stack."""
        command = [str(BIN / "vggflow"), *args, "--config", str(self.config)]
        return self.command(command, check=check, timeout=timeout, **env)

    def command(self, command: list[str], check: bool = True, timeout: float = 900, **env: str):
        environment = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)}
        environment.update(self.env | env)
        environment["PATH"] = f"{BIN}{os.pathsep}{environment['PATH']}"
        environment["PREFECT_LOCAL_STORAGE_PATH"] = str(self.project / ".vggflow" / "prefect" / "results")
        done = subprocess.run(
            command, cwd=self.project, env=environment, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{command} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done


def make_project(stack: Stack) -> None:
    """A git + DVC project with tiny data, this repository's prefect.yaml and retraining flow, a config."""
    project = stack.project
    (project / "flows").mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "prefect.yaml", project)
    shutil.copy(PROJECT_ROOT / "flows" / "retrain.py", project / "flows")
    write_dataset(project / "data", classes=3, per_class=12)
    tree: dict = {}
    for override in tiny_overrides():
        key, value = override.split("=", 1)
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = yaml.safe_load(value)
    tree["data"] = {"dir": str(project / "data"), "dvc_file": str(project / "data.dvc")}
    tree["work_dir"] = str(project / ".vggflow")
    tree["features"]["cache_dir"] = str(project / ".vggflow" / "cache")
    tree["stack"] = {"dir": str(stack.base / "stack"), "ports": {"postgres": stack.busy_port}, "dask_workers": 2}
    stack.config.write_text(yaml.safe_dump(tree))
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], [str(BIN / "dvc"), "add", "-q", "data"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True, timeout=300)
    subprocess.run([str(BIN / "dvc"), "remote", "add", "stack", "s3://vggflow/dvc"], cwd=project, check=True)


def first_free_port(start: int) -> int:
    from vggflow.ports import port_in_use

    return next(p for p in range(start, start + 200) if not port_in_use("127.0.0.1", p))


@pytest.fixture(scope="module")
def stack():
    try:
        postgres.bin_dir()
    except StackError:
        pytest.skip("PostgreSQL is not installed: the stack tests need Debian's `postgresql` (.ci/run installs it)")
    # PostgreSQL runs as the `postgres` user when we are root: it must be able to enter the folder.
    base = Path(tempfile.mkdtemp(prefix="vggflow-stack-test-", dir="/tmp"))
    base.chmod(0o711)
    busy = socket.socket()
    busy.bind(("127.0.0.1", first_free_port(25432)))
    busy.listen()
    stack = Stack(base, busy.getsockname()[1])
    make_project(stack)
    try:
        up = stack.run("stack", "up", "--project", str(stack.project), timeout=1200)
        stack.up_output = up.stdout
        env_lines = stack.run("stack", "env").stdout
        stack.env = dict(line.removeprefix("export ").split("=", 1) for line in env_lines.splitlines())
        yield stack
    finally:
        busy.close()
        stack.run("stack", "down", check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_up_starts_every_service_on_loopback_with_private_credentials(stack: Stack) -> None:
    folder = stack.folder
    assert f"postgres: port {stack.busy_port} is taken" in stack.up_output  # moved, not hung
    assert folder.ports["postgres"] != stack.busy_port
    status = stack.run("stack", "status")
    for service in ("postgres", "s3", "mlflow", "prefect", "worker", "dask"):
        assert any(line.startswith(service) and " OK " in line for line in status.stdout.splitlines()), status.stdout
    assert "2 of 2 worker(s)" in status.stdout
    for private in (folder.secrets_file, folder.root / "client" / "pgpass", folder.root / "client" / "s3-credentials"):
        assert private.stat().st_mode & 0o777 == 0o600
    secrets = [v for v in folder.secrets.values()]
    shown = stack.up_output + "".join(f"{k}={v}" for k, v in stack.env.items())
    for path in [*folder.logs.iterdir(), folder.state_file, folder.root / "client.env"]:
        shown += path.read_text(errors="replace")
    for pid in _marked(folder):
        shown += Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert not [s for s in secrets if s in shown], "a generated secret was printed, logged or on a command line"


def test_train_on_the_cluster_and_the_stores_behind_the_servers(stack: Stack) -> None:
    import psycopg

    # Extraction on the stack's 2-worker Dask cluster, shards through the object store.
    trained = stack.run("train", "--set", "features.executor=dask", "--set", "features.shard_size=8")
    assert "PROMOTED" in trained.stdout and stack.env["MLFLOW_TRACKING_URI"] in trained.stdout
    run_id = trained.stdout.split("vggflow train: done   run ")[1].split()[0]
    folder = stack.folder
    # The run, its params and metrics are rows in PostgreSQL; the aliases too.
    with psycopg.connect(
        host="127.0.0.1",
        port=folder.ports["postgres"],
        user=postgres.APP_USER,
        password=folder.secrets["postgres_app"],
        dbname="mlflow",
    ) as conn:
        status = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
        params = dict(conn.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run_id,)).fetchall())
        metrics = {k for (k,) in conn.execute("SELECT key FROM latest_metrics WHERE run_uuid = %s", (run_id,))}
        aliases = dict(conn.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (MODEL,)))
    assert status == ("FINISHED",) and params["backbone.image_size"] == "32"
    assert {"test_accuracy", "test_macro_f1"} <= metrics and aliases["champion"] == 1
    # The artifacts and the model are objects in the bucket.
    keys = [
        item["Key"]
        for page in objectstore.client(folder)
        .get_paginator("list_objects_v2")
        .paginate(Bucket="vggflow", Prefix="mlflow/")
        for item in page.get("Contents", [])
    ]
    assert any(k.endswith(f"{run_id}/artifacts/model_card.md") for k in keys)
    assert any("/models/m-" in k and k.endswith("/MLmodel") for k in keys)


def local_reference(stack: Stack, image_size: int, layers: list[str], cache: Path, precision: str = "float32"):
    """The single-process pass over the project's train and val images (the arrays to compare with)."""
    from vggflow.feature_cache import cached_rows
    from vggflow.files import read_rows
    from vggflow.model import resolve_weights
    from vggflow.tasks.features import compute_features

    cfg = load_config(stack.config, [f"backbone.image_size={image_size}"], environ={})
    rows_file = next(p for p in (stack.project / ".vggflow").rglob("rows.csv") if ",test," in p.read_text())
    rows = read_rows(rows_file)
    weights = resolve_weights(cfg.backbone, cfg.features.cache_dir, cfg.seed)
    features = compute_features(
        rows, cfg.data.dir, weights, image_size, 16, cache, "reference", layers, ["x"], precision=precision
    )
    return features.directory, cached_rows(rows), weights, cfg


def test_dask_features_equal_the_local_pass_and_went_through_the_bucket(stack: Stack) -> None:
    cfg = load_config(stack.config, environ={})
    cluster = [p for p in (Path(cfg.features.cache_dir) / "features").iterdir() if (p / "meta.json").is_file()]
    assert len(cluster) == 1
    layers = sorted(json.loads((cluster[0] / "meta.json").read_text())["layers"])
    assert "avg_pool" in layers and len(layers) > 1  # the head's features and the stages' frozen prefixes
    # In the precision the training flow ran in (`auto`: bfloat16 where the CPU has it).
    precision = resolve_precision(cfg.backbone.precision)
    reference, _, _, _ = local_reference(stack, 32, layers, stack.base / "reference", precision)
    for layer in layers:
        assert (cluster[0] / f"{layer}.npy").read_bytes() == (reference / f"{layer}.npy").read_bytes(), layer
    assert (cluster[0] / "meta.json").read_text() == (reference / "meta.json").read_text()
    s3 = objectstore.client(stack.folder)
    shards = [o["Key"] for o in s3.list_objects_v2(Bucket="vggflow", Prefix="shards/").get("Contents", [])]
    assert any(k.endswith("/avg_pool.npy") for k in shards) and any(k.endswith("/shard.json") for k in shards)
    # The test images' frozen-part pass for evaluation took the same path: shards, then the cache's test/ folder.
    tested = json.loads((cluster[0] / "test" / "meta.json").read_text())["layers"]
    assert any("/test/" in k and k.endswith(f"/{layer}.npy") for k in shards for layer in tested)


KILLED_RUN = """
import json, sys
from pathlib import Path
from vggflow.config import load_config
from vggflow.precision import resolve_precision
from vggflow.feature_cache import cached_rows
from vggflow.files import read_rows
from vggflow.flows.extract import extract_on_cluster
from vggflow.model import resolve_weights

if __name__ == "__main__":
    config, rows_file, directory = sys.argv[1:4]
    cfg = load_config(config, ["features.shard_store=s3://vggflow/shards-kill-test", "features.shard_size=16",
                               "features.batch_size=16"])
    weights = resolve_weights(cfg.backbone, cfg.features.cache_dir, cfg.seed)
    rows = cached_rows(read_rows(rows_file))
    extract_on_cluster(cfg.features, weights, 64, rows, cfg.data.dir, ["avg_pool"], Path(directory))
    print("assembled")
"""


def test_a_worker_killed_mid_shard_the_shard_runs_elsewhere_and_the_features_are_the_same(stack: Stack) -> None:
    import threading

    from distributed import Client

    reference, rows, _, cfg = local_reference(stack, 64, [], stack.base / "reference-64")
    address = stack.env["VGGFLOW__FEATURES__DASK_ADDRESS"]
    killed: dict = {}

    def kill_a_busy_worker(stop: threading.Event) -> None:
        with Client(address, timeout=30) as client:
            while not stop.is_set():
                busy = [worker for worker, keys in client.processing().items() if keys]
                if busy:
                    pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                    os.kill(pid, signal.SIGKILL)
                    killed.update(worker=busy[0], pid=pid, at=time.time())
                    return
                time.sleep(0.02)

    stop = threading.Event()
    killer = threading.Thread(target=kill_a_busy_worker, args=(stop,), daemon=True)
    killer.start()
    rows_file = next(p for p in (stack.project / ".vggflow").rglob("rows.csv") if ",test," in p.read_text())
    directory = stack.base / "killed-run"
    try:
        done = stack.command(
            [sys.executable, "-c", KILLED_RUN, str(stack.config), str(rows_file), str(directory)], timeout=900
        )
    finally:
        stop.set()
        killer.join(30)
    assert killed, "no worker was busy with a shard to kill"
    assert "assembled" in done.stdout and "Completed" in done.stdout + done.stderr
    assert (directory / "avg_pool.npy").read_bytes() == (reference / "avg_pool.npy").read_bytes()
    assert (directory / "meta.json").read_text() == (reference / "meta.json").read_text()
    assert len(rows) > 16  # more than one shard ran


def test_a_sweep_runs_each_configuration_on_a_dask_worker_as_a_nested_run(stack: Stack) -> None:
    from distributed import Client
    from mlflow.tracking import MlflowClient

    trained = stack.run(
        "train", "--no-promote", "--set", "features.executor=dask", "--set", "finetune.stages=[]",
        "--sweep", "head.learning_rate=[0.01, 0.001]", "--sweep", "head.dense_units=[8]",
    )  # fmt: skip
    assert "sweep: 2 configurations on dask" in trained.stdout + trained.stderr
    run_id = trained.stdout.split("vggflow train: done   run ")[1].split()[0]
    client = MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    parent = client.get_run(run_id)
    trials = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`vggflow.kind` = 'trial'"
    )
    assert sorted(t.data.params["sweep.head.learning_rate"] for t in trials) == ["0.001", "0.01"]
    with Client(stack.env["VGGFLOW__FEATURES__DASK_ADDRESS"], timeout=30) as dask:
        worker_pids = {str(pid) for pid in dask.run(os.getpid).values()}
    assert {t.data.tags["vggflow.pid"] for t in trials} <= worker_pids  # trained on the workers
    for trial in trials:
        assert trial.info.status == "FINISHED" and "best_val_loss" in trial.data.metrics  # the selection metric
        heads = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")
        assert [h.data.tags["vggflow.stage"] for h in heads] == ["head"]
    best = parent.data.params["sweep.best_trial"]
    table = client.download_artifacts(run_id, "sweep/trials.json", str(stack.base))
    assert [row["won"] for row in json.loads(Path(table).read_text())["trials"]].index(True) == int(best)


def test_registry_commands_predict_and_ui_against_the_stack(stack: Stack) -> None:
    """Version 2 is the sweep's (registered without promotion); version 1 the champion."""
    assert "champion" in stack.run("registry").stdout
    assert "@champion -> version 2" in stack.run("promote", "2", "--reason", "stack test").stdout
    assert "@champion -> version 1" in stack.run("rollback", "--reason", "stack test").stdout
    image = next((stack.project / "data" / "class_0").iterdir())
    # The model comes from the server, so MLflow copies it into a new folder of TMPDIR and leaves it
    # there; vggflow deletes its copy once the model is loaded.
    copies = lambda folder: [p for p in folder.iterdir() if (p / "MLmodel").is_file()]  # noqa: E731
    mlflow_tmp, vggflow_tmp = stack.base / "tmp-mlflow", stack.base / "tmp-vggflow"
    mlflow_tmp.mkdir()
    vggflow_tmp.mkdir()
    load = f"import mlflow; mlflow.pyfunc.load_model('models:/{MODEL}@champion')"
    stack.command([str(BIN / "python"), "-c", load], TMPDIR=str(mlflow_tmp))
    assert copies(mlflow_tmp), "MLflow no longer leaves a copy of a model it loads: load_pyfunc can go"
    assert stack.run("predict", str(image), TMPDIR=str(vggflow_tmp)).stdout.startswith(str(image))
    assert copies(vggflow_tmp) == []
    ui = stack.run("ui", timeout=60)
    assert "served by the tracking server itself" in ui.stdout and "latest run" in ui.stdout


def test_a_deployment_run_executed_by_the_worker_completes(stack: Stack) -> None:
    """The nightly retraining deployed from prefect.yaml by `up`, run by the stack's worker (data unchanged: skip)."""
    params = json.dumps({"config_file": str(stack.config)})
    done = stack.command(
        [str(BIN / "prefect"), "deployment", "run", "vggflow-retrain/nightly", "--params", params, "--watch",
         "--watch-interval", "1", "--watch-timeout", "600"],
        timeout=700,
    )  # fmt: skip
    assert "Flow run finished successfully in 'Completed'" in done.stdout + done.stderr
    worker_log = (stack.folder.logs / "worker.log").read_text()
    assert "skipped: data unchanged" in worker_log


def test_validate_retrain_and_schedule_against_the_stack(stack: Stack, tmp_path: Path) -> None:
    """`validate` and `retrain` unchanged; `schedule` serves the retraining on the stack's Prefect server."""
    from tests.test_schedule import ProcessTree, wait_for

    assert "manifest" in stack.run("validate", str(stack.project / "data")).stdout
    assert "vggflow retrain: skipped: data unchanged" in stack.run("retrain").stdout
    log = tmp_path / "schedule.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)} | stack.env
    scheduler = ProcessTree(
        subprocess.Popen(
            [str(BIN / "vggflow"), "schedule", "--cron", "0 3 * * *", "--config", str(stack.config)],
            cwd=stack.project,
            env=environment | {"PREFECT_RUNNER_POLL_FREQUENCY": "2"},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    )
    try:
        wait_for(lambda: "prefect deployment run" in log.read_text(), 180, "the serving message", every=0.5)
        assert f"prefect server    {stack.env['PREFECT_API_URL']}" in log.read_text()  # the stack's, not its own
        done = stack.command(
            [str(BIN / "prefect"), "deployment", "run", "vggflow-retrain/nightly", "--watch", "--watch-interval", "1",
             "--watch-timeout", "300"],
            timeout=400,
        )  # fmt: skip
        assert "Flow run finished successfully in 'Completed'" in done.stdout + done.stderr
    finally:
        assert scheduler.terminate() == 0, log.read_text()[-3000:]
    assert scheduler.survivors() == []


def test_mlflow_models_serve_the_champion_from_the_stack(stack: Stack) -> None:
    """`mlflow models serve -m models:/vgg19-classifier@champion`: the model comes through the tracking server."""
    import urllib.request

    from tests.test_schedule import ProcessTree, wait_for
    from vggflow.ports import free_port
    from vggflow.processes import group_members, http_ok

    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)} | stack.env
    environment["PATH"] = f"{BIN}{os.pathsep}{environment['PATH']}"  # mlflow starts uvicorn from PATH
    environment["TMPDIR"] = str(stack.base)  # where MLflow leaves its copy of the model
    server = ProcessTree(
        subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=stack.base, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    )  # fmt: skip
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/ping"), 300, "the model server", every=0.5)
        server.snapshot()
        body = json.dumps({"inputs": [[[[0, 0, 0]] * 32] * 32]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
        assert predictions[0]["label"] in {"class_0", "class_1", "class_2"}
    finally:
        server.snapshot()
        os.killpg(server.process.pid, signal.SIGTERM)  # mlflow's CLI and the uvicorn server it started
        server.process.wait(60)
        wait_for(lambda: not group_members(server.process.pid), 60, "the model server's processes to exit")
    # Every process seen is gone (the group's id may still name zombies that init has not reaped yet).
    assert [line for line in server.survivors() if not line.startswith("process group")] == []


def test_dvc_push_and_pull_through_the_object_store(stack: Stack) -> None:
    dvc = str(BIN / "dvc")
    stack.command([dvc, "push", "-r", "stack"])
    keys = objectstore.client(stack.folder).list_objects_v2(Bucket="vggflow", Prefix="dvc/").get("KeyCount", 0)
    assert keys >= 36  # every image and the folder's listing
    original = {p.name: p.read_bytes() for p in (stack.project / "data" / "class_1").iterdir()}
    shutil.rmtree(stack.project / "data")
    shutil.rmtree(stack.project / ".dvc" / "cache")
    stack.command([dvc, "pull", "-r", "stack"])
    assert {p.name: p.read_bytes() for p in (stack.project / "data" / "class_1").iterdir()} == original


GATE = """
import json, sys, time
import mlflow
import pandas as pd
from vggflow.config import load_config
from vggflow.precision import resolve_precision
from vggflow.files import read_rows
from vggflow.registry import promotion_lock
from vggflow.tasks.promote import promote_if_better
from vggflow.tracking import connect, lock_dir

cfg = load_config(sys.argv[1], [f"work_dir={sys.argv[2]}", "registry.thresholds={accuracy: 0.0}"])
client, experiment_id = connect(cfg.tracking)
champion = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
run_id = client.create_run(experiment_id, run_name="concurrent-gate").info.run_id
version = mlflow.register_model(champion.source, cfg.registry.model_name).version
rows = read_rows(sys.argv[3])
classes = sorted(rows["label"].unique())
# Decoys: a training image of each class under the next class's label. The candidate's predictions are
# the labels (all right); the champion sees the images (it would have to mistake each for the next class).
decoys = rows[rows["split"] == "train"].groupby("label").head(1).copy()
decoys["label"] = [classes[(classes.index(label) + 1) % len(classes)] for label in decoys["label"]]
test = pd.concat([rows[rows["split"] == "test"], decoys], ignore_index=True)
with promotion_lock(lock_dir(cfg.tracking, cfg.work_dir), cfg.registry.lock_url, cfg.registry.model_name):
    acquired = time.time()
    perfect = list(test["label"])  # the candidate's predictions
    decision = promote_if_better(client, cfg.registry, version, perfect, run_id, test, cfg.data.dir, classes, 8)
    released = time.time()
client.set_terminated(run_id)
print(json.dumps({"decision": decision.model_dump(mode="json"), "held": [acquired, released], "run_id": run_id}))
"""


def test_two_promotions_at_once_from_separate_work_folders_take_turns(stack: Stack) -> None:
    rows = next(p for p in (stack.project / ".vggflow").rglob("rows.csv") if ",test," in p.read_text())
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", GATE, str(stack.config), str(stack.base / f"machine-{name}"), str(rows)],
            cwd=stack.project,
            env={k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)} | stack.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    first, second = sorted((json.loads(out.strip().splitlines()[-1]) for out, _ in outputs), key=lambda r: r["held"])
    assert first["held"][1] <= second["held"][0]  # one gate at a time
    # The second gate compared against the first's result: nothing lost, one champion, both decisions logged.
    reasons = [first["decision"]["reason"], second["decision"]["reason"]]
    assert first["decision"]["promoted"] and second["decision"]["promoted"], reasons
    assert second["decision"]["champion_version"] == first["decision"]["candidate_version"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    assert client.get_model_version_by_alias(MODEL, "champion").version == second["decision"]["candidate_version"]
    assert client.get_model_version_by_alias(MODEL, "previous").version == first["decision"]["candidate_version"]
    for result in (first, second):
        logged = client.download_artifacts(result["run_id"], "promotion/decision.json", str(stack.base))
        assert json.loads(Path(logged).read_text())["candidate_version"] == result["decision"]["candidate_version"]


def test_wrong_credentials_are_one_clear_message_without_the_secret(stack: Stack) -> None:
    wrong = stack.base / "wrong-pgpass"
    wrong.write_text("127.0.0.1:*:*:*:not-the-password\n")
    wrong.chmod(0o600)
    done = stack.run("rollback", "--reason", "stack test", check=False, PGPASSFILE=str(wrong))
    assert done.returncode == 3 and "Traceback" not in done.stderr
    assert "password authentication failed" in done.stderr and "not-the-password" not in done.stderr
    assert f"127.0.0.1:{stack.folder.ports['postgres']}" in done.stderr
    # Wrong object-store keys: the shard store is named before any work, the secret is not echoed.
    wrong_s3 = stack.base / "wrong-s3-credentials"
    wrong_s3.write_text("[default]\naws_access_key_id = nobody\naws_secret_access_key = not-the-secret\n")
    wrong_s3.chmod(0o600)
    done = stack.run("train", "--set", "features.executor=dask", check=False, AWS_SHARED_CREDENTIALS_FILE=str(wrong_s3))
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "cannot write to the shard store s3://vggflow/shards" in done.stderr
    assert "not-the-secret" not in done.stdout + done.stderr


def test_down_stops_everything_and_a_stopped_service_is_named(stack: Stack) -> None:
    folder = stack.folder
    ports = dict(folder.ports)
    assert _marked(folder)
    stack.run("stack", "down")
    time.sleep(0.5)
    assert _marked(folder) == [] and [p for p in ports.values() if tcp_open(f"127.0.0.1:{p}")] == []
    status = stack.run("stack", "status", check=False)
    assert status.returncode == 3 and "DOWN" in status.stdout
    for command in (["registry"], ["train"]):
        done = stack.run(*command, check=False)
        assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
        assert f"127.0.0.1:{ports['mlflow']}" in done.stderr or f"127.0.0.1:{ports['prefect']}" in done.stderr


def _marked(folder: StackFolder) -> list[int]:
    from vggflow.marked_processes import processes_marked

    return processes_marked(MARKER, folder.state["id"])

"""The promotion gate, manual registry commands and the self-contained model, against a real
MLflow sqlite store (no Prefect needed: the gate's functions are called directly)."""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("keras")

from tests.conftest import write_dataset
from vggflow.config import Config, HeadConfig, RegistryConfig
from vggflow.images import load_rgb
from vggflow.model import build_base, build_classifier, resolve_weights
from vggflow.ports import free_port
from vggflow.promotion import RegisteredVersion
from vggflow.registry import CHALLENGER, CHAMPION, PREVIOUS, promotion_lock, rollback
from vggflow.scoring import score
from vggflow.tasks.features import compute_features
from vggflow.tasks.promote import promote_if_better
from vggflow.tasks.register import input_example, log_classifier, register_version
from vggflow.tasks.train_head import train_head_on_features as train_head
from vggflow.tracking import connect
from vggflow.validation import validate_dataset

pytestmark = pytest.mark.slow
NAME = "vgg19-classifier"


class Lab:
    """A dataset, its validated rows, and helpers to make, register and gate tiny classifiers."""

    def __init__(self, root: Path, data_dir: Path) -> None:
        self.root, self.data_dir = root, data_dir
        cfg = Config()
        self.cfg = cfg.model_copy(
            update={"tracking": cfg.tracking.model_copy(update={"artifact_root": root / "artifacts"})}
        )
        self.client, self.experiment_id = connect(self.cfg.tracking)
        self.weights = resolve_weights(
            self.cfg.backbone.model_copy(update={"weights": "none", "image_size": 32}), root / "cache", 7
        )
        self.predicted: dict[str, list[str]] = {}
        self.refresh_rows()

    def refresh_rows(self) -> None:
        result = validate_dataset(self.data_dir, self.cfg.data, self.cfg.validation)
        self.rows = result.usable.reset_index(drop=True)
        self.classes = sorted(self.rows["label"].unique())
        self.test_rows = self.rows[self.rows["split"] == "test"]

    def trained_checkpoint(self, epochs: int) -> Path:
        features = compute_features(
            self.rows,
            self.data_dir,
            self.weights,
            32,
            16,
            self.root / "cache",
            f"fp-{len(self.rows)}",
            [],
            self.classes,
        )
        head = HeadConfig(dense_units=16, epochs=epochs, patience=epochs, learning_rate=1e-2)
        return train_head(
            features, self.weights, 32, head, 0, self.root / f"trained-{epochs}-{len(self.rows)}.keras"
        ).checkpoint

    def constant_checkpoint(self, label: str) -> Path:
        """A classifier that answers ``label`` for every image."""
        model = build_classifier(build_base(self.weights, 32), len(self.classes), HeadConfig(dense_units=4), 32)
        kernel, bias = model.get_layer("predictions").get_weights()
        bias[:] = -100.0
        bias[self.classes.index(label)] = 100.0
        model.get_layer("predictions").set_weights([kernel * 0, bias])
        path = self.root / f"constant-{label}.keras"
        model.save(path)
        return path

    def keras_predictions(self, checkpoint: Path, rows: pd.DataFrame) -> list[str]:
        import keras

        model = keras.saving.load_model(checkpoint)
        images = np.stack([load_rgb(self.data_dir / p) for p in rows["path"]]).astype(np.float32)
        return [self.classes[i] for i in np.asarray(model.predict_on_batch(images)).argmax(axis=1)]

    def keras_metrics(self, checkpoint: Path, rows: pd.DataFrame) -> dict[str, float]:
        index = {c: i for i, c in enumerate(self.classes)}
        predicted = np.array([index[label] for label in self.keras_predictions(checkpoint, rows)])
        return score(rows["label"].map(index).to_numpy(), predicted, len(self.classes))[0]

    def register(self, checkpoint: Path) -> tuple[RegisteredVersion, dict[str, float]]:
        run_id = self.client.create_run(self.experiment_id).info.run_id
        example = input_example(self.data_dir / self.rows["path"].iloc[0])
        uri = log_classifier(run_id, checkpoint, self.classes, 32, self.root / run_id, example)
        self.predicted[run_id] = self.keras_predictions(checkpoint, self.test_rows)
        metrics = self.keras_metrics(checkpoint, self.test_rows)
        return register_version(
            uri, RegistryConfig(), run_id, {"vggflow.test_accuracy": str(metrics["accuracy"])}
        ), metrics

    def right(self) -> list[str]:
        """Predictions that are all right (the test labels)."""
        return list(self.test_rows["label"])

    def wrong(self) -> list[str]:
        """Predictions that are all wrong (the next class of each test label)."""
        return [self.classes[(self.classes.index(label) + 1) % len(self.classes)] for label in self.right()]

    def gate(self, version: RegisteredVersion, predicted: list[str] | None = None, **registry):
        """The gate on the version's own test predictions (or ``predicted``)."""
        cfg = RegistryConfig(thresholds={"accuracy": 0.0}, **registry)
        predicted = predicted if predicted is not None else self.predicted[version.run_id]
        return promote_if_better(
            self.client, cfg, version.version, predicted, version.run_id, self.test_rows, self.data_dir, self.classes, 8
        )

    def alias(self, alias: str) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(NAME, alias).version)
        except Exception:
            return None


@pytest.fixture
def lab(project: Path) -> Lab:
    return Lab(project, write_dataset(project / "data", classes=3, per_class=12))


def test_gate_promotes_rejects_promotes_and_rolls_back(lab: Lab) -> None:
    import mlflow.artifacts

    shares = lab.test_rows["label"].value_counts()
    common, rare = shares.idxmax(), shares.idxmin()

    first, first_metrics = lab.register(lab.constant_checkpoint(common))
    decision = lab.gate(first)
    assert decision.promoted and "no champion yet" in decision.reason
    assert lab.alias(CHAMPION) == first.version

    worse, worse_metrics = lab.register(lab.constant_checkpoint(rare))
    decision = lab.gate(worse)
    assert not decision.promoted and decision.delta <= 0
    assert "does not beat champion" in decision.reason
    assert lab.alias(CHAMPION) == first.version and lab.alias(CHALLENGER) == worse.version
    tags = lab.client.get_model_version(NAME, worse.version).tags
    assert tags["vggflow.rejection_reason"] == decision.reason
    logged = mlflow.artifacts.load_dict(f"runs:/{worse.run_id}/promotion/decision.json")
    assert logged["promoted"] is False and logged["champion_version"] == first.version

    better, better_metrics = lab.register(lab.trained_checkpoint(epochs=40))
    assert better_metrics["accuracy"] > first_metrics["accuracy"]
    decision = lab.gate(better)
    assert decision.promoted and decision.delta > 0
    assert lab.alias(CHAMPION) == better.version and lab.alias(PREVIOUS) == first.version

    # --no-promote: registered and evaluated, aliases untouched.
    untouched, untouched_metrics = lab.register(lab.trained_checkpoint(epochs=40))
    decision = lab.gate(untouched, promote=False)
    assert not decision.promoted and "--no-promote" in decision.reason
    assert lab.alias(CHAMPION) == better.version and lab.alias(CHALLENGER) == worse.version

    record = rollback(lab.client, NAME, promotion_lock(lab.root), "wrong labels in the new photos")
    assert (record.rolled_back_version, record.restored_version) == (better.version, first.version)
    assert lab.alias(CHAMPION) == first.version and lab.alias(PREVIOUS) == better.version


def test_champion_is_re_evaluated_on_the_candidates_test_split(lab: Lab) -> None:
    champion_checkpoint = lab.trained_checkpoint(epochs=3)
    champion, champion_metrics = lab.register(champion_checkpoint)
    lab.gate(champion)

    # New images arrive: the candidate's test split differs from the champion's.
    write_dataset(lab.data_dir, classes=3, per_class=10, start=100)
    old_test = set(lab.test_rows["path"])
    lab.refresh_rows()
    assert set(lab.test_rows["path"]) != old_test and old_test <= set(lab.test_rows["path"])
    candidate, candidate_metrics = lab.register(lab.trained_checkpoint(epochs=40))
    decision = lab.gate(candidate)

    on_new_split = lab.keras_metrics(champion_checkpoint, lab.test_rows)["accuracy"]
    assert decision.champion_value == pytest.approx(on_new_split)
    assert decision.delta == pytest.approx(candidate_metrics["accuracy"] - on_new_split)


def test_registered_model_round_trips_raw_images_in_a_plain_process(lab: Lab) -> None:
    checkpoint = lab.trained_checkpoint(epochs=5)
    version, _ = lab.register(checkpoint)
    lab.gate(version, lab.right())
    paths = [str(lab.data_dir / p) for p in lab.test_rows["path"][:4]]
    images = np.stack([load_rgb(p) for p in paths])
    np.save(lab.root / "images.npy", images)
    # A fresh interpreter that never imports vggflow: the model must carry everything it needs, and
    # describe itself (a full signature, an input example) without MLflow's "add type hints" advice.
    script = f"""
import json, sys, numpy as np, mlflow
model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
out = model.predict(np.load("images.npy"))
imported = [m for m in sys.modules if m == "vggflow" or m.startswith(("vggflow.", "tasks.", "flows."))]
assert not imported, imported
info = mlflow.models.get_model_info("models:/{NAME}@champion")
example = mlflow.models.Model.load("models:/{NAME}@champion").load_input_example()
print(json.dumps({{"labels": list(out["label"]), "probabilities": list(out["probabilities"]),
                  "signature": info.signature.to_dict(), "example": [str(example.dtype), list(example.shape)],
                  "example_labels": list(model.predict(example)["label"])}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=lab.root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "type hint" not in done.stderr, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    outputs = json.loads(result["signature"]["outputs"])
    assert [o["name"] for o in outputs] == ["label", "confidence", "probabilities"]
    assert set(outputs[2]["properties"]) == set(lab.classes)
    assert json.loads(result["signature"]["inputs"])[0]["tensor-spec"] == {"dtype": "uint8", "shape": [-1, -1, -1, 3]}
    assert result["example"][0] == "uint8" and result["example"][1][0] == 1 and result["example"][1][3] == 3
    assert result["example_labels"][0] in lab.classes
    import keras

    expected = np.asarray(keras.saving.load_model(checkpoint).predict_on_batch(images.astype(np.float32)))
    got = np.array([[p[c] for c in lab.classes] for p in result["probabilities"]])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert result["labels"] == [lab.classes[i] for i in expected.argmax(axis=1)]
    # The same logged model is also a Keras-flavour model: the classifier itself.
    import mlflow

    keras_model = mlflow.keras.load_model(f"models:/{NAME}@champion")
    np.testing.assert_allclose(keras_model.predict_on_batch(images.astype(np.float32)), expected, atol=1e-6)


def test_served_model_answers_http_invocations(lab: Lab) -> None:
    import requests

    version, metrics = lab.register(lab.trained_checkpoint(epochs=5))
    lab.gate(version)
    port = free_port()
    venv_bin = Path(sys.executable).parent
    # `mlflow models serve` execs `uvicorn` from PATH: the venv's bin must be on it.
    env = os.environ | {"PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        [
            str(venv_bin / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{NAME}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        cwd=lab.root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        else:
            pytest.fail("the model server did not become ready in 240 s")
        images = np.stack([load_rgb(lab.data_dir / p) for p in lab.test_rows["path"][:3]])
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": images.tolist()}, timeout=120)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert len(predictions) == 3
        for row in predictions:
            assert row["label"] in lab.classes
            assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
            assert row["confidence"] == pytest.approx(max(row["probabilities"].values()))
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def test_registry_promote_and_rollback_commands(lab: Lab, capsys) -> None:
    from vggflow.cli import main

    first, _ = lab.register(lab.constant_checkpoint(lab.classes[0]))
    lab.gate(first)
    second, _ = lab.register(lab.constant_checkpoint(lab.classes[1]))
    lab.gate(second, lab.wrong())
    assert lab.alias(CHALLENGER) == second.version

    assert main(["registry"]) == 0
    listing = capsys.readouterr().out
    assert f"{NAME} (" in listing and "champion" in listing and "challenger" in listing

    assert main(["promote", second.version, "--reason", "hand-checked on new photos"]) == 0
    assert lab.alias(CHAMPION) == second.version and lab.alias(PREVIOUS) == first.version
    assert lab.alias(CHALLENGER) is None
    tags = lab.client.get_model_version(NAME, second.version).tags
    assert tags["vggflow.manual_promotion_reason"] == "hand-checked on new photos"

    assert main(["rollback", "--reason", "complaints about shoes"]) == 0
    assert lab.alias(CHAMPION) == first.version and lab.alias(PREVIOUS) == second.version
    assert "rolled back from" in capsys.readouterr().out
    record = json.loads(lab.client.get_model_version(NAME, second.version).tags["vggflow.rollback"])
    assert record["reason"] == "complaints about shoes" and record["restored_version"] == first.version
    assert record["by"].startswith(f"{getpass.getuser()}@")
    assert main(["registry"]) == 0
    assert "last rollback: v" + second.version in capsys.readouterr().out
    assert main(["registry", "--json"]) == 0  # the same, for scripts: one JSON document
    listed = json.loads(capsys.readouterr().out)
    assert listed["model"] == NAME and [v["version"] for v in listed["versions"]] == [second.version, first.version]
    assert listed["versions"][1]["aliases"] == [CHAMPION] and listed["versions"][0]["aliases"] == [PREVIOUS]
    assert listed["versions"][0]["rollback"]["reason"] == "complaints about shoes"
    assert listed["last_rollback"]["rolled_back_version"] == second.version
    assert isinstance(listed["versions"][1]["test_metrics"]["accuracy"], float)
    assert main(["rollback", "--reason", "undo: the complaints were about another app"]) == 0  # an undo
    assert "vggflow.rollback" not in lab.client.get_model_version(NAME, second.version).tags
    capsys.readouterr()

    assert main(["promote", "99", "--reason", "typo"]) == 1
    assert "has no version 99" in capsys.readouterr().err


def test_predict_command_labels_files_and_stops_quietly_when_its_reader_goes(lab: Lab) -> None:
    """`vggflow predict` as a user runs it (the console script, the champion), also piped into
    `head`: a closed stdout ends it with the shell's SIGPIPE code (141), not a traceback."""
    first, metrics = lab.register(lab.trained_checkpoint(epochs=5))
    lab.gate(first)
    vggflow = str(Path(sys.executable).with_name("vggflow"))
    folder = lab.data_dir / lab.classes[0]
    (folder / "notes.txt").write_text("not an image")

    done = subprocess.run(
        [vggflow, "predict", str(folder), "--top-k", "2"], cwd=lab.root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(list(folder.glob("*.png")))
    path, ranked = lines[0].split("\t")
    assert Path(path).parent == folder and ranked.split()[0] in lab.classes and len(ranked.split()) == 4
    assert "notes.txt\tERROR not_an_image" in done.stderr and "1 file(s) could not be read" in done.stderr
    as_json = subprocess.run(
        [vggflow, "predict", str(folder), "--top-k", "2", "--json"], cwd=lab.root, capture_output=True, text=True
    )
    assert as_json.returncode == 0, as_json.stderr
    items = {item["path"]: item for item in json.loads(as_json.stdout)}  # one document, unreadable files included
    unreadable = items.pop(str(folder / "notes.txt"))
    assert unreadable["label"] is None and unreadable["error"].startswith("not_an_image")
    assert {path: item["label"] for path, item in items.items()} == {
        line.split("\t")[0]: line.split("\t")[1].split()[0] for line in lines
    }
    assert all(len(item["top_k"]) == 2 and item["error"] is None for item in items.values())

    many = lab.root / "many"
    many.mkdir()
    image = next(folder.glob("*.png"))
    for i in range(1000):  # several flushes of stdout's 8 KB buffer: the later ones fail
        (many / f"{i:05d}.png").symlink_to(image)
    reader = subprocess.Popen(
        [vggflow, "predict", str(many)], cwd=lab.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert reader.stdout.readline().startswith(str(many))
    reader.stdout.close()  # as `head -1` does
    _, err = reader.communicate(timeout=300)
    assert reader.returncode == 141 and "Traceback" not in err, err


def test_test_set_scores_are_reused_only_for_the_same_model_and_test_images(lab: Lab, capsys) -> None:
    """A re-run that chose the same checkpoint (or meets the same champion) on the same data
    does not score the test set again; another checkpoint, champion or data version does."""
    from mlflow.tracking import MlflowClient

    from vggflow.config import EvaluateConfig
    from vggflow.tasks.evaluate import evaluate_classifier

    scores, cfg = lab.root / "scores", EvaluateConfig(batch_size=8)
    trained = lab.trained_checkpoint(epochs=5)

    def evaluate(checkpoint: Path, fingerprint: str, name: str):
        return evaluate_classifier(
            checkpoint, lab.test_rows, lab.data_dir, lab.classes, cfg, lab.root / name, scores / fingerprint
        )

    first = evaluate(trained, "data-1", "first")
    again = evaluate(trained, "data-1", "again")
    assert not first.scores_reused and first.seconds > 0
    assert again.scores_reused and again.seconds == 0 and again.metrics == first.metrics
    assert (lab.root / "again" / "confusion_matrix.png").is_file()  # the report is still written
    assert not evaluate(trained, "data-2", "new-data").scores_reused
    assert not evaluate(lab.constant_checkpoint(lab.classes[0]), "data-1", "other-model").scores_reused
    for f in scores.glob("*/*.npy"):
        f.write_bytes(f.read_bytes()[:20])  # damaged: scored again, same numbers
    repaired = evaluate(trained, "data-1", "repaired")
    assert not repaired.scores_reused and repaired.metrics == first.metrics

    champion, metrics = lab.register(trained)
    lab.gate(champion)
    candidate, candidate_metrics = lab.register(lab.constant_checkpoint(lab.classes[1]))

    def gate(fingerprint: str):
        return promote_if_better(
            MlflowClient(),
            RegistryConfig(thresholds={"accuracy": 0.0}, promote=False),
            candidate.version,
            lab.predicted[candidate.run_id],
            candidate.run_id,
            lab.test_rows,
            lab.data_dir,
            lab.classes,
            8,
            scores / fingerprint,
        )

    capsys.readouterr()
    decisions = [gate("data-1"), gate("data-1"), gate("data-2")]
    reused = [line for line in capsys.readouterr().out.splitlines() if "reused its" in line]
    assert len(reused) == 1 and f"models:/{NAME}/{champion.version}" in reused[0]
    assert decisions[0].champion_value == decisions[1].champion_value == decisions[2].champion_value is not None

"""The command line as a user meets it: help everywhere, clear errors with exit codes, no tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_dataset
from vggflow.cli import build_parser, main

VGGFLOW = [sys.executable, "-m", "vggflow.cli"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*VGGFLOW, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_every_subcommand_has_help(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"train", "validate", "registry", "promote", "rollback", "predict", "config"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: vggflow " + name in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["train", "--set", "head.epoks=3"], 78, "head.epoks: unknown key"),
        (["train", "--set", "backbone.image_size=8"], 78, "backbone.image_size"),
        (["train", "--config", "missing.yaml"], 78, "config file not found: missing.yaml"),
        (["train", "--data", "no/such/folder"], 2, "data folder not found: no/such/folder"),
        (["validate", "no/such/folder"], 2, "no/such/folder"),
        (["train", "--epochs", "3"], 64, "unrecognized arguments: --epochs"),
        (["validate"], 64, "the following arguments are required: DATA_DIR"),
        (["rollback"], 64, "the following arguments are required: --reason"),
    ],
)
def test_bad_input_gives_a_clear_error_and_exit_code(project, args, code, message):
    done = run(*args, cwd=project)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_registry_commands_on_a_missing_store_say_where_they_looked_and_create_nothing(project, capsys, monkeypatch):
    """A mistyped store path must not look like an empty registry, nor leave an empty store behind."""
    typo = project / "mlfow" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlfow/mlflow.db")
    for args, hint in (
        (["registry"], "run `vggflow train` first"),
        (["predict", "photo.jpg"], "Or pass --model with a saved model folder"),
        (["promote", "1", "--reason", "looks good"], "run `vggflow train` first"),
        (["rollback", "--reason", "bad"], "run `vggflow train` first"),
    ):
        assert main(args) == 3, args
        err = capsys.readouterr().err
        assert f"the MLflow tracking store {typo} does not exist" in err and hint in err, err
        assert "MLFLOW_TRACKING_URI = sqlite:///mlfow/mlflow.db" in err
    assert list(project.iterdir()) == []


def test_unwritable_tracking_store_is_refused_before_any_work(project, tiny_dataset, monkeypatch):
    blocker = project / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    done = run("train", "--data", str(tiny_dataset), "--set", "backbone.weights=none", cwd=project)
    assert done.returncode == 3, done.stderr
    assert "tracking store" in done.stderr and "Traceback" not in done.stderr


def test_validate_command_writes_the_report_and_sets_the_exit_status(project):
    data = write_dataset(project / "data", classes=2, per_class=6)
    report = project / "out" / "report.json"
    done = run("validate", str(data), "--report", str(report), cwd=project)
    assert done.returncode == 0, done.stderr
    summary = json.loads(report.read_text())["summary"]
    assert summary["n_valid"] == 12 and summary["classes"] == {"class_0": 6, "class_1": 6}
    single = write_dataset(project / "single", classes=1, per_class=6)
    done = run("validate", str(single), "--report", str(project / "single.json"), cwd=project)
    assert done.returncode == 2 and "Traceback" not in done.stderr


#: Where users read suggested commands: messages, docstrings, configs and docs.
SUGGESTING = ["vggflow", "tasks", "flows", "configs", "docs", "benchmarks", "scripts"]
SUGGESTING_FILES = ["README.md", "BENCHMARKS.md", "DATA.md", "prefect.yaml", "Makefile", "dvc.yaml"]
#: The tools whose suggested command lines are checked against the tool's own parser.
CHECKED_TOOLS = ("vggflow", "dvc", "mlflow", "make")


def suggested_commands() -> list[tuple[str, str]]:
    """Every `vggflow …`, `dvc …`, `mlflow …` and `make …` command line quoted in backticks, with where it was found.

    A quoted shell line is split at ``&&``, ``;`` and ``|`` into its commands.
    """
    root = Path(__file__).resolve().parents[1]
    paths = [root / name for name in SUGGESTING_FILES if (root / name).exists()]
    for folder in SUGGESTING:
        paths += [p for p in sorted((root / folder).rglob("*")) if p.suffix in (".py", ".md", ".yaml", ".yml")]
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for quoted in re.findall(r"`([^`]+)`", line):
                for command in re.split(r"&&|;|\|", quoted):
                    command = command.strip()
                    if command.split(" ")[0] in CHECKED_TOOLS and " " in command:
                        found.append((command, f"{path.relative_to(root)}:{number}"))
    return found


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def argparse_problem(parser: argparse.ArgumentParser, words: list[str]) -> str | None:
    """Why ``words`` (after the program name) is not a command of ``parser``, or None.

    Subcommands are followed while the parser has them; every option must belong to one of the
    parsers on the way (or be a global one).
    """
    known = {o for action in parser._actions for o in action.option_strings}
    node = parser
    for word in words:
        if word.startswith("-") or "{" in word or "…" in word:
            continue
        choices = _subcommands(node)
        if not choices:
            break
        if word not in choices:
            return f"no subcommand {word!r}"
        node = choices[word]
        known |= {o for action in node._actions for o in action.option_strings}
    if _subcommands(node) and not any(w.startswith("-") for w in words):  # `vggflow --help` is fine
        return "a command group, not a command"
    unknown = [w.split("=")[0] for w in words if w.startswith("-") and w.split("=")[0] not in known]
    return f"unknown options {unknown}" if unknown else None


def make_targets() -> set[str]:
    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.MULTILINE))


def command_problem(command: str) -> str | None:
    """Why a suggested command line does not exist, or None."""
    words = shlex.split(command.replace("[", " ").replace("]", " "))
    tool, rest = words[0], words[1:]
    if "{" in rest[0] or "…" in rest[0]:  # a template such as `vggflow {command}`
        return None
    if tool == "vggflow":
        return argparse_problem(build_parser(), rest)
    if tool == "dvc":
        from dvc.cli.parser import get_main_parser

        return argparse_problem(get_main_parser(), rest)
    if tool == "make":
        missing = sorted(set(w for w in rest if not w.startswith("-") and "=" not in w) - make_targets())
        return f"no make target {missing}" if missing else None
    import mlflow.cli

    group = mlflow.cli.cli
    for word in rest:
        if word.startswith("-") or not hasattr(group, "commands"):
            break
        if word not in group.commands:
            return f"no subcommand {word!r}"
        group = group.commands[word]
    return None


def test_every_suggested_command_and_option_exists():
    """A message, docstring or doc that suggests `vggflow SUB --option` (or a dvc, mlflow or make
    command) names a real command and real options."""
    found = suggested_commands()
    assert any(command.startswith("vggflow config") for command, _ in found)
    assert {command.split()[0] for command, _ in found} == set(CHECKED_TOOLS)
    wrong = [f"{where}: `{command}`: {problem}" for command, where in found if (problem := command_problem(command))]
    assert wrong == []


def test_the_command_checker_catches_what_does_not_exist():
    assert command_problem("vggflow config --show") == "unknown options ['--show']"
    assert command_problem("vggflow lineages 3") == "no subcommand 'lineages'"
    assert command_problem("dvc exp run -S head.learning_rate=0.01") is None
    assert command_problem("dvc exp runs") == "no subcommand 'runs'"
    assert command_problem("dvc metrics") == "a command group, not a command"
    assert command_problem("make demo") is None and command_problem("make deploy") == "no make target ['deploy']"
    assert command_problem("mlflow models serve -m x") is None and command_problem("mlflow serve") is not None


def test_version_verbosity_and_completion(capsys):
    from vggflow.runtime import installed_version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"vggflow {installed_version()}\n"
    parser = build_parser()
    assert parser.parse_args(["-q", "config"]).verbosity == -1
    assert parser.parse_args(["config", "-v"]).verbosity == 1  # after the command too
    assert parser.parse_args(["config"]).verbosity == 0
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "lineage" in script and "--no-promote" in script and "--json" in script
    assert main(["completion", "zsh"]) == 0 and "#compdef vggflow" in capsys.readouterr().out


VERBOSITY_PROBE = """
import json, logging, os, sys
from vggflow.cli import main
from vggflow import progress
assert main([*sys.argv[1:], "config"]) == 0
names = ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "PREFECT_LOGGING_LEVEL", "MLFLOW_LOGGING_LEVEL")
print(json.dumps({"env": {n: os.environ.get(n) for n in names}, "progress": progress._SETTINGS}))
"""


@pytest.mark.parametrize(
    ("flags", "env", "settings"),
    [
        ([], {}, {"bars": None, "every_epoch": False}),
        (
            ["-q"],
            {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING", "MLFLOW_LOGGING_LEVEL": "WARNING"},
            {"bars": False, "every_epoch": False},
        ),
        (["-v"], {"PREFECT_LOGGING_LEVEL": "DEBUG"}, {"bars": None, "every_epoch": True}),
    ],
)
def test_quiet_and_verbose_set_the_logs_and_progress_of_what_the_command_runs(tmp_path, flags, env, settings):
    """-q: Prefect's and MLflow's console logs from WARNING, no bars; -v: Prefect's DEBUG logs, a line per epoch."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_LOGGING", "MLFLOW_LOGGING"))}
    done = subprocess.run(
        [sys.executable, "-c", VERBOSITY_PROBE, *flags], cwd=tmp_path, env=clean, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert {k: v for k, v in state["env"].items() if v is not None} == env and state["progress"] == settings


def test_validate_json_is_one_document_on_stdout(project):
    data = write_dataset(project / "data", classes=2, per_class=6)
    done = run("validate", str(data), "--json", cwd=project)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["ok"] and document["summary"]["n_valid"] == 12 and Path(document["files"]["report"]).is_file()
    single = write_dataset(project / "single", classes=1, per_class=6)
    done = run("validate", str(single), "--json", cwd=project)
    assert done.returncode == 2 and json.loads(done.stdout)["errors"]


def test_config_command_prints_the_effective_config(capsys):
    assert main(["config", "--set", "head.epochs=3"]) == 0
    assert "epochs: 3" in capsys.readouterr().out


def test_console_script_exit_runs_cleanup_flushes_output_and_keeps_the_exit_code(tmp_path):
    """`console()` skips the interpreter's teardown, never the exit work a command relies on."""
    script = (
        "import atexit, sys, threading, time\n"
        "from vggflow.cli import console\n"
        "atexit.register(lambda: print('atexit handler ran', flush=True))\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), print('worker thread finished'))).start()\n"
        "sys.argv = ['vggflow', *sys.argv[1:]]\n"
        "console()\n"
    )
    ok = subprocess.run(
        [sys.executable, "-c", script, "config"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    # The whole config, flushed (the worker thread may print before or after it).
    assert "seed: 42" in lines and "  deployment_name: nightly" in lines
    assert lines[-1] == "atexit handler ran" and "worker thread finished" in lines  # threads first, then atexit

    bad = subprocess.run(
        [sys.executable, "-c", script, "train", "--set", "head.epoks=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 78 and "head.epoks: unknown key" in bad.stderr
    assert bad.stdout.splitlines()[-1] == "atexit handler ran"


def test_tensorflow_start_up_noise_is_dropped_and_everything_else_on_stderr_is_kept(capfd):
    """TensorFlow's C++ code writes its CPU-only start-up lines (one says "CUDA error") straight to
    file descriptor 2, ignoring TF_CPP_MIN_LOG_LEVEL; only those lines are dropped."""
    import os

    from vggflow.runtime import stderr_without_tensorflow_noise

    noise = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1795924570.439301   24263 port.cc:153] oneDNN custom operations are on. You may see ...\n"
        "I0000 00:00:1795924570.439685   24263 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU "
        "will not be used.\n"
        "E0000 00:00:1795924573.291042   24263 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
        "Failed call to cuInit: UNKNOWN ERROR (303)\n"
    )
    with stderr_without_tensorflow_noise():
        os.write(2, noise.encode())
        os.write(2, b"E0000 00:00:1.0 1 some_kernel.cc:1] a real problem\n")
        print("a Python warning", file=sys.stderr)
    out, err = capfd.readouterr()
    # (pytest's own capture of sys.stderr may order the Python line first)
    assert sorted(err.splitlines()) == ["E0000 00:00:1.0 1 some_kernel.cc:1] a real problem", "a Python warning"]
    os.write(2, b"after\n")  # file descriptor 2 is restored
    assert capfd.readouterr().err == "after\n"


def test_quiet_tensorflow_import_prints_no_start_up_noise():
    code = "from vggflow.runtime import import_tensorflow_quietly; import_tensorflow_quietly(); print('imported')"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr
    assert (
        "cuInit" not in done.stderr and "absl::InitializeLog" not in done.stderr and "cuda drivers" not in done.stderr
    )


def test_imports_without_gc_pauses_the_collector_then_freezes_what_it_created():
    """The short commands import MLflow/TensorFlow under it (benchmarks/results/cli.md)."""
    import gc

    from vggflow.runtime import imports_without_gc

    collections: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    frozen_before = gc.get_freeze_count()
    try:
        with imports_without_gc():
            assert not gc.isenabled()
            for _ in range(50_000):  # far past the threshold that would start a collection
                cycle: list = []
                cycle.append(cycle)
        assert collections == []
        assert gc.isenabled() and gc.get_freeze_count() >= frozen_before + 50_000
        gc.disable()
        with imports_without_gc():
            pass
        assert not gc.isenabled()  # a caller's disabled collector stays disabled
    finally:
        gc.callbacks.remove(count)
        gc.enable()
        gc.unfreeze()


def test_flow_runs_on_the_temporary_prefect_server_print_no_view_at_link(tmp_path):
    """That server serves no UI and ends with the command: Prefect's "View at <url>" would point nowhere."""
    script = (
        "import os, uuid\n"
        "os.environ.pop('PREFECT_API_URL', None)\n"
        "from vggflow.warmup import start_local_prefect_server\n"
        "server = start_local_prefect_server()\n"
        "from prefect.client.schemas.objects import FlowRun\n"
        "from prefect.utilities.urls import url_for\n"
        "print(url_for(FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name='run')))\n"
        "server.stop()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr
    from vggflow.cli.summary import format_training_summary
    from vggflow.promotion import Decision
    from vggflow.summary import TrainingSummary

    decision = Decision(
        promoted=True, reason="no champion yet", model_name="m", candidate_version="1", primary_metric="accuracy",
        candidate_value=0.9, min_delta=0.0, thresholds={},
    )  # fmt: skip
    summary = TrainingSummary(
        run_id="r", experiment_id="1", tracking_uri="sqlite:///m.db", data_version="d", data_matches_dvc=True,
        freeze_configuration={"stage": "head", "first_trainable_layer": "head_dense", "trainable_layers": 2,
                              "trainable_params": 10, "learning_rate": 0.001},
        stages=[], skipped_stages=[], test_metrics={"accuracy": 0.9}, model_name="m", model_version="1",
        model_uri="models:/m-1", decision=decision, random_init=False, weights_note="", validation_summary="",
        report_dir="r",
    )  # fmt: skip
    assert "temporary server" in format_training_summary(summary, temporary_prefect_server=True)
    assert "temporary server" not in format_training_summary(summary)

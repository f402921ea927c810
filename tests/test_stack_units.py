"""The stack's pieces that need no server: config, ports, credentials files, the lock's errors,
processes stopped from another process and found by their marker, the model card's length."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vggflow.cli import main
from vggflow.config import StackConfig, load_config
from vggflow.errors import ConfigError, TrackingError
from vggflow.marked_processes import processes_marked, signal_processes
from vggflow.ports import free_port
from vggflow.processes import SupervisedProcess, group_members, stop_process_group
from vggflow.stack import client, objectstore, postgres
from vggflow.stack.folder import StackFolder


def test_stack_ports_keep_defaults_for_services_left_out_and_a_lock_url_holds_no_password() -> None:
    cfg = load_config(None, ["stack.ports={mlflow: 25500}"], environ={})
    assert cfg.stack.ports["mlflow"] == 25500 and cfg.stack.ports["postgres"] == 15432
    with pytest.raises(ConfigError, match="stack.ports"):
        load_config(None, ["stack.ports={s3: 80}"], environ={})
    with pytest.raises(ConfigError, match="must not contain a password"):
        load_config(None, ["registry.lock_url=postgresql://u:secret@127.0.0.1:5432/db"], environ={})
    assert load_config(None, ["registry.lock_url=postgresql://u@h:1/db"], environ={}).registry.lock_url


def test_a_taken_port_moves_to_the_next_free_one(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        folder = StackFolder(StackConfig(dir=tmp_path / "stack", ports={"mlflow": taken}))
        said: list[str] = []
        folder.choose_ports(said.append)
    # Only mlflow's line: another stack running beside the tests may hold other default ports.
    assert folder.ports["mlflow"] > taken and [line for line in said if line.startswith("mlflow:")] == [
        f"mlflow: port {taken} is taken on 127.0.0.1, using {folder.ports['mlflow']}"
    ]
    assert StackFolder(StackConfig(dir=tmp_path / "stack")).ports == folder.ports  # recorded for the next `up`


def test_credentials_are_private_files_and_the_client_settings_hold_none(tmp_path: Path) -> None:
    folder = StackFolder(StackConfig(dir=tmp_path / "stack"))
    folder.choose_ports(lambda line: None)
    folder.secret("postgres_lock", lambda: "lock-password-123")
    objectstore.keys(folder)
    env_file = client.write_files(folder)
    for path in [folder.secrets_file, *client.files(folder).values()]:
        assert path.stat().st_mode & 0o777 == 0o600
    text = env_file.read_text() + client.env_text(folder)
    assert not [value for value in folder.secrets.values() if value in text]
    assert "PGPASSFILE=" in text and f"VGGFLOW__REGISTRY__LOCK_URL={postgres.lock_url(folder)}" in text
    assert "lock-password-123" in client.files(folder)["pgpass"].read_text()


def test_status_and_env_without_a_stack_say_so(tmp_path: Path, capsys) -> None:
    assert main(["stack", "env", "--set", f"stack.dir={tmp_path / 'none'}"]) == 3
    assert "no stack in" in capsys.readouterr().err
    assert main(["stack", "status", "--set", f"stack.dir={tmp_path / 'none'}"]) == 3
    assert main(["stack", "down", "--set", f"stack.dir={tmp_path / 'none'}"]) == 0


def test_the_commands_printed_after_up_find_the_same_stack() -> None:
    from argparse import Namespace

    from vggflow.cli.stack import same_stack_command

    args = Namespace(config="team.yaml", overrides=["stack.dir=/srv/my stack", "head.epochs=3"])
    assert same_stack_command(args, "env") == "vggflow stack env --config team.yaml --set 'stack.dir=/srv/my stack'"
    assert same_stack_command(Namespace(config=None, overrides=[]), "down") == "vggflow stack down"


def test_an_unreachable_lock_database_is_one_message_naming_it() -> None:
    from vggflow.locks import AdvisoryLock

    port = free_port()
    with pytest.raises(TrackingError, match=f"PostgreSQL at 127.0.0.1:{port}") as caught:
        with AdvisoryLock(f"postgresql://nobody@127.0.0.1:{port}/locks", "x"):
            pass
    assert caught.value.exit_code == 3


def test_a_service_outlives_its_starter_and_is_stopped_and_found_from_elsewhere(tmp_path: Path) -> None:
    marker = f"test-{os.getpid()}-{time.time_ns()}"
    starter = (
        "import sys, time\n"
        "from vggflow.processes import SupervisedProcess\n"
        "service = SupervisedProcess([sys.executable, '-c', 'import subprocess, sys, time; "
        'subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(600)"]); time.sleep(600)\'],'
        " name='service', die_with_parent=False, log_path=sys.argv[2],"
        " env=dict(__import__('os').environ, VGGFLOW_TEST_MARK=sys.argv[1]))\n"
        "print(service.start().pid, flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", starter, marker, tmp_path / "log"], capture_output=True, text=True, timeout=60
    )
    pgid = int(done.stdout)  # the starter has exited; its service runs on

    def child_left_the_group() -> bool:  # marked from its start, but out of the group only once setsid() ran
        marked = processes_marked("VGGFLOW_TEST_MARK", marker)
        return len(marked) == 2 and len(set(marked) - set(group_members(pgid))) == 1

    deadline = time.monotonic() + 20
    while not child_left_the_group() and time.monotonic() < deadline:
        time.sleep(0.1)
    marked = processes_marked("VGGFLOW_TEST_MARK", marker)
    assert group_members(pgid) and len(marked) == 2  # the service, and a child that left its group
    assert stop_process_group(pgid, grace=5) is False and group_members(pgid) == []
    left = processes_marked("VGGFLOW_TEST_MARK", marker)
    assert len(left) == 1  # only the marker finds the one that left the group
    signal_processes(left, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while processes_marked("VGGFLOW_TEST_MARK", marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_marked("VGGFLOW_TEST_MARK", marker) == []


def test_running_as_another_user_needs_root() -> None:
    from vggflow.processes import ProcessError, run_as

    assert run_as(None) == {}
    with pytest.raises(ProcessError, match="no system user"):
        run_as("no-such-user-vggflow")
    if os.geteuid() == 0:
        assert run_as("nobody")["extra_groups"] == []
        with SupervisedProcess(["sleep", "30"], name="as nobody", user="nobody") as process:
            time.sleep(0.2)
            assert Path(f"/proc/{process.pid}").stat().st_uid != 0


def test_a_long_model_card_is_cut_at_a_section_for_the_version_description() -> None:
    from vggflow.tasks.model_card import DESCRIPTION_LIMIT, version_description

    card = "# Card\n\n" + "".join(f"## Section {i}\n\n" + "x" * 900 + "\n\n" for i in range(10))
    short = version_description(card)
    assert len(short) <= DESCRIPTION_LIMIT and short.rstrip().endswith("`model_card.md`.)*")
    assert short.count("## Section") == 5 and version_description("# small") == "# small"


def test_shards_are_whole_batches_covering_every_row_once() -> None:
    from vggflow.tasks.features import shard_bounds

    assert shard_bounds(100, 30, 16) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert shard_bounds(5, 1, 8) == [(0, 5)] and shard_bounds(0, 8, 8) == []


def test_a_written_part_that_shows_up_late_is_read_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    import threading

    from vggflow.executors import open_written

    late = tmp_path / "late.npy"
    threading.Timer(0.5, late.write_bytes, args=(b"part",)).start()  # a store that shows the upload late
    with open_written(late.as_uri(), attempts=6, first_wait=0.1) as handle:
        assert handle.read() == b"part"
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        open_written((tmp_path / "never.npy").as_uri(), attempts=3, first_wait=0.05)
    assert time.monotonic() - started >= 0.15  # looked again, waiting in between


def test_assembled_shards_equal_one_array_and_a_corrupt_shard_is_refused(tmp_path: Path) -> None:
    import numpy as np
    import pandas as pd

    from vggflow.feature_cache import LayerWriter, ShardPart, assemble_layers, read_meta, record_layers, verified_arrays

    rows = pd.DataFrame({"path": [f"img{i}.png" for i in range(7)], "label": ["a"] * 7})
    whole = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    parts = []
    for index, (start, stop) in enumerate([(0, 4), (4, 7)]):
        folder = tmp_path / f"shard{index}"
        folder.mkdir()
        writer = LayerWriter(folder, "avg_pool", (stop - start, 3))
        writer.write(whole[start:stop].tobytes())
        writer.close()
        record_layers(folder, rows.iloc[start:stop], [writer])
        sha = read_meta(folder)["layers"]["avg_pool"]["sha256"]
        parts.append(ShardPart(url=str(folder / "avg_pool.npy"), sha256=sha, rows=stop - start))
    cache = tmp_path / "cache"
    assemble_layers(cache, rows, {"avg_pool": parts}, lambda url: open(url, "rb"))
    assert np.array_equal(np.load(cache / "avg_pool.npy"), whole) and verified_arrays(cache, rows) == {"avg_pool"}

    data = bytearray(Path(parts[1].url).read_bytes())
    data[-1] ^= 1
    Path(parts[1].url).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        assemble_layers(tmp_path / "other", rows, {"avg_pool": parts}, lambda url: open(url, "rb"))
    assert not list((tmp_path / "other").glob("*.npy")) and not list((tmp_path / "other").glob(".*"))


def test_an_unreachable_scheduler_or_store_is_named_before_any_work(tmp_path: Path, monkeypatch) -> None:
    from vggflow.errors import ServiceError
    from vggflow.executors import check_executor

    port = free_port()
    cfg = load_config(None, ["features.executor=dask", f"features.dask_address=tcp://127.0.0.1:{port}"], environ={})
    with pytest.raises(ServiceError, match=f"Dask scheduler at tcp://127.0.0.1:{port}"):
        check_executor(cfg.features)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-this-secret")
    cfg = load_config(None, ["features.executor=dask", "features.shard_store=s3://bucket/shards"], environ={})
    with pytest.raises(
        ServiceError, match=f"shard store s3://bucket/shards \\(endpoint http://127.0.0.1:{port}\\)"
    ) as err:
        check_executor(cfg.features)
    assert "not-this-secret" not in str(err.value)
    check_executor(
        load_config(None, [f"features.shard_store={tmp_path}", "features.executor=dask"], environ={}).features
    )


def test_sweep_axes_make_every_combination_and_bad_items_name_themselves() -> None:
    from vggflow.config_tree import sweep_grid

    grid = sweep_grid(["head.learning_rate=[1.0e-3, 3.0e-4]", "head.dense_units=[16, 32]", "head.epochs=3"])
    assert len(grid) == 4 and grid[0] == {"head.learning_rate": 1e-3, "head.dense_units": 16, "head.epochs": 3}
    cfg = load_config(None, ["head.dropout=0.1"], environ={}, values={"sweep": grid})
    trials = cfg.trial_configs()
    assert [(t.head.learning_rate, t.head.dense_units) for t in trials] == [
        (1e-3, 16), (1e-3, 32), (3e-4, 16), (3e-4, 32)
    ]  # fmt: skip
    assert all(t.head.dropout == 0.1 and t.sweep == [] for t in trials)
    stages = load_config(None, [], environ={}, values={"sweep": [{"finetune.stages.0.learning_rate": 0.5}]})
    assert stages.trial_configs()[0].finetune.stages[0].learning_rate == 0.5
    for bad, named in (
        ({"backbone.image_size": 64}, "backbone.image_size"),
        ({"finetune.selection_metric": "val_loss"}, "finetune.selection_metric"),
        ({"head.epochs": 0}, "head.epochs"),
    ):
        with pytest.raises(ConfigError, match=f"sweep item 0.*{named}"):
            load_config(None, [], environ={}, values={"sweep": [bad]})


def test_the_best_trial_wins_a_sweep_and_the_earlier_one_a_tie() -> None:
    from tests.test_steps import stage
    from vggflow.tasks.select import choose_trial
    from vggflow.training import TrainedStages

    sweep = [{"head.learning_rate": 0.1}, {"head.learning_rate": 0.01}, {"head.learning_rate": 0.001}]
    results = [
        TrainedStages(results=[stage("head", 0.70, 0.9)]),
        TrainedStages(results=[stage("head", 0.75, 1.2), stage("block5", 0.80, 1.0)]),
        TrainedStages(results=[stage("head", 0.80, 0.8)]),
    ]
    choice = choose_trial(sweep, results, "val_accuracy")
    assert choice.winner == 1  # its block5 stage ties trial 2's head: the earlier trial wins
    assert [row["won"] for row in choice.table] == [False, True, False]
    assert choice.table[1] == {
        "trial": 1, "overrides": sweep[1], "stage": "block5", "val_accuracy": 0.80, "won": True
    }  # fmt: skip
    assert choose_trial(sweep, results, "val_loss").winner == 2

"""Progress: a bar with rate and time left on a terminal, plain log lines elsewhere (``vggflow/progress.py``)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time

import pytest

from vggflow import progress

BAR = re.compile(r"\d+/\d+ \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ ?\w+/s")  # done/total [elapsed<left, rate]


@pytest.fixture
def bars(request):
    """Bars forced on (True) or off (False) for one test, then back to the terminal's choice."""
    progress.configure(bars=request.param)
    yield request.param
    progress.configure()


def test_bars_are_drawn_only_when_stderr_is_a_terminal():
    code = "from vggflow.progress import bars_shown; print(bars_shown())"
    main, replica = pty.openpty()
    try:
        on_tty = subprocess.run([sys.executable, "-c", code], stderr=replica, capture_output=False, stdout=-1)
    finally:
        os.close(replica)
        os.close(main)
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert on_tty.stdout.strip() == b"True" and piped.stdout.strip() == b"False"


@pytest.mark.parametrize("bars", [True], indirect=True)
def test_a_loop_on_a_terminal_shows_rate_and_time_left_then_one_line(bars, capsys):
    lines: list[str] = []
    report = progress.progress_logger("feature extraction", log=lines.append)
    for done in range(10, 101, 10):
        time.sleep(0.12)  # a bar is redrawn at most every 0.1 s
        report(done, 100)
    assert BAR.search(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("feature extraction: 100/100 images (")


@pytest.mark.parametrize("bars", [False], indirect=True)
def test_a_loop_elsewhere_logs_about_every_tenth(bars, capsys):
    lines: list[str] = []
    report = progress.progress_logger("feature extraction", log=lines.append)
    for done in range(5, 101, 5):
        report(done, 100)
    assert len(lines) == 10 and all(
        re.fullmatch(r"feature extraction: \d+/100 images \([\d.]+ images/s\)", x) for x in lines
    )
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bars", [True, False], indirect=True)
def test_epochs_show_a_bar_with_the_latest_metrics_or_throttled_lines(bars, capsys):
    lines: list[str] = []
    epochs = progress.EpochProgress("head", 40, lines.append)
    for epoch in range(40):
        time.sleep(0.01 if epoch < 39 else 0.12)
        epochs(epoch, {"loss": 1.0 / (epoch + 1), "accuracy": 0.5, "val_loss": 0.9, "val_accuracy": 0.6})
    epochs.close()
    err = capsys.readouterr().err
    if bars:
        assert "stage head" in err and "val_acc 0.600" in err and re.search(r"\d+/40 \[", err) and lines == []
    else:
        assert lines == ["stage head epoch 1/40: loss 1.0000 acc 0.500 val_loss 0.9000 val_acc 0.600"] and err == ""


def test_verbose_logs_every_epoch():
    progress.configure(bars=False, every_epoch=True)
    try:
        lines: list[str] = []
        epochs = progress.EpochProgress("block5", 3, lines.append)
        for epoch in range(3):
            epochs(epoch, {"loss": 1.0})
        assert [line.split(":")[0] for line in lines] == [f"stage block5 epoch {n}/3" for n in (1, 2, 3)]
    finally:
        progress.configure()


@pytest.mark.parametrize("bars", [True], indirect=True)
def test_printed_items_go_above_the_bar(bars, capsys):
    with progress.ItemProgress(3, "predict", "images") as items:
        for n in range(3):
            time.sleep(0.12)
            items.advance()
            items.print(f"photo{n}.jpg\tcat 0.900")
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"photo{n}.jpg\tcat 0.900" for n in range(3)]
    assert "predict" in err and "images/s" in err

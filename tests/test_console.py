"""The console of train, study and demo, without a Ray cluster: a line per epoch followed from a
history file, the study's trial table from Tune's callback hooks, Ray's loggers moved to a
file and back, ``--verbose`` after the verb, and ``--keep-alive`` ending on Ctrl-C."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from matsci_ray.cli.main import build_parser
from matsci_ray.console.ray_logs import quiet_ray
from matsci_ray.console.run import RunProgress
from matsci_ray.console.text import Console, duration
from matsci_ray.errors import SourceError

MSE = "val/mp-formation-energy/mse"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _row(epoch: int, loss: float, mse: float, seconds: float = 2.0) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "train/mp-formation-energy/loss": loss,
        "train/mp-stability/loss": 0.5,
        MSE: mse,
        "train/samples_per_s": 320.4,
        "time/train_s": seconds - 0.5,
        "time/val_s": 0.5,
        "time/report_s": 0.0,
    }


def _append(history: Path, *rows: dict[str, Any], end: str = "\n") -> None:
    with history.open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows)[: None if end else -1])


def _follower(run_dir: Path, tty: bool) -> tuple[RunProgress, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    # a poll interval longer than the test: only the test's own polls read the file
    progress = RunProgress(run_dir, 4, MSE, Console(out, tty=tty), clock, poll_s=3600)
    return progress, out, clock


def test_a_line_per_epoch_appended_after_the_start(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    _append(history, _row(1, 9.0, 9.0))  # an earlier run's epoch in the same directory
    progress, out, clock = _follower(tmp_path, tty=False)
    with progress:
        clock.now += 10
        _append(history, _row(2, 0.9, 0.125))
        _append(history, _row(3, 0.8, 0.1), end="")  # still being written
        progress.poll()
        assert out.getvalue().splitlines() == [
            "epoch 2/4  train loss 1.4  val mp-formation-energy/mse 0.125  320 samples/s"
            "  elapsed 0:10  ETA 0:04"
        ]
        with history.open("a") as fh:
            fh.write("\n")
        clock.now += 2
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in out.getvalue()  # no bar off a terminal
    assert lines[1].startswith("epoch 3/4  train loss 1.3  val mp-formation-energy/mse 0.1")
    assert lines[1].endswith("elapsed 0:12  ETA 0:02")


def test_a_terminal_gets_a_bar_redrawn_below_the_lines(tmp_path: Path) -> None:
    progress, out, clock = _follower(tmp_path, tty=True)
    with progress:
        _append(tmp_path / "history.jsonl", _row(1, 1.0, 0.2, seconds=30))
        clock.now += 35
        progress.poll()
        clock.now += 10
        progress.poll()  # no new epoch: the bar only, its clocks moved on
    text = out.getvalue()
    assert "epoch 1/4" in text
    assert "[######------------------] 1/4 epochs  elapsed 0:45  ETA 1:20" in text
    assert "\x1b[1F\x1b[J" in text  # the previous bar erased before each redraw


def test_durations() -> None:
    assert [duration(s) for s in (0, 59.6, 61, 3600 + 62, None)] == [
        "0:00",
        "1:00",
        "1:01",
        "1:01:02",
        "?",
    ]


class _Trial(SimpleNamespace):
    def get_pickled_error(self) -> BaseException | None:
        return self.error

    def get_error(self) -> str | None:
        return None


def test_study_table_prints_a_row_per_change_and_one_line_per_error() -> None:
    from matsci_ray.console.study import StudyConsole

    out = io.StringIO()
    table = StudyConsole("sweep", MSE, 2, Console(out, tty=False))
    a = _Trial(trial_id="a1", config={"lr": 0.00123, "width": 64, "depth": 2}, status="PENDING")
    b = _Trial(trial_id="b2", config={"variant": {"label": "mp-pair-egnn"}}, status="PENDING")
    a.error = b.error = None
    a.error_file, b.error_file = None, "/runs/b2/error.txt"
    a.last_result = b.last_result = {}
    trials = [a, b]
    table.setup()
    table.on_trial_start(0, trials, a)
    table.on_trial_result(0, trials, a, {"epoch": 1, MSE: 0.25})
    a.last_result = {"epoch": 2, MSE: 0.125}
    table.on_trial_complete(0, trials, a)
    # a user's error inside Ray's wrappers: the one line the CLI would print
    b.error = RuntimeError("trial failed")
    b.error.__cause__ = SourceError("data/x.lmdb", "truncated", "7")
    table.on_trial_error(0, trials, b)
    table.on_experiment_end(trials)
    lines = out.getvalue().splitlines()
    assert lines[0] == "sweep: trials"
    assert lines[1].split() == ["trial", "state", "epoch", MSE]
    # first sight of both trials at a's start, then a's result and end, then b's failure
    assert [line.split()[-3:] for line in lines[2:7]] == [
        ["RUNNING", "-", "-"],
        ["PENDING", "-", "-"],
        ["RUNNING", "1/2", "0.25"],
        ["TERMINATED", "2/2", "0.125"],
        ["ERROR", "-", "-"],
    ]
    assert lines[2].split()[:6] == ["a1", "(lr", "1.2e-03,", "width", "64,", "depth"]
    assert lines[7] == (
        "mp-pair-egnn: error: data/x.lmdb [record 7]: truncated (traceback: /runs/b2/error.txt)"
    )
    assert lines[8:] == [lines[1], lines[5], lines[6]]  # the whole table again at the end


def _to_console(handler: logging.Handler) -> bool:
    """Ray's and Optuna's own handlers to stderr (not a test runner's capture handler)."""
    return type(handler).__name__ == "PlainRayHandler" or type(handler) is logging.StreamHandler


def test_ray_loggers_go_to_the_file_and_come_back(tmp_path: Path) -> None:
    import optuna.logging
    import ray.data  # its logger gets Ray's console handler on import

    optuna.logging.get_logger("optuna")  # and Optuna's gets its own when first used

    loggers = [logging.getLogger(name) for name in ("ray", "ray.data", "ray.tune", "optuna")]
    tune_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
    before = [set(lg.handlers) for lg in loggers]
    log = tmp_path / "run" / "ray.log"
    with quiet_ray(log):
        consoles = [h for lg in loggers for h in lg.handlers if _to_console(h)]
        assert not consoles, consoles
        for logger in loggers:
            logger.warning("noise from %s", logger.name)
        assert not ray.data.DataContext.get_current().print_on_execution_start
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # Tune's engine that is silent at 0
    assert [set(lg.handlers) for lg in loggers] == before
    assert ray.data.DataContext.get_current().print_on_execution_start
    assert os.environ.get("RAY_AIR_NEW_OUTPUT") == tune_output
    assert all(f"noise from {lg.name}" in log.read_text() for lg in loggers)
    with quiet_ray(None):  # --verbose: Ray's console as Ray sets it up
        assert [set(lg.handlers) for lg in loggers] == before


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["train", "c.yaml"], False),
        (["train", "c.yaml", "--verbose"], True),
        (["-v", "study", "s.yaml"], True),
        (["demo", "-v"], True),
    ],
)
def test_verbose_before_or_after_the_verb(argv: list[str], verbose: bool) -> None:
    assert build_parser().parse_args(argv).verbose is verbose


def test_keep_alive_returns_when_told_to_stop(capsys: pytest.CaptureFixture[str]) -> None:
    from matsci_ray.cli.demo import keep_alive

    stop = threading.Event()
    stop.set()
    keep_alive("127.0.0.1:8265", stop_ray=False, stop=stop)
    out = capsys.readouterr().out
    assert "dashboard at http://127.0.0.1:8265 stay up: press Ctrl-C" in out


def test_keep_alive_ends_cleanly_on_ctrl_c() -> None:
    code = "from matsci_ray.cli.demo import keep_alive; keep_alive(None, stop_ray=False)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert "press Ctrl-C" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == "done" and "Traceback" not in err

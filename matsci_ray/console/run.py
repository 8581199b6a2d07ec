"""One line per epoch of a Ray Train run, read from the run's ``history.jsonl`` while
``trainer.fit()`` runs.

Rank 0 appends a row per epoch to ``<run.storage>/<name>/history.jsonl``
(:mod:`matsci_ray.train.telemetry`); a thread on the driver follows the file from where it
ended when the run started. A Ray Train callback would run in Train's controller actor, whose
prints reach the driver only through ``log_to_driver``, which is off. What the file holds is
what this run did: an epoch that a restart runs again is printed again, rows of an earlier
run in the same directory are not, and the epochs a resume under a new name copies in are.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from matsci_ray.console.text import Console, duration, number
from matsci_ray.storage import Location, location, read_from, size
from matsci_ray.train.telemetry import HISTORY

if TYPE_CHECKING:
    from matsci_ray.config import ExperimentConfig

# the loop's own timing of an epoch: training, validation, the previous epoch's checkpoint
EPOCH_TIMES = ("time/train_s", "time/val_s", "time/report_s")


def train_loss(row: dict[str, Any]) -> float | None:
    """The epoch's training loss: the sum of its tasks' ``train/<task>/loss``."""
    losses = [v for k, v in row.items() if k.startswith("train/") and k.endswith("/loss")]
    return float(sum(losses)) if losses else None


def epoch_seconds(row: dict[str, Any]) -> float | None:
    times = [row[k] for k in EPOCH_TIMES if isinstance(row.get(k), int | float)]
    return float(sum(times)) if times else None


def epoch_line(
    row: dict[str, Any], epochs: int, metric: str, elapsed: float, eta: float | None
) -> str:
    """``epoch 3/20  train loss 0.84  val mp-formation-energy/mse 0.143  312 samples/s
    elapsed 0:12  ETA 0:48``."""
    rate = row.get("train/samples_per_s")
    parts = [
        f"epoch {row.get('epoch', '?'):>{len(str(epochs))}}/{epochs}",
        f"train loss {number(train_loss(row))}",
        f"val {metric.removeprefix('val/')} {number(row.get(metric))}",
        f"{rate:.0f} samples/s" if isinstance(rate, int | float) else "- samples/s",
        f"elapsed {duration(elapsed)}",
        f"ETA {duration(eta)}",
    ]
    return "  ".join(parts)


def progress_bar(done: int, epochs: int, elapsed: float, eta: float | None, width: int = 24) -> str:
    """``[#######-----------------] 7/24 epochs  elapsed 0:21  ETA 0:51``: a terminal's."""
    filled = min(width, round(width * done / max(epochs, 1)))
    bar = "#" * filled + "-" * (width - filled)
    return f"[{bar}] {done}/{epochs} epochs  elapsed {duration(elapsed)}  ETA {duration(eta)}"


class RunProgress:
    """Follows ``run_dir/history.jsonl`` in a thread while a run trains (``with`` block)."""

    def __init__(
        self,
        run_dir: Location | str,
        epochs: int,
        metric: str,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = 0.5,
    ) -> None:
        self.history = location(run_dir) / HISTORY
        self.epochs, self.metric = epochs, metric
        self.console = console or Console()
        self.clock, self.poll_s = clock, poll_s
        self._offset = 0
        self._started = clock()
        self._seconds: list[float] = []  # each followed epoch's own time, for the ETA
        self._eta: tuple[float, float] | None = None  # (ETA, when it was computed)
        self._done = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def of(cls, config: ExperimentConfig, console: Console | None = None) -> RunProgress:
        from matsci_ray.tasks.registry import primary_metric

        key, _ = primary_metric(config.tasks)
        return cls(config.run.storage / config.name, config.optim.epochs, key, console)

    def start(self) -> None:
        """Skip what the history already holds; follow what is appended from now on."""
        self._offset = size(self.history) or 0
        self._started = self.clock()
        self._thread = threading.Thread(target=self._follow, name="run-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Print the rows still unread, then the bar's last state stays on a terminal."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()
        self.console.keep()

    def __enter__(self) -> RunProgress:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> list[dict[str, Any]]:
        """Print a line per row appended since the last poll (and redraw the bar)."""
        rows = [self._show(row) for row in self._read_new()]
        now = self.clock()
        eta = None if self._eta is None else max(self._eta[0] - (now - self._eta[1]), 0.0)
        self.console.live([progress_bar(self._done, self.epochs, now - self._started, eta)])
        return rows

    def _read_new(self) -> list[dict[str, Any]]:
        found = read_from(self.history, self._offset)
        if found is None:  # not written yet
            return []
        end, data = found
        if end < self._offset:  # rewritten: read it again from the start
            self._offset = 0
            found = read_from(self.history, 0)
            data = found[1] if found else b""
        complete = data[: data.rfind(b"\n") + 1]  # a line being written waits for its end
        self._offset += len(complete)
        rows = []
        for line in complete.decode(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn line is the run's to repair, not the console's
        return rows

    def _show(self, row: dict[str, Any]) -> dict[str, Any]:
        seconds = epoch_seconds(row)
        if seconds is not None:
            self._seconds.append(seconds)
        epoch = row.get("epoch")
        self._done = epoch if isinstance(epoch, int) else self._done + 1
        eta = None
        if self._seconds:
            eta = sum(self._seconds) / len(self._seconds) * max(self.epochs - self._done, 0)
        now = self.clock()
        self._eta = None if eta is None else (eta, now)
        self.console.line(epoch_line(row, self.epochs, self.metric, now - self._started, eta))
        return row

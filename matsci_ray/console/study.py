"""A study's trials as a table (trial, state, epoch, primary metric), from a Ray Tune callback.

Tune calls its callbacks on the driver, in the loop that runs the experiment, once per event:
a trial starting, each epoch it reports (one result per epoch, forwarded from rank 0 by
``TuneReportCallback``), finishing or failing. On a terminal the table is redrawn in place at
each event; elsewhere each event prints the one row that changed, and the whole table is
printed when the study ends. A failed trial also prints one line saying why.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from matsci_ray.console.text import Console, number
from matsci_ray.errors import one_line, user_facing

STATES = ("PENDING", "RUNNING", "TERMINATED", "ERROR")


def trial_label(trial: Any) -> str:
    """A grid trial's variant label, or a sweep trial's id and sampled point."""
    config = getattr(trial, "config", None) or {}
    variant = config.get("variant")
    if isinstance(variant, dict) and "label" in variant:
        return str(variant["label"])
    shown = {"lr": "{:.1e}", "width": "{}", "depth": "{}"}  # lr: the same width in every row
    point = ", ".join(f"{k} {f.format(config[k])}" for k, f in shown.items() if k in config)
    return f"{trial.trial_id} ({point})" if point else str(trial.trial_id)


def error_summary(error: BaseException | str | None) -> str:
    """One line for a failed trial: the user's error if one is inside Ray's wrappers, else the
    last line of the traceback text (where Python names the innermost exception)."""
    if isinstance(error, BaseException):
        known = user_facing(error)
        if known is not None:
            return one_line(known)
        error = str(error)
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


class StudyConsole(Callback):
    """Prints a study's trial table as its trials run (``RunConfig(callbacks=[...])``)."""

    def __init__(self, name: str, metric: str, epochs: int, console: Console | None = None) -> None:
        self.name, self.metric, self.epochs = name, metric, epochs
        self.console = console or Console()
        self.rows: dict[str, dict[str, Any]] = {}
        self.width = 24  # of the trial column: grows to the longest label, never shrinks
        self.headed = False  # off a terminal: the header goes above the first rows

    # -- Tune's hooks ----------------------------------------------------------------------
    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        self.console.line(f"{self.name}: trials")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trials, trial, "RUNNING")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._update(trials, trial, "RUNNING", result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trials, trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trials, trial, "ERROR")
        error = trial.get_pickled_error() or trial.get_error()
        where = f" (traceback: {trial.error_file})" if trial.error_file else ""
        self.console.line(
            f"{self.rows[trial.trial_id]['trial']}: error: {error_summary(error)}{where}"
        )

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._add(trials)
        if self.console.tty:  # the live table already shows the end
            self.console.keep()
            return
        self.console.line(self._format(self._header()))
        for row in self.rows.values():
            self.console.line(self._format(row))

    # -- the table -------------------------------------------------------------------------
    def _header(self) -> dict[str, str]:
        return {"trial": "trial", "state": "state", "epoch": "epoch", "metric": self.metric}

    def _add(self, trials: list) -> list[str]:
        """Rows for trials not seen yet (Tune's own status: PENDING until they start)."""
        new = [t for t in trials if t.trial_id not in self.rows]
        for trial in new:
            state = trial.status if trial.status in STATES else "PENDING"
            label = trial_label(trial)
            self.width = max(self.width, len(label))
            self.rows[trial.trial_id] = {
                "trial": label,
                "state": state,
                "epoch": "-",
                "metric": "-",
            }
        return [t.trial_id for t in new]

    def _update(self, trials: list, trial: Any, state: str, result: dict | None = None) -> None:
        changed = self._add(trials)
        row = self.rows[trial.trial_id]
        row["state"] = state
        last = result or getattr(trial, "last_result", None) or {}
        if isinstance(last.get("epoch"), int):
            row["epoch"] = f"{last['epoch']}/{self.epochs}"
        if self.metric in last:
            row["metric"] = number(last[self.metric])
        if self.console.tty:
            table = [self._format(self._header())]
            self.console.live(table + [self._format(r) for r in self.rows.values()])
            return
        if not self.headed:
            self.console.line(self._format(self._header()))
            self.headed = True
        for trial_id in dict.fromkeys([*changed, trial.trial_id]):
            self.console.line(self._format(self.rows[trial_id]))

    def _format(self, row: dict[str, str]) -> str:
        trial, width = row["trial"], self.width
        return f"  {trial:<{width}}  {row['state']:<10}  {row['epoch']:>7}  {row['metric']}"

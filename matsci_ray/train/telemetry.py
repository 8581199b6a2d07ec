"""Where training numbers go besides ``ray.train.report``: TensorBoard event files and
``history.jsonl`` (rank 0, one line per epoch), and Ray's metrics export
(``ray.util.metrics``, scraped by Prometheus for Grafana).

A run stored on an object store writes its event files to a local scratch directory, uploaded
after each epoch's flush: TensorBoard's writer appends to a local file."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from matsci_ray.config import ExperimentConfig
from matsci_ray.storage import Location, append_text, location, read_text, upload_dir

# Gauges exported per worker; names are the ones the Grafana dashboards query
# (``dashboards/grafana``; Prometheus sees them with Ray's ``ray_`` prefix).
_GAUGES = {
    "train/samples_per_s": "matsci_ray_samples_per_second",
    "train/data_wait_fraction": "matsci_ray_data_wait_fraction",
    "epoch": "matsci_ray_epoch",
}
# Every other logged number (losses, metrics; rank 0), tagged ``name`` with its key.
METRIC_GAUGE = "matsci_ray_metric"
EXPORTED_METRICS = (*_GAUGES.values(), METRIC_GAUGE)


HISTORY = "history.jsonl"
HISTORY_TIME = "time/logged_at"  # a history line's wall-clock stamp, Unix seconds


def read_history(run_dir: Location | str) -> list[dict[str, float]]:
    """Per-epoch metrics of a run, the last report of each epoch (restarts repeat epochs)."""
    try:
        text = read_text(location(run_dir) / HISTORY)
    except FileNotFoundError:
        return []
    by_epoch = {}
    for line in text.splitlines():
        row = json.loads(line)
        by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


class Telemetry:
    def __init__(self, config: ExperimentConfig, rank: int) -> None:
        self.rank = rank
        self.writer = None
        self.history: Location | None = None
        self.upload: tuple[Path, Location] | None = None  # (scratch, destination)
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            run_dir = config.run.storage / config.name
            events: Location = run_dir / "tensorboard"
            if not isinstance(events, Path):
                self.upload = (Path(tempfile.mkdtemp(prefix="tensorboard-")), events)
            self.writer = SummaryWriter(log_dir=str(self.upload[0] if self.upload else events))
            self.history = run_dir / HISTORY
        self.tags = {"experiment": config.name}
        self._gauges: dict[str, object] = {}
        self._metric_gauge = None
        try:
            from ray.util.metrics import Gauge

            for key, name in _GAUGES.items():
                self._gauges[key] = Gauge(name, description=key, tag_keys=("experiment",))
            self._metric_gauge = Gauge(
                METRIC_GAUGE,
                description="loss and metric per task",
                tag_keys=("experiment", "name"),
            )
        except Exception:  # outside a Ray worker: TensorBoard only
            self._gauges = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if self.writer is not None:
                self.writer.add_scalar(key, value, step)
            gauge = self._gauges.get(key)
            if gauge is not None:
                gauge.set(value, tags=self.tags)  # type: ignore[attr-defined]
            elif self._metric_gauge is not None and self.rank == 0:
                self._metric_gauge.set(value, tags={**self.tags, "name": key})
        if self.writer is not None:
            self.writer.flush()
        if self.upload is not None:
            upload_dir(*self.upload)
        if self.history is not None:  # learning curves for reports, one JSON line per epoch
            # when the epoch ended (Unix seconds): curves against wall time, and which epochs
            # of a run overlapped something else (benchmarks/mace_native.py)
            row = {**metrics, "epoch": step, HISTORY_TIME: time.time()}
            append_text(self.history, json.dumps(row) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.upload is not None:
            upload_dir(*self.upload)
            shutil.rmtree(self.upload[0], ignore_errors=True)

"""The report's generative section: CDVAE's metric table of every generative run that has
been evaluated (``generative_metrics.json`` in its run directory, written by
``benchmarks/cdvae.py`` through :func:`write_metrics`), each metric beside the trivial
baseline and, where CDVAE's paper gives one, its published figure.

Pictures of generated crystals are not drawn yet: the table only.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from matsci_ray.report import Trial
from matsci_ray.storage import Location, is_file, location, read_text, write_text

METRICS_FILE = "generative_metrics.json"
# Column order and how each metric reads; "higher" says which way is better.
COLUMNS: dict[str, tuple[str, bool]] = {
    "match_rate": ("match rate", True),
    "rmse": ("RMSE", False),
    "valid_structure": ("valid (structure)", True),
    "valid_composition": ("valid (composition)", True),
    "cov_recall": ("COV-R", True),
    "cov_precision": ("COV-P", True),
    "density_emd": ("density EMD (g/cm³)", False),
    "elements_emd": ("#elements EMD", False),
}


def write_metrics(
    run_dir: Location | str, dataset: str, results: dict[str, dict[str, float]]
) -> Location:
    """``results``: ``{"model": {...}, "baseline": {...}, "published": {...}}`` metrics."""
    path = location(run_dir) / METRICS_FILE
    write_text(path, json.dumps({"dataset": dataset, **results}, indent=1, sort_keys=True))
    return path


def _read(trial: Trial) -> dict[str, Any] | None:
    """The run's metrics, wherever its directory is (a local path or an object-store URI)."""
    if trial.run_dir is None:
        return None
    path = location(trial.run_dir) / METRICS_FILE
    return json.loads(read_text(path)) if is_file(path) else None


def _cell(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) else "–"


def metric_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One row per run and source (model, baseline, published)."""
    head = "".join(f"<th>{escape(label)}</th>" for label, _ in COLUMNS.values())
    body = []
    for name, results in rows:
        for source in ("model", "baseline", "published"):
            values = results.get(source) or {}
            if not values:
                continue
            cells = "".join(f"<td>{_cell(values.get(key))}</td>" for key in COLUMNS)
            label = f"{results.get('dataset', '?')}: {name} ({source})"
            body.append(f"<tr><td>{escape(label)}</td>{cells}</tr>")
    return f"<table><tr><th>run</th>{head}</tr>{''.join(body)}</table>"


def generative_sections(trials: list[Trial]) -> list[tuple[str, str, str]]:
    """The report's ``(anchor, title, html)`` section of generative runs; none without any."""
    rows = [(t.trial_id, found) for t in trials if (found := _read(t)) is not None]
    if not rows:
        return []
    note = (
        '<p class="note">Baseline: random positions in a training crystal\'s cell and '
        "composition. Coverage uses this project's stand-in fingerprints "
        "(matsci_ray.generative.metrics), not CDVAE's matminer ones. Pictures of generated "
        "crystals: not drawn yet.</p>"
    )
    return [("generative", "Generative models (CDVAE metrics)", metric_table(rows) + note)]

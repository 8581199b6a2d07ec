"""The report's generative section: CDVAE's metric table of every generative run that has
been evaluated (``generative_metrics.json`` in its run directory, written by
``benchmarks/cdvae.py`` through :func:`write_metrics`), each metric beside the trivial
baseline and, where CDVAE's paper gives one, its published figure; under it, pictures of the
first :data:`PICTURES` crystals the run generated (``generated.extxyz`` beside the metrics).
"""

from __future__ import annotations

import io
import json
from html import escape
from typing import Any

from matsci_ray.report import Trial
from matsci_ray.report.figures import figure_html, new_figure, note
from matsci_ray.storage import Location, is_file, location, read_text, write_text

METRICS_FILE = "generative_metrics.json"
GENERATED_FILE = "generated.extxyz"
PICTURES = 8  # crystals drawn per run, two rows of four
# Where a row of metrics comes from, in table order, and its label.
SOURCES = {
    "model": "model",
    "decoder_only": "decoder alone",
    "baseline": "random baseline",
    "training_set": "training crystals",
    "published": "CDVAE paper",
}
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
    run_dir: Location | str,
    dataset: str,
    results: dict[str, dict[str, float]],
    generated: list[Any] | None = None,
) -> Location:
    """``results``: metrics by source (:data:`SOURCES`); ``generated``: ASE ``Atoms`` the
    model sampled, of which the first :data:`PICTURES` are kept for the report's pictures."""
    from ase.io import write

    path = location(run_dir) / METRICS_FILE
    write_text(path, json.dumps({"dataset": dataset, **results}, indent=1, sort_keys=True))
    if generated:
        text = io.StringIO()
        write(text, generated[:PICTURES], format="extxyz")
        write_text(location(run_dir) / GENERATED_FILE, text.getvalue())
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
        for source, said in SOURCES.items():
            values = results.get(source) or {}
            if not values:
                continue
            cells = "".join(f"<td>{_cell(values.get(key))}</td>" for key in COLUMNS)
            label = f"{results.get('dataset', '?')}: {name} ({said})"
            body.append(f"<tr><td>{escape(label)}</td>{cells}</tr>")
    return f"<table><tr><th>run</th>{head}</tr>{''.join(body)}</table>"


def generated_pictures(trial: Trial) -> str:
    """The run's kept generated crystals drawn side by side (ASE's matplotlib renderer, the
    cell outlined), each captioned with its formula; a note if it kept none."""
    from ase.io import read
    from ase.visualize.plot import plot_atoms

    path = location(trial.run_dir) / GENERATED_FILE if trial.run_dir is not None else None
    if path is None or not is_file(path):
        return note(f"{trial.trial_id}: no generated crystals kept ({GENERATED_FILE})")
    crystals = read(io.StringIO(read_text(path)), ":", format="extxyz")
    columns = min(4, len(crystals))
    rows = -(-len(crystals) // columns)
    fig = new_figure(2.2 * columns, 2.4 * rows)
    for i, atoms in enumerate(crystals):
        ax = fig.add_subplot(rows, columns, i + 1)
        plot_atoms(atoms, ax, rotation="10x,20y,0z", show_unit_cell=2, radii=0.5)
        ax.set_title(atoms.get_chemical_formula(), fontsize=9)
        ax.set_axis_off()
    formulas = ", ".join(a.get_chemical_formula() for a in crystals)
    caption = f"{trial.trial_id}: the first {len(crystals)} generated crystals ({formulas})"
    return figure_html(fig, f"generated crystals of {trial.trial_id}", caption, "generated")


def generative_sections(trials: list[Trial]) -> list[tuple[str, str, str]]:
    """The report's ``(anchor, title, html)`` section of generative runs; none without any."""
    evaluated = [(t, found) for t in trials if (found := _read(t)) is not None]
    if not evaluated:
        return []
    table = metric_table([(t.trial_id, found) for t, found in evaluated])
    explained = note(
        "Random baseline: random positions in a training crystal's cell and composition "
        "(for the match rate: in the test crystal's own). Decoder alone: the model's score "
        "network places each test crystal's own atoms in its own cell, so its match rate "
        "compares with the baseline's: a gap says the denoiser learned geometry. "
        "Training crystals: a sample of the training set scored as if generated, the ceiling "
        "of the coverage figures. Coverage uses this project's stand-in fingerprints "
        "(matsci_ray.generative.metrics), not CDVAE's matminer ones."
    )
    pictures = "".join(generated_pictures(t) for t, _ in evaluated)
    return [("generative", "Generative models (CDVAE metrics)", table + explained + pictures)]

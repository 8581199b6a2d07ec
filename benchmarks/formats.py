"""Read rates of the ASE-LMDB and MPtrj readers against each format's own reader library.

Run ``python benchmarks/formats.py`` (``--quick`` for a smoke run). Both sides read the same
frames in the same run, one process each, so the ratio is what to compare across machines.
See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.format_samples builds the inputs

import ase.db  # noqa: E402
from pymatgen.core import Structure  # noqa: E402

from matsci_ray.data.readers import get_reader  # noqa: E402
from matsci_ray.data.readers.mptrj import material_offsets  # noqa: E402
from matsci_ray.data.shards import IngestOptions, ingest_unit  # noqa: E402
from tests.format_samples import labelled, mp_atoms, write_mptrj  # noqa: E402


def write_aselmdb(path: Path, frames: int) -> Path:
    """``frames`` labelled MP structures (the 200 samples, cycled) through ASE's aselmdb."""
    structures = mp_atoms(200)
    db = ase.db.connect(path, type="aselmdb")
    for index in range(frames):
        db.write(labelled(structures[index % len(structures)], index))
    db.close()
    return path


def library_aselmdb(path: Path) -> int:
    """ASE's database API, as fairchem's AseDBDataset uses it: each row's Atoms and labels."""
    db = ase.db.connect(path, type="aselmdb", readonly=True, use_lock_file=False)
    count = 0
    for row in db.select():
        atoms = row.toatoms()
        _ = (atoms.positions, row.energy, row.forces, row.stress)
        count += 1
    db.close()
    return count


def library_mptrj_json(path: Path) -> int:
    """``json.load`` of the whole file: parsing only, every frame held in memory at once."""
    with path.open() as fh:
        document = json.load(fh)
    return sum(len(frames) for frames in document.values())


def library_mptrj_structures(path: Path) -> int:
    """``json.load`` and a pymatgen ``Structure`` per frame, as CHGNet's MPtrj loader does."""
    with path.open() as fh:
        document = json.load(fh)
    count = 0
    for frames in document.values():
        for frame in frames.values():
            Structure.from_dict(frame["structure"])
            count += 1
    return count


def reader_only(source: str) -> Callable[[Path], int]:
    """Our reader: plan the file, convert every frame (no validation, no Parquet)."""

    def run(path: Path) -> int:
        reader = get_reader(source)
        return sum(1 for unit in reader.plan(path) for _ in reader.read(unit))

    return run


def ingest(source: str, out: Path) -> Callable[[Path], int]:
    """The ingest's work per unit in this process: read, validate, split, write Parquet."""

    def run(path: Path) -> int:
        options = IngestOptions(source=source)
        units = get_reader(source).plan(path)
        sidecars = [ingest_unit(u, out / source, options, "bench") for u in units]
        return sum(s["rows"] for c in sidecars for s in c["shards"].values())

    return run


def timed(fn: Callable[[Path], int], path: Path, repeats: int) -> dict[str, Any]:
    """Best-of-``repeats`` frames per second (the least disturbed run on a shared machine)."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        frames = fn(path)
        runs.append((time.perf_counter() - start, frames))
    seconds, frames = min(runs)
    return {"frames": frames, "seconds": seconds, "frames_per_s": frames / seconds}


def measure(repeats: int, materials: int, frames_each: int, rows: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lmdb = write_aselmdb(work / "bench.aselmdb", rows)
        mptrj = write_mptrj(work / "MPtrj_bench.json", materials, frames_each)
        modes: dict[str, dict[str, Callable[[Path], int]]] = {
            "aselmdb": {
                "library: ase.db (aselmdb backend)": library_aselmdb,
                "matsci-ray reader": reader_only("omat24"),
                "matsci-ray ingest (serial)": ingest("omat24", work / "out"),
            },
            "mptrj": {
                "library: json.load": library_mptrj_json,
                "library: json.load + Structure.from_dict": library_mptrj_structures,
                "matsci-ray reader": reader_only("mptrj"),
                "matsci-ray ingest (serial)": ingest("mptrj", work / "out"),
            },
        }
        files = {"aselmdb": lmdb, "mptrj": mptrj}
        results: dict[str, Any] = {
            fmt: {name: timed(fn, files[fmt], repeats) for name, fn in fns.items()}
            for fmt, fns in modes.items()
        }
        start = time.perf_counter()
        material_offsets(str(mptrj))
        results["mptrj_plan_scan_mb_per_s"] = (
            mptrj.stat().st_size / 1e6 / (time.perf_counter() - start)
        )
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        "| format | reader | frames | frames/s | ÷ first library |",
        "|---|---|---:|---:|---:|",
    ]
    for fmt in ("aselmdb", "mptrj"):
        modes = results[fmt]
        base = next(iter(modes.values()))["frames_per_s"]
        for name, m in modes.items():
            ratio = m["frames_per_s"] / base
            lines.append(
                f"| {fmt} | {name} | {m['frames']} | {m['frames_per_s']:,.0f} | {ratio:.2f} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    for ax, fmt in zip(axes, ("aselmdb", "mptrj"), strict=True):
        modes = results[fmt]
        names = list(modes)
        ax.barh(names, [modes[n]["frames_per_s"] for n in names], color="tab:blue")
        ax.set_title(f"{fmt} ({next(iter(modes.values()))['frames']} frames)")
        ax.set_xlabel("frames / s (one process)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--materials", type=int, default=100, help="MPtrj materials")
    parser.add_argument("--frames", type=int, default=10, help="MPtrj frames per material")
    parser.add_argument("--rows", type=int, default=1000, help="ASE-LMDB rows")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, few frames")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.materials, args.frames, args.rows = 1, 10, 5, 50
    results = measure(args.repeats, args.materials, args.frames, args.rows)
    print(table(results))
    print(f"MPtrj planning scan: {results['mptrj_plan_scan_mb_per_s']:,.0f} MB/s")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"machine": platform.platform(), "python": platform.python_version(), **results}
    (args.out / "formats.json").write_text(json.dumps(record, indent=1))
    plot(results, args.out / "formats.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

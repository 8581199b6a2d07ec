"""Small files in the MPtrj and fairchem ASE-LMDB layouts, built from the Materials Project
sample structures, for the readers' tests and ``benchmarks/formats.py``.

The labels are synthetic (seeded) but shaped and unitted as the real releases: MPtrj's stress
in kbar with VASP's sign and a 3×3 tensor, ASE-LMDB's in eV/Å³ as ASE's Voigt 6-vector.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from tests.samples import SAMPLES

MP_DOCS = SAMPLES / "materials_project" / "summary_docs.jsonl"


def mp_structures(count: int) -> list[tuple[str, Structure]]:
    """``(material id, structure)`` of the first ``count`` MP sample documents (the samples
    carry no ids: ``mp-1000`` onwards stand in)."""
    with MP_DOCS.open() as fh:
        docs = [json.loads(line) for _, line in zip(range(count), fh, strict=False)]
    return [(f"mp-{1000 + i}", Structure.from_dict(doc["structure"])) for i, doc in enumerate(docs)]


def mp_atoms(count: int) -> list[Atoms]:
    return [AseAtomsAdaptor.get_atoms(s) for _, s in mp_structures(count)]


def labelled(atoms: Atoms, seed: int) -> Atoms:
    """``atoms`` with stored results: energy (eV), forces (eV/Å), stress (eV/Å³, Voigt)."""
    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    atoms.calc = SinglePointCalculator(
        atoms,
        energy=-4.0 * len(atoms) + rng.normal(),
        forces=rng.normal(scale=0.5, size=(len(atoms), 3)),
        stress=rng.normal(scale=0.01, size=6),
    )
    return atoms


def mptrj_frame(material_id: str, structure: Structure, seed: int) -> dict[str, Any]:
    """One frame as MPtrj stores it; some have no stress (as some of MPtrj's frames)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(scale=0.02, size=(len(structure), 3))
    moved = Structure(
        structure.lattice,
        structure.species,
        structure.cart_coords + noise,
        coords_are_cartesian=True,
    )
    n = len(moved)
    energy = -4.0 * n + float(rng.normal())
    stress = rng.normal(scale=20.0, size=(3, 3))  # kbar
    return {
        "structure": moved.as_dict(),
        "uncorrected_total_energy": energy + 0.3,
        "corrected_total_energy": energy,
        "energy_per_atom": energy / n,
        "ef_per_atom": float(rng.normal(scale=0.5)),
        "e_per_atom_relaxed": energy / n - 0.01,
        "ef_per_atom_relaxed": -0.5,
        "force": rng.normal(scale=0.3, size=(n, 3)).tolist(),
        "stress": None if seed % 3 == 2 else ((stress + stress.T) / 2).tolist(),
        "magmom": rng.uniform(0, 2, size=n).tolist(),
        "bandgap": float(rng.uniform(0, 3)),
        "mp_id": material_id,
    }


def mptrj_document(materials: int, frames: int) -> dict[str, dict[str, dict[str, Any]]]:
    """``{mp_id: {frame_id: frame}}`` with ``frames`` frames of each of ``materials`` materials."""
    doc: dict[str, dict[str, dict[str, Any]]] = {}
    for m, (material_id, structure) in enumerate(mp_structures(materials)):
        doc[material_id] = {
            f"{material_id}-{1 - f % 2}-{f}": mptrj_frame(material_id, structure, m * 1000 + f)
            for f in range(frames)
        }
    return doc


def write_mptrj(path: Path, materials: int, frames: int, indent: int | None = None) -> Path:
    """An MPtrj-layout JSON (``json.dump``'s separators, as the release) at ``path``."""
    path.write_text(json.dumps(mptrj_document(materials, frames), indent=indent))
    return path

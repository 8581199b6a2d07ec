"""Canonical column and target names, in one place.

Every reader converts its source into these names and units; every model, task and report reads
them from here. A name that is not here is not part of the data set format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# --- structure columns -----------------------------------------------------------------------
DATASET = "dataset"  # source name, e.g. "oc20-s2ef"
SAMPLE_ID = "sample_id"  # unique within a dataset, stable across re-ingests
SPLIT = "split"  # "train" | "val" | "test"
GROUP = "group"  # split unit: frames sharing a group never straddle splits (OC20 system id)
ATOMIC_NUMBERS = "atomic_numbers"  # (n,) int
POSITIONS = "positions"  # (n, 3) Cartesian, Å
CELL = "cell"  # (3, 3) Å, rows are lattice vectors
PBC = "pbc"  # (3,) bool
NATOMS = "natoms"  # int

STRUCTURE_COLUMNS = (DATASET, SAMPLE_ID, SPLIT, GROUP, ATOMIC_NUMBERS, POSITIONS, CELL, PBC, NATOMS)

SPLITS = ("train", "val", "test")

# --- targets ---------------------------------------------------------------------------------
ENERGY = "energy"
FORCES = "forces"
RELAXED_ENERGY = "relaxed_energy"
RELAXED_POSITIONS = "relaxed_positions"
FORMATION_ENERGY = "formation_energy_per_atom"
BAND_GAP = "band_gap"
EFERMI = "efermi"
IS_STABLE = "is_stable"
SPACE_GROUP = "space_group"
TAGS = "tags"
FIXED = "fixed"
# Per structure, eV/Å³, ASE's sign (σ = (1/V) ∂E/∂ε: negative under compression, i.e. a
# cell that wants to expand) and Voigt order (xx, yy, zz, yz, xz, xy), the 6-vector that
# ASE's calculators return; matsci_ray.data.units converts kbar and GPa sources into it.
STRESS = "stress"
VOIGT_ORDER = ("xx", "yy", "zz", "yz", "xz", "xy")

# "voigt": a symmetric 3×3 tensor stored as its 6 Voigt components (:data:`VOIGT_ORDER`).
TargetKind = Literal[
    "scalar", "per_atom_vector", "per_atom_int", "per_atom_bool", "bool", "class", "voigt"
]

# 1 GPa in eV/Å³ (1 eV/Å³ = 160.2176634 GPa, from the exact SI values of e and Å).
GPA = 1.0 / 160.2176634


@dataclass(frozen=True)
class TargetSpec:
    """What a target column holds: its shape kind, unit and accepted range."""

    name: str
    kind: TargetKind
    unit: str
    description: str
    low: float | None = None  # inclusive bounds checked by validation (None: unbounded)
    high: float | None = None
    num_classes: int | None = None
    extensive: bool = False  # scales with system size (total energies)
    # An energy per atom (formation energy): predicted as the mean of per-atom contributions
    # over per-element references fitted on composition fractions, since composition alone
    # explains most of it (a ridge fit on fractions halves the GNN's error on the MP sample).
    per_atom_energy: bool = False


TARGETS: dict[str, TargetSpec] = {
    spec.name: spec
    for spec in (
        TargetSpec(ENERGY, "scalar", "eV", "total DFT energy of the structure", extensive=True),
        TargetSpec(FORCES, "per_atom_vector", "eV/Å", "DFT forces, −∂E/∂positions", -100, 100),
        TargetSpec(
            RELAXED_ENERGY,
            "scalar",
            "eV",
            "energy of the relaxed structure (IS2RE)",
            extensive=True,
        ),
        TargetSpec(RELAXED_POSITIONS, "per_atom_vector", "Å", "positions after relaxation"),
        TargetSpec(
            FORMATION_ENERGY,
            "scalar",
            "eV/atom",
            "formation energy per atom",
            -20,
            20,
            per_atom_energy=True,
        ),
        TargetSpec(BAND_GAP, "scalar", "eV", "electronic band gap", 0, 50),
        TargetSpec(EFERMI, "scalar", "eV", "Fermi energy", -100, 100),
        TargetSpec(IS_STABLE, "bool", "", "on the convex hull (binary class)"),
        TargetSpec(SPACE_GROUP, "class", "", "international space group number", 1, 230, 230),
        TargetSpec(TAGS, "per_atom_int", "", "OC20 tags: 0 subsurface, 1 surface, 2 adsorbate"),
        TargetSpec(FIXED, "per_atom_bool", "", "atom held fixed during the relaxation"),
        # ±1000 GPa: beyond the pressures of any materials data set (Earth's core: 360 GPa),
        # while a kbar or GPa value stored as eV/Å³ lands 160-1600 times too large.
        TargetSpec(
            STRESS,
            "voigt",
            "eV/Å³",
            "stress, (1/V) ∂E/∂ε in ASE's sign and Voigt order xx yy zz yz xz xy",
            -1000 * GPA,
            1000 * GPA,
        ),
    )
}

# Metadata carried per record but not learned.
MATERIAL_ID = "material_id"  # Materials Project id where the source has one

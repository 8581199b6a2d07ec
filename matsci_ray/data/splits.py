"""Train/val/test assignment: the MatSciML paper's MP split by id, else a seeded hash of the group.

Hashing the group (OC20: the system id) instead of shuffling makes the split deterministic,
independent of file order and of how ingest is parallelised, and keeps every frame of one
trajectory on the same side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from matsci_ray.keys import SPLITS


@dataclass(frozen=True)
class SplitConfig:
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 42

    def __post_init__(self) -> None:
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions):
            raise ValueError(
                f"split fractions must be three non-negative numbers: {self.fractions}"
            )
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {sum(self.fractions)}")


def hash_split(group: str, config: SplitConfig) -> str:
    """The split of ``group``: uniform in [0, 1) from SHA-256 of seed and group."""
    digest = hashlib.sha256(f"{config.seed}:{group}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    train, val, _ = config.fractions
    if u < train:
        return "train"
    return "val" if u < train + val else "test"


def load_id_split(directory: Path) -> dict[str, str]:
    """Material id → split from ``{train,val,test}.yml`` files (``{split: [ids]}``)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    mapping: dict[str, str] = {}
    for split in SPLITS:
        path = directory / f"{split}.yml"
        if not path.exists():
            raise FileNotFoundError(f"{path}: split file missing (expected train/val/test.yml)")
        with path.open() as fh:
            doc = yaml.load(fh, Loader=loader)
        if not isinstance(doc, dict) or not isinstance(doc.get(split), list):
            raise ValueError(f"{path}: expected a mapping {{{split}: [ids]}}")
        for material_id in doc[split]:
            previous = mapping.setdefault(str(material_id), split)
            if previous != split:
                raise ValueError(f"{path}: {material_id} is in both {previous} and {split}")
    return mapping


@dataclass
class Splitter:
    """Assigns records to splits; ``id_split`` takes precedence for records with a known id."""

    config: SplitConfig
    id_split: dict[str, str] | None = None

    def __call__(self, group: str, material_id: str | None = None) -> tuple[str, str]:
        """``(split, how)`` where ``how`` is ``"id"`` or ``"hash"`` (counted in the manifest)."""
        if self.id_split is not None and material_id is not None:
            split = self.id_split.get(material_id)
            if split is not None:
                return split, "id"
        return hash_split(group, self.config), "hash"

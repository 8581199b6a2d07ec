"""Source readers, by the SOURCE name used on the command line."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from matsci_ray.data.readers.base import SourceReader

# name -> "module:Class"; imported lazily so one reader's heavy imports do not slow the others.
READERS: dict[str, str] = {
    "oc20-s2ef": "matsci_ray.data.readers.oc20:S2EFReader",
    "oc20-is2re": "matsci_ray.data.readers.oc20:IS2REReader",
    "materials-project": "matsci_ray.data.readers.materials_project:MaterialsProjectReader",
    "lips": "matsci_ray.data.readers.lips:LiPSReader",
    "oqmd": "matsci_ray.data.readers.oqmd:OQMDReader",
    "nomad": "matsci_ray.data.readers.nomad:NomadReader",
    "carolina-db": "matsci_ray.data.readers.carolina:CarolinaReader",
    "generic": "matsci_ray.data.readers.generic:GenericASEReader",
}


def get_reader(name: str, **options: Any) -> SourceReader:
    """Build the reader for SOURCE ``name``; ``options`` go to its constructor."""
    if name not in READERS:
        raise ValueError(f"unknown source {name!r}; choose one of: {', '.join(READERS)}")
    module, cls = READERS[name].split(":")
    reader_cls = getattr(import_module(module), cls)
    return reader_cls(**options)

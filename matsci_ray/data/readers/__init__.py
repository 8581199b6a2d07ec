"""Source readers, by the SOURCE name used on the command line.

Every registered data set (:mod:`matsci_ray.data.registry`) is a source of the same name; the
``generic`` source reads any ASE file into a data set the user names, so it has no data set
facts of its own.
"""

from __future__ import annotations

from typing import Any

from matsci_ray.data.readers.base import SourceReader
from matsci_ray.data.registry import DATASETS
from matsci_ray.errors import ConfigError
from matsci_ray.plugins import load_target

GENERIC = "generic"
# name -> "module:Class"; imported lazily so one reader's heavy imports do not slow the others.
READERS: dict[str, str] = {
    **{spec.name: spec.reader for spec in DATASETS.specs().values()},
    GENERIC: "matsci_ray.data.readers.generic:GenericASEReader",
}


def reader_class(name: str) -> type[SourceReader]:
    """The reader class of SOURCE ``name``, imported now; it must write the data set its
    registry entry names (the ``generic`` reader writes the one the user names)."""
    if name not in READERS:
        raise ValueError(f"unknown source {name!r}; choose one of: {', '.join(READERS)}")
    cls = load_target(READERS[name])
    if name != GENERIC and (cls.name, cls.dataset) != (name, name):
        raise ConfigError(
            f"source {name}: {READERS[name]} reads {cls.name!r} into data set "
            f"{cls.dataset!r}; its registry entry says {name!r}"
        )
    return cls


def get_reader(name: str, **options: Any) -> SourceReader:
    """Build the reader for SOURCE ``name``; ``options`` go to its constructor."""
    return reader_class(name)(**options)

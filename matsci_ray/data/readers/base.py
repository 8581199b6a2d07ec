"""The contract every source reader fulfils.

A reader turns one :class:`WorkUnit` (a slice of one input file) into canonical
:class:`Record` objects, converting units and conventions itself. It yields a
:class:`Reject` for a record it can read but must refuse (missing label, unparsable field),
and raises :class:`SourceError` when the file itself cannot be read. Physical validation
(finite values, distances, ranges) happens afterwards, in one place, for every source.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from matsci_ray.data.record import Record, Reject, SourceError, WorkUnit


class SourceReader(ABC):
    name: ClassVar[str]  # the SOURCE name on the command line
    dataset: ClassVar[str]  # the value of the ``dataset`` column
    suffixes: ClassVar[tuple[str, ...]]  # file endings found when a directory is given
    targets: ClassVar[tuple[str, ...]]  # canonical targets this source can provide

    def expand(self, paths: list[Path]) -> list[Path]:
        """Input files under ``paths`` (files as given, directories searched), sorted."""
        files: list[Path] = []
        for path in paths:
            if path.is_dir():
                found = [p for p in sorted(path.rglob("*")) if p.is_file() and self.accepts(p)]
                if not found:
                    raise SourceError(str(path), f"no {'/'.join(self.suffixes)} files found")
                files.extend(found)
            elif path.is_file():
                files.append(path)
            else:
                raise SourceError(str(path), "no such file or directory")
        return sorted({f.resolve() for f in files})

    def accepts(self, path: Path) -> bool:
        return path.name.endswith(self.suffixes)

    def plan(self, file: Path) -> list[WorkUnit]:
        """Split one input file into work units; by default the whole file is one unit."""
        return [WorkUnit(self.name, str(file))]

    @abstractmethod
    def read(self, unit: WorkUnit) -> Iterator[Record | Reject]:
        """Stream the canonical records of one work unit."""

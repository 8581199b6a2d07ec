"""The contract every source reader fulfils.

A reader turns one :class:`WorkUnit` (a slice of one input file) into canonical
:class:`Record` objects, converting units and conventions itself. It yields a
:class:`Reject` for a record it can read but must refuse (missing label, unparsable field),
and raises :class:`SourceError` when the file itself cannot be read. Physical validation
(finite values, distances, ranges) happens afterwards, in one place, for every source.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from matsci_ray.data.record import Record, Reject, SourceError, WorkUnit, input_id
from matsci_ray.errors import UserError


class SourceReader(ABC):
    name: ClassVar[str]  # the SOURCE name on the command line
    dataset: ClassVar[str]  # the value of the ``dataset`` column
    suffixes: ClassVar[tuple[str, ...]]  # file endings found when a directory is given
    targets: ClassVar[tuple[str, ...]]  # canonical targets this source can provide

    def expand(self, paths: list[Path]) -> list[Path]:
        """Input files under ``paths`` (files as given, directories searched), sorted."""
        return [file for file, _ in self.inputs(paths)]

    def inputs(self, paths: list[Path]) -> list[tuple[Path, str]]:
        """``(file, input id)`` of every input file under ``paths``, sorted by path.

        The input id, the part of each ``sample_id`` that names the file, is the file's path
        relative to the root the user gave (the common directory of the arguments: a directory
        argument itself, a file argument's grandparent), without compression or format suffix.
        So ``a/x.extxyz`` and ``b/x.extxyz`` are ``a/x`` and ``b/x``, a file given alone keeps
        its directory's name (``lips/lips_devset``, the id it had before directories counted,
        so its hash split is unchanged), and the id does not depend on where the data lives.
        Two files with one id (a file beside its ``.gz`` twin) would repeat each other's sample
        ids: a ``SourceError``.
        Paths are made absolute but symlinks are not followed: a link is its own input.
        """
        files, anchors = self._collect(paths)
        root = os.path.commonpath(anchors)
        named = [(file, input_id(os.path.relpath(file, root))) for file in sorted(set(files))]
        first: dict[str, Path] = {}
        for file, name in named:
            if name in first:
                raise SourceError(
                    str(file),
                    f"same input id {name!r} as {first[name]}, so their sample ids would "
                    "collide (a compressed twin or a copy?): give only one of them",
                )
            first[name] = file
        return named

    def _collect(self, paths: list[Path]) -> tuple[list[Path], list[str]]:
        """Every accepted file under ``paths``, and the directory each argument roots ids at."""
        if not paths:
            raise UserError("no input files or directories given")
        files: list[Path] = []
        anchors: list[str] = []
        for path in (Path(os.path.abspath(p)) for p in paths):
            if path.is_dir():
                found = [p for p in sorted(path.rglob("*")) if p.is_file() and self.accepts(p)]
                if not found:
                    raise SourceError(str(path), f"no {'/'.join(self.suffixes)} files found")
                files.extend(found)
                anchors.append(str(path))
            elif path.is_file():
                files.append(path)
                anchors.append(str(path.parent.parent))
            else:
                raise SourceError(str(path), "no such file or directory")
        return files, anchors

    def accepts(self, path: Path) -> bool:
        return path.name.endswith(self.suffixes)

    def plan(self, file: Path) -> list[WorkUnit]:
        """Split one input file into work units; by default the whole file is one unit."""
        return [WorkUnit(self.name, str(file))]

    @abstractmethod
    def read(self, unit: WorkUnit) -> Iterator[Record | Reject]:
        """Stream the canonical records of one work unit."""

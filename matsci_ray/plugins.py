"""Registries of named specs (models, data sets) that other packages extend by entry points.

A registry holds the built-in specs, in the order given, then those of installed plugins,
sorted by name. A plugin is a distribution with an entry point in the registry's group whose
name is the spec's name and whose value is ``"module:attr"`` naming the spec object, e.g. in
its ``pyproject.toml``::

    [project.entry-points."matsci_ray.models"]
    toy = "toy_pkg.spec:SPEC"

Plugins are read once, the first time the registry is asked for its specs, so every process
(the driver, each Ray worker) builds the same registry from the same installed distributions.
A plugin that does not load is left out, and the reason is given when its name is asked for
(and logged at INFO): one broken plugin must not stop the built-in models or data sets.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Sequence
from importlib import import_module, metadata
from typing import Any, Generic, Protocol, TypeVar

from matsci_ray.errors import ConfigError

log = logging.getLogger(__name__)


class NamedSpec(Protocol):
    @property
    def name(self) -> str: ...


S = TypeVar("S", bound=NamedSpec)


def load_target(target: str) -> Any:
    """The object ``"module:attr"`` names, its module imported now."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"{target!r}: expected 'module:attribute'")
    try:
        return getattr(import_module(module), attr)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{target}: cannot be imported: {error}") from error


class Registry(Generic[S]):
    """Specs of one kind by name: the built-ins, then the plugins of entry-point ``group``.

    ``check(spec, specs)`` raises a :class:`ConfigError` for a spec that contradicts the rest
    of the project (a task that does not exist): for a built-in that is a bug and raised, a
    plugin is left out. Checks that need the spec's code imported belong to its first use.
    """

    def __init__(
        self,
        kind: str,
        group: str,
        spec_type: type[S],
        builtin: Sequence[S],
        check: Callable[[S, dict[str, S]], None] | None = None,
    ) -> None:
        self.kind = kind  # "model", "data set": the word in messages
        self.group = group
        self.spec_type = spec_type
        self._builtin = tuple(builtin)
        self._check = check
        self._specs: dict[str, S] | None = None
        self._failed: dict[str, str] = {}  # plugin name -> why it was left out

    def specs(self) -> dict[str, S]:
        """Every registered spec by name: built-ins first, then plugins by name."""
        if self._specs is None:
            self._specs = self._collect()
        return self._specs

    def fresh(self) -> Registry[S]:
        """The same built-ins and group with the plugins not read yet (they are read again
        when it is first used: a test that installs one on ``sys.path`` needs that)."""
        return Registry(self.kind, self.group, self.spec_type, self._builtin, self._check)

    def names(self) -> list[str]:
        return list(self.specs())

    def __contains__(self, name: object) -> bool:
        return name in self.specs()

    def get(self, name: str) -> S:
        """The spec called ``name``; a :class:`ConfigError` naming the choices if none is."""
        if name not in self.specs():
            raise ConfigError(self.unknown(name))
        return self.specs()[name]

    def unknown(self, name: str) -> str:
        """Why ``name`` is not registered, in one line: the closest name, or all of them, and
        the reason a plugin of that name did not load."""
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        failed = self._failed.get(name)
        why = f" (its plugin did not load: {failed})" if failed else ""
        return f"unknown {self.kind} {name!r}; {hint}choose from {', '.join(names)}{why}"

    def _collect(self) -> dict[str, S]:
        specs: dict[str, S] = {}
        for spec in self._builtin:
            if spec.name in specs:
                raise ValueError(f"{self.kind} {spec.name!r} is registered twice")
            specs[spec.name] = spec
        builtin = set(specs)
        for entry in sorted(metadata.entry_points(group=self.group), key=lambda e: e.name):
            try:
                specs[entry.name] = self._plugin(entry, specs)
            except ConfigError as error:
                self._leave_out(entry.name, str(error))
            except Exception as error:  # whatever its module raised: left out, never fatal
                self._leave_out(entry.name, f"{entry.value}: {type(error).__name__}: {error}")
        check = self._check or (lambda spec, specs: None)
        for spec in list(specs.values()):
            try:
                check(spec, specs)
            except ConfigError as error:
                if spec.name in builtin:
                    raise
                del specs[spec.name]
                self._leave_out(spec.name, str(error))
        return specs

    def _leave_out(self, name: str, reason: str) -> None:
        # said when the name is asked for (unknown); here only for --verbose, so a broken
        # plugin nobody uses does not add a line to every command's console
        self._failed[name] = reason
        log.info("%s plugin %r left out: %s", self.kind, name, reason)

    def _plugin(self, entry: metadata.EntryPoint, specs: dict[str, S]) -> S:
        if entry.name in specs:
            raise ConfigError(f"{self.kind} {entry.name!r} is already registered")
        spec = load_target(entry.value)
        if not isinstance(spec, self.spec_type):
            raise ConfigError(f"{entry.value}: not a {self.spec_type.__name__}")
        if spec.name != entry.name:
            raise ConfigError(f"{entry.value}: named {spec.name!r}, its entry point {entry.name!r}")
        return spec

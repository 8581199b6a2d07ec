"""The errors a user can fix, in one place.

Every :class:`MatSciError` is printed by the CLI as one line (``--debug`` shows the traceback)
and ends the command with exit code 2. They cross process boundaries intact: Ray pickles an
exception raised in a task or actor and rebuilds it on the driver, so each type here pickles
back to an equal object (``tests/test_errors.py`` round-trips every one). An exception whose
``__init__`` takes other arguments than it passes to ``Exception.__init__`` does not: Ray then
hands the driver a generic error with a 40-line traceback instead.
"""

from __future__ import annotations

from typing import Any


class MatSciError(Exception):
    """Bad input or configuration: one line naming what is wrong (file, record, field)."""

    exit_code = 2


class UserError(MatSciError):
    """A command line that cannot be carried out as given."""


class ConfigError(MatSciError, ValueError):
    """A config that does not parse or validate; the message names the file and field."""


class SourceError(MatSciError):
    """An input that cannot be read at all (corrupt, truncated, empty, wrong format).

    The message always names the file and, where known, the record.
    """

    def __init__(self, file: str, message: str, key: str | None = None) -> None:
        where = f"{file}" + (f" [record {key}]" if key is not None else "")
        super().__init__(f"{where}: {message}")
        self.file = file
        self.key = key
        self.reason = message

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.file, self.reason, self.key)


class StrictModeError(MatSciError):
    """Raised under ``--strict`` for the first rejected record."""


class ShardError(MatSciError):
    """An ingested shard that is missing, truncated or not what the manifest says."""


class CheckpointError(MatSciError, ValueError):
    """A file that is not a loadable matsci-ray checkpoint."""


class StructureError(MatSciError, ValueError):
    """A structure no model should score (no atoms, an element the model cannot embed, atoms
    on top of each other, a degenerate cell): refused by prediction and ``MatSciCalculator``
    with the check's reason, the same one ingest rejects a record for."""


class StorageError(MatSciError):
    """A storage location that cannot be used: an object store that does not answer, refused
    or missing credentials, a bucket that does not exist."""


class ClusterError(MatSciError):
    """A Ray cluster that cannot be joined: nothing answers at the address, or the cluster
    refused this client (token authentication without the cluster's token)."""


class ResourceError(MatSciError):
    """A run that asks for more than the cluster has, or waited too long for it."""


def user_facing(error: BaseException) -> MatSciError | None:
    """The :class:`MatSciError` behind ``error``, looking through the wrappers Ray puts around
    an exception raised in a task, actor or training worker (``cause``, ``__cause__``)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(current, MatSciError):
            # a RayTaskError(SourceError) is both: its own message holds the remote traceback
            inner = cause if isinstance(cause, MatSciError) else None
            return inner or current
        stack.append(current.__cause__)
        if isinstance(cause, BaseException):
            stack.append(cause)
        # Ray Train's ControllerError: what failed the controller (train.preflight's
        # StopOnUserError re-raises a worker's MatSciError there so it is not retried)
        failure = getattr(current, "controller_failure", None)
        if isinstance(failure, BaseException):
            stack.append(failure)
        for nested in getattr(current, "worker_failures", {}).values() or ():
            stack.append(nested)
    return None


def one_line(error: BaseException) -> str:
    """The first line of ``error``'s message: what the CLI prints."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

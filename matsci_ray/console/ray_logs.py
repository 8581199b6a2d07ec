"""Ray's own output off the console: what Ray logs on the driver goes to a file.

Three sources printed Ray's side of a run on the console: its workers' output, copied to the
driver (``init_ray(log_to_driver=...)``, off unless ``--verbose``); its driver-side loggers
(``ray``, ``ray.data``, ``ray.train``, ``ray.tune``, and Optuna's under Tune's sweeps: the
cluster start, each dataset execution, Tune's status); and Ray Tune's own reporter
(``verbose=0`` in the study's RunConfig). :func:`quiet_ray` moves the loggers' console
handlers to one file, keeps Ray Data from logging an execution plan per epoch and Tune from
printing its experiment header. Nothing that fails is hidden: an error reaches the driver as
the exception Ray raises there, which the CLI prints as one line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from io import TextIOWrapper
from pathlib import Path

RAY_LOG = "ray.log"
# Ray's own format (ray.init sets it on the ray logger's handlers, this one included)
_FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"


def _ray_loggers() -> list[logging.Logger]:
    names = [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]
    return [logging.getLogger(n) for n in sorted(names)]


def _is_ray_console(handler: logging.Handler) -> bool:
    """Ray's own handler to stderr; not a file, and not one another program attached (a test
    runner's capture handler) to the same logger."""
    return (
        isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
        and type(handler).__module__.startswith("ray.")
    )


class _LazyFileHandler(logging.FileHandler):
    """Makes its file, and the directory, at the first record: a command that fails before
    Ray logs anything (a bad ``--resume`` path) leaves no run directory behind."""

    def _open(self) -> TextIOWrapper:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextmanager
def quiet_ray(log_file: Path | None) -> Iterator[Path | None]:
    """Inside the block, Ray's driver-side logs go to ``log_file`` instead of the console, and
    Ray Data logs no execution plans; after it, both are as they were. ``None`` (``--verbose``)
    changes nothing."""
    if log_file is None:
        yield None
        return
    import ray.data  # sets up Ray Data's own console handler on import: moved below too

    to_file = _LazyFileHandler(log_file, encoding="utf-8", delay=True)
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter(_FORMAT))
    moved = [(lg, h) for lg in _ray_loggers() for h in list(lg.handlers) if _is_ray_console(h)]
    targets = list(dict.fromkeys([logging.getLogger("ray"), *(lg for lg, _ in moved)]))
    for logger, handler in moved:
        logger.removeHandler(handler)
    for logger in targets:
        logger.addHandler(to_file)
    context = ray.data.DataContext.get_current()
    # "Starting execution of Dataset ..." and its plan, at each epoch's pass over each split
    plans, context.print_on_execution_start = context.print_on_execution_start, False
    try:
        with ExitStack() as stack:
            stack.enter_context(_optuna_to(to_file))
            stack.enter_context(_tune_legacy_output())
            yield log_file
    finally:
        context.print_on_execution_start = plans
        for logger in targets:
            logger.removeHandler(to_file)
        for logger, handler in moved:
            logger.addHandler(handler)
        to_file.close()


@contextmanager
def _optuna_to(handler: logging.Handler) -> Iterator[None]:
    """Optuna, Tune's sweep searcher, logs each new study to stderr with a handler of its own."""
    try:
        import optuna.logging
    except ImportError:  # no sweeps without it: nothing to move
        yield
        return
    optuna.logging.disable_default_handler()
    logger = logging.getLogger("optuna")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        optuna.logging.enable_default_handler()


@contextmanager
def _tune_legacy_output() -> Iterator[None]:
    """Ray Tune's default output engine prints an experiment header (searcher, scheduler,
    result and TensorBoard paths) whatever the RunConfig's ``verbose``; its other engine,
    chosen by this variable at each ``fit()``, prints nothing at ``verbose=0``."""
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


@contextmanager
def ray_console(
    address: str | None, num_cpus: int | None, log_file: Path, verbose: bool
) -> Iterator[str | None]:
    """Start or join Ray (``init_ray``) with its output in ``log_file`` and the session's
    worker logs, and say where they are; ``verbose`` keeps all of it on the console. Yields
    the dashboard's ``host:port`` (None without one)."""
    from matsci_ray.ray_env import init_ray, session_logs

    with quiet_ray(None if verbose else log_file) as quiet:
        dashboard = init_ray(address, num_cpus=num_cpus, log_to_driver=verbose)
        if quiet is not None:
            workers = session_logs()
            print(f"Ray logs: {quiet}" + (f" (workers: {workers})" if workers else ""))
        yield dashboard

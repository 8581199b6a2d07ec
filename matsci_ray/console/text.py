"""Numbers, durations and a writer with a live block: redrawn in place on a terminal, left out
of a log file or a pipe (where the permanent lines say everything)."""

from __future__ import annotations

import math
import sys
from typing import TextIO

# cursor to the start of the line N lines up (CSI n F), then clear to the end of the screen
_UP = "\x1b[{}F"
_CLEAR_BELOW = "\x1b[J"


def duration(seconds: float | None) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(max(seconds, 0.0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def number(value: object) -> str:
    """Four significant digits; ``-`` for a missing or non-numeric value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.4g}"


class Console:
    """Permanent lines, and below them a live block that a terminal redraws in place.

    The stream is looked up at each write (``sys.stdout`` unless given), so output that a
    test or a job runner captures by replacing ``sys.stdout`` is caught. Elsewhere than on a
    terminal :meth:`live` writes nothing: the caller's permanent lines carry the progress."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self._stream = stream
        self._tty = tty
        self._live: list[str] = []

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    @property
    def tty(self) -> bool:
        if self._tty is not None:
            return self._tty
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def line(self, text: str) -> None:
        """Print ``text`` above the live block (which is drawn again below it)."""
        self._write(self._erase() + text + "\n" + "".join(f"{x}\n" for x in self._live))

    def live(self, lines: list[str]) -> None:
        """Replace the live block (a terminal only; unchanged text is not drawn again)."""
        if not self.tty or lines == self._live:
            return
        erase = self._erase()
        self._live = list(lines)
        self._write(erase + "".join(f"{x}\n" for x in self._live))

    def keep(self) -> None:
        """Leave the live block on the screen as it is and start a new one below it."""
        self._live = []

    def _erase(self) -> str:
        return _UP.format(len(self._live)) + _CLEAR_BELOW if self._live and self.tty else ""

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def __getstate__(self) -> dict[str, object]:
        # Tune pickles its callbacks with the experiment (tuner.pkl): not the stream
        return {"_stream": None, "_tty": self._tty, "_live": []}

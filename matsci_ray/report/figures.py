"""Figures for ``report.html``: matplotlib figures rendered to inline base64 PNG, so the page
stays one self-contained file."""

from __future__ import annotations

import base64
import io
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
    # A bare Figure renders with Agg and touches no pyplot state: safe in any process.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_html(fig: Figure, alt: str, caption: str, kind: str) -> str:
    """``<figure class=kind>`` holding ``fig`` as an ``img.plot`` and its caption."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    image = f'<img class="plot" alt="{escape(alt)}" src="data:image/png;base64,{data}">'
    return f'<figure class="{kind}">{image}<figcaption>{escape(caption)}</figcaption></figure>'


def note(text: str) -> str:
    """A ``p.note``: what a section shows instead of a plot, and why."""
    return f'<p class="note">{escape(text)}</p>'

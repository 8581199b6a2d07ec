"""``report.html`` in a real browser: headless Chromium opens the page ``matsci-ray report``
writes (the report of ``tests/test_report.py``), its DOM holds the tables and plots where
``matsci_ray/report/html.py`` documents them, every plot decodes, nothing overflows the
window, and a screenshot shows a rendered page, not a blank one.

Needs ``chromium`` on PATH (Debian: ``apt-get install chromium``). Without it the tests skip,
unless ``MATSCI_RAY_REQUIRE_BROWSER`` is set (CI sets it): then they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tests import test_report

# the report of tests/test_report.py, built again for this module (module-scoped fixtures)
data_root = test_report.data_root
results = test_report.results
report_dir = test_report.report_dir

WIDTH, HEIGHT = 1280, 2000
FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    f"--window-size={WIDTH},{HEIGHT}",
]
SECTIONS = ("tables", "learning-curves", "parity", "confusion")
TABLES = ("table-3", "table-4", "table-5", "table-sweep")
# Appended to a copy of the page (the report itself has no script): once everything has
# loaded, write what the browser made of the plots and tables into the DOM for --dump-dom.
PROBE = """<script>
window.addEventListener("load", () => {
  const box = (e) => e.getBoundingClientRect();
  const probe = {
    viewport: window.innerWidth,
    scrollWidth: document.documentElement.scrollWidth,
    images: [...document.querySelectorAll("img.plot")].map((img) => ({
      section: img.closest("section").id, complete: img.complete,
      naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
      width: box(img).width, height: box(img).height, right: box(img).right,
    })),
    tables: [...document.querySelectorAll("table")].map((t) => ({
      id: t.id, rows: t.tBodies[0].rows.length, width: box(t).width, right: box(t).right,
    })),
  };
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(probe);
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium not found on PATH (Debian: apt-get install chromium)"
        if os.environ.get("MATSCI_RAY_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(chromium: str, tmp: Path, *args: str) -> str:
    profile = tmp / "profile"
    profile.mkdir(exist_ok=True)
    done = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


class _Elements(HTMLParser):
    """Every element of a (serialised, so well-formed) DOM with the ids of its ancestors."""

    VOID = frozenset(("area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"))

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.found: list[tuple[str, dict[str, str], list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.found.append((tag, attributes, [a.get("id", "") for _, a in self.stack]))
        if tag not in self.VOID:
            self.stack.append((tag, attributes))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1][0] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def _elements(dom: str) -> list[tuple[str, dict[str, str], list[str]]]:
    parser = _Elements()
    parser.feed(dom)
    parser.close()
    assert not parser.stack, parser.stack
    return parser.found


@pytest.fixture(scope="module")
def page(report_dir: Path) -> Path:
    return report_dir / "report.html"


def test_dom_has_the_tables_and_plots(chromium: str, page: Path, tmp_path: Path) -> None:
    dom = _run(chromium, tmp_path, "--dump-dom", page.as_uri())
    elements = _elements(dom)
    by_id = {a["id"]: (tag, ancestors) for tag, a, ancestors in elements if a.get("id")}
    for key in SECTIONS:
        assert by_id[key][0] == "section", key
    for key in TABLES:
        tag, ancestors = by_id[key]
        assert tag == "table" and "tables" in ancestors, key
    plots = [(a, ancestors) for tag, a, ancestors in elements if "plot" in a.get("class", "")]
    source = page.read_text()
    assert len(plots) == source.count('<img class="plot"')  # the browser kept every one
    for key in ("learning-curves", "parity", "confusion"):
        here = [a for a, ancestors in plots if key in ancestors]
        assert here, f"no plot in section {key}"
        assert all(a["src"].startswith("data:image/png;base64,") for a in here)
    # the table cells are the report's: the band-gap row of Table 3 names its best trial's value
    table3 = dom[dom.index('<table id="table-3">') : dom.index("</table>", dom.index("table-3"))]
    assert "mp-band-gap" in table3 and "0.5000 (best of 2)" in table3


def test_plots_decode_and_fit_the_window(chromium: str, page: Path, tmp_path: Path) -> None:
    probed = tmp_path / "probed.html"  # a copy next to nothing else: data: URIs only
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _run(chromium, tmp_path, "--dump-dom", probed.as_uri())
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert match, "the probe did not run"
    probe = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["viewport"] == WIDTH
    assert probe["scrollWidth"] <= probe["viewport"], "the page scrolls sideways"
    assert {s["section"] for s in probe["images"]} == set(SECTIONS) - {"tables"}
    for image in probe["images"]:
        assert image["complete"] and image["naturalWidth"] > 100, image  # decoded
        assert image["width"] > 100 and image["height"] > 100, image  # laid out
        assert image["right"] <= WIDTH, image
    tables = {t["id"]: t for t in probe["tables"]}
    assert set(TABLES) <= set(tables)
    for key in ("table-3", "table-4", "table-5"):
        assert tables[key]["rows"] >= 1 and 0 < tables[key]["right"] <= WIDTH, tables[key]


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_screenshot_shows_a_rendered_page(chromium: str, page: Path, tmp_path: Path) -> None:
    from PIL import Image  # matplotlib's own dependency

    shot = tmp_path / "report.png"
    _run(chromium, tmp_path, f"--screenshot={shot}", page.as_uri())
    assert _png_size(shot) == (WIDTH, HEIGHT)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    grey = pixels.mean(axis=2)
    assert grey.std() > 10, "blank screenshot"
    # the heading: dark text within the top 150 px on the white page
    assert (grey[:150] < 80).sum() > 500, "no heading at the top"
    assert (grey > 250).mean() > 0.5, "the page background is not white"
    # matplotlib's first colour (#1f77b4) in the learning curves below the tables
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    plot_blue = (abs(red - 31) < 40) & (abs(green - 119) < 40) & (abs(blue - 180) < 40)
    assert plot_blue.sum() > 200, "no plotted line in view"

"""Resumable download of Materials Project summary documents through the MP REST API.

Plain ``requests`` rather than the mp-api client: we need only one paged endpoint, and owning
the paging is what makes the download resumable. Each page is written to its own numbered
JSON-lines part file and only then recorded in ``state.json`` (both written atomically), so an
interrupted run resumes at the first page that was not completely written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

DEFAULT_ENDPOINT = "https://api.materialsproject.org"
SUMMARY_FIELDS = (
    "material_id",
    "structure",
    "formation_energy_per_atom",
    "energy_per_atom",
    "uncorrected_energy_per_atom",
    "band_gap",
    "efermi",
    "is_stable",
    "is_metal",
    "is_magnetic",
    "symmetry",
    "formula_pretty",
)
STATE_FILE = "state.json"
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT = (requests.ConnectionError, requests.Timeout)


class MPAPIError(RuntimeError):
    """The MP download failed; the message is one line and says what to do."""


def resolve_api_key(explicit: str | None = None) -> str:
    """The API key from ``--api-key`` or ``MP_API_KEY``; a clear error when neither is set."""
    key = explicit or os.environ.get("MP_API_KEY", "")
    if not key.strip():
        raise MPAPIError(
            "no Materials Project API key: set MP_API_KEY or pass --api-key "
            "(get a key at https://materialsproject.org/api)"
        )
    return key.strip()


@dataclass
class _State:
    """Progress of one paged download; the query fields guard against mixing two queries."""

    endpoint: str
    fields: list[str]
    page_size: int
    next_skip: int = 0
    pages: int = 0
    total_doc: int | None = None
    complete: bool = False  # the server ran out of documents (not merely --max-docs reached)


def part_path(out_dir: Path, page: int) -> Path:
    return Path(out_dir) / f"summary-{page:06d}.jsonl"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # the rename must not land before the bytes do
    os.replace(tmp, path)


def _load_state(out_dir: Path, fresh: _State) -> _State:
    path = out_dir / STATE_FILE
    if not path.exists():
        return fresh
    state = _State(**json.loads(path.read_text(encoding="utf-8")))
    for name in ("endpoint", "fields", "page_size"):
        if getattr(state, name) != getattr(fresh, name):
            raise MPAPIError(
                f"{path} records a download with a different {name} "
                f"({getattr(state, name)!r}); use the same options or a new --out directory"
            )
    return state


def download_summary(
    out_dir: Path,
    *,
    api_key: str,
    endpoint: str = DEFAULT_ENDPOINT,
    page_size: int = 500,
    max_docs: int | None = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 120.0,
    progress: bool | None = None,
    session: requests.Session | None = None,
) -> int:
    """Page through ``/materials/summary/`` into ``out_dir``; returns the documents on disk.

    Paging is by ``_skip``, so the database must not change between pages for an exact
    snapshot; MP changes only with its (rare) database releases.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    endpoint = endpoint.rstrip("/")
    state = _load_state(out_dir, _State(endpoint, list(SUMMARY_FIELDS), page_size))
    http = session or requests.Session()
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=state.total_doc, initial=state.next_skip, unit="doc", disable=not show) as bar:
        while not state.complete and (max_docs is None or state.next_skip < max_docs):
            limit = page_size if max_docs is None else min(page_size, max_docs - state.next_skip)
            body = _get_page(
                http, endpoint, api_key, limit, state.next_skip, retries, backoff, timeout
            )
            docs = body.get("data")
            if not isinstance(docs, list):
                raise MPAPIError(f"unexpected response from {endpoint}: no 'data' list")
            total = (body.get("meta") or {}).get("total_doc")
            state.total_doc = total if isinstance(total, int) else state.total_doc
            bar.total = state.total_doc
            if docs:
                lines = "".join(json.dumps(doc, separators=(",", ":")) + "\n" for doc in docs)
                _write_atomic(part_path(out_dir, state.pages), lines)
                state.pages += 1
                state.next_skip += len(docs)
            state.complete = len(docs) < limit or (
                state.total_doc is not None and state.next_skip >= state.total_doc
            )
            # The part file is in place before the state names it: a crash in between only
            # means the page is fetched again and its file overwritten.
            _write_atomic(out_dir / STATE_FILE, json.dumps(asdict(state), indent=1))
            bar.update(len(docs))
    return state.next_skip


def _get_page(
    http: requests.Session,
    endpoint: str,
    api_key: str,
    limit: int,
    skip: int,
    retries: int,
    backoff: float,
    timeout: float,
) -> dict[str, Any]:
    url = f"{endpoint}/materials/summary/"
    params: dict[str, str | int] = {
        "_fields": ",".join(SUMMARY_FIELDS),
        "_limit": limit,
        "_skip": skip,
    }
    headers = {"X-API-KEY": api_key, "accept": "application/json"}
    for attempt in range(retries + 1):
        wait = backoff * 2**attempt
        try:
            resp = http.get(url, params=params, headers=headers, timeout=timeout)
        except _TRANSIENT as exc:
            reason = type(exc).__name__
        else:
            if resp.status_code == 200:
                try:
                    return dict(resp.json())
                except ValueError as exc:
                    raise MPAPIError(f"{url} (skip {skip}) did not return JSON") from exc
            if resp.status_code in (401, 403):
                raise MPAPIError(
                    f"the Materials Project API refused the key (HTTP {resp.status_code}) at "
                    f"{url}: check MP_API_KEY or --api-key"
                )
            if resp.status_code not in _RETRY_STATUS:
                snippet = " ".join(resp.text[:200].split())
                raise MPAPIError(f"HTTP {resp.status_code} from {url} (skip {skip}): {snippet}")
            reason = f"HTTP {resp.status_code}"
            retry_after = resp.headers.get("Retry-After", "")
            wait = max(wait, float(retry_after)) if retry_after.isdigit() else wait
        if attempt < retries:
            time.sleep(min(wait, 120.0))
    raise MPAPIError(
        f"{url} (skip {skip}) failed after {retries + 1} attempt(s): {reason}; rerun to resume"
    )


def iter_summary_docs(out_dir: Path) -> Iterator[dict[str, Any]]:
    """The downloaded documents in order; part files the state does not name are ignored."""
    state = json.loads((Path(out_dir) / STATE_FILE).read_text(encoding="utf-8"))
    for page in range(int(state["pages"])):
        with part_path(out_dir, page).open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)

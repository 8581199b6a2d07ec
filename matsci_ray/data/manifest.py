"""``manifest.json``: what an ingest produced, merged from its units' sidecars.

Per data set: ``<out>/<dataset>/manifest.json`` (counts, rejects, statistics, inputs, shards).
Each shard entry holds its split, path, rows, bytes and SHA-256 (checked by
:mod:`matsci_ray.data.integrity`). Across data sets: ``<out>/manifest.json``, an index naming
each data set's manifest.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from matsci_ray.data.schema import SCHEMA_VERSION
from matsci_ray.data.shards import IngestOptions, write_json_atomic
from matsci_ray.data.stats import SplitStats
from matsci_ray.keys import SPLITS
from matsci_ray.storage import Location, exists, glob, location, read_text, resolve

MANIFEST = "manifest.json"


def build_manifest(
    dataset: str,
    options: IngestOptions,
    inputs: list[dict[str, Any]],
    sidecars: list[dict[str, Any]],
) -> dict[str, Any]:
    """Merge unit sidecars (in unit order, so the result is deterministic)."""
    stats: dict[str, SplitStats] = {}
    shards: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    split_how: Counter[str] = Counter()
    for sidecar in sidecars:
        for split, data in sidecar["stats"].items():
            stats.setdefault(split, SplitStats()).merge(SplitStats.from_json(data))
        for split, shard in sidecar["shards"].items():
            shards.append({"split": split, **shard})
        rejects.extend(sidecar["rejects"])
        split_how.update(sidecar["split_how"])
    reasons = Counter(r["reason"].split(":", 1)[0] for r in rejects)
    counts = {s: stats[s].records if s in stats else 0 for s in SPLITS}
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": dataset,
        "source": options.source,
        "options": {
            "reader_options": options.reader_options,
            "split_fractions": list(options.split.fractions),
            "split_seed": options.split.seed,
            "id_split": options.id_split_name,
            "strict": options.strict,
            "limits": vars(options.limits),
            "fingerprint": options.fingerprint(),
        },
        "inputs": inputs,
        "counts": {**counts, "total": sum(counts.values()), "rejected": len(rejects)},
        "split_assignment": dict(split_how),
        "rejects": {"by_reason": dict(sorted(reasons.items())), "records": rejects},
        "splits": {s: stats[s].summary() for s in SPLITS if s in stats},
        "shards": sorted(shards, key=lambda s: s["path"]),
    }


def write_manifest(out: Location, dataset: str, manifest: dict[str, Any]) -> Location:
    path = out / dataset / MANIFEST
    write_json_atomic(path, manifest)
    index_path = out / MANIFEST
    index = json.loads(read_text(index_path)) if exists(index_path) else {"datasets": {}}
    index["schema_version"] = SCHEMA_VERSION
    index["datasets"][dataset] = {
        "manifest": f"{dataset}/{MANIFEST}",
        "source": manifest["source"],
        "counts": manifest["counts"],
    }
    write_json_atomic(index_path, index)
    return path


def datasets_under(directory: Location | str) -> list[tuple[Location, str]]:
    """``(root, dataset)`` of every data set in ``directory``: an ingest output (its index
    ``manifest.json`` names them) or one data set's own directory. ``[]`` when neither."""
    directory = resolve(location(directory))  # "." has a name and a parent
    path = directory / MANIFEST
    try:
        manifest = json.loads(read_text(path))
    except (OSError, ValueError):
        return []
    if isinstance(manifest, dict) and isinstance(manifest.get("datasets"), dict):
        return [(directory, name) for name in sorted(manifest["datasets"])]
    if isinstance(manifest, dict) and "shards" in manifest:
        return [(directory.parent, directory.name)]
    return []


def read_manifest(root: Location | str, dataset: str) -> dict[str, Any]:
    """The manifest of ``dataset`` under ingest output ``root``, schema version checked."""
    path = location(root) / dataset / MANIFEST
    try:
        manifest = json.loads(read_text(path))
    except FileNotFoundError:
        known = sorted(p.parent.name for p in glob(location(root), f"*/{MANIFEST}"))
        raise FileNotFoundError(
            f"{path}: no ingested data set {dataset!r} (found: {', '.join(known) or 'none'})"
        ) from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema version {manifest.get('schema_version')} != {SCHEMA_VERSION}; "
            "re-run `matsci-ray ingest`"
        )
    return manifest

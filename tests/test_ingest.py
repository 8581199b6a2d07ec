"""Ingest on a real local Ray: every sample source, manifests, splits, resume after a kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray.data

from matsci_ray import keys as K
from matsci_ray.data.dataset import open_dataset, sample_rows, shard_paths
from matsci_ray.data.ingest import run_ingest
from matsci_ray.data.shards import IngestOptions, StrictModeError
from matsci_ray.data.splits import SplitConfig
from matsci_ray.train.trainer import cached_epochs

pytestmark = pytest.mark.usefixtures("ray_local")


def _ingest(
    source: str,
    paths: list[Path],
    out: Path,
    id_split_dir: Path | None = None,
    on_unit_done: object = None,
    **kwargs: object,
) -> dict:
    options = IngestOptions(source=source, **kwargs)  # type: ignore[arg-type]
    return run_ingest(
        source,
        paths,
        out,
        options,
        id_split_dir=id_split_dir,
        progress=False,
        on_unit_done=on_unit_done,
    )  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def oc20(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("oc20")
    manifest = _ingest("oc20-s2ef", [samples / "oc20" / "trajectories"], out)
    return out, manifest


def test_oc20_counts_units_and_first_frame(oc20: tuple[Path, dict], samples: Path) -> None:
    import ase.io

    out, manifest = oc20
    counts = manifest["counts"]
    assert counts["total"] + counts["rejected"] == 4207
    assert counts["rejected"] == len(manifest["rejects"]["records"])
    assert len(manifest["inputs"]) == 24 and all(len(i["sha256"]) == 64 for i in manifest["inputs"])
    first = samples / "oc20" / "trajectories" / "random1000100.traj"
    atoms = ase.io.read(first, 0)
    table = pq.read_table(
        shard_paths(out, "oc20-s2ef", "train")
        + shard_paths(out, "oc20-s2ef", "val")
        + shard_paths(out, "oc20-s2ef", "test")
    )
    row = table.filter(table[K.SAMPLE_ID].to_numpy(zero_copy_only=False) == "random1000100:0")
    assert row.num_rows == 1
    assert row[K.ENERGY][0].as_py() == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
    forces = np.array(row[K.FORCES][0].as_py())
    # raw DFT forces: FixAtoms would zero the fixed atoms; the `fixed` column marks them
    np.testing.assert_allclose(forces, atoms.get_forces(apply_constraint=False), atol=1e-9)
    np.testing.assert_allclose(np.array(row[K.CELL][0].as_py()), atoms.cell[:], atol=1e-12)
    assert row[K.NATOMS][0].as_py() == len(atoms)


def test_oc20_split_by_system(oc20: tuple[Path, dict]) -> None:
    out, manifest = oc20
    seen: dict[str, str] = {}
    for split in K.SPLITS:
        for path in shard_paths(out, "oc20-s2ef", split):
            for group in set(pq.read_table(path, columns=[K.GROUP])[K.GROUP].to_pylist()):
                assert seen.setdefault(group, split) == split, f"{group} straddles splits"
    assert len(seen) == 24
    train = manifest["splits"]["train"]
    assert train["targets"]["energy"]["count"] == manifest["counts"]["train"]
    assert train["targets"]["forces"]["std"] > 0
    refs = train["reference_energies"]["energy"]
    assert {"1", "8"} <= set(refs["per_element"])  # adsorbates carry H and O
    # per-element references explain most of the total energy
    assert refs["residual_rms"] < 0.2 * train["targets"]["energy"]["std"]


def test_oc20_forces_are_minus_the_energy_gradient_along_relaxations(
    oc20: tuple[Path, dict],
) -> None:
    """Units and sign of the ingested labels: between consecutive frames of a relaxation the
    energy change matches the work of the mean force, dE = -F.dx (trapezoid rule)."""
    out, _ = oc20
    columns = [K.SAMPLE_ID, K.GROUP, K.POSITIONS, K.ENERGY, K.FORCES]
    frames: dict[str, dict[int, tuple[np.ndarray, float, np.ndarray]]] = {}
    for split in K.SPLITS:
        for path in shard_paths(out, "oc20-s2ef", split):
            t = pq.read_table(path, columns=columns).to_pydict()
            for sid, group, pos, energy, forces in zip(*t.values(), strict=True):
                frames.setdefault(group, {})[int(sid.rsplit(":", 1)[1])] = (
                    np.asarray(pos).reshape(-1, 3),
                    energy,
                    np.asarray(forces).reshape(-1, 3),
                )
    ratios = []
    for by_index in frames.values():
        for k, (x0, e0, f0) in by_index.items():
            if k + 1 not in by_index:
                continue
            x1, e1, f1 = by_index[k + 1]
            work = -(0.5 * (f0 + f1) * (x1 - x0)).sum()
            if abs(work) > 0.01 and np.abs(x1 - x0).max() < 0.05:  # small, measurable steps
                ratios.append((e1 - e0) / work)
    assert len(ratios) > 300
    assert np.median(ratios) == pytest.approx(1.0, abs=0.02)


def test_open_dataset_streams_manifest_counts(oc20: tuple[Path, dict]) -> None:
    out, manifest = oc20
    ds = open_dataset(out, "oc20-s2ef", "test", columns=[K.SAMPLE_ID, K.NATOMS])
    assert ds.count() == manifest["counts"]["test"] > 0


def test_sampled_rows_are_exact_uniform_and_repeatable(oc20: tuple[Path, dict]) -> None:
    """A training cap draws its rows from every system, not the first shard's first frames."""
    out, manifest = oc20
    total = manifest["counts"]["train"]
    columns = [K.SAMPLE_ID, K.GROUP]

    def draw(count: int, seed: int) -> list[dict]:
        ds = open_dataset(out, "oc20-s2ef", "train", columns=columns)
        return sample_rows(ds, out, "oc20-s2ef", "train", count, seed).take_all()

    rows = draw(200, seed=42)
    ids = [r[K.SAMPLE_ID] for r in rows]
    assert len(ids) == len(set(ids)) == 200
    systems = {r[K.GROUP] for r in rows}
    first = open_dataset(out, "oc20-s2ef", "train", columns=columns).limit(200).take_all()
    assert len(systems) >= 15 > len({r[K.GROUP] for r in first})
    assert sorted(ids) == sorted(r[K.SAMPLE_ID] for r in draw(200, seed=42))
    assert set(ids) != {r[K.SAMPLE_ID] for r in draw(200, seed=7)}
    assert len(draw(total + 5, seed=42)) == total


def _epochs_as_ray_train_reads(ds: ray.data.Dataset, epochs: int) -> list[list[str]]:
    """Sample ids in the order a 2-worker run sees them, per epoch: one streaming_split whose
    shards both iterate every epoch (each epoch a new execution)."""
    shards = ds.streaming_split(2, equal=False)
    seen: list[list[list[str]]] = [[], []]

    def consume(k: int) -> None:
        for _ in range(epochs):
            batches = shards[k].iter_batches(batch_size=64, batch_format="numpy")
            seen[k].append([i for b in batches for i in b[K.SAMPLE_ID]])

    threads = [threading.Thread(target=consume, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [seen[0][e] + seen[1][e] for e in range(epochs)]


def test_training_order_changes_every_epoch_and_keeps_every_row(oc20: tuple[Path, dict]) -> None:
    """Shards follow the systems; an epoch must not sweep them in the same order every time
    (without the seeded reshuffles both orders below repeat exactly)."""
    out, manifest = oc20
    columns = [K.SAMPLE_ID]
    streamed = open_dataset(out, "oc20-s2ef", "train", columns=columns, shuffle_seed=3)
    built = open_dataset(out, "oc20-s2ef", "train", columns=columns).map_batches(
        lambda t: t, batch_size=64, batch_format="pyarrow"
    )
    for ds in (streamed, cached_epochs(built, seed=3)):
        first, second = _epochs_as_ray_train_reads(ds, 2)
        assert sorted(first) == sorted(second)
        assert len(first) == len(set(first)) == manifest["counts"]["train"]
        assert first != second


def test_every_sample_source_ingests(samples: Path, tmp_path: Path) -> None:
    devsets = samples / "matsciml-devsets"
    cases = {
        "oc20-is2re": ([samples / "oc20" / "trajectories"], 24),
        "materials-project": (
            [
                samples / "materials_project" / "summary_docs.jsonl",
                devsets / "materials_project" / "data.lmdb",
            ],
            400,
        ),
        "lips": ([samples / "lips" / "lips_devset.extxyz", devsets / "lips" / "data.lmdb"], 400),
        "oqmd": ([devsets / "oqmd" / "data.lmdb"], 200),
        "nomad": ([devsets / "nomad" / "data.lmdb"], 200),
        "carolina-db": ([devsets / "carolina_db" / "data.lmdb"], 100),
    }
    for source, (paths, expected) in cases.items():
        manifest = _ingest(source, paths, tmp_path, id_split_dir=None)
        counts = manifest["counts"]
        assert counts["total"] + counts["rejected"] == expected, (source, counts)
        assert counts["total"] > 0.5 * expected, (source, manifest["rejects"]["by_reason"])
    index = json.loads((tmp_path / "manifest.json").read_text())
    assert set(index["datasets"]) == {
        "oc20-is2re",
        "materials-project",
        "lips",
        "oqmd",
        "nomad",
        "carolina-db",
    }


def test_nomad_lattice_in_angstrom(samples: Path, tmp_path: Path) -> None:
    _ingest("nomad", [samples / "matsciml-devsets" / "nomad" / "data.lmdb"], tmp_path)
    table = pq.read_table([p for s in K.SPLITS for p in shard_paths(tmp_path, "nomad", s)])
    row = table.filter(table[K.SAMPLE_ID].to_numpy(zero_copy_only=False) == "nomad/data:0")
    cell = np.array(row[K.CELL][0].as_py())
    assert cell[0, 0] == pytest.approx(4.34166917, abs=1e-6)  # 4.3416691700000006e-10 m


def test_mp_paper_split_applied_by_id(samples: Path, tmp_path: Path) -> None:
    from matsci_ray.data.splits import load_id_split

    id_split = load_id_split(samples / "materials_project" / "splits")
    wanted = {"mp-1214041": "val"}
    assert id_split["mp-1214041"] == "val"
    docs = [
        json.loads(line)
        for line in (samples / "materials_project" / "summary_docs.jsonl")
        .read_text()
        .splitlines()[:20]
    ]
    ids = sorted(id_split)[:20]
    ids[0] = "mp-1214041"
    for doc, material_id in zip(docs, ids, strict=True):
        doc["material_id"] = material_id
        wanted[material_id] = id_split[material_id]
    src = tmp_path / "with_ids.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    manifest = _ingest(
        "materials-project",
        [src],
        tmp_path / "out",
        id_split_dir=samples / "materials_project" / "splits",
    )
    assert manifest["split_assignment"].get("id", 0) == manifest["counts"]["total"]
    for split in K.SPLITS:
        for path in shard_paths(tmp_path / "out", "materials-project", split):
            for mid in pq.read_table(path, columns=[K.MATERIAL_ID])[K.MATERIAL_ID].to_pylist():
                assert wanted[mid] == split


def test_strict_fails_on_first_reject(samples: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.extxyz"
    bad.write_text(
        '2\nLattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3 energy=-1.0 pbc="T T T"\n'
        "Li 0 0 0\nLi 0.1 0 0\n"
    )
    manifest = _ingest(
        "generic", [bad], tmp_path / "lenient", reader_options={"targets": {"energy": "energy"}}
    )
    assert manifest["rejects"]["by_reason"] == {"distance": 1}
    assert manifest["rejects"]["records"][0]["file"].endswith("bad.extxyz")
    with pytest.raises(StrictModeError, match=r"bad\.extxyz.*distance"):
        _ingest(
            "generic",
            [bad],
            tmp_path / "strict",
            strict=True,
            reader_options={"targets": {"energy": "energy"}},
        )


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_killed_ingest_resumes_to_identical_output(samples: Path, tmp_path: Path) -> None:
    """Kill the CLI (and its Ray) mid-run; the re-run skips finished units, output is identical."""
    traj = samples / "oc20" / "trajectories"
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [
        sys.executable,
        "-m",
        "matsci_ray.cli.main",
        "ingest",
        "oc20-s2ef",
        str(traj),
        "--out",
        str(killed),
        "--num-cpus",
        "1",
        "--chunk-size",
        "50",
        "--no-progress",
    ]
    # a short temp root: Ray's socket paths must stay under the 107-character limit
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    log = (tmp_path / "ingest.log").open("w")
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    units_dir = killed / "oc20-s2ef" / "_units"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(units_dir.glob("*.json"))) < 5:
        assert proc.poll() is None, (tmp_path / "ingest.log").read_text()[-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    # a Ray worker already running a unit can outlive the kill by a moment and still commit
    # it: count the finished units once that count has settled
    done_before, settle = -1, time.time() + 30
    while time.time() < settle and done_before != len(list(units_dir.glob("*.json"))):
        done_before = len(list(units_dir.glob("*.json")))
        time.sleep(1.0)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    tail = (tmp_path / "ingest.log").read_text()[-2000:]
    assert done_before >= 5, f"{done_before} units finished in 180 s before the kill:\n{tail}"
    assert not (killed / "oc20-s2ef" / "manifest.json").exists(), "finished before the kill"

    redone: list[dict] = []
    options = {"reader_options": {"chunk_size": 50}}
    manifest = _ingest("oc20-s2ef", [traj], killed, on_unit_done=redone.append, **options)
    _ingest("oc20-s2ef", [traj], clean, **options)
    assert _tree(killed) == _tree(clean)
    total_units = len(list(units_dir.glob("*.json")))
    assert len(redone) == total_units - done_before
    assert manifest["counts"]["total"] + manifest["counts"]["rejected"] == 4207


def test_rerun_with_other_seed_replaces_shards(samples: Path, tmp_path: Path) -> None:
    src = [samples / "matsciml-devsets" / "oqmd" / "data.lmdb"]
    first = _ingest("oqmd", src, tmp_path, split=SplitConfig(seed=1))
    second = _ingest("oqmd", src, tmp_path, split=SplitConfig(seed=2))
    assert first["counts"]["total"] == second["counts"]["total"]
    rows = sum(
        pq.read_metadata(p).num_rows for s in K.SPLITS for p in shard_paths(tmp_path, "oqmd", s)
    )
    on_disk = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "oqmd").glob("*/*.parquet"))
    assert rows == on_disk == second["counts"]["total"]

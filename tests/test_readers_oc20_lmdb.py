"""OC20's LMDB releases (pickled ``torch_geometric`` ``Data``, PyG 1.x and 2.x layouts), written
here from the sample trajectories and compared field by field with the trajectory reading;
and the released archive's path end to end: download → ingest → train."""

from __future__ import annotations

import copyreg
import hashlib
import io
import os
import pickle
import tarfile
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import ase.io
import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from ase import Atoms

from matsci_ray.data.readers import get_reader
from matsci_ray.data.readers.base import SourceReader
from matsci_ray.data.record import Record, Reject, SourceError
from tests.samples import SAMPLES, TINY_EGNN

Data = pytest.importorskip("torch_geometric.data").Data

TRAJ = SAMPLES / "oc20" / "trajectories"
SYSTEMS = ("random1000100", "random1000141", "random1000156")  # 33, 40 and 49 atoms
OCP_NAMES = {"energy": "y", "forces": "force"}  # OCP's S2EF field names (2020-2024)
FAIRCHEM_NAMES = {"energy": "energy", "forces": "forces"}  # fairchem's, since 2024

pytestmark = pytest.mark.skipif(not TRAJ.is_dir(), reason=f"sample data not found at {SAMPLES}")


# --- writing LMDBs as OCP/fairchem do ---------------------------------------------------------


def _graph(atoms: Atoms, system: str) -> Any:
    """A ``Data`` as OCP's ``AtomsToGraphs`` builds it: float32 tensors, a 1×3×3 cell, the
    system's integer id, raw DFT forces and the FixAtoms mask (tags: zeros when unset)."""
    fixed = torch.zeros(len(atoms))
    for constraint in atoms.constraints:
        fixed[constraint.index] = 1
    data = Data(
        cell=torch.tensor(atoms.cell.array, dtype=torch.float32).view(1, 3, 3),
        pos=torch.tensor(atoms.positions, dtype=torch.float32),
        atomic_numbers=torch.tensor(atoms.numbers, dtype=torch.float32),
        natoms=len(atoms),
    )
    data.fixed = fixed
    data.tags = torch.tensor(atoms.get_tags(), dtype=torch.long)
    data.sid = int(system.removeprefix("random"))
    return data


def s2ef_graph(atoms: Atoms, system: str, frame: int, names: dict[str, str]) -> Any:
    data = _graph(atoms, system)
    data.fid = frame
    data[names["energy"]] = atoms.get_potential_energy()
    data[names["forces"]] = torch.tensor(
        atoms.get_forces(apply_constraint=False), dtype=torch.float32
    )
    return data


def is2re_graph(first: Atoms, last: Atoms, system: str, shift: float = 0.0) -> Any:
    """The IS2RE/IS2RS record; ``shift`` is subtracted from both energies (a reference)."""
    data = _graph(first, system)
    data.y_init = first.get_potential_energy() - shift
    data.y_relaxed = last.get_potential_energy() - shift
    data.pos_relaxed = torch.tensor(last.positions, dtype=torch.float32)
    return data


class _Pyg1Pickler(pickle.Pickler):
    """Pickles ``Data`` as PyG 1.x did: the fields in the instance's own state, beside the
    standard attributes left ``None`` and ``__num_nodes__``."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is Data:
            state = dict.fromkeys(
                ("x", "edge_index", "edge_attr", "y", "pos", "normal", "face", "__num_nodes__")
            )
            state.update(obj.to_dict())
            return copyreg.__newobj__, (Data,), state  # type: ignore[attr-defined]
        return NotImplemented


def pickled(data: Any, layout: str) -> bytes:
    if layout == "pyg2":
        return pickle.dumps(data, protocol=-1)
    buffer = io.BytesIO()
    _Pyg1Pickler(buffer, protocol=4).dump(data)
    return buffer.getvalue()


def write_lmdb(path: Path, values: list[bytes]) -> Path:
    """Keys ``b"0"``… and a pickled ``length``, as fairchem's preprocessing writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), subdir=False, map_size=1 << 28, meminit=False)
    with env.begin(write=True) as txn:
        for index, value in enumerate(values):
            txn.put(str(index).encode("ascii"), value)
        txn.put(b"length", pickle.dumps(len(values), protocol=-1))
    env.close()
    return path


def _ends(system: str) -> tuple[Atoms, Atoms]:
    first, last = ase.io.read(TRAJ / f"{system}.traj", 0), ase.io.read(TRAJ / f"{system}.traj", -1)
    assert isinstance(first, Atoms) and isinstance(last, Atoms)
    return first, last


def read_all(reader: SourceReader, *paths: Path) -> tuple[dict[str, Record], list[Reject]]:
    records: dict[str, Record] = {}
    rejects: list[Reject] = []
    for file in reader.expand(list(paths)):
        for unit in reader.plan(file):
            for item in reader.read(unit):
                if isinstance(item, Record):
                    assert item.sample_id not in records
                    records[item.sample_id] = item
                else:
                    rejects.append(item)
    return records, rejects


def assert_same_structure(got: Record, want: Record) -> None:
    """LMDB positions and cells are float32: equal to the trajectory's to float32 precision."""
    assert (got.sample_id, got.group, got.dataset) == (want.sample_id, want.group, want.dataset)
    np.testing.assert_array_equal(got.atomic_numbers, want.atomic_numbers)
    np.testing.assert_allclose(got.positions, want.positions, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.cell, want.cell, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got.pbc, want.pbc)
    np.testing.assert_array_equal(got.targets["fixed"], want.targets["fixed"])
    assert got.targets["fixed"].any()
    # the sample trajectories store no tags, and AtomsToGraphs wrote zeros: absent in both
    assert "tags" not in got.targets and "tags" not in want.targets


# --- field by field against the trajectories ------------------------------------------------------

LAYOUTS = [("pyg1", OCP_NAMES), ("pyg2", OCP_NAMES), ("pyg2", FAIRCHEM_NAMES)]


@pytest.mark.parametrize(("layout", "names"), LAYOUTS)
def test_s2ef_lmdb_matches_the_trajectories(
    tmp_path: Path, layout: str, names: dict[str, str]
) -> None:
    values = []
    for system in SYSTEMS:
        frames = ase.io.read(TRAJ / f"{system}.traj", "::20")
        for step, atoms in enumerate(frames):
            values.append(pickled(s2ef_graph(atoms, system, step * 20, names), layout))
    assert (b"GlobalStorage" in values[0]) == (layout == "pyg2")
    file = write_lmdb(tmp_path / "s2ef" / "data.0000.lmdb", values)

    reader = get_reader("oc20-s2ef", chunk_size=7)  # several units, none aligned to a system
    assert len(reader.plan(file)) == -(-len(values) // 7)
    got, rejects = read_all(reader, file)
    want, _ = read_all(get_reader("oc20-s2ef"), *(TRAJ / f"{s}.traj" for s in SYSTEMS))
    assert rejects == [] and len(got) == len(values)
    for sample_id, record in got.items():
        expected = want[sample_id]  # "random<sid>:<frame>", the trajectory reader's id
        assert_same_structure(record, expected)
        assert record.targets["energy"] == expected.targets["energy"]  # raw DFT totals, exact
        np.testing.assert_allclose(
            record.targets["forces"], expected.targets["forces"], rtol=1e-6, atol=1e-5
        )
        assert record.targets["forces"].dtype == np.float64


@pytest.mark.parametrize("layout", ["pyg1", "pyg2"])
def test_is2re_lmdb_matches_the_trajectories(tmp_path: Path, layout: str) -> None:
    values = [pickled(is2re_graph(*_ends(system), system), layout) for system in SYSTEMS]
    file = write_lmdb(tmp_path / "is2re" / "all" / "train" / "data.lmdb", values)
    got, rejects = read_all(get_reader("oc20-is2re"), tmp_path / "is2re")
    want, _ = read_all(get_reader("oc20-is2re"), *(TRAJ / f"{s}.traj" for s in SYSTEMS))
    assert rejects == [] and sorted(got) == sorted(want) == list(SYSTEMS)
    for system, record in got.items():
        expected = want[system]
        assert_same_structure(record, expected)
        assert record.targets["relaxed_energy"] == expected.targets["relaxed_energy"]
        np.testing.assert_allclose(
            record.targets["relaxed_positions"],
            expected.targets["relaxed_positions"],
            rtol=0,
            atol=1e-5,
        )
        assert record.source_file == str(file) and record.source_key in {"0", "1", "2"}


def test_tags_and_malformed_records(tmp_path: Path) -> None:
    first, last = _ends("random1000100")
    good = is2re_graph(first, last, "random1000100")
    tags = torch.ones(len(first), dtype=torch.long)
    tags[-1] = 2
    good.tags = tags
    good.cell = good.cell.view(3, 3)  # a plain 3×3 cell reads as OCP's 1×3×3
    good.sid = "random1000100"  # a string id is kept as it is

    def variant(**changes: Any) -> bytes:
        data = good.clone()
        for name, value in changes.items():
            if value is None:
                del data[name]
            else:
                data[name] = value
        return pickled(data, "pyg2")

    file = write_lmdb(
        tmp_path / "data.lmdb",
        [
            pickled(good, "pyg2"),
            variant(cell=torch.eye(2)),
            variant(natoms=7),
            variant(sid=None),
            variant(y_relaxed=None, pos_relaxed=None, y_init=None),  # as the test splits
            variant(pos=torch.zeros(3, 3)),
            variant(fixed=torch.full((len(first),), 0.5)),
        ],
    )
    reader = get_reader("oc20-is2re")
    items = [item for unit in reader.plan(file) for item in reader.read(unit)]
    record = items[0]
    assert isinstance(record, Record) and record.sample_id == record.group == "random1000100"
    np.testing.assert_array_equal(record.targets["tags"], tags.numpy())
    assert record.cell.shape == (3, 3)
    reasons = [item.reason for item in items[1:] if isinstance(item, Reject)]
    assert reasons == [
        "cell has shape (2, 2), expected (1, 3, 3) or (3, 3)",
        "natoms is 7 but 33 atoms are given",
        "no sid (the system id that keeps a system in one split)",
        "no y_relaxed: an unlabelled split, such as IS2RE test?",
        "pos has shape (3, 3), expected (33, 3)",
        "fixed holds non-integer values",
    ]


def test_unsafe_or_foreign_pickles_are_refused_naming_file_and_key(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Shell:
        def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
            return (os.system, (f"touch {marker}",))

    first, last = _ends("random1000156")
    good = pickled(is2re_graph(first, last, "random1000156"), "pyg2")
    evil = is2re_graph(first, last, "random1000156")
    evil.note = Shell()
    hetero = pytest.importorskip("torch_geometric.data").HeteroData()
    for index, value in enumerate([pickle.dumps(evil, protocol=-1), pickle.dumps(hetero)]):
        file = write_lmdb(tmp_path / f"{index}.lmdb", [good, value])
        reader = get_reader("oc20-is2re")
        with pytest.raises(SourceError) as info:
            read_all(reader, file)
        message = str(info.value)
        assert message.startswith(f"{file} [record 1]: unsafe pickle: refused global")
        assert ("os" if index == 0 else "HeteroData") in message and "\n" not in message
    assert not marker.exists()


def test_a_directory_of_lmdbs_is_read_in_one_pass(tmp_path: Path) -> None:
    # fairchem's preprocessing writes data.0000.lmdb … one per worker, with lock files beside
    for index, system in enumerate(SYSTEMS):
        frames = enumerate(ase.io.read(TRAJ / f"{system}.traj", "::50"))
        values = [pickled(s2ef_graph(a, system, 50 * i, OCP_NAMES), "pyg2") for i, a in frames]
        write_lmdb(tmp_path / "train" / f"data.{index:04d}.lmdb", values)
    (tmp_path / "train" / "data_log.0000.txt").write_text("random1000100,frame0\n")
    reader = get_reader("oc20-s2ef")
    files = reader.expand([tmp_path / "train"])
    assert [f.name for f in files] == ["data.0000.lmdb", "data.0001.lmdb", "data.0002.lmdb"]
    records, _ = read_all(reader, tmp_path / "train")
    assert {r.group for r in records.values()} == set(SYSTEMS)


# --- adsorption energies against totals ----------------------------------------------------------


def _referenced_lmdb(path: Path, systems: tuple[str, ...]) -> tuple[Path, dict[str, float]]:
    """As the IS2RE release: energies minus a per-system reference, giving adsorption energies
    of a few eV (drawn here; the release subtracts the slab's and the gas molecules' energies)."""
    rng = np.random.default_rng(0)
    values, adsorption = [], {}
    for system in systems:
        first, last = _ends(system)
        shift = last.get_potential_energy() - rng.uniform(-3.0, 1.0)
        data = is2re_graph(first, last, system, shift)
        adsorption[system] = data.y_relaxed
        values.append(pickled(data, "pyg1"))
    return write_lmdb(path, values), adsorption


def test_adsorption_energies_are_stored_as_given_and_never_mixed_with_totals(
    tmp_path: Path,
) -> None:
    referenced, adsorption = _referenced_lmdb(tmp_path / "ads" / "data.lmdb", SYSTEMS)
    reader = get_reader("oc20-is2re")
    records, _ = read_all(reader, referenced)
    assert {s: r.targets["relaxed_energy"] for s, r in records.items()} == adsorption

    totals = [pickled(is2re_graph(*_ends(s), s), "pyg2") for s in ("random1000120",)]
    total_lmdb = write_lmdb(tmp_path / "total" / "data.lmdb", totals)
    trajectory = TRAJ / "random1000179.traj"
    for other in (total_lmdb, trajectory):
        with pytest.raises(SourceError) as info:
            reader.inputs([referenced, other])
        message = str(info.value)
        assert message.startswith(f"{referenced}: holds adsorption energies (median")
        assert f"but {other} holds" in message and "ingest them separately" in message
    # totals from an LMDB and from a trajectory are one kind
    assert len(reader.inputs([total_lmdb, trajectory])) == 2


# --- the released archive end to end --------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on 127.0.0.1, and its URL."""
    root = tmp_path / "mirror"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _release_archive(path: Path, stage: Path) -> None:
    """``is2res_train_val_test_lmdbs.tar.gz`` as OC20 ships it: ``data/is2re/<size>/<split>/
    data.lmdb`` under the archive's own directory, test splits without labels."""
    systems = sorted(p.stem for p in TRAJ.glob("random*.traj"))
    all_dir = stage / "is2res_train_val_test_lmdbs" / "data" / "is2re" / "all"
    _referenced_lmdb(all_dir / "train" / "data.lmdb", tuple(systems[:20]))
    _referenced_lmdb(all_dir / "val_id" / "data.lmdb", tuple(systems[20:22]))
    unlabelled = []
    for system in systems[22:]:
        data = is2re_graph(*_ends(system), system)
        del data.y_init, data.y_relaxed, data.pos_relaxed
        unlabelled.append(pickled(data, "pyg1"))
    write_lmdb(all_dir / "test_id" / "data.lmdb", unlabelled)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(stage / "is2res_train_val_test_lmdbs", arcname="is2res_train_val_test_lmdbs")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local", "one_thread")
def test_released_is2re_archive_downloads_ingests_and_trains(
    serve: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from matsci_ray.cli.main import main
    from matsci_ray.data.download import CATALOGUE

    mirror, url = serve
    archive = CATALOGUE["oc20-is2re"]["all"]
    _release_archive(mirror / archive.filename, tmp_path / "stage")
    digest = hashlib.sha256((mirror / archive.filename).read_bytes()).hexdigest()

    downloads, data = tmp_path / "downloads", tmp_path / "data"
    argv = ["download", "oc20-is2re", "--base-url", url, "--out", str(downloads)]
    assert main([*argv, "--sha256", digest]) == 0
    lmdbs = downloads / "is2res_train_val_test_lmdbs" / "data" / "is2re" / "all"
    assert sorted(p.parent.name for p in lmdbs.rglob("*.lmdb")) == ["test_id", "train", "val_id"]

    capsys.readouterr()
    # 22 systems: wider val and test fractions than the default, so that neither is empty
    argv = ["ingest", "oc20-is2re", str(lmdbs), "--out", str(data), "--split", "0.6,0.2,0.2"]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert '"no y_relaxed": 2' in printed  # the unlabelled test split's records
    shards = sorted((data / "oc20-is2re").glob("*/part-*.parquet"))
    table = pa.concat_tables([pq.read_table(shard) for shard in shards])
    assert table.num_rows == 22 and set(table.column("split").to_pylist()) >= {"train", "val"}
    energies = table.column("relaxed_energy").to_numpy()
    assert np.abs(energies).max() <= 3.0  # the adsorption energies, as the release holds them

    config = {
        "name": "is2re-lmdb",
        "tasks": ["is2re"],
        "data": {"root": str(data), "cutoff": 4.0, "batch_size": 8},
        "model": {"name": "egnn", "params": TINY_EGNN, "head_hidden": 16},
        "optim": {"lr": 3e-3, "epochs": 1, "scheduler": "none"},
        "run": {
            "num_workers": 1,
            "cpus_per_worker": 0.5,
            "storage": str(tmp_path / "runs"),
            "threads_per_worker": 1,
        },
    }
    config_file = tmp_path / "is2re.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert main(["train", str(config_file)]) == 0
    assert '"val/is2re/mse"' in capsys.readouterr().out

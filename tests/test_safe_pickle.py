"""The allow-list unpickler: admits what the devsets need, refuses everything else."""

from __future__ import annotations

import os
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from matsci_ray.data.record import SourceError
from matsci_ray.data.safe_pickle import (
    CrystalSystem,
    PygData,
    SafeUnpickler,
    SymmetryData,
    UnsafePickleError,
    safe_loads,
)


def _load(data: bytes) -> object:
    return safe_loads(data, file="f.lmdb", key="7")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy_and_torch_round_trip(protocol: int) -> None:
    values = {
        "matrix": np.arange(6.0).reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
        "structured": np.zeros(2, dtype=[("a", "f8"), ("b", "i4")]),
        "scalar": np.float64(-357.05872304),
        "tensor": torch.arange(5.0).reshape(5, 1),
        "hooks": OrderedDict(a=1),
    }
    out = _load(pickle.dumps(values, protocol=protocol))
    assert isinstance(out, dict)
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(out[name], value)
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(out[name], value)
            assert out[name].dtype == value.dtype and type(out[name]) is np.ndarray
        else:
            assert out[name] == value


class _Shell:
    def __init__(self, func: object, marker: Path) -> None:
        self.func, self.marker = func, marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        if self.func is eval:
            return (eval, (f"open({str(self.marker)!r}, 'w')",))
        return (self.func, (f"touch {self.marker}",))


@pytest.mark.parametrize("func", [os.system, eval, __import__("subprocess").getoutput])
def test_code_execution_refused(tmp_path: Path, func: object) -> None:
    marker = tmp_path / "pwned"
    data = pickle.dumps({"x": _Shell(func, marker)})
    with pytest.raises(SourceError) as info:
        _load(data)
    assert "f.lmdb" in str(info.value) and "[record 7]" in str(info.value)
    assert "unsafe pickle" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("os", "system"),
        ("builtins", "eval"),
        ("subprocess", "Popen"),
        ("copyreg", "_reconstructor"),
    ],
)
def test_refusal_names_the_global(module: str, name: str) -> None:
    data = f"c{module}\n{name}\n(S'true'\ntR.".encode()  # protocol 0 GLOBAL + REDUCE
    with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
        SafeUnpickler(__import__("io").BytesIO(data)).load()
    with pytest.raises(SourceError, match=f"{module}.{name}"):
        _load(data)


def test_nested_torch_storage_is_loaded_weights_only(tmp_path: Path) -> None:
    # torch.storage._load_from_bytes does a full torch.load; ours must refuse what is inside.
    marker = tmp_path / "pwned"
    inner = pickle.dumps(_Shell(os.system, marker), protocol=2)

    class Outer:
        def __reduce__(self) -> tuple[object, tuple[bytes]]:
            return (torch.storage._load_from_bytes, (inner,))

    with pytest.raises(SourceError, match="nested torch storage refused"):
        _load(pickle.dumps(Outer()))
    assert not marker.exists()


def test_object_arrays_and_backward_hooks_refused() -> None:
    with pytest.raises(SourceError, match="object dtype"):
        _load(pickle.dumps(np.array([1, None], dtype=object)))
    with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what devsets hold
        warnings.simplefilter("ignore")
        storage = torch.zeros(2).storage()

    class HookedTensor:  # torch drops hooks when pickling; a crafted pickle need not
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            hooks = OrderedDict(h=1)
            return (torch._utils._rebuild_tensor_v2, (storage, 0, (2,), (1,), False, hooks))

    class OversizedView:  # a view past the end of its storage (torch would grow it)
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return (torch._utils._rebuild_tensor_v2, (storage, 0, (1000,), (1,), False, {}))

    with pytest.raises(SourceError, match="backward hooks"):
        _load(pickle.dumps(HookedTensor()))
    with pytest.raises(SourceError, match="reaches element 999 of a 2-element storage"):
        _load(pickle.dumps(OversizedView()))
    # without hooks the same pickle is a plain tensor
    plain = _load(pickle.dumps(torch.zeros(2)))
    assert isinstance(plain, torch.Tensor) and plain.shape == (2,)


@pytest.mark.parametrize("data", [b"", b"\x80\x05garbage", pickle.dumps({"a": [1, 2]})[:-4]])
def test_corrupt_pickles_give_one_line_source_error(data: bytes) -> None:
    with pytest.raises(SourceError) as info:
        _load(data)
    message = str(info.value)
    assert message.startswith("f.lmdb [record 7]: corrupt pickle") and "\n" not in message
    assert info.value.file == "f.lmdb" and info.value.key == "7"


def test_emmet_stand_ins_keep_plain_data() -> None:
    # How emmet pickles SymmetryData (pydantic) and CrystalSystem (Enum), without emmet.
    data = (
        b"\x80\x04\x8c\x13emmet.core.symmetry\x94\x8c\x0cSymmetryData\x94\x93\x94)\x81\x94}\x94"
        b"(\x8c\x08__dict__\x94}\x94(\x8c\x0ecrystal_system\x94\x8c\x13emmet.core.symmetry"
        b"\x94\x8c\rCrystalSystem\x94\x93\x94\x8c\x08Trigonal\x94\x85\x94R\x94\x8c\x06number"
        b"\x94K\x98u\x8c\x12__pydantic_extra__\x94Nub."
    )
    out = _load(data)
    assert isinstance(out, SymmetryData)
    assert out.get("number") == 152
    system = out.get("crystal_system")
    assert isinstance(system, CrystalSystem) and system == "Trigonal" and str(system) == "Trigonal"


def test_every_devset_record_loads(samples: Path) -> None:
    import lmdb

    for path in sorted((samples / "matsciml-devsets").glob("*/data.lmdb")):
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False)
        with env.begin() as txn:
            for key, value in txn.cursor():
                assert isinstance(safe_loads(value, file=str(path), key=key.decode()), dict)
        env.close()


def _pyg1_pickle(data: object) -> bytes:
    """``data`` pickled as PyG 1.x did: the fields as the object's own state, the unset
    standard attributes ``None``."""
    import copyreg

    cls = type(data)

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj: object) -> object:
            if type(obj) is cls:
                state = {"x": None, "edge_index": None, "__num_nodes__": None, **obj.to_dict()}
                return copyreg.__newobj__, (cls,), state  # type: ignore[attr-defined]
            return NotImplemented

    buffer = __import__("io").BytesIO()
    Pickler(buffer, protocol=4).dump(data)
    return buffer.getvalue()


def test_pyg_data_reads_as_plain_fields_in_both_layouts() -> None:
    pyg = pytest.importorskip("torch_geometric.data")
    data = pyg.Data(pos=torch.zeros(2, 3), natoms=2)
    data.sid, data.y = 7, -1.5
    pyg2 = pickle.dumps(data, protocol=-1)
    pyg1 = _pyg1_pickle(data)
    assert b"GlobalStorage" in pyg2 and b"GlobalStorage" not in pyg1
    for blob in (pyg1, pyg2):
        out = _load(blob)
        assert isinstance(out, PygData)
        fields = out.as_dict()
        assert sorted(fields) == ["natoms", "pos", "sid", "y"]
        assert torch.equal(fields["pos"], torch.zeros(2, 3)) and fields["y"] == -1.5


def test_pyg_admits_only_data_and_its_storage(tmp_path: Path) -> None:
    pyg = pytest.importorskip("torch_geometric.data")
    batch = pyg.Batch.from_data_list([pyg.Data(pos=torch.zeros(1, 3))])
    with pytest.raises(SourceError, match=r"f.lmdb \[record 7\]: unsafe pickle: refused global"):
        _load(pickle.dumps(batch))
    marker = tmp_path / "pwned"
    data = pyg.Data(pos=torch.zeros(1, 3))
    data.payload = _Shell(os.system, marker)
    for blob in (pickle.dumps(data), _pyg1_pickle(data)):
        with pytest.raises(SourceError, match=r"refused global posix\.system"):
            _load(blob)
    assert not marker.exists()


def test_pyg_stand_ins_run_nothing_they_are_handed() -> None:
    # The attribute classes PyG pickles by reference cannot be instantiated by a pickle, and a
    # Data whose _store is not a storage is refused.
    attr = b"\x80\x04\x8c\x19torch_geometric.data.data\x8c\x0cDataEdgeAttr\x93)\x81."
    with pytest.raises(SourceError, match="instances of PyG attribute classes refused"):
        _load(attr)
    data_with_list_store = (
        b"\x80\x04\x8c\x19torch_geometric.data.data\x8c\x04Data\x93)\x81}\x8c\x06_store]sb."
    )
    with pytest.raises(SourceError, match="PyG Data whose _store is a list"):
        _load(data_with_list_store)

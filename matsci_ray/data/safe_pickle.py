"""An allow-list unpickler for the pickled records of the MatSciML LMDB devsets.

``pickle.loads`` runs whatever callable a pickle names, so a devset file from an untrusted mirror
could execute code on every Ray worker that reads it. :class:`SafeUnpickler` admits only the
globals these files were found to need (inspected with ``pickletools`` on every record of every
devset) and refuses everything else with :class:`UnsafePickleError`:

- numpy: ``dtype``, ``ndarray``, ``_frombuffer``, ``_reconstruct``, ``scalar`` (both the numpy 1
  ``numpy.core`` and numpy 2 ``numpy._core`` spellings), restricted to non-object dtypes;
- torch: ``_rebuild_tensor_v2`` (without backward hooks) and ``torch.storage._load_from_bytes``,
  which is *replaced*: the original does an unrestricted nested ``torch.load``;
- ``collections.OrderedDict`` (torch's empty backward-hook dict) and ``_codecs.encode`` for
  latin-1 only (how protocol 2 spells bytes);
- pymatgen core classes (built from their ``__dict__``; no code of theirs runs but ``__init__``
  on plain data);
- emmet-core classes, mapped to inert stand-ins so emmet need not be installed;
- ``torch_geometric`` ``Data`` and ``GlobalStorage`` (OC20's LMDB records), mapped to inert
  stand-ins that keep the fields in either pickle layout (PyG 1.x: the attributes themselves;
  PyG 2.x: a ``_store``), plus the two attribute classes PyG >= 2.3 pickles by reference. No
  PyG code runs, and PyG need not be installed; its other classes (``Batch``, ``HeteroData``)
  are refused.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from importlib import import_module
from typing import Any

import numpy as np

from matsci_ray.data.record import SourceError


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list."""


class EmmetModel:
    """Inert stand-in for an emmet-core pydantic model: keeps its fields as a plain dict."""

    def __init__(self, **fields: Any) -> None:
        self.fields: dict[str, Any] = dict(fields)

    def __setstate__(self, state: Any) -> None:
        # pydantic pickles {"__dict__": fields, "__pydantic_extra__": ..., ...}.
        if isinstance(state, dict) and isinstance(state.get("__dict__"), dict):
            self.fields = dict(state["__dict__"])
            extra = state.get("__pydantic_extra__")
            if isinstance(extra, dict):
                self.fields.update(extra)
        elif isinstance(state, dict):
            self.fields = dict(state)
        else:
            raise UnsafePickleError(f"unexpected state for an emmet model: {type(state).__name__}")

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fields!r})"


class EmmetEnum:
    """Inert stand-in for an emmet-core ``Enum`` member (pickled as ``Class(value)``)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"

    def __eq__(self, other: object) -> bool:
        return self.value == (other.value if isinstance(other, EmmetEnum) else other)

    def __hash__(self) -> int:
        return hash(self.value)


class SymmetryData(EmmetModel):
    """Stand-in for ``emmet.core.symmetry.SymmetryData`` (fields: number, symbol, …)."""


class CrystalSystem(EmmetEnum):
    """Stand-in for ``emmet.core.symmetry.CrystalSystem`` (value e.g. ``"Cubic"``)."""


class _PygFields:
    """Holds the fields of a pickled PyG object as a plain dict (set by ``__setstate__``)."""

    _fields: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__.get("_fields", {}))  # empty if the pickle never set a state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({sorted(self.as_dict())})"


class PygStorage(_PygFields):
    """Stand-in for ``torch_geometric.data.storage.GlobalStorage``: keeps its ``_mapping`` (the
    fields) and drops ``_parent``, the back-reference to the ``Data`` that holds it."""

    def __setstate__(self, state: Any) -> None:
        mapping = state.get("_mapping") if isinstance(state, dict) else None
        if not isinstance(mapping, dict):
            raise UnsafePickleError("PyG GlobalStorage without a _mapping dict")
        self._fields = {k: v for k, v in mapping.items() if isinstance(k, str)}


class PygData(_PygFields):
    """Inert stand-in for ``torch_geometric.data.data.Data``: :meth:`as_dict` gives its fields.

    PyG 1.x pickles a ``Data``'s attributes as they are, the unset standard ones (``x``,
    ``edge_index``, ``face``, …) as ``None`` beside a private ``__num_nodes__``; PyG 2.x
    pickles ``{"_store": GlobalStorage, ...}``. Both read back as the same fields.
    """

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"unexpected state for a PyG Data: {type(state).__name__}")
        store = state.get("_store")
        if store is None:  # PyG 1.x
            self._fields = {
                k: v
                for k, v in state.items()
                if isinstance(k, str) and not k.startswith("_") and v is not None
            }
        elif isinstance(store, PygStorage):  # PyG 2.x
            self._fields = store.as_dict()
        else:
            raise UnsafePickleError(f"PyG Data whose _store is a {type(store).__name__}")


class PygAttrClass:
    """What PyG's ``DataEdgeAttr``/``DataTensorAttr`` resolve to: PyG >= 2.3 pickles these
    classes by reference only (``Data._edge_attr_cls``), so an instance is never needed."""

    def __new__(cls, *args: Any, **kwargs: Any) -> PygAttrClass:
        raise UnsafePickleError("instances of PyG attribute classes refused")


def _check_dtype(dtype: Any) -> np.dtype:
    # Object dtypes would let raw bytes or pickled state stand for Python objects. Checked
    # again where a dtype is used, as a pickle can BUILD (``__setstate__``) a dtype after
    # creating it.
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise UnsafePickleError("numpy object dtype refused")
    return dt


def _dtype(obj: Any, align: bool = False, copy: bool = False) -> np.dtype:
    """``numpy.dtype`` as pickles call it: ``dtype("f8", False, True)``."""
    if not isinstance(obj, str):
        raise UnsafePickleError("numpy dtype from a non-string spec refused")
    return _check_dtype(np.dtype(obj, align=bool(align), copy=bool(copy)))


def _frombuffer(buf: Any, dtype: Any, shape: tuple[int, ...], order: str) -> np.ndarray:
    # numpy's own _frombuffer (protocol-5 arrays), with the dtype checked first.
    return np.frombuffer(buf, dtype=_check_dtype(dtype)).reshape(shape, order=order)


def _scalar(dtype: Any, data: Any = None) -> Any:
    dt = _check_dtype(dtype)
    if not isinstance(data, bytes | bytearray) or len(data) != dt.itemsize:
        raise UnsafePickleError("numpy scalar with malformed data")
    return np.frombuffer(bytes(data), dtype=dt)[0]


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); other codecs (zlib, …)
    # are not needed and could inflate data, so only latin-1 is admitted.
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} refused")
    return text.encode("latin-1")


class _NdarrayToken:
    """What the global ``numpy.ndarray`` resolves to: only usable as ``_reconstruct``'s class.

    Handing out ``np.ndarray`` itself would let a pickle call it on a raw buffer.
    """


def _reconstruct(cls: Any, shape: Any, dtype: Any) -> np.ndarray:
    # Protocol <5 arrays: _reconstruct(ndarray, (0,), b"b"), then ndarray.__setstate__ whose
    # state's dtype came from _dtype above (so object arrays cannot be rebuilt).
    if cls is not _NdarrayToken:
        raise UnsafePickleError("numpy _reconstruct of a class other than ndarray refused")
    if tuple(shape) != (0,):  # numpy always writes (0,); the data comes with __setstate__
        raise UnsafePickleError(f"numpy _reconstruct with shape {shape!r} refused")
    return np.ndarray((0,), dtype=_check_dtype(dtype))


def _load_from_bytes(data: bytes) -> Any:
    """Replacement for ``torch.storage._load_from_bytes`` that loads weights only."""
    import torch

    if not isinstance(data, bytes | bytearray):
        raise UnsafePickleError("torch storage from non-bytes data refused")
    try:
        return torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise
        # torch's message is a paragraph of advice; keep the line that says what was refused.
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln), lines[-1])
        raise UnsafePickleError(f"nested torch storage refused: {detail}") from None


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> Any:
    import torch
    from torch._utils import _rebuild_tensor_v2 as rebuild

    # Backward hooks are callables that would run later, during autograd: never accept any.
    if backward_hooks:
        raise UnsafePickleError("tensor with backward hooks refused")
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError(f"tensor storage of type {type(storage).__name__} refused")
    # torch would silently grow the storage to fit the view; a genuine pickle never needs it.
    dims = [(int(n), int(s)) for n, s in zip(size, stride, strict=True)]
    if int(storage_offset) < 0 or any(n < 0 or s < 0 for n, s in dims):
        raise UnsafePickleError("tensor with negative size, stride or offset refused")
    if all(n > 0 for n, _ in dims):
        # Element count via the untyped storage: TypedStorage.size() warns (deprecated).
        count = storage._untyped_storage.nbytes() // storage.dtype.itemsize
        last = int(storage_offset) + sum((n - 1) * s for n, s in dims)
        if last >= count:
            raise UnsafePickleError(
                f"tensor view reaches element {last} of a {count}-element storage"
            )
    return rebuild(storage, storage_offset, size, stride, requires_grad, OrderedDict(), metadata)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "dtype"): _dtype,
    ("numpy", "ndarray"): _NdarrayToken,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("emmet.core.symmetry", "SymmetryData"): SymmetryData,
    ("emmet.core.symmetry", "CrystalSystem"): CrystalSystem,
    ("torch_geometric.data.data", "Data"): PygData,
    ("torch_geometric.data.storage", "GlobalStorage"): PygStorage,
    ("torch_geometric.data.data", "DataEdgeAttr"): PygAttrClass,
    ("torch_geometric.data.data", "DataTensorAttr"): PygAttrClass,
}
for _module in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_module}.numeric", "_frombuffer")] = _frombuffer
    _ALLOWED[(f"{_module}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED[(f"{_module}.multiarray", "scalar")] = _scalar
_PYMATGEN: dict[str, tuple[str, ...]] = {
    "pymatgen.core.structure": ("Structure", "IStructure", "Molecule", "IMolecule"),
    "pymatgen.core.lattice": ("Lattice",),
    "pymatgen.core.sites": ("Site", "PeriodicSite"),
    "pymatgen.core.composition": ("Composition",),
    "pymatgen.core.periodic_table": ("Element", "Species", "DummySpecies"),
}
for _module, _names in _PYMATGEN.items():
    for _name in _names:
        _ALLOWED[(_module, _name)] = f"{_module}:{_name}"


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only allow-listed globals."""

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED.get((module, name))
        if target is None:
            raise UnsafePickleError(f"refused global {module}.{name} (not on the allow-list)")
        if isinstance(target, str):
            # pymatgen is imported only when a pickle needs it (LiPS workers never do).
            mod, attr = target.split(":")
            return getattr(import_module(mod), attr)
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("persistent ids refused")


def safe_loads(data: bytes, *, file: str, key: str) -> Any:
    """Unpickle ``data`` through :class:`SafeUnpickler`.

    Raises :class:`SourceError` naming ``file`` and ``key`` for a refused global or a corrupt
    or truncated pickle, with a one-line message rather than the unpickler's traceback.
    """
    try:
        return SafeUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as exc:
        raise SourceError(file, f"unsafe pickle: {exc}", key) from None
    except Exception as exc:  # pickle raises many types (EOFError, ValueError, …) on bad data
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise SourceError(
            file, f"corrupt pickle ({type(exc).__name__}: {message})"[:300], key
        ) from None

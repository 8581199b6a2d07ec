"""Per-record validation: every rule refuses what it should and passes real structures."""

from __future__ import annotations

import numpy as np
import pytest

from matsci_ray.data.record import Record
from matsci_ray.data.validate import check_record


def _record(**overrides: object) -> Record:
    base: dict[str, object] = {
        "dataset": "test",
        "sample_id": "s0",
        "atomic_numbers": np.array([3, 15]),
        "positions": np.array([[0.0, 0.0, 0.0], [1.5, 1.5, 1.5]]),
        "cell": np.eye(3) * 4.0,
        "pbc": np.array([True, True, True]),
        "targets": {"energy": -3.2, "forces": np.zeros((2, 3))},
    }
    base.update(overrides)
    return Record(**base)  # type: ignore[arg-type]


def test_sound_record_passes() -> None:
    assert check_record(_record()) is None


@pytest.mark.parametrize(
    ("overrides", "category"),
    [
        ({"positions": np.zeros((3, 3))}, "shape"),
        ({"atomic_numbers": np.array([0, 15])}, "element"),
        ({"positions": np.array([[0.0, 0.0, np.nan], [1.5, 1.5, 1.5]])}, "non-finite"),
        ({"cell": np.zeros((3, 3))}, "cell"),
        ({"cell": np.eye(3) * 4e-10}, "cell"),  # metres, not Å
        ({"targets": {}}, "label"),
        ({"targets": {"forces": np.zeros((3, 3))}}, "label"),
        ({"targets": {"energy": float("inf")}}, "non-finite"),
        ({"targets": {"space_group": 231}}, "range"),
        ({"targets": {"band_gap": -0.1}}, "range"),
        ({"targets": {"is_stable": 1.0}}, "label"),
        ({"positions": np.array([[0.0, 0.0, 0.0], [0.2, 0.2, 0.0]])}, "distance"),
    ],
)
def test_rejects_by_category(overrides: dict[str, object], category: str) -> None:
    reason = check_record(_record(**overrides))
    assert reason is not None and reason.split(":")[0] == category, reason


def test_distance_uses_periodic_images() -> None:
    # 0.3 Å apart only through the boundary: x = 0.1 and x = 3.8 in a 4 Å cell
    record = _record(positions=np.array([[0.1, 0.0, 0.0], [3.8, 0.0, 0.0]]))
    assert "0.300 Å" in (check_record(record) or "")
    record.pbc = np.array([False, True, True])
    assert check_record(record) is None


def test_self_image_too_close_is_rejected() -> None:
    record = _record(
        atomic_numbers=np.array([3]),
        positions=np.zeros((1, 3)),
        cell=np.diag([0.4, 5.0, 5.0]),
        targets={"energy": -1.0},
    )
    reason = check_record(record) or ""
    assert reason.startswith("distance: atom 0 and its own image are 0.400 Å"), reason


def test_molecule_without_cell_passes() -> None:
    record = _record(cell=np.zeros((3, 3)), pbc=np.array([False, False, False]))
    assert check_record(record) is None

"""EGNN and MEGNet beyond the encoder contract (``test_encoder_contract.py``): sizes at the
default settings, EGNN with coordinate updates, and EGNN's factorised edge layer."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from matsci_ray.models.base import Encoder
from matsci_ray.models.egnn import EGNN
from matsci_ray.models.megnet import MEGNet
from tests.test_encoder_contract import (
    CUTOFF,
    check_forces_match_finite_differences,
    check_invariance,
    crystals,
    to_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _egnn_with_coordinate_updates() -> EGNN:
    torch.manual_seed(0)
    return EGNN(
        hidden_dim=32, num_layers=3, mlp_dim=32, num_rbf=16, cutoff=CUTOFF, update_coords=True
    )


def test_coordinate_updates_keep_invariance_and_conservative_forces() -> None:
    """Between layers the coordinates move equivariantly; the outputs stay invariant."""
    check_invariance(_egnn_with_coordinate_updates())
    check_forces_match_finite_differences(_egnn_with_coordinate_updates())


@pytest.mark.parametrize(
    ("factory", "low", "high"),
    [
        (EGNN, 0.6e6, 0.8e6),
        (lambda: EGNN(update_coords=True), 0.6e6, 0.8e6),
        (MEGNet, 1.2e6, 1.45e6),
    ],
)
def test_default_parameter_counts(factory: Callable[[], Encoder], low: float, high: float) -> None:
    model = factory()
    assert low <= model.num_parameters() <= high
    out = model(to_batch(crystals()[:1], double=False))
    assert out.node.shape[-1] == model.node_dim and out.graph.shape[-1] == model.graph_dim


def test_egnn_factorised_edge_linear_is_the_paper_concatenation() -> None:
    """The per-node split of the first edge Linear gives phi_e([h_i, h_j, d2, rbf]) exactly."""
    from matsci_ray.models.egnn import EGNNLayer

    gen = torch.Generator().manual_seed(3)
    layer = EGNNLayer(8, 16, 5, update_coords=False, attention=False, aggr_norm=1.0).double()
    h = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    src = torch.randint(0, 6, (20,), generator=gen)
    dst = torch.randint(0, 6, (20,), generator=gen)
    d2 = torch.rand(20, generator=gen, dtype=torch.float64)
    rbf = torch.rand(20, 5, generator=gen, dtype=torch.float64)
    direct = layer.edge_mlp[0](torch.cat([h[dst], h[src], d2.unsqueeze(-1), rbf], dim=-1))
    torch.testing.assert_close(layer._first_edge_linear(h, d2, rbf, src, dst), direct)

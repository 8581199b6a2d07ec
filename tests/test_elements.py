"""Element descriptors let an embedding place an element it never saw beside its neighbours."""

from __future__ import annotations

import torch

from matsci_ray.models.blocks import AtomEmbedding
from matsci_ray.models.elements import GROUPS, PERIODS, element_features


def test_each_element_has_one_period_group_and_block() -> None:
    table = element_features(118)
    assert torch.equal(table[0], torch.zeros_like(table[0]))
    onehots = table[1:, : PERIODS + GROUPS + 4]
    assert torch.equal(onehots.sum(1), torch.full((118,), 3.0))
    period, group = table[:, :PERIODS].argmax(1), table[:, PERIODS : PERIODS + GROUPS].argmax(1)
    assert group[78] == group[46] == group[28]  # Pt, Pd, Ni: group 10
    assert period[78] == 5  # sixth row (zero-based)
    assert torch.isfinite(table).all()


def test_unseen_element_moves_with_its_chemical_neighbours() -> None:
    """Train the embedding of Pd towards a target: with descriptors Pt (never in a batch)
    follows Pd more than Na does; a plain table leaves Pt exactly where it started."""
    for features in (True, False):
        torch.manual_seed(0)
        embedding = AtomEmbedding(8, element_features=features)
        before = embedding(torch.tensor([78, 11])).detach().clone()
        target = torch.ones(8)
        optimizer = torch.optim.SGD(embedding.parameters(), lr=0.05)
        for _ in range(50):
            loss = (embedding(torch.tensor([46])) - target).pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        pt, na = (embedding(torch.tensor([78, 11])).detach() - before).norm(dim=1)
        if features:
            assert pt > 2 * na > 0
            state = embedding.state_dict()
            assert torch.equal(state["descriptors"], element_features(118))  # saved with it
        else:
            assert pt == na == 0

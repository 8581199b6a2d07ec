"""PCGrad: the projection on hand-made gradients, and DDP equivalence (2 gloo ranks vs 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from matsci_ray.train.pcgrad import pcgrad_backward, project_conflicting


def test_conflicting_gradients_are_projected() -> None:
    g1 = torch.tensor([1.0, 0.0])
    g2 = torch.tensor([-1.0, 1.0])  # g1 · g2 = -1: conflict
    combined = project_conflicting(torch.stack([g1, g2]))
    # g1 - (g1·g2)/|g2|² g2 = [0.5, 0.5];  g2 - (g2·g1)/|g1|² g1 = [0, 1]
    torch.testing.assert_close(combined, torch.tensor([0.5, 1.5]))
    # each projected gradient no longer conflicts with the other task
    assert torch.dot(torch.tensor([0.5, 0.5]), g2) >= 0


def test_agreeing_gradients_are_summed_unchanged() -> None:
    grads = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]])
    torch.testing.assert_close(project_conflicting(grads), grads.sum(0))


def test_three_tasks_order_is_seeded() -> None:
    grads = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    a = project_conflicting(grads, torch.Generator().manual_seed(7))
    b = project_conflicting(grads, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict(
        {
            "shared": torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh()),
            "a": torch.nn.Linear(8, 1),
            "b": torch.nn.Linear(8, 1),
        }
    )


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=g)
    return x, torch.randn(8, 1, generator=g), -torch.randn(8, 1, generator=g)


def _step(model: torch.nn.Module, x: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor) -> None:
    h = model["shared"](x)
    losses = [((model["a"](h) - ya) ** 2).mean(), ((model["b"](h) - yb) ** 2).mean()]
    shared = list(model["shared"].parameters())
    specific = [*model["a"].parameters(), *model["b"].parameters()]
    pcgrad_backward(losses, shared, specific, torch.Generator().manual_seed(5))
    torch.optim.SGD(model.parameters(), lr=0.1).step()


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = _model()
    x, ya, yb = _data()
    half = slice(4 * rank, 4 * rank + 4)  # each rank sees half of the global batch
    _step(model, x[half], ya[half], yb[half])
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank_on_the_global_batch(tmp_path: Path) -> None:
    reference = _model()
    _step(reference, *_data())
    out = tmp_path / "ddp.pt"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2)
    distributed = torch.load(out, weights_only=True)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-6, atol=1e-7)
    # and the update differs from projecting per rank then averaging (why the order matters)
    assert not torch.equal(_model().state_dict()["a.weight"], reference.state_dict()["a.weight"])


@pytest.mark.parametrize("conflict", [True, False])
def test_projection_only_when_conflicting(conflict: bool) -> None:
    g1 = torch.tensor([1.0, 1.0])
    g2 = torch.tensor([-2.0, 0.5]) if conflict else torch.tensor([2.0, 0.5])
    combined = project_conflicting(torch.stack([g1, g2]))
    assert torch.allclose(combined, g1 + g2) != conflict

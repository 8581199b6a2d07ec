"""PCGrad: gradient surgery for multi-task learning (Yu et al., NeurIPS 2020).

For every task ``i`` the gradient ``g_i`` of the shared parameters is projected onto the normal
plane of each other task's gradient ``g_j`` it conflicts with (``g_i · g_j < 0``), in a random
order; the projected gradients are summed. Task-specific parameters (heads) get their own
task's gradient unchanged.

Under data parallelism the per-task gradients are all-reduced *before* the projection, so the
update on N workers equals the update of one worker on the same global batch: projecting local
gradients and averaging afterwards would not (the projection is not linear).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def project_conflicting(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Combine per-task gradients ``(T, P)`` into one ``(P,)`` update by PCGrad."""
    num_tasks = grads.shape[0]
    squared = (grads * grads).sum(dim=1).clamp_min(1e-20)
    combined = torch.zeros_like(grads[0])
    for i in range(num_tasks):
        g = grads[i].clone()
        for j in torch.randperm(num_tasks, generator=generator).tolist():
            if j == i:
                continue
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g = g - dot / squared[j] * grads[j]
        combined += g
    return combined


def _flat(grads: Sequence[Tensor | None], params: Sequence[nn.Parameter]) -> Tensor:
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _all_reduce_mean(tensor: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def _assign(flat: Tensor, params: Sequence[nn.Parameter]) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def pcgrad_backward(
    losses: Sequence[Tensor],
    shared: Sequence[nn.Parameter],
    specific: Sequence[nn.Parameter],
    generator: torch.Generator | None = None,
) -> None:
    """Set ``.grad`` of ``shared`` by PCGrad and of ``specific`` by the summed losses.

    Every worker must call this with the same ``generator`` state so the projection order, and
    therefore the update, is identical everywhere.
    """
    per_task = torch.stack(
        [
            _flat(torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True), shared)
            for loss in losses
        ]
    )
    per_task = _all_reduce_mean(per_task)
    _assign(project_conflicting(per_task, generator), shared)
    if specific:
        total = torch.stack(list(losses)).sum()
        head = _flat(torch.autograd.grad(total, specific, allow_unused=True), specific)
        _assign(_all_reduce_mean(head), specific)

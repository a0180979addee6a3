"""Point-cloud grouping in pure torch: farthest-point sampling, k-nearest neighbours, local patches.

These replace the CUDA extensions of the official Point-MAE / Point-BERT code (``pointnet2_ops``'
``furthest_point_sample`` and ``knn_cuda``), run on any device and are batched: the only Python loop is FPS's
inherently sequential loop over the ``n`` samples, each step vectorised over the batch and all points.

Determinism: FPS starts at point index 0 of every cloud, as ``pointnet2_ops`` does (so the same cloud always gives
the same centres); ``random_start=True`` draws the first index per cloud from ``generator`` instead. Ties in the
farthest distance pick the lowest index (``torch.argmax``'s documented rule).

Deviations from the reference implementation:
    * ``pointnet2_ops``' FPS kernel skips points whose squared norm is at most 1e-3 (within about 0.03 of the
      origin) when looking for the next farthest point; here every point is a candidate. On normalised clouds the
      farthest point is rarely that close to the origin, so centres differ only in such corner cases.
    * kNN distances are exact squared differences (Point-BERT's ``knn_point`` expands ``|a|^2 + |b|^2 - 2ab``,
      which can reorder near-ties); the neighbour set is the same up to ties.
"""

from __future__ import annotations

from typing import Optional

import torch


def _check_xyz(xyz: torch.Tensor, name: str = "xyz") -> None:
    if not isinstance(xyz, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape (B, N, 3), got {type(xyz).__name__}")
    if xyz.dim() != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (B, N, 3) (batch, points, xyz), got {tuple(xyz.shape)}")
    if not xyz.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {xyz.dtype}")


def farthest_point_sample(xyz: torch.Tensor, n: int, random_start: bool = False,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Indices of ``n`` points chosen by iterative farthest-point sampling.

    Each step adds the point whose squared distance to the already chosen set is largest.

    Args:
        xyz: Points ``(B, N, 3)``.
        n: Number of samples, ``1 <= n <= N``.
        random_start: Draw the first index per cloud from ``generator`` (default: index 0, as the official code).
        generator: Random generator for ``random_start`` (on ``xyz``'s device); ignored otherwise.

    Returns:
        ``(B, n)`` int64 indices into dimension 1 of ``xyz``.

    Raises:
        ValueError: bad shape or ``n`` out of range.
    """
    _check_xyz(xyz)
    b, num, _ = xyz.shape
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= num:
        raise ValueError(f"farthest_point_sample: n must be an int in [1, {num}] (the number of points), got {n!r}")
    with torch.no_grad():
        pts = xyz.detach().float()
        batch = torch.arange(b, device=xyz.device)
        if random_start:
            far = torch.randint(num, (b,), device=xyz.device, generator=generator)
        else:
            far = torch.zeros(b, dtype=torch.long, device=xyz.device)
        idx = torch.empty(b, n, dtype=torch.long, device=xyz.device)
        dist = torch.full((b, num), float("inf"), device=xyz.device)
        for i in range(n):
            idx[:, i] = far
            d = ((pts - pts[batch, far].unsqueeze(1)) ** 2).sum(-1)
            dist = torch.minimum(dist, d)
            far = dist.argmax(-1)
    return idx


def knn_indices(query: torch.Tensor, xyz: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` points of ``xyz`` nearest to each query point, nearest first.

    Args:
        query: Query points ``(B, G, 3)``.
        xyz: Points ``(B, N, 3)``.
        k: Neighbours per query, ``1 <= k <= N``.

    Returns:
        ``(B, G, k)`` int64 indices into dimension 1 of ``xyz``, in increasing distance.
    """
    _check_xyz(query, "query")
    _check_xyz(xyz)
    if query.shape[0] != xyz.shape[0]:
        raise ValueError(f"query and xyz batch sizes differ: {query.shape[0]} vs {xyz.shape[0]}")
    num = xyz.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num:
        raise ValueError(f"knn_indices: k must be an int in [1, {num}] (the number of points), got {k!r}")
    with torch.no_grad():
        d = ((query.detach().float().unsqueeze(2) - xyz.detach().float().unsqueeze(1)) ** 2).sum(-1)  # B G N
        return d.topk(k, dim=-1, largest=False, sorted=True).indices


def gather_points(xyz: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``xyz[b, idx[b, ...]]`` for every batch element: ``(B, N, C)`` and ``(B, *S)`` give ``(B, *S, C)``."""
    b = xyz.shape[0]
    flat = idx.reshape(b, -1)
    out = xyz.gather(1, flat.unsqueeze(-1).expand(-1, -1, xyz.shape[-1]))
    return out.reshape(*idx.shape, xyz.shape[-1])


def group_points(xyz: torch.Tensor, num_group: int, group_size: int, random_start: bool = False,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-MAE's patches: FPS centres, their ``group_size`` nearest points, each patch centred on its centre.

    Args:
        xyz: Points ``(B, N, 3)``.
        num_group: Number of patches (FPS centres).
        group_size: Points per patch (kNN, the centre itself included).
        random_start: See :func:`farthest_point_sample`.
        generator: See :func:`farthest_point_sample`.

    Returns:
        ``(neighborhood, center)``: ``(B, num_group, group_size, 3)`` local coordinates and ``(B, num_group, 3)``.
        Both are differentiable in ``xyz`` (the indices are not).
    """
    center = gather_points(xyz, farthest_point_sample(xyz, num_group, random_start, generator))
    idx = knn_indices(center, xyz, group_size)
    neighborhood = gather_points(xyz, idx) - center.unsqueeze(2)
    return neighborhood, center

"""The pure tensor math of the transfer diagnostic (:mod:`implicit_updates.analyses.transfer_diagnostic`): how well
one set of rows (training queries' MLP inputs) spans another (held-out queries'), and how well an update fitted on
the first set gives the second what it needs.

Row spaces and fits come from :class:`~implicit_updates.math.lowrank.Solver` with ``refuse_dependent=False``: a thin
SVD, directions below ``rcond`` of the largest singular value dropped. Principal angles
between two subspaces are the arc-cosines of the singular values of ``Q_a^T Q_b`` for orthonormal bases ``Q_a``,
``Q_b`` (Björck & Golub 1973, "Numerical methods for computing angles between linear subspaces"). The fitted update
is the minimum-norm least-squares solution ``pinv(X) T`` through the kept directions: for independent rows (all
singular values above the floor) it is the exact ``delta = pinv(X) T`` of
:func:`~implicit_updates.math.lowrank.first_layer_updates` and :func:`~implicit_updates.math.lowrank.output_update`,
exact on every row of ``X``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor


def coverage(basis: Float[Tensor, "r d"], rows: Float[Tensor, "m d"]) -> float:
    """Mean over ``rows`` of ``||Proj(row)||^2 / ||row||^2``, the projection onto the span of ``basis``'s orthonormal
    rows: 1 when every row lies in the subspace, 0 when every row is orthogonal to it. Zero rows count as covered."""
    norms = rows.pow(2).sum(-1)
    inside = (rows @ basis.T).pow(2).sum(-1)
    share = torch.where(norms > 0, inside / norms.clamp_min(torch.finfo(rows.dtype).tiny), torch.ones_like(norms))
    return float(share.mean())


def principal_cosines(basis_a: Float[Tensor, "ra d"], basis_b: Float[Tensor, "rb d"]) -> Float[Tensor, " r"]:
    """Cosines of the principal angles between the spans of two orthonormal row bases: the singular values of
    ``Q_a^T Q_b`` (here ``basis_a @ basis_b.T``), descending, ``min(ra, rb)`` of them, clamped to ``[0, 1]``
    (Björck & Golub 1973)."""
    return torch.linalg.svdvals(basis_a @ basis_b.T).clamp(0.0, 1.0)


def relative_residual(predictions: Sequence[Tensor], targets: Sequence[Tensor]) -> float:
    """``sqrt(sum_i ||p_i - t_i||_F^2 / sum_i ||t_i||_F^2)`` over pairs (several maps' outputs at once): 0 when every
    prediction is exact, 1 when predicting nothing (zero). A zero target gives 0 if matched exactly, else inf."""
    num = sum(float((p - t).pow(2).sum()) for p, t in zip(predictions, targets, strict=True))
    den = sum(float(t.pow(2).sum()) for t in targets)
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return (num / den) ** 0.5

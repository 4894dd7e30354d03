"""Analysis of factored updates: alignment, effective rank, norms and output-correction directions, never dense.

Every update here is rank one, ``dW_i = u_i v_i^T`` (column ``u_i = W (m_i - m_x)``, row ``v_i = m_x/||m_x||^2``;
Dherin et al. 2025 Eq. 8, Innocenti & Achour 2025), so Frobenius inner products, norms and singular values follow
from the factors: ``<u1 v1^T, u2 v2^T>_F = (u1 . u2)(v1 . v2)`` and ``||u v^T||_F = ||u||_2 = ||u|| ||v||``.
A block's maps that read the MLP input share the row, so they are one update with their columns stacked.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from implicit_updates.math import core


def alignment(u1: Float[Tensor, "*batch d_out"], v1: Float[Tensor, "*batch d_in"], u2: Float[Tensor, "*batch d_out"],
              v2: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch"]:
    """Normalized Frobenius inner product ``(u1.u2)(v1.v2) / (|u1||v1||u2||v2|)`` of ``u1 v1^T`` and ``u2 v2^T``.

    Broadcasts over leading dimensions; 1 for parallel updates, 0 for orthogonal ones; zero updates give 0.
    """
    num = (u1 * u2).sum(-1) * (v1 * v2).sum(-1)
    den = u1.norm(dim=-1) * v1.norm(dim=-1) * u2.norm(dim=-1) * v2.norm(dim=-1)
    return torch.where(den > 0, num / den.where(den > 0, torch.ones_like(den)), torch.zeros_like(num))


def alignment_matrix(columns: Float[Tensor, "n d_out"], rows: Float[Tensor, "n d_in"]) -> Float[Tensor, "n n"]:
    """``[n, n]`` pairwise alignments of ``u_i v_i^T``; ``columns`` ``[n, d_out]``, ``rows`` ``[n or 1, d_in]``."""
    rows = rows.expand(columns.shape[0], rows.shape[-1])
    return alignment(columns[:, None], rows[:, None], columns[None], rows[None])


def difference_frobenius_norm(u1: Float[Tensor, "*batch d_out"], v1: Float[Tensor, "*batch d_in"],
                              u2: Float[Tensor, "*batch d_out"], v2: Float[Tensor, "*batch d_in"]
                              ) -> Float[Tensor, "*batch"]:
    """``||u1 v1^T - u2 v2^T||_F`` from the factors, without subtracting two large dense matrices.

    ``u1 v1^T - u2 v2^T = a v1^T + u2 b^T`` with ``a = u1 - u2`` and ``b = v1 - v2``, so the squared norm is
    ``|a|^2 |v1|^2 + |u2|^2 |b|^2 + 2 (a.u2)(v1.b)``: every term is built from the small differences. With a
    shared row (``b = 0``) it is exactly ``||u1 - u2|| ||v||``.
    """
    a, b = u1 - u2, v1 - v2
    squared = (a.pow(2).sum(-1) * v1.pow(2).sum(-1) + u2.pow(2).sum(-1) * b.pow(2).sum(-1)
               + 2 * (a * u2).sum(-1) * (v1 * b).sum(-1))
    return squared.clamp_min(0).sqrt()


def first_layer_factors(update, batch: int = 0) -> tuple[Float[Tensor, "pos d_out"], Float[Tensor, "q d_in"]]:
    """A :class:`BlockUpdate`'s first-layer factors: columns ``[pos, sum d_out]`` (maps stacked) and rows."""
    columns = torch.cat([u.column[batch] for u in update.first_layer], dim=-1)
    return columns, update.row[batch]


def position_alignment(result, block: int, batch: int = 0) -> Float[Tensor, "pos pos"]:
    """``[pos, pos]`` alignments between the updates of every pair of positions within ``block``."""
    return alignment_matrix(*first_layer_factors(result.block(block), batch))


def block_alignment(result, position: int = -1, batch: int = 0) -> Float[Tensor, "block block"]:
    """``[blocks, blocks]`` alignments between the decomposed blocks' updates at one ``position``.

    Needs every block's first-layer maps to have the same shapes (true for a HookedTransformer's blocks).
    """
    columns, rows = [], []
    for update in result.blocks:
        c, r = first_layer_factors(update, batch)
        columns.append(c[position])
        rows.append(r[position if r.shape[0] > 1 else 0])
    if len({c.shape for c in columns}) > 1 or len({r.shape for r in rows}) > 1:
        raise ValueError("the blocks' first-layer maps have different shapes, so their updates are not comparable")
    return alignment_matrix(torch.stack(columns), torch.stack(rows))


def update_norms(result, block: int, batch: int = 0) -> Float[Tensor, " pos"]:
    """``[pos]`` Frobenius (= spectral, rank one) norms ``||u_i|| ||v_i||`` of each position's update."""
    columns, rows = first_layer_factors(result.block(block), batch)
    return core.factored_frobenius_norm(rows, columns)


def summed_singular_values(result, block: int, positions: slice | Tensor | None = None, batch: int = 0
                           ) -> Float[Tensor, " k"]:
    """Singular values of ``sum_i dW_i`` over ``positions`` (all by default), from the factors (thin QR)."""
    columns, rows = first_layer_factors(result.block(block), batch)
    select = slice(None) if positions is None else positions
    columns = columns[select]
    rows = rows.expand(*columns.shape[:-1], rows.shape[-1]) if rows.shape[0] == 1 else rows[select]
    return core.summed_update_singular_values(rows, columns)


def summed_norms(result, block: int, positions: slice | Tensor | None = None, batch: int = 0) -> dict[str, float]:
    """Frobenius and spectral norms of the summed update, its numerical rank and its entropy effective rank."""
    sv = summed_singular_values(result, block, positions, batch)
    columns, rows = first_layer_factors(result.block(block), batch)
    scale = rows.norm() * columns.norm()  # the factors' rounding scale (core.numerical_rank)
    return {
        "frobenius": float(sv.pow(2).sum().sqrt()),
        "spectral": float(sv.max()) if sv.numel() else 0.0,
        "rank": core.numerical_rank(sv, max(rows.shape[-1], columns.shape[-1]), scale),
        "effective_rank": effective_rank(sv),
    }


def effective_rank(singular_values: Float[Tensor, " k"]) -> float:
    """Roy & Vetterli's effective rank ``exp(-sum p_k log p_k)`` with ``p = sigma / sum sigma`` (1 for rank one)."""
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    p = singular_values / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def delta_b_cosine(result, direction: Float[Tensor, " d_model"], batch: int = 0) -> Float[Tensor, "block pos"]:
    """``[blocks, pos]`` cosine between each output-bias correction ``delta_b_i = r_i - r_x`` and ``direction``.

    ``direction`` is ``[d_model]`` (e.g. a function vector); Dherin et al. Thm A.2's ``db'``. Zero vectors give 0.
    """
    delta_b = torch.stack([u.delta_b[batch] for u in result.blocks])  # [blocks, pos, d]
    direction = direction.to(delta_b)
    den = delta_b.norm(dim=-1) * direction.norm()
    num = delta_b @ direction
    return torch.where(den > 0, num / den.where(den > 0, torch.ones_like(den)), torch.zeros_like(num))

"""The math of implicit updates, as pure tensor functions (no framework knowledge).

Shapes: ``[batch, pos, d]`` for with-context activations and ``[batch, q, d]`` for the query-only ones,
where ``q`` is 1 (``query="last"``: one query shared by every position) or ``pos`` (``query="self"``).

Conventions: a first-layer map reads the MLP input ``m`` as ``m @ W`` with ``W`` of shape ``[d_in, d_out]``
(TransformerLens layout; shapes annotated in its jaxtyping style). Its rank-one update is
``delta_W = outer(row, column)``, the transpose of the
papers' ``dW = (W dm) m_x^T / ||m_x||^2`` written for ``W x``.
"""

from __future__ import annotations

import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor


def implicit_row(query_mlp_input: Float[Tensor, "*batch q d_in"]) -> Float[Tensor, "*batch q d_in"]:
    """The row shared by every rank-one update of a block: ``m_x / ||m_x||^2``.

    Dherin et al. 2025, Eq. 8 (with ``A(x)`` replaced by the MLP input ``m(x)``, as in Innocenti & Achour 2025
    for Pre-LN blocks). ``1/||m_x||^2`` is the implicit learning rate of Prop. 3.1.
    """
    squared_norm = query_mlp_input.pow(2).sum(-1, keepdim=True)
    if not torch.all(squared_norm > 0):
        raise ZeroQueryNormError(
            "the query's MLP input m(x) has zero norm, so no rank-one update W + (W dm) m(x)^T/||m(x)||^2 exists; "
            "check the block's pre-MLP norm weights (all zero?) or choose another query token"
        )
    return query_mlp_input / squared_norm


def implicit_column(mlp_input: Float[Tensor, "*batch pos d_in"], query_mlp_input: Float[Tensor, "*batch q d_in"],
                    weight: Float[Tensor, "d_in d_out"]) -> Float[Tensor, "*batch pos d_out"]:
    """The column ``W (m_i - m_x)`` of the rank-one update of one first-layer map, for every position i.

    Dherin et al. 2025, Eq. 8; Innocenti & Achour 2025 (all positions). ``weight`` is ``[d_in, d_out]``, read in
    the activations' dtype (a float32 model computed in float64 is upcast one map at a time).
    """
    return einsum(mlp_input - query_mlp_input, weight.to(mlp_input.dtype), "... d_in, d_in d_out -> ... d_out")


def bias_correction(residual: Float[Tensor, "*batch pos d_model"], query_residual: Float[Tensor, "*batch q d_model"]
                    ) -> Float[Tensor, "*batch pos d_model"]:
    """The output-bias correction ``delta_b_i = r_i(C, x) - r(x)`` of a block with a skip connection.

    Dherin et al. 2025, Thm A.2 (``db' = dA``); Innocenti & Achour 2025 (``r`` = the residual the MLP output is
    added to, for every position). Zero for blocks without an MLP skip connection.
    """
    return residual - query_residual


def scale_correction(residual: Float[Tensor, "*batch pos d_model"], query_residual: Float[Tensor, "*batch q d_model"],
                     normalized_mlp_output: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos d_model"]:
    """The patch of a post-MLP norm's scale, ``delta_w_i = (r_i - r_x) / z_i`` (Goldwaser et al. 2025).

    With a norm after the MLP the block adds ``w * z`` (``z`` the normalized MLP output, the same with context and
    for the patched query), so ``(w + delta_w) * z_i = w * z_i + (r_i - r_x)`` moves the query onto position i.
    """
    if not torch.all(normalized_mlp_output != 0):
        raise ValueError(
            "the normalized MLP output has an exact zero, so the post-MLP norm's scale cannot absorb the "
            "residual difference there; this block cannot be decomposed with a scale patch"
        )
    return (residual - query_residual) / normalized_mlp_output


def flattened_output(mlp_output: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos d_model"]:
    """``k_i sign(h_i)``, ``k_i = max(rms(h_i), 1)``: the MLP output a post-MLP norm's scale patch divides by.

    Dividing the residual difference by the normalized MLP output itself (:func:`scale_correction`) is exact but
    ill-conditioned where an entry of ``z_i`` is near zero: on Gemma-3-270M it reaches ~1e6, and chained patched
    blocks amplify rounding ~10x per block. A rank-one update of the MLP's output matrix first maps the hidden onto
    this vector (same signs, every entry the same size), whose normalized form is ``+-1``, so the scale patch
    (:func:`post_norm_scale`) stays as large as the block's own output. ``k >= 1`` keeps the norm's eps (~1e-6)
    negligible beside ``k^2`` when the MLP output is tiny; ``sign(0)`` counts as ``+1``.
    """
    size = mlp_output.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1.0)
    return torch.where(mlp_output < 0, -size, size)


def post_norm_scale(output: Float[Tensor, "*batch pos d_model"], query_residual: Float[Tensor, "*batch q d_model"],
                    norm_output: Float[Tensor, "*batch pos d_model"], normalized: Float[Tensor, "*batch pos d_model"]
                    ) -> Float[Tensor, "*batch pos d_model"]:
    """The patch ``delta_w_i = (y_i - r_x - w * z') / z'`` of a post-MLP norm's scale ``w``.

    Goldwaser et al. 2025 patch the norm after the MLP; here the norm reads the flattened MLP output
    (:func:`flattened_output`), normalized to ``z'`` (``norm_output = w * z'``). The query-alone block then adds
    ``(w + delta_w) * z' = y_i - r_x`` to its residual ``r_x``: exactly the with-context block output ``y_i``.
    """
    if not torch.all(normalized != 0):
        raise ValueError("the normalized flattened MLP output has an exact zero (is the norm's eps huge?)")
    return (output - query_residual - norm_output) / normalized


def rank_one_delta(row: Float[Tensor, "*batch d_in"], column: Float[Tensor, "*batch d_out"]
                   ) -> Float[Tensor, "*batch d_in d_out"]:
    """Densify one update: ``outer(row, column)``, shaped ``[d_in, d_out]`` like the weight it updates."""
    return einsum(row, column, "... d_in, ... d_out -> ... d_in d_out")


def factored_frobenius_norm(row: Float[Tensor, "*batch d_in"], column: Float[Tensor, "*batch d_out"]
                            ) -> Float[Tensor, "*batch"]:
    """``||outer(row, column)||_F = ||row|| ||column||`` without densifying."""
    return row.norm(dim=-1) * column.norm(dim=-1)


def summed_update_singular_values(rows: Float[Tensor, "n d_in"], columns: Float[Tensor, "n d_out"]
                                  ) -> Float[Tensor, " k"]:
    """Singular values of ``sum_i outer(row_i, column_i)`` computed from the factors.

    ``rows`` is ``[n, d_in]``, ``columns`` ``[n, d_out]``. With thin QR ``R^T = Q_r S_r`` and ``C^T = Q_c S_c``
    the sum is ``Q_r (S_r S_c^T) Q_c^T``, whose singular values are those of the small ``S_r S_c^T``.
    """
    _, r_rows = torch.linalg.qr(rows.T, mode="reduced")  # [k, n]
    _, r_cols = torch.linalg.qr(columns.T, mode="reduced")
    return torch.linalg.svdvals(r_rows @ r_cols.T)


def numerical_rank(singular_values: Float[Tensor, " k"], size: int, scale: float | Tensor | None = None) -> int:
    """Rank with the usual tolerance ``max(sigma) * size * eps`` (as ``numpy.linalg.matrix_rank``).

    Singular values computed from factors (:func:`summed_update_singular_values`) carry rounding of the order of
    ``eps ||rows||_F ||columns||_F``, which exceeds ``eps max(sigma)`` when the updates cancel; pass that product as
    ``scale`` and the tolerance is ``max(max(sigma), scale) * size * eps``.
    """
    if singular_values.numel() == 0 or singular_values.max() == 0:
        return 0
    reference = singular_values.max() if scale is None else torch.clamp_min(singular_values.max(), float(scale))
    tol = reference * size * torch.finfo(singular_values.dtype).eps
    return int((singular_values > tol).sum())


def relative_errors(patched_output: Float[Tensor, "*batch pos d_model"],
                    target_output: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos"]:
    """``||y'_i - y_i|| / ||y_i||`` per position (Euclidean over d_model; 0 where both are zero), in float64."""
    diff = (patched_output - target_output).to(torch.float64)
    return diff.norm(dim=-1) / target_output.to(torch.float64).norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)


def reproduction_errors(patched_output: Float[Tensor, "*batch pos d_model"],
                        target_output: Float[Tensor, "*batch pos d_model"]) -> dict[str, float]:
    """MSD, max absolute and max relative error between patched query-only outputs and with-context outputs.

    The relative error is per position (:func:`relative_errors`), maxed over positions.
    """
    diff = (patched_output - target_output).to(torch.float64)
    return {
        "msd": float(diff.pow(2).mean()),
        "max_abs_err": float(diff.abs().max()),
        "max_rel_err": float(relative_errors(patched_output, target_output).max()),
    }


class ZeroQueryNormError(ValueError):
    """The query's MLP input is the zero vector: no rank-one update through it exists."""


def kl_divergence(log_p: Float[Tensor, " vocab"], log_q: Float[Tensor, " vocab"]) -> float:
    """``KL(p || q)`` from log-probabilities (clamped at 0: rounding can make it a tiny negative)."""
    return float((log_p.exp() * (log_p - log_q)).sum().clamp_min(0))

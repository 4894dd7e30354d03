"""The pure tensor math of a rank-K update per block, shared by every backend
(:mod:`implicit_updates.analyses.continuation`).

With ``M'`` the K MLP inputs of a block run on the continuation alone and ``M`` the with-context ones, every
first-layer map ``W`` (``m @ W``) gets ``delta_W = pinv(M') (M - M') W`` (Dherin et al. 2025, Eq. 8, with the
rank-one ``m_x^T / ||m_x||^2`` replaced by the pseudo-inverse of K query inputs), so ``M' (W + delta_W) = M W``; the
output matrix gets ``delta_W_out = pinv(P) D`` with ``P`` the K with-context hidden activations and ``D`` what the
MLP output must still move by. Both are exact when ``M'`` and ``P`` have full row rank K.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from implicit_updates.capture import FirstLayerMap


@dataclass(frozen=True)
class LowRankUpdate:
    """``delta = rows @ columns`` for parameter ``name`` (``[d_in, K] @ [K, d_out]``; transposed for nn.Linear)."""

    name: str
    rows: Tensor
    columns: Tensor
    transposed: bool = False

    def dense(self) -> Tensor:
        delta = self.rows @ self.columns
        return delta.T if self.transposed else delta

    @property
    def rank(self) -> int:
        return self.rows.shape[-1]


def default_rcond(dtype: torch.dtype) -> float:
    """The relative singular-value floor below which K rows count as numerically dependent: ``1e-10`` in float64,
    ``1e3 eps`` in coarser dtypes (float32: condition numbers above ~8e3, where the pseudo-inverse's rounding error
    ``cond * eps`` would no longer be small; a float32 model's condition number of 2e7 once gave logits off by 0.4)."""
    return max(1e-10, 1e3 * torch.finfo(dtype).eps)


def checked_pinv(rows: Tensor, rcond: float, what: str) -> tuple[Tensor, float]:
    """``pinv(rows)`` (``[d, K]`` for ``rows`` ``[K, d]``) and its condition number; refuses dependent rows."""
    sv = torch.linalg.svdvals(rows)
    if rows.shape[0] > rows.shape[1]:  # more rows than dimensions: at most d of them are independent
        sv = torch.cat([sv, sv.new_zeros(rows.shape[0] - rows.shape[1])])
    cond = float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf")
    if sv[-1] <= rcond * sv[0]:
        raise ValueError(f"{what} are numerically dependent (condition number {cond:.3g}): no exact update of rank "
                         f"{rows.shape[0]} through them; use fewer or other continuation tokens")
    return torch.linalg.pinv(rows), cond


def first_layer_updates(m: Tensor, m_alone: Tensor, maps: Sequence[FirstLayerMap], rcond: float,
                        what: str) -> tuple[list[LowRankUpdate], float]:
    """``delta_W = pinv(M') (M - M') W`` for every map ``W`` reading the MLP input (``m``, ``m_alone``: ``[K, d]``),
    so the continuation-alone inputs give the with-context pre-activations; and the condition number of ``M'``."""
    pinv, cond = checked_pinv(m_alone, rcond, what)
    return [LowRankUpdate(w.name, pinv, (m - m_alone) @ w.weight.to(m.dtype), w.transposed) for w in maps], cond


def output_update(hidden: Tensor, change: Tensor, name: str, transposed: bool, rcond: float,
                  what: str) -> tuple[LowRankUpdate, float]:
    """``delta_W_out = pinv(P) D``: the output matrix (``p @ W_out``) then adds ``D`` (``[K, d_model]``) to the MLP
    output at each of the K hidden activations ``P`` (``[K, d_mlp]``) (Dherin et al. Thm A.2 for K positions)."""
    pinv, cond = checked_pinv(hidden, rcond, what)
    return LowRankUpdate(name, pinv, change, transposed), cond


def output_correction(hidden: Tensor, change: Tensor, name: str, transposed: bool, bias: str | None, rcond: float,
                      block: int) -> tuple[LowRankUpdate | tuple[str, Tensor], float]:
    """What carries the output change ``D``: the output bias ``bias`` (``(bias, D[0])``, Dherin et al. Thm A.2) when
    there is one position and a bias is offered, else :func:`output_update`; with ``D``'s condition number (inf for
    the bias)."""
    if change.shape[0] == 1 and bias is not None:
        return (bias, change[0]), float("inf")
    return output_update(hidden, change, name, transposed, rcond, f"block {block}: the with-context hidden activations")


def post_norm_target(wanted: Tensor, mlp_output: Tensor, eps: float, weight: Tensor) -> tuple[Tensor, Tensor]:
    """MLP outputs ``h'_k`` and a scale patch ``delta_w`` with ``(w + delta_w) * z(h'_k) = wanted_k`` for every k,
    for an RMSNorm ``z(h) = h / sqrt(mean(h^2) + eps)`` after the MLP whose scale ``w`` is shared by all positions.

    With ``w' = 1/sqrt(u)`` and ``z_k = wanted_k sqrt(u)``, ``z(h'_k) = z_k`` for ``h'_k = lam_k z_k`` exactly when
    ``mean(z_k^2) = 1 - eps/lam_k^2``: K linear equations ``mean(wanted_k^2 u) = 1 - eps/lam_k^2`` for ``u > 0``.
    ``lam_k = max(rms(h_k), 1)`` keeps ``h'_k`` as large as the MLP's own output, so the output-matrix update that
    produces it does not cancel down to a tiny vector (which would amplify rounding block after block, as the
    single-token flattening in :func:`implicit_updates.math.updates.post_norm_updates` avoids too). ``u`` comes from
    :func:`positive_solution`; where none is found no exact update of this form is offered (refused).
    """
    lam = mlp_output.pow(2).mean(-1).sqrt().clamp_min(1.0)  # [K]
    a = wanted.pow(2) / wanted.shape[-1]  # [K, d]: mean(wanted_k^2 u) = a_k . u
    b = 1 - eps / lam.pow(2)
    u = positive_solution(a, b)
    if u is None:
        raise ValueError("no positive scale for the norm after the MLP reaches every continuation position (the "
                         "residual differences are too unlike in size per coordinate); use fewer tokens")
    z = wanted * u.sqrt()
    return lam[:, None] * z, u.rsqrt() - weight.detach().to(wanted.dtype)


def positive_solution(a: Tensor, b: Tensor, steps: int = 200) -> Tensor | None:
    """A solution ``u > 0`` of ``a u = b`` (``a`` ``[K, d]`` non-negative), or None.

    The analytic centre, ``max sum(log u)`` subject to ``a u = b``: its dual ``min b . theta - sum(log(a^T theta))``
    over ``a^T theta > 0`` gives ``u = 1 / (a^T theta)``, found by damped Newton (gradient ``b - a u``, Hessian
    ``a diag(u^2) a^T``); the dual is bounded below exactly when a positive solution exists. Of all positive
    solutions it keeps every ``u_j`` farthest from 0 (the norm's new scale is ``1/sqrt(u)``): the maximum-entropy
    solution used before, ``u0 exp(a^T theta)``, reached ``u`` of 1e-20 on Gemma-3-270M (K = 4, scales of 1e10 and
    NaN logits) where this one's smallest ``u`` is 3e-5. A step is accepted where it stays feasible and lowers the
    dual or the gradient (near the solution the dual's decrease is below the rounding of its value); the result
    where the relative residual is at rounding level. Coordinates ``j`` with ``a[:, j] = 0`` are free (``u_j = 1``).
    """
    free = a.sum(0) <= 0
    ak = a[:, ~free]
    if ak.shape[1] == 0:
        return None

    def dual(t: Tensor) -> Tensor:
        s = ak.T @ t
        return b @ t - torch.log(s).sum() if bool((s > 0).all()) else torch.tensor(float("inf"), dtype=a.dtype)

    def residual(t: Tensor) -> Tensor:
        return (b - ak @ (1 / (ak.T @ t))).norm()

    theta = torch.full_like(b, 1 / float(ak.sum(0).mean()))  # a^T theta > 0: a is non-negative, no zero column
    for _ in range(steps):
        u = 1 / (ak.T @ theta)
        grad = b - ak @ u
        if grad.norm() <= 64 * torch.finfo(a.dtype).eps * b.norm():
            return torch.ones_like(a[0]).masked_scatter(~free, u)
        step = torch.linalg.solve(ak @ (u.pow(2)[:, None] * ak.T), grad)
        size, before = 1.0, dual(theta)
        while size > 1e-12:
            new = theta - size * step
            value = dual(new)
            if torch.isfinite(value) and (value <= before or residual(new) < grad.norm()):
                break
            size /= 2
        else:  # no step helps any more: accept where the residual is at rounding level
            break
        theta = theta - size * step
    u = 1 / (ak.T @ theta)
    if bool((u > 0).all()) and (b - ak @ u).norm() <= 1e-12 * b.norm():
        return torch.ones_like(a[0]).masked_scatter(~free, u)
    return None


def at_continuation(t: Tensor, k: int) -> Tensor:
    """The last ``k`` positions of every stacked sequence as rows: ``[n, pos, ...]`` -> ``[n * k, ...]`` (a
    continuation run alone, ``[n, k, ...]``, gives the same rows in the same order)."""
    return t[:, -k:].reshape(-1, *t.shape[2:])


@dataclass(frozen=True)
class BlockContinuation:
    """One block's rank-K update: low-rank maps or ``(bias / norm scale name, delta)``, with the condition numbers
    of the inputs it was solved through."""

    block: int
    updates: tuple[LowRankUpdate | tuple[str, Tensor], ...]  # low-rank maps, or (bias / norm scale name, delta)
    cond_mlp_input: float  # condition number of M' (the S-alone MLP inputs)
    cond_hidden: float  # condition number of P (the with-context hidden activations), inf when K = 1 (bias)
    rank: int

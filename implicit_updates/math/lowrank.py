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
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from implicit_updates.capture import FirstLayerMap
from implicit_updates.errors import UnsupportedArchitectureError


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


@dataclass(frozen=True)
class Fit:
    """How each map's update is solved from the N input rows ``X`` it reads and the changes ``T`` its outputs need.

    ``ridge = 0``, ``rank = None``, ``kind = "matrix"``: exactly, ``delta = pinv(X) T``, refusing numerically dependent
    rows (the continuation: exact on every row). Otherwise a *thought patch*, query-independent and fitted by least
    squares over all rows (:func:`implicit_updates.analyses.thought.thought_patch`): ``ridge`` adds
    ``ridge * mean_i ||x_i||^2 * ||delta||^2`` to ``||X delta - T||^2`` (relative to the rows' mean squared norm, so
    one value means the same in every block and model), ``rank`` caps the rank (reduced-rank ridge regression), and
    ``kind`` chooses the patch: the maps (``"matrix"``), one additive change of each block's output (``"vector"``),
    or both (``"both"``).
    """

    rcond: float
    ridge: float = 0.0
    rank: int | None = None
    kind: str = "matrix"

    @property
    def exact(self) -> bool:
        return self.ridge == 0 and self.rank is None and self.kind == "matrix"


class Solver:
    """``delta = argmin ||X delta - T||^2 + l ||delta||^2`` over ``rank(delta) <= rank``, in factors, with the
    penalty ``l = ridge * ||X||_F^2 / N`` (the ridge relative to the N rows' mean squared norm).

    With ``X = U S V^T`` (thin SVD), the ridge solution is ``V diag(s / (s^2 + l)) U^T T`` (Hoerl & Kennard 1970;
    at ridge 0 the minimum-norm least-squares solution, directions below ``rcond`` of the largest singular value
    dropped). The rank cap is reduced-rank ridge regression (Mukherjee & Zhu 2011): the ridge solution projected onto
    the top ``rank`` right singular vectors of its fitted values on the augmented data ``[X; sqrt(ridge) I]``, which is
    the least-squares optimum among updates of that rank (Izenman 1975 at ridge 0). The fitted values are computed
    through a QR of ``[X L; sqrt(l) L]`` (``L`` the left factor, at most N columns), never as a d x d matrix. The
    exact fit keeps :func:`checked_pinv`'s refusal of dependent rows, unless ``refuse_dependent=False`` (the
    transfer diagnostic: the minimum-norm fit whatever the rows, with ``basis``, the kept right singular vectors).
    """

    def __init__(self, rows: Tensor, fit: Fit, what: str, refuse_dependent: bool = True):
        self.rows, self.fit = rows, fit
        self.penalty = fit.ridge * float(rows.pow(2).sum()) / rows.shape[0] if fit.ridge else 0.0
        if fit.exact and refuse_dependent:
            self.left, self.cond = checked_pinv(rows, fit.rcond, what)
            self.project = self.basis = None
            return
        u, sv, vh = torch.linalg.svd(rows, full_matrices=False)
        self.cond = float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf")
        keep = sv > (fit.rcond * sv[0] if self.penalty == 0 else 0)
        self.basis = vh[keep]  # [k, d_in]: orthonormal rows spanning the kept row space
        self.left = vh[keep].T * (sv[keep] / (sv[keep].pow(2) + self.penalty))  # [d_in, k]
        self.project = u[:, keep].T  # [k, N]

    def apply(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(left [d_in, r], right [r, d_out])`` with ``left @ right`` the fitted ``delta`` for ``targets``."""
        if self.project is None:
            return self.left, targets
        right = self.project @ targets
        if self.fit.rank is None or self.fit.rank >= right.shape[0]:
            return self.left, right
        design = self.rows @ self.left
        if self.penalty > 0:
            design = torch.cat([design, self.penalty ** 0.5 * self.left])
        _, r = torch.linalg.qr(design)  # fitted values = q @ (r @ right), q orthonormal
        top = torch.linalg.svd(r @ right, full_matrices=False)[2][: self.fit.rank]  # [rank, d_out]
        return self.left @ (right @ top.T), top

    def predict(self, rows: Tensor, targets: Tensor) -> Tensor:
        """``rows @ delta`` for the ``delta`` fitted to ``targets``, in factors (``delta``, ``[d_in, d_out]``, is
        never formed)."""
        left, right = self.apply(targets)
        return (rows @ left) @ right


def first_layer_updates(m: Tensor, m_alone: Tensor, maps: Sequence[FirstLayerMap], fit: Fit,
                        what: str) -> tuple[list[LowRankUpdate], float]:
    """``delta_W = pinv(M') (M - M') W`` for every map ``W`` reading the MLP input (``m``, ``m_alone``: ``[K, d]``),
    so the continuation-alone inputs give the with-context pre-activations (or its :class:`Fit` least-squares
    version); and the condition number of ``M'``."""
    solver = Solver(m_alone, fit, what)
    return [LowRankUpdate(w.name, *solver.apply((m - m_alone) @ w.weight.to(m.dtype)), w.transposed)
            for w in maps], solver.cond


def output_update(hidden: Tensor, change: Tensor, name: str, transposed: bool, fit: Fit,
                  what: str) -> tuple[LowRankUpdate, float]:
    """``delta_W_out = pinv(P) D``: the output matrix (``p @ W_out``) then adds ``D`` (``[K, d_model]``) to the MLP
    output at each of the K hidden activations ``P`` (``[K, d_mlp]``) (Dherin et al. Thm A.2 for K positions)."""
    solver = Solver(hidden, fit, what)
    return LowRankUpdate(name, *solver.apply(change), transposed), solver.cond


def output_correction(hidden: Tensor, change: Tensor, name: str, transposed: bool, bias: str | None, fit: Fit,
                      block: int) -> tuple[LowRankUpdate | tuple[str, Tensor], float]:
    """What carries the output change ``D``: the output bias ``bias`` (``(bias, D[0])``, Dherin et al. Thm A.2) when
    there is one position, a bias is offered and the fit is exact, else :func:`output_update`; with ``D``'s
    condition number (inf for the bias)."""
    if change.shape[0] == 1 and bias is not None and fit.exact:
        return (bias, change[0]), float("inf")
    return output_update(hidden, change, name, transposed, fit, f"block {block}: the with-context hidden activations")


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
        try:
            step = torch.linalg.solve(ak @ (u.pow(2)[:, None] * ak.T), grad)
        except torch.linalg.LinAlgError:  # dependent equations (e.g. repeated rows): no Newton step, no solution
            return None
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


@dataclass(frozen=True)
class OutputShift:
    """A thought vector: ``vector`` added to block ``block``'s output (the residual stream after it) at every
    position. ``bias`` names the MLP output bias that carries it exactly as a weight edit (``delta = vector / s``),
    where the block has one and no norm after the MLP; elsewhere it is a steering vector."""

    block: int
    vector: Tensor
    bias: str | None = None
    residual_scale: float = 1.0


@dataclass(frozen=True)
class PostNorm:
    """An RMSNorm after the MLP: its scale's parameter name, ``eps``, its effective scale (``w`` or ``1 + w``), the
    with-context MLP outputs ``h`` and what the norm's output must become, ``wanted`` (each ``[K, d]``, already
    divided by the residual scale)."""

    name: str
    eps: float
    scale: Tensor
    mlp_output: Tensor
    wanted: Tensor


@dataclass(frozen=True)
class RoutedOutputs:
    """A mixture's output side: the routed experts' weighted hidden activations side by side ``[K, E * d_mlp]``,
    and each expert's output-matrix name (``d_mlp`` columns each)."""

    weighted_hidden: Tensor
    names: tuple[str, ...]
    d_mlp: int


@dataclass(frozen=True)
class BlockSystem:
    """What one block's rank-K update is solved from, as plain ``[K, ...]`` rows at the continuation's positions
    (every stacked sequence's, sequence-major), gathered by an adapter: the MLP inputs with context (``M``) and of the
    block run on the continuation alone (``M'``, its input the with-context one), the maps reading them, what the MLP
    output must move by (``change = (R - R') / s``), the with-context hidden activations ``P`` (None for a mixture:
    ``routed``), the output matrix, and the block's outputs with context and alone unpatched (the thought vector's
    data)."""

    block: int
    mlp_input: Tensor
    query_mlp_input: Tensor
    maps: tuple[FirstLayerMap, ...]
    change: Tensor
    hidden: Tensor | None
    output_weight: str
    output_transposed: bool
    output_bias: str | None
    output: Tensor
    query_output: Tensor
    residual_scale: float = 1.0
    post_norm: PostNorm | None = None
    routed: RoutedOutputs | None = None


def select_rows(system: BlockSystem, rows: Tensor) -> BlockSystem:
    """The same block's system on a subset of its rows (``rows``: indices into the N rows), e.g. some of the stacked
    queries, so that fits over subsets share one gathering."""
    pick = {f: getattr(system, f)[rows] for f in ("mlp_input", "query_mlp_input", "change", "output", "query_output")}
    if system.hidden is not None:
        pick["hidden"] = system.hidden[rows]
    if system.post_norm is not None:
        pick["post_norm"] = replace(system.post_norm, mlp_output=system.post_norm.mlp_output[rows],
                                    wanted=system.post_norm.wanted[rows])
    if system.routed is not None:
        pick["routed"] = replace(system.routed, weighted_hidden=system.routed.weighted_hidden[rows])
    return replace(system, **pick)


def concat_rows(systems: Sequence[BlockSystem]) -> BlockSystem:
    """One block's systems gathered in several batches (queries of different lengths) as one: their rows stacked in
    order (:func:`select_rows` picks them apart again); the rest is the block's own, taken from the first."""
    first = systems[0]

    def cat(get) -> Tensor:
        return torch.cat([get(s) for s in systems])

    pick = {f: cat(lambda s, f=f: getattr(s, f)) for f in ("mlp_input", "query_mlp_input", "change", "output",
                                                           "query_output")}
    if first.hidden is not None:
        pick["hidden"] = cat(lambda s: s.hidden)
    if first.post_norm is not None:
        pick["post_norm"] = replace(first.post_norm, mlp_output=cat(lambda s: s.post_norm.mlp_output),
                                    wanted=cat(lambda s: s.post_norm.wanted))
    if first.routed is not None:
        pick["routed"] = replace(first.routed, weighted_hidden=cat(lambda s: s.routed.weighted_hidden))
    return replace(first, **pick)


def solve_block(system: BlockSystem, fit: Fit, output: str = "auto") -> BlockContinuation:
    """One block's update from its :class:`BlockSystem`: exact (the continuation, :class:`Fit` defaults) or a
    thought patch (ridge, rank, vector). ``output="matrix"`` puts a single position's output change into the output
    matrix instead of the bias (as a LoRA needs).

    The thought vector (``kind="vector"``) is the least-squares constant output change over the rows,
    ``v = sum_i (y_i - y'_i) / (N + ridge)`` (``y'``: the block alone, unpatched). With ``kind="both"`` the output
    matrix is fitted with an intercept: ``delta_W_out`` from the centred rows ``(P - mean P, D - mean D)``, and the
    intercept ``mean D - (mean P) delta_W_out`` (unpenalised) becomes the block's output shift, times the residual
    scale; with the first-layer maps patched as in ``"matrix"``. Through a norm after the MLP (Gemma), a ridge or
    rank-capped output matrix is fitted to the pre-norm targets of :func:`post_norm_target` (least squares before the
    norm, a surrogate of the normed output's); ``"both"`` is refused there, and every non-exact matrix through routed
    experts.
    """
    b, n = system.block, system.mlp_input.shape[0]
    if fit.kind not in ("matrix", "vector", "both"):
        raise ValueError(f"kind must be 'matrix', 'vector' or 'both', not {fit.kind!r}")
    if fit.kind == "vector":
        vector = (system.output - system.query_output).sum(0) / (n + fit.ridge)
        return BlockContinuation(b, (_shift(system, vector),), float("inf"), float("inf"), 1)
    if system.routed is not None and not fit.exact:
        raise UnsupportedArchitectureError(
            f"block {b}: a ridge, rank-limited or intercept thought matrix through a mixture of experts' routed "
            "outputs is not implemented (the update through it is solved exactly for independent rows only): use "
            "kind='vector', or ridge=0, rank=None")
    if system.post_norm is not None and fit.kind == "both":
        raise UnsupportedArchitectureError(
            f"block {b}: kind='both' through a norm after the MLP is not implemented (its intercept lives before the "
            "norm, not in the block output): use kind='matrix' or kind='vector'")
    updates, cond_m = first_layer_updates(system.mlp_input, system.query_mlp_input, system.maps, fit,
                                          f"block {b}: the continuation's MLP inputs run alone")
    change = system.change
    # a norm after the MLP: the MLP output must reach what post_norm_target says (with its exact scale patch, shared
    # by every row); a least-squares output matrix fits those pre-norm targets, not the normed output itself
    if system.post_norm is not None:
        norm = system.post_norm
        target, scale_delta = post_norm_target(norm.wanted, norm.mlp_output, norm.eps, norm.scale)
        change = target - norm.mlp_output
        updates.append((norm.name, scale_delta))
    if system.routed is not None:
        routed = system.routed
        pinv_q, cond_p = checked_pinv(routed.weighted_hidden, fit.rcond,
                                      f"block {b}: the routed experts' weighted hidden activations")
        updates += [LowRankUpdate(name, pinv_q[e * routed.d_mlp:(e + 1) * routed.d_mlp], change, transposed=True)
                    for e, name in enumerate(routed.names)]
        return BlockContinuation(b, tuple(updates), cond_m, cond_p, n)
    hidden = system.hidden
    if fit.kind == "both":
        mean_hidden, mean_change = hidden.mean(0), change.mean(0)
        update, cond_p = output_update(hidden - mean_hidden, change - mean_change, system.output_weight,
                                       system.output_transposed, fit, f"block {b}: the with-context hidden activations")
        intercept = mean_change - mean_hidden @ update.rows @ update.columns
        return BlockContinuation(b, (*updates, update, _shift(system, system.residual_scale * intercept)), cond_m,
                                 cond_p, update.rank)
    update, cond_p = output_correction(hidden, change, system.output_weight, system.output_transposed,
                                       system.output_bias if output == "auto" else None, fit, b)
    updates.append(update)
    return BlockContinuation(b, tuple(updates), cond_m, cond_p, n if fit.exact else _rank(updates))


def _shift(system: BlockSystem, vector: Tensor) -> OutputShift:
    bias = system.output_bias if system.post_norm is None and system.routed is None else None
    return OutputShift(system.block, vector, bias, system.residual_scale)


def _rank(updates: list) -> int:
    return max((u.rank for u in updates if isinstance(u, LowRankUpdate)), default=0)

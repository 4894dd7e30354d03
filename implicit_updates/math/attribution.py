"""Exact attribution of every implicit update to (head, context token) terms, as pure tensor functions.

Block l at position i, query input x (the last token's block input for ``query="last"``, position i's own for
``"self"``). The MLP's residual is ``r_i = h_i + T(A_i)`` (``h`` the block input, ``A`` the attention output, ``T`` a
norm after attention: Gemma's ``ln1_post``, OLMo 2's post-norm ``ln1``; identity elsewhere) and ``r_x = x + T(A(x))``
on the query alone. Attention is a convex combination of values, ``A_i = sum_h sum_{j<=i} alpha^h_ij P^h_j + b_O``
with ``P^h_j = v^h_j W_O^h``, so (the biases cancel)

    A_i - A(x) = sum_h sum_j alpha^h_ij (P^h_j - P^h_x) + sum_h (sum_j alpha^h_ij - alpha^h_x) P^h_x     (1)

whose last sum (``sink``) is zero unless attention sinks take weight (pattern rows summing to < 1). Then

    r_i - r_x = (h_i - x) + Jbar_T(i) (A_i - A(x)),   Jbar_F(i) = int_0^1 J_F(start_i + s (end_i - start_i)) ds   (2)

splits into one term per (head, source token), ``sink``, and ``residual = h_i - x`` (a token's influence through
earlier blocks sits in ``h``: this is a *direct* attribution at block l, like direct logit attribution). The MLP reads
``m = N(r)`` (N the pre-MLP norm), attributed along the straight path ``r_x + s (r_i - r_x)`` (integrated gradients):

    a_t = Jbar_N(i) c_t,    sum_t a_t = N(r_i) - N(r_x)   (completeness)                                      (3)

and ``norm_rounding`` names what the model's own norms round differently from the functions differentiated here:
``(m_i - m_x) - (N(r_i) - N(r_x))`` at the MLP input, plus, where a norm T follows attention,
``((r_i - h_i) - (r_x - x)) - (T(A_i) - T(A_x))`` in Eq. 2 (0 up to float64 rounding on TransformerLens; float32
rounding on ``transformers``, whose RMSNorms compute in float32 inside a float64 model). The first-layer column of
every map W is ``u_i = W (m_i - m_x) = sum_t W a_t``, so ``dW_i = sum_t (W a_t) v^T``: one rank-one update per
term, one shared row ``v = m_x/||m_x||^2`` (Dherin et al. 2025 Eq. 8; Innocenti & Achour 2025). Parallel blocks
read ``N(h)``: only ``residual`` reaches the MLP, and the attention terms appear in the output correction alone. A
mixture's router and experts read the same m, so they share the terms. The integrals are Gauss-Legendre quadratures
(``nodes`` points after a sinh change of variables around the path's point nearest the origin, :func:`path_nodes`;
exact to float64 rounding also for the massive activations of pretrained models' first token);
:meth:`BlockAttribution.completeness` reports the residual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor

Fn = Callable[[Tensor], Tensor]
EXTRAS = ("residual", "sink", "norm_rounding")


@dataclass
class AttentionCapture:
    """What an adapter hands over for one block, with context (``[batch, pos, ...]``) and on the query alone
    (``q`` = 1 for ``query="last"``, ``pos`` for ``"self"``).

    ``pattern`` ``[batch, head, pos, pos]``; ``values`` ``P^h_j = v^h_j W_O^h`` ``[batch, head, pos, d_model]``;
    ``query_values``/``query_weight`` the same on the query alone (``[batch, head, q, d_model]``, ``[batch, head, q]``:
    the query's weight on itself, 1 without sinks). ``attention``/``query_attention`` the attention output before
    ``output_map`` (T); ``mlp_residual``/``query_mlp_residual`` what the pre-MLP norm ``mlp_norm`` (N; None: the MLP
    reads the residual itself) reads; ``mlp_input``/``query_mlp_input`` what the MLP receives. ``parallel``: the MLP
    reads the block input, not the attention.
    """

    block: int
    block_input: Tensor
    query_input: Tensor
    pattern: Tensor
    values: Tensor
    query_values: Tensor
    query_weight: Tensor
    attention: Tensor
    query_attention: Tensor
    mlp_residual: Tensor
    query_mlp_residual: Tensor
    mlp_input: Tensor
    query_mlp_input: Tensor
    output_map: Fn | None = None
    mlp_norm: Fn | None = None
    parallel: bool = False


def gauss_legendre(nodes: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights on [0, 1] (exact for polynomials of degree < 2 nodes), in ``like``'s dtype."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    return (torch.as_tensor((x + 1) / 2, dtype=like.dtype, device=like.device),
            torch.as_tensor(w / 2, dtype=like.dtype, device=like.device))


def path_nodes(start: Tensor, end: Tensor, nodes: int) -> tuple[Tensor, Tensor]:
    """Quadrature nodes ``s`` and weights on [0, 1] for every row of the straight path ``start + s (end - start)``,
    ``[nodes, *rows, 1]``: Gauss-Legendre in ``t`` after ``s = s* + w sinh(t)``, with ``s*`` the point of the path
    nearest the origin and ``w = ||r(s*)|| / ||end - start||``. A norm's Jacobian scales like ``1/||r(s)||``, whose
    poles sit at ``s* +- i w``: a path from a small residual to a huge one (the massive activations of a pretrained
    model's first token, ``w`` ~ 1e-2) is sharply peaked in ``s`` but smooth in ``t`` (``ds / ||r(s)|| ~ dt``), so
    ``nodes`` points stay exact to float64 rounding where plain Gauss-Legendre in ``s`` needs hundreds. The change of
    variables is exact whatever ``w``: the weights sum to 1 and only the rate of convergence depends on it."""
    delta = end - start
    squared = delta.pow(2).sum(-1, keepdim=True)
    moving = squared > 0
    safe = torch.where(moving, squared, torch.ones_like(squared))
    s_star = (-(start * delta).sum(-1, keepdim=True) / safe).clamp(0, 1)
    width = (start + s_star * delta).norm(dim=-1, keepdim=True) / safe.sqrt()
    width = torch.where(moving, width.clamp_min(1e-8), torch.ones_like(width))
    x, w = gauss_legendre(nodes, delta)
    shape = (nodes,) + (1,) * delta.dim()
    t0, t1 = torch.asinh(-s_star / width), torch.asinh((1 - s_star) / width)
    t = t0 + x.reshape(shape) * (t1 - t0)
    return s_star + width * torch.sinh(t), w.reshape(shape) * (t1 - t0) * width * torch.cosh(t)


def path_jvp(fn: Fn | None, start: Float[Tensor, "*rows d"], end: Float[Tensor, "*rows d"],
             tangent: Float[Tensor, "*rows d"], nodes: int) -> Float[Tensor, "*rows d"]:
    """``Jbar tangent = int_0^1 J_fn(start + s (end - start)) tangent ds`` (Eq. 2), rows independent (``fn`` acts on
    the last dim), by the quadrature of :func:`path_nodes`. ``start``/``end`` broadcast against ``tangent``.
    ``fn=None`` is the identity."""
    if fn is None:
        return tangent
    start, end = (t.expand_as(tangent) for t in (start, end))
    s, w = path_nodes(start, end, nodes)
    total = torch.zeros_like(tangent)
    for sk, wk in zip(s, w, strict=True):
        total += wk * torch.func.jvp(fn, (start + sk * (end - start),), (tangent,))[1]
    return total


def path_vjp(fn: Fn | None, start: Float[Tensor, "*rows d"], end: Float[Tensor, "*rows d"],
             cotangent: Float[Tensor, "*rows d"], nodes: int) -> Float[Tensor, "*rows d"]:
    """``Jbar^T cotangent`` for the same path integral as :func:`path_jvp` (scores: ``<Jbar c, g> = <c, Jbar^T g>``)."""
    if fn is None:
        return cotangent
    start, end = (t.expand_as(cotangent) for t in (start, end))
    s, w = path_nodes(start, end, nodes)
    total = torch.zeros_like(cotangent)
    with torch.enable_grad():
        for sk, wk in zip(s, w, strict=True):
            _, pullback = torch.func.vjp(fn, start + sk * (end - start))
            total += wk * pullback(cotangent)[0]
    return total


def _rows(t: Tensor, n: int) -> Tensor:
    """A query-alone tensor ``[batch, q, ...]`` (q = 1 or n) as ``[batch, n, ...]``."""
    return t.expand(t.shape[0], n, *t.shape[2:]) if t.shape[1] == 1 else t


def relative(error: Tensor, total: Tensor, reference: Tensor) -> Tensor:
    """``||error|| / ||total||`` per position, the denominator floored at ``sqrt(eps) ||reference||``: a position the
    context leaves unchanged up to rounding (``query="self"`` at position 0) is not divided by ~0, yet a wrong term
    there still shows (an error of 1e-10 ||reference|| reads ~1e-2)."""
    floor = torch.finfo(total.dtype).eps ** 0.5 * reference.norm(dim=-1)
    return error.norm(dim=-1) / torch.maximum(total.norm(dim=-1), floor).clamp_min(torch.finfo(total.dtype).tiny)


@dataclass
class BlockAttribution:
    """The terms of one block, factored: per (head, source) ``alpha^h_ij (P^h_j - P^h_x)`` and the named extras.

    ``maps``: ``{name: W}`` (``[d_in, d_out]`` views) of the first-layer maps; ``columns``/``row``/``delta_b``: the
    decomposition's ``u_i``, ``v`` and ``r_i - r_x`` (the totals the terms must sum to).
    """

    capture: AttentionCapture
    maps: dict[str, Tensor]
    columns: dict[str, Tensor]
    row: Tensor
    delta_b: Tensor
    nodes: int = 64
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def block(self) -> int:
        return self.capture.block

    @property
    def n_heads(self) -> int:
        return self.capture.pattern.shape[1]

    @property
    def n_positions(self) -> int:
        return self.capture.pattern.shape[2]

    # -- the pieces of Eqs. 1-3, every position at once -----------------------------------------------------

    def _query(self, name: str) -> Tensor:
        return _rows(getattr(self.capture, name), self.n_positions)

    def _query_values(self) -> Tensor:  # [batch, head, pos, d]
        pv = self.capture.query_values
        return pv.expand(*pv.shape[:2], self.n_positions, pv.shape[-1]) if pv.shape[2] == 1 else pv

    def extras(self) -> dict[str, Tensor]:
        """The named terms ``[batch, pos, d_model]``: ``residual = h_i - x`` and ``sink`` (before T), Eq. 1."""
        c = self.capture
        qw = c.query_weight if c.query_weight.shape[2] > 1 else c.query_weight.expand(-1, -1, self.n_positions)
        mass = c.pattern.sum(-1) - qw  # [batch, head, pos]
        return {"residual": c.block_input - self._query("query_input"),
                "sink": einsum(mass, self._query_values(), "b h i, b h i d -> b i d")}

    def attention_sum(self) -> Tensor:
        """``sum_t`` of the (head, source) terms plus ``sink``: Eq. 1's ``A_i - A(x)`` rebuilt from the terms."""
        c = self.capture
        direct = einsum(c.pattern, c.values, "b h i j, b h j d -> b i d")
        direct -= einsum(c.pattern.sum(-1), self._query_values(), "b h i, b h i d -> b i d")
        return direct + self.extras()["sink"]

    def _through_output_map(self, tangent: Tensor) -> Tensor:
        c = self.capture
        return path_jvp(c.output_map, self._query("query_attention"), c.attention, tangent, self.nodes)

    def _through_norm(self, tangent: Tensor) -> Tensor:
        c = self.capture
        return path_jvp(c.mlp_norm, self._query("query_mlp_residual"), c.mlp_residual, tangent, self.nodes)

    def norm_rounding(self) -> Tensor:
        """``(m_i - m_x) - (N(r_i) - N(r_x))``: the model's norm against the function differentiated here."""
        c = self.capture
        n = (lambda r: r) if c.mlp_norm is None else c.mlp_norm
        model_dm = c.mlp_input - self._query("query_mlp_input")
        return model_dm - (n(c.mlp_residual) - n(self._query("query_mlp_residual")))

    def output_rounding(self) -> Tensor:
        """``((r_i - h_i) - (r_x - x)) - (T(A_i) - T(A_x))``: the model's norm after attention against T (zero
        without T); part of ``norm_rounding``, it enters the correction (Eq. 2) and, through N, the MLP input."""
        c = self.capture
        if c.output_map is None or c.parallel:
            return torch.zeros_like(c.block_input)
        model = (c.mlp_residual - c.block_input) - (self._query("query_mlp_residual") - self._query("query_input"))
        return model - (c.output_map(c.attention) - c.output_map(self._query("query_attention")))

    def completeness(self) -> dict[str, Tensor]:
        """Relative residuals ``[batch, pos]`` of the terms' sums against the totals: ``correction`` (``sum_t c_t``
        vs the decomposition's ``r_i - r_x``), ``mlp_input`` (``sum_t a_t`` vs ``m_i - m_x``) and ``columns``
        (``sum_t W a_t`` vs the decomposition's ``u_i``, all maps stacked)."""
        if "completeness" in self._cache:
            return self._cache["completeness"]
        c = self.capture
        ext = self.extras()
        correction = ext["residual"] + self._through_output_map(self.attention_sum()) + self.output_rounding()
        reads = ext["residual"] if c.parallel else correction
        inputs = self._through_norm(reads) + self.norm_rounding()
        dm = c.mlp_input - self._query("query_mlp_input")
        col_err = torch.cat([inputs @ w - self.columns[n] for n, w in self.maps.items()], -1)
        col_tot = torch.cat([self.columns[n] for n in self.maps], -1)
        col_ref = torch.cat([self._query("query_mlp_input") @ w for w in self.maps.values()], -1)
        out = {"correction": relative(correction - self.delta_b, self.delta_b, self._query("query_mlp_residual")),
               "mlp_input": relative(inputs - dm, dm, self._query("query_mlp_input")),
               "columns": relative(col_err, col_tot, col_ref)}
        self._cache["completeness"] = out
        return out

    def max_completeness_error(self) -> float:
        return max(float(e.max()) for e in self.completeness().values())

    # -- scores: <W a_t, u_i> / ||u_i||^2, summed over maps ----------------------------------------------------

    def scores(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Each term's share of the update at every position: ``[batch, pos_i, head, pos_j]`` for the (head, source)
        terms and ``{extra: [batch, pos_i]}``; per position they sum to 1 (``<sum_t W a_t, u_i> = ||u_i||^2``).
        Computed as ``<c_t, Jbar_T^T Jbar_N^T g_i>`` with ``g_i = sum_W W u_i`` (no per-term Jacobian)."""
        if "scores" in self._cache:
            return self._cache["scores"]
        c = self.capture
        g = sum(self.columns[n] @ w.T for n, w in self.maps.items())  # [batch, pos, d_model]
        squared = sum(self.columns[n].pow(2).sum(-1) for n in self.maps).clamp_min(torch.finfo(g.dtype).tiny)
        q_r = path_vjp(c.mlp_norm, self._query("query_mlp_residual"), c.mlp_residual, g, self.nodes)
        q_a = torch.zeros_like(q_r) if c.parallel else path_vjp(
            c.output_map, self._query("query_attention"), c.attention, q_r, self.nodes)
        diff = c.values[:, :, None] - self._query_values()[:, :, :, None]  # [b, h, i, j, d]: P_j - P_x(i)
        per_term = c.pattern * einsum(diff, q_a, "b h i j d, b i d -> b h i j")
        ext = self.extras()
        extras = {"residual": einsum(ext["residual"], q_r, "b i d, b i d -> b i"),
                  "sink": einsum(ext["sink"], q_a, "b i d, b i d -> b i"),
                  "norm_rounding": einsum(self.norm_rounding(), g, "b i d, b i d -> b i")
                  + einsum(self.output_rounding(), q_r, "b i d, b i d -> b i")}
        out = (per_term.permute(0, 2, 1, 3) / squared[..., None, None], {k: v / squared for k, v in extras.items()})
        self._cache["scores"] = out
        return out

    def token_scores(self, position: int = -1, batch: int = 0) -> Float[Tensor, " pos"]:
        """Per source token's share of position ``position``'s update (summed over heads), ``[pos]``."""
        return self.scores()[0][batch, position].sum(0)

    def head_scores(self, position: int = -1, batch: int = 0) -> Float[Tensor, " head"]:
        """Per head's share of position ``position``'s update (summed over source tokens), ``[head]``."""
        return self.scores()[0][batch, position].sum(-1)

    # -- per-term vectors at one position (on request; densest objects here) -------------------------------------

    def terms(self) -> list[tuple[int, int] | str]:
        """The term labels in the order of :meth:`term_corrections`: (head, source) pairs, then the extras."""
        return [(h, j) for h in range(self.n_heads) for j in range(self.n_positions)] + list(EXTRAS)

    def term_corrections(self, position: int = -1, batch: int = 0) -> Float[Tensor, "term d_model"]:
        """``c_t`` of every term at one position, ``[n_terms, d_model]`` (summing to ``r_i - r_x``; the row of
        ``norm_rounding`` is the rounding of the norm after attention, :meth:`output_rounding`, zero without one)."""
        c, i = self.capture, position % self.n_positions
        qv = self._query_values()[batch, :, i]  # [head, d]
        raw = c.pattern[batch, :, i, :, None] * (c.values[batch] - qv[:, None])  # [head, pos, d]
        ext = self.extras()
        attention = torch.cat([raw.reshape(-1, raw.shape[-1]), ext["sink"][batch, i][None]])
        mapped = path_jvp(c.output_map, self._query("query_attention")[batch, i], c.attention[batch, i], attention,
                          self.nodes)
        rounding = self.output_rounding()[batch, i][None]
        return torch.cat([mapped[:-1], ext["residual"][batch, i][None], mapped[-1:], rounding])

    def term_inputs(self, position: int = -1, batch: int = 0) -> Float[Tensor, "term d_model"]:
        """``a_t`` of every term at one position (Eq. 3), ``[n_terms, d_model]``, summing to ``m_i - m_x``."""
        c, i = self.capture, position % self.n_positions
        cs = self.term_corrections(position, batch)
        if c.parallel:  # the MLP reads N(h): only the residual term reaches it
            cs = torch.where(torch.tensor([t == "residual" for t in self.terms()], device=cs.device)[:, None], cs,
                             torch.zeros_like(cs))
        a = path_jvp(c.mlp_norm, self._query("query_mlp_residual")[batch, i], c.mlp_residual[batch, i], cs,
                     self.nodes)
        a[-1] = a[-1] + self.norm_rounding()[batch, i]  # the norm after attention's rounding, through N, + N's own
        return a

    def term_columns(self, position: int = -1, batch: int = 0) -> dict[str, Tensor]:
        """``W a_t`` of every term for every first-layer map, ``{name: [n_terms, d_out]}`` (summing to ``u_i``)."""
        a = self.term_inputs(position, batch)
        return {name: a @ w for name, w in self.maps.items()}


def attribute_block(capture: AttentionCapture, maps: dict[str, Tensor], columns: dict[str, Tensor], row: Tensor,
                    delta_b: Tensor, nodes: int = 64) -> BlockAttribution:
    """Attribution of one block from an adapter's capture and its decomposition (columns, row, ``r_i - r_x``)."""
    return BlockAttribution(capture, maps, columns, row, delta_b, nodes)

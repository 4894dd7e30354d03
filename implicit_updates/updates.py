"""Factored per-block updates, and the pure function that computes them from a :class:`BlockCapture`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from implicit_updates import core
from implicit_updates.capture import BlockCapture, OutputCorrection


@dataclass
class RankOneUpdate:
    """``delta = outer(row_i, column_i)`` for parameter ``name`` at every position i (never stored dense).

    ``row`` is ``[batch, q, d_in]`` (q = 1 when shared by all positions), ``column`` ``[batch, pos, d_out]``;
    ``transposed`` parameters (``nn.Linear``) get ``outer(column_i, row_i)`` instead.
    """

    name: str
    row: Tensor
    column: Tensor
    transposed: bool = False

    def dense(self, batch: int, position: int) -> Tensor:
        row = self.row[batch, position if self.row.shape[1] > 1 else 0]
        delta = core.rank_one_delta(row, self.column[batch, position])
        return delta.T if self.transposed else delta


@dataclass
class AdditiveUpdate:
    """``delta_i`` added to parameter ``name`` (a bias or a norm scale); ``delta`` is ``[batch, pos, *shape]``."""

    name: str
    delta: Tensor

    def dense(self, batch: int, position: int) -> Tensor:
        return self.delta[batch, position]


@dataclass
class BlockUpdate:
    """Everything the context does to one block, per position, in factored form."""

    block: int
    row: Tensor  # m_x / ||m_x||^2, [batch, q, d_model]
    delta_b: Tensor  # r_i - r_x, [batch, pos, d_model]
    updates: list[RankOneUpdate | AdditiveUpdate]
    query_input: Tensor  # [batch, q, d_model]
    target_output: Tensor  # block output with context, [batch, pos, d_model]
    correction: str  # "bias" | "scale" | "expert_out" | "none"

    @property
    def first_layer(self) -> list[RankOneUpdate]:
        """The rank-one updates of the maps reading the MLP input (they share ``row``)."""
        return [u for u in self.updates if isinstance(u, RankOneUpdate) and u.row is self.row]

    def summed_singular_values(self, batch: int = 0) -> Tensor:
        """Singular values of ``sum_i dW_i`` over positions, all first-layer maps stacked along d_out."""
        columns = torch.cat([u.column[batch] for u in self.first_layer], dim=-1)
        if self.row.shape[1] == 1:  # one row for every position: sum_i outer(v, u_i) = outer(v, sum_i u_i)
            return (self.row[batch, 0].norm() * columns.sum(0).norm())[None]
        return core.summed_update_singular_values(self.row[batch], columns)

    def summed_rank(self, batch: int = 0) -> int:
        sv = self.summed_singular_values(batch)
        columns = torch.cat([u.column[batch] for u in self.first_layer], dim=-1)
        scale = self.row[batch].norm() * columns.norm()  # the factors' rounding scale (core.numerical_rank)
        return core.numerical_rank(sv, max(self.row.shape[-1], columns.shape[-1]), scale)


def decompose_block(capture: BlockCapture) -> BlockUpdate:
    """Per-position rank-one first-layer updates and output corrections of one block.

    Dherin et al. 2025 Eq. 8 and Thm A.2, in Innocenti & Achour's all-position, all-block form; every map reading
    the MLP input shares the row ``m_x/||m_x||^2``; a norm after the MLP gets a scale patch (Goldwaser et al. 2025),
    kept well-conditioned by :func:`post_norm_updates`.
    """
    row = core.implicit_row(capture.query_mlp_input)
    updates: list[RankOneUpdate | AdditiveUpdate] = [
        RankOneUpdate(m.name, row, core.implicit_column(capture.mlp_input, capture.query_mlp_input, m.weight),
                      m.transposed)
        for m in capture.maps
    ]
    delta_b = core.bias_correction(capture.residual, capture.query_residual)
    fix = capture.correction
    if fix.kind == "bias":
        updates.append(AdditiveUpdate(fix.name, delta_b))
    elif fix.kind == "scale":
        updates += post_norm_updates(capture.output, capture.query_residual, fix)
    elif fix.kind == "expert_out":
        updates += expert_output_updates(delta_b, fix.names, fix.expert_hidden, fix.routing_weights)
    return BlockUpdate(capture.block, row, delta_b, updates, capture.query_input, capture.output, fix.kind)


def post_norm_updates(output: Tensor, query_residual: Tensor, fix: OutputCorrection
                      ) -> list[RankOneUpdate | AdditiveUpdate]:
    """A norm after the MLP: flatten the MLP output by a rank-one output-matrix update, then patch the norm's scale.

    Both are exact: the patched query-alone MLP outputs ``h'_i`` (its hidden is the with-context ``p_i``), the norm
    turns it into ``z' = +-1`` (up to eps) and ``(w + delta_w) z'`` is the with-context ``y_i - r_x``. Patching the
    scale alone (``(r_i - r_x)/z_i``, Goldwaser et al. 2025) divides by near-zero ``z_i`` entries instead.
    """
    squared = fix.hidden.pow(2).sum(-1, keepdim=True)
    if not torch.all(squared > 0):
        raise ValueError(f"{fix.output_weight}: the MLP's hidden activation is exactly zero at some position, so no "
                         "rank-one update of its output matrix can change the MLP output there")
    flat = core.flattened_output(fix.mlp_output)
    normalized, norm_output = fix.post_norm(flat)
    return [RankOneUpdate(fix.output_weight, fix.hidden / squared, flat - fix.mlp_output, fix.output_transposed),
            AdditiveUpdate(fix.name, core.post_norm_scale(output, query_residual, norm_output, normalized))]


def expert_output_updates(delta_b: Tensor, names: tuple[str, ...], hidden: tuple[Tensor, ...],
                          routing_weights: Tensor) -> list[RankOneUpdate]:
    """Rank-one output-matrix updates that add ``delta_b`` to a mixture of experts with no output bias.

    Expert e contributes ``w_e W_out_e p_e``; with ``W_out_e += (delta_b/S) p_e^T/||p_e||^2`` for every routed
    expert (``S = sum_e w_e``) the mixture moves by exactly ``delta_b``. Unrouted experts get zero.
    """
    routed = routing_weights > 0  # [batch, pos, n_experts]
    total = routing_weights.sum(-1, keepdim=True)
    out = []
    for e, (name, p) in enumerate(zip(names, hidden, strict=True)):
        squared = p.pow(2).sum(-1, keepdim=True)
        on = routed[..., e : e + 1]
        if torch.any(on & (squared == 0)):
            raise ValueError(f"expert output {name}: a routed expert's hidden activation is exactly zero")
        row = torch.where(on, p / squared.where(on, torch.ones_like(squared)), torch.zeros_like(p))
        column = torch.where(on, delta_b / total, torch.zeros_like(delta_b))
        out.append(RankOneUpdate(name, row, column, transposed=True))
    return out

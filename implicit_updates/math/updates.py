"""Factored per-block updates, and the pure function that computes them from a :class:`BlockCapture`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from implicit_updates.capture import BlockCapture, OutputCorrection
from implicit_updates.math import core


@dataclass
class RankOneUpdate:
    """``delta = outer(row_i, column_i)`` for parameter ``name`` at every position i (never stored dense).

    ``row`` is ``[batch, q, d_in]`` (q = 1 when shared by all positions), ``column`` ``[batch, pos, d_out]``;
    ``transposed`` parameters (``nn.Linear``) get ``outer(column_i, row_i)`` instead. A parameter stacking
    ``experts`` experts' maps (transformers' fused experts, ``[E, d_out, d_in]`` or ``[E, d_in, d_out]``) takes the
    update on the slice of ``expert``, or, with ``expert=None``, on every slice at once: the column is then the
    experts' columns side by side (``E * d_out``, expert-major), since every slice reads the same input.
    """

    name: str
    row: Tensor
    column: Tensor
    transposed: bool = False
    experts: int = 0
    expert: int | None = None

    def dense(self, batch: int, position: int) -> Tensor:
        """The update shaped like the parameter it is added to."""
        row = self.row[batch, position if self.row.shape[1] > 1 else 0]
        delta = core.rank_one_delta(row, self.column[batch, position])  # [d_in, d_out]
        if not self.experts:
            return delta.T if self.transposed else delta
        if self.expert is None:  # [d_in, E * d_out] -> [E, d_in, d_out]
            delta = delta.reshape(delta.shape[0], self.experts, -1).permute(1, 0, 2)
        else:
            stacked = delta.new_zeros(self.experts, *delta.shape)  # only this expert's slot is nonzero
            stacked[self.expert] = delta
            delta = stacked
        return delta.transpose(1, 2) if self.transposed else delta


@dataclass
class AdditiveUpdate:
    """``delta_i`` added to parameter ``name``; ``delta`` is ``[batch, pos, *shape]``.

    ``acts_as`` says what the parameter does, so a backend applies the edit from the update alone, whatever the
    correction that produced it: ``"bias"`` moves its module's output by ``delta``; ``"norm_scale"`` (a norm's
    elementwise scale) moves the norm's output by ``delta * z``, z the norm's normalized input.
    """

    name: str
    delta: Tensor
    acts_as: Literal["bias", "norm_scale"] = "bias"

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

    def edits(self, shaped: Callable[[Tensor], Tensor]) -> list[RankOneUpdate | AdditiveUpdate]:
        """The updates as edits for the rows a block runs on: each factor passed through ``shaped`` (e.g.
        ``adapters.assemble.PatchedRows``). Each edit says how it acts (a rank-one map change, a bias, a norm
        scale), so a backend applies it without knowing the correction that produced it."""
        return [replace(u, row=shaped(u.row), column=shaped(u.column)) if isinstance(u, RankOneUpdate)
                else replace(u, delta=shaped(u.delta)) for u in self.updates]

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
                      m.transposed, m.experts)
        for m in capture.maps
    ]
    delta_b = core.bias_correction(capture.residual, capture.query_residual)
    fix = capture.correction
    if fix.kind == "bias":
        updates.append(AdditiveUpdate(fix.name, scaled_residual_delta(delta_b, fix.residual_scale)))
    elif fix.kind == "scale":
        updates += post_norm_updates(scaled_residual_target(capture), capture.query_residual, fix)
    elif fix.kind == "expert_out":
        updates += expert_output_updates(scaled_residual_delta(delta_b, fix.residual_scale), fix)
    return BlockUpdate(capture.block, row, delta_b, updates, capture.query_input, capture.output, fix.kind)


def scaled_residual_delta(delta_b: Tensor, scale: float) -> Tensor:
    """What the MLP's own output must move by when the block adds ``scale *`` it to the residual (Granite's
    ``y = r + s * mlp(m)``): ``(r_i - r_x) / s``, so that ``s`` times it is ``r_i - r_x``."""
    return delta_b if scale == 1 else delta_b / scale


def scaled_residual_target(capture: BlockCapture) -> Tensor:
    """The output a post-MLP norm patch must produce for an unscaled join: ``r_x + (y_i - r_x) / s``, so that
    ``r_x + s * (norm output) = y_i`` (the block output itself when s = 1)."""
    s = capture.correction.residual_scale
    return capture.output if s == 1 else capture.query_residual + (capture.output - capture.query_residual) / s


def post_norm_updates(output: Tensor, query_residual: Tensor, fix: OutputCorrection
                      ) -> list[RankOneUpdate | AdditiveUpdate]:
    """A norm after the MLP: flatten the MLP output by a rank-one output-matrix update, then patch the norm's scale.

    Where the hidden activation is exactly zero the output bias (``fix.output_bias``) moves the output instead.

    Both are exact: the patched query-alone MLP outputs ``h'_i`` (its hidden is the with-context ``p_i``), the norm
    turns it into ``z' = +-1`` (up to eps) and ``(w + delta_w) z'`` is the with-context ``y_i - r_x``. Patching the
    scale alone (``(r_i - r_x)/z_i``, Goldwaser et al. 2025) divides by near-zero ``z_i`` entries instead.
    """
    flat = core.flattened_output(fix.mlp_output)
    normalized, norm_output = fix.post_norm(flat)
    scale = AdditiveUpdate(fix.name, core.post_norm_scale(output, query_residual, norm_output, normalized),
                           "norm_scale")
    if fix.names:  # a mixture of experts: the routed experts' output matrices carry the flattening together
        return [*expert_output_updates(flat - fix.mlp_output, fix), scale]
    move = flat - fix.mlp_output
    squared = fix.hidden.pow(2).sum(-1, keepdim=True)
    dead = squared == 0  # a hidden of exact zeros (ReLU): no output-matrix update reaches the output there
    if dead.any() and fix.output_bias is None:
        raise ValueError(dead_hidden(fix.output_weight))
    row = torch.where(dead, torch.zeros_like(fix.hidden), fix.hidden / squared.where(~dead, torch.ones_like(squared)))
    updates = [RankOneUpdate(fix.output_weight, row, move.where(~dead, torch.zeros_like(move)), fix.output_transposed)]
    if dead.any():  # there the output bias moves the MLP output instead
        updates.append(AdditiveUpdate(fix.output_bias, move.where(dead, torch.zeros_like(move))))
    return [*updates, scale]


def dead_hidden(output_weight: str) -> str:
    return (f"{output_weight}: the MLP's hidden activation is exactly zero at some position and the MLP has no output "
            "bias, so no update of its output layer can change the MLP output there")


def expert_output_updates(delta_b: Tensor, fix: OutputCorrection) -> list[RankOneUpdate]:
    """Rank-one output-matrix updates that add ``delta_b`` to a mixture of experts with no output bias.

    Expert e contributes ``w_e W_out_e p_e``; with ``W_out_e += (delta_b/S) p_e^T/||p_e||^2`` for every routed
    expert whose hidden ``p_e`` is nonzero (``S`` the sum of their routing weights) the mixture moves by exactly
    ``delta_b``. Unrouted experts, and routed ones with a zero hidden (ReLU), get zero. The matrices are
    ``fix.names`` (slices ``fix.expert_slots`` of one stacked parameter, for transformers' fused experts).
    """
    names, hidden, routing_weights = fix.names, fix.expert_hidden, fix.routing_weights
    slots = fix.expert_slots or (None,) * len(names)
    transposed = fix.output_transposed if fix.expert_slots else True  # else TransformerLens experts' nn.Linear
    squared = torch.stack([p.pow(2).sum(-1) for p in hidden], dim=-1)  # [batch, pos, n_experts]
    carriers = (routing_weights > 0) & (squared > 0)  # routed experts whose hidden can carry an update
    if not torch.all(carriers.any(-1)):
        if len(names) == 1:  # a dense MLP without output bias, carried as one "expert" of weight 1
            raise ValueError(dead_hidden(names[0]))
        raise ValueError(f"expert outputs {names[0]}...: every routed expert's hidden activation is exactly zero at "
                         "some position, so no update of their output matrices can move the mixture there")
    total = (routing_weights * carriers).sum(-1, keepdim=True)
    out = []
    for e, (name, p) in enumerate(zip(names, hidden, strict=True)):
        on = carriers[..., e : e + 1]
        row = torch.where(on, p / squared[..., e : e + 1].where(on, torch.ones_like(total)), torch.zeros_like(p))
        column = torch.where(on, delta_b / total, torch.zeros_like(delta_b))
        out.append(RankOneUpdate(name, row, column, transposed, fix.stacked_experts, slots[e]))
    return out

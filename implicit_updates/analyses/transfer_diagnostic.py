"""Why transfer differs between tasks and models: a per-block diagnostic of how far an update fitted on training
queries reaches held-out ones (issue #26, thought patches, part 3).

For training queries and held-out queries, each run after the same prefix, every block gives the rows the
continuation's update is solved from (:class:`~implicit_updates.math.lowrank.BlockSystem`, teacher-forced: each
block on its with-context input): the query-alone MLP inputs ``M'``, the with-context ones ``M``, the with-context
hidden activations ``P`` and the change the MLP output needs ``D``. Per block:

- ``coverage``: the mean share of a held-out row ``m'_h``'s squared norm inside the row space of ``M'_train``. The
  first-layer update ``dW = pinv(M'_train) (...)`` only acts on that subspace: the part of ``m'_h`` outside it
  gets no change at all.
- ``principal_cosines``: the cosines of the principal angles between the row spaces of ``M'_train`` and
  ``M'_held`` (Björck & Golub 1973), and their mean square ``principal_mean_square``.
- ``first_layer_residual``: ``||M'_held dW - (M_held - M'_held) W|| / ||(M_held - M'_held) W||`` over every
  first-layer map ``W`` (squares summed over maps), ``dW`` the exact stacked update fitted on the training rows (the
  minimum-norm least-squares one where they are dependent). 0: the training update gives every held-out query
  exactly the pre-activation change the prefix gives it; 1: none of it; above 1: worse than nothing.
- ``output_residual``: ``||P_held dW_out - D_held|| / ||D_held||``, ``dW_out`` fitted on the training rows the same
  way; ``vector_residual``: ``||D_held - mean(D_train)|| / ||D_held||``, what one constant shift (the thought
  vector's) achieves instead. Both None for a block with a norm after the MLP (its output matrix does not solve
  ``P dW_out = D``: the target goes through the norm, whose scale is patched jointly for all rows by
  :func:`~implicit_updates.math.lowrank.post_norm_target`, not a linear fit one could apply to new rows) or with
  routed experts (no single ``P``: each expert's output matrix reads its routing-weighted hidden activations, and
  the routing of a held-out query differs).

The math is in :mod:`implicit_updates.math.transfer`. Any backend with the ``continuation`` capability; the user's
model is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from implicit_updates.analyses.continuation import gathered_systems, token_batch
from implicit_updates.analyses.thought import ThoughtSystems, thought_systems
from implicit_updates.math.lowrank import BlockSystem, Fit, Solver, default_rcond
from implicit_updates.math.transfer import coverage, principal_cosines, relative_residual

MEASURES = ("coverage", "principal_mean_square", "first_layer_residual", "output_residual", "vector_residual")


@dataclass
class TransferDiagnostic:
    """Per-block lists (one entry per block, in ``blocks`` order) of each measure, the ranks of the training and
    held-out query-alone MLP inputs, the row counts, the compute dtype and the singular-value floor used."""

    blocks: list[int]
    coverage: list[float]
    principal_cosines: list[list[float]]
    principal_mean_square: list[float]
    first_layer_residual: list[float]
    output_residual: list[float | None]
    vector_residual: list[float | None]
    train_rank: list[int]
    held_rank: list[int]
    n_train_rows: int
    n_held_rows: int
    dtype: torch.dtype
    rcond: float

    def mean(self) -> dict[str, float | None]:
        """Each measure's mean over the blocks, ignoring None (None where every block's is None)."""
        out: dict[str, float | None] = {}
        for name in MEASURES:
            values = [v for v in getattr(self, name) if v is not None]
            out[name] = sum(values) / len(values) if values else None
        return out

    def to_dict(self) -> dict:
        """Plain floats, ints, lists and None (JSON-able)."""
        out = {name: getattr(self, name) for name in ("blocks", *MEASURES, "principal_cosines", "train_rank",
                                                      "held_rank", "n_train_rows", "n_held_rows", "rcond")}
        return {**out, "dtype": str(self.dtype).removeprefix("torch."), "mean": self.mean()}

    def summary(self) -> str:
        """A text table: one row per block, then the means."""
        head = f"{'block':>5} {'coverage':>9} {'cos^2':>7} {'first-layer':>11} {'output':>8} {'vector':>8} {'rank':>7}"
        rows = [head]
        for i, b in enumerate(self.blocks):
            ranks = f"{self.train_rank[i]}/{self.held_rank[i]}"
            rows.append(_row(str(b), [getattr(self, m)[i] for m in MEASURES]) + f" {ranks:>7}")
        rows.append(_row("mean", list(self.mean().values())))
        note = (f"{self.n_train_rows} training rows, {self.n_held_rows} held-out rows; residuals: 0 = the training "
                "update gives held-out queries exactly what the prefix does, 1 = nothing (rank: train/held)")
        return "\n".join([*rows, note])


def transfer_diagnostic(model: nn.Module, prefix: Tensor, train_queries: Tensor | Sequence[Tensor] | ThoughtSystems,
                        held_queries: Tensor | Sequence[Tensor], dtype: torch.dtype | str | None = None,
                        rcond: float | None = None) -> TransferDiagnostic:
    """How well an update fitted on ``train_queries`` reaches ``held_queries`` (each run after ``prefix``), per
    block: coverage of the held-out MLP inputs by the training ones' row space, the principal angles between the
    two, and the held-out residuals of the first-layer, output-matrix and constant-vector fits (module docstring).

    ``train_queries`` and ``held_queries``: token ids ``[n, K]``, or lists of 1-D id tensors of any lengths (each
    length's queries are gathered in one batch, their rows concatenated).
    ``train_queries`` may also be the :class:`~implicit_updates.analyses.thought.ThoughtSystems` already gathered
    for them after this ``prefix`` (its rows are reused, not gathered again; its dtype is the compute dtype).
    ``rcond``: the relative singular-value floor of the row spaces and fits (default
    :func:`~implicit_updates.math.lowrank.default_rcond` of the compute dtype).
    """
    if isinstance(train_queries, ThoughtSystems):
        compute_dtype, train = _reused(train_queries, model, prefix, dtype)
    else:
        gathered = thought_systems(model, prefix, train_queries, dtype, rcond)
        compute_dtype, train = gathered.dtype, gathered.systems
    held = [gathered_systems(model, prefix, group, compute_dtype)[1] for group in _by_length(held_queries)]
    rcond = default_rcond(compute_dtype) if rcond is None else float(rcond)
    rows = {name: [] for name in MEASURES + ("principal_cosines", "train_rank", "held_rank")}
    with torch.no_grad():
        for i, system in enumerate(train):
            for name, value in _block(system, [group[i] for group in held], rcond).items():
                rows[name].append(value)
    return TransferDiagnostic([s.block for s in train], **rows, n_train_rows=train[0].mlp_input.shape[0],
                              n_held_rows=sum(g[0].mlp_input.shape[0] for g in held), dtype=compute_dtype,
                              rcond=rcond)


def _block(train: BlockSystem, held: list[BlockSystem], rcond: float) -> dict:
    """One block's measures from its training system and its held-out systems (one per query length)."""
    def cat(field: str) -> Tensor:
        return torch.cat([getattr(h, field) for h in held])

    m_held, alone_held = cat("mlp_input"), cat("query_mlp_input")
    fit, held_fit = _least_squares(train.query_mlp_input, rcond), _least_squares(alone_held, rcond)
    weights = [w.weight.detach().to(alone_held.dtype) for w in train.maps]
    first = relative_residual([fit.predict(alone_held, (train.mlp_input - train.query_mlp_input) @ w)
                               for w in weights], [(m_held - alone_held) @ w for w in weights])
    cosines = principal_cosines(fit.basis, held_fit.basis)
    out = {"coverage": coverage(fit.basis, alone_held), "principal_cosines": cosines.tolist(),
           "principal_mean_square": float(cosines.pow(2).mean()) if cosines.numel() else 0.0,
           "first_layer_residual": first, "output_residual": None, "vector_residual": None,
           "train_rank": fit.basis.shape[0], "held_rank": held_fit.basis.shape[0]}
    if train.post_norm is None and train.routed is None:
        change = cat("change")
        out["output_residual"] = relative_residual([_least_squares(train.hidden, rcond).predict(cat("hidden"),
                                                                                           train.change)], [change])
        out["vector_residual"] = relative_residual([train.change.mean(0).expand_as(change)], [change])
    return out


def _least_squares(rows: Tensor, rcond: float) -> Solver:
    """The minimum-norm least-squares fit on ``rows`` (dependent rows kept, not refused), with its row-space basis."""
    return Solver(rows, Fit(rcond), "the diagnostic's rows", refuse_dependent=False)


def _reused(systems: ThoughtSystems, model: nn.Module, prefix: Tensor, dtype) -> tuple[torch.dtype, list]:
    """The compute dtype and rows of ``systems``, refused in one line if they were gathered for another model, prefix
    or dtype than the diagnostic is asked for."""
    if systems.model is not model:
        raise ValueError("the ThoughtSystems were gathered on another model: pass the model they were gathered on")
    if systems.prefix is None or not torch.equal(systems.prefix.cpu(), token_batch(prefix).cpu()):
        raise ValueError("the ThoughtSystems were gathered after another prefix: pass the prefix they were "
                         "gathered after, or the training queries' token ids")
    if dtype is not None and getattr(torch, str(dtype).removeprefix("torch.")) != systems.dtype:
        raise ValueError(f"the ThoughtSystems were gathered in {systems.dtype}, not {dtype}: leave dtype out or "
                         "pass the training queries' token ids")
    return systems.dtype, systems.systems


def _row(label: str, values: list[float | None]) -> str:
    cells = [f"{'-' if v is None else f'{v:.3g}':>{w}}" for v, w in zip(values, (9, 7, 11, 8, 8), strict=True)]
    return f"{label:>5} " + " ".join(cells)


def _by_length(queries: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """The queries as batches ``[n_K, K]``, one per length (in order of first appearance)."""
    if not isinstance(queries, (list, tuple)):
        return [token_batch(queries)]
    if not queries:
        raise ValueError("no held-out queries given")
    groups: dict[int, list[Tensor]] = {}
    for q in queries:
        q = token_batch(q)
        groups.setdefault(q.shape[1], []).append(q)
    return [torch.cat(g) for g in groups.values()]

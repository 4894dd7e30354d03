"""Thought patches: one query-independent update per block, fitted by least squares over many queries' exact
per-token updates (Mazzawi, Dherin, Munn, Wunder & Gonzalvo 2025, "Transmuting prompts into weights", arXiv
2510.08734: thought matrices and thought vectors).

For n training queries of K tokens each, run after the prefix, every block gives N = n K rows (queries of several
lengths: N is the sum of their lengths): the MLP inputs with context ``M`` and of the block run on the queries alone
``M'`` (its input the with-context one, as the continuation absorption runs it), the hidden activations ``P`` and the
change ``D`` the MLP output needs (:class:`~implicit_updates.math.lowrank.BlockSystem`). The exact stacked update solves
``M' dW = (M - M') W`` and ``P dW_out = D`` exactly (rank <= N); a *thought matrix* solves both by ridge and/or
reduced-rank least squares (:class:`~implicit_updates.math.lowrank.Solver`), a *thought vector* is the least-squares
constant change of each block's output, and ``kind="both"`` fits the output matrix with that vector as its intercept
(:func:`~implicit_updates.math.lowrank.solve_block`). With ``ridge=0``, no rank cap and ``kind="matrix"`` the fit is the
exact stacked update (exact on all N rows when they are independent, as :func:`absorb_continuation`).

Each block is fitted on its with-context inputs (teacher forcing), the rows the exact update is defined on; where a
fit is not exact, a later block on a held-out query sees the earlier blocks' residual error, which the fit did not
model (fitting block by block on the patched model's own outputs is the alternative, not implemented).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from implicit_updates.analyses.continuation import ContinuationAbsorption, after_prefix, gathered_systems, token_batch
from implicit_updates.analyses.decompose import torch_module, untouched
from implicit_updates.math.core import kl_divergence
from implicit_updates.math.lowrank import (
    BlockContinuation,
    BlockSystem,
    Fit,
    OutputShift,
    concat_rows,
    default_rcond,
    select_rows,
    solve_block,
)
from implicit_updates.runtime.hooks import swapped_parameters
from implicit_updates.runtime.precision import computed_in

KINDS = ("matrix", "vector", "both")


@dataclass
class ThoughtPatch(ContinuationAbsorption):
    """A query-independent patch per block. ``patch()``: the weight deltas (and output biases carrying a thought
    vector exactly); ``steering_vectors()``: every block's output shift; ``applied(model)``: both, while a block
    is open; ``save_lora`` / ``save_steering``: the exports."""

    fit: Fit = Fit(0.0)

    @property
    def shifts(self) -> list[OutputShift]:
        return [u for b in self.blocks for u in b.updates if isinstance(u, OutputShift)]

    def steering_vectors(self) -> dict[int, Tensor]:
        """``{block: vector}`` added to each block's output (the residual stream after it)."""
        return {s.block: s.vector for s in self.shifts}

    def patch(self) -> dict[str, Tensor]:
        """``{parameter name: dense delta}``: the matrices, and the output biases of blocks whose thought vector a
        bias carries exactly (``vector / s``). Blocks without one keep their vector as a steering vector only."""
        out = ContinuationAbsorption.patch(replace(self, blocks=self._weights_only()))
        for s in self.shifts:
            if s.bias is not None:
                out[s.bias] = out.get(s.bias, 0) + s.vector / s.residual_scale
        return out

    def _steered(self) -> dict[int, Tensor]:
        return {s.block: s.vector for s in self.shifts if s.bias is None}

    def _weights_only(self) -> list[BlockContinuation]:
        return [replace(b, updates=tuple(u for u in b.updates if not isinstance(u, OutputShift))) for b in self.blocks]

    def patched(self) -> nn.Module:
        """A deep copy with the weight deltas added; refused where a thought vector has no bias to live in (use
        :meth:`applied`, which adds it as a steering vector)."""
        if self._steered():
            raise ValueError(f"blocks {sorted(self._steered())} carry their thought vector as a steering vector (no "
                             "output bias to hold it): use `with patch.applied():` to run the model with it")
        if isinstance(self.continuation, tuple):  # queries of several lengths: the copy's probe takes the first
            return ContinuationAbsorption.patched(replace(self, continuation=self.continuation[0][None]))
        return ContinuationAbsorption.patched(self)

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """The user's model with the patch while the block is open: the weights swapped for ``weight + delta`` and
        the steering vectors added to the block outputs, computing in the patch's dtype; restored on any exit."""
        from implicit_updates.adapters import adapter_for

        module = torch_module(self.model)
        values = {n: module.get_parameter(n).to(self.dtype) + d for n, d in self.patch().items()}
        with untouched(module), computed_in(module, self.dtype), swapped_parameters(module, values), \
                adapter_for(module).output_shifts(self._steered()):
            yield module

    def logits_on(self, queries: Tensor | Sequence[Tensor]) -> Tensor:
        """``[sum of lengths, d_vocab]``: the patched model on each query alone (token ids ``[n, K]``, or n sequences
        of any lengths), query-major."""
        from implicit_updates.adapters import adapter_for

        with self.applied() as module:
            adapter = adapter_for(module)
            return _by_query(_query_list(queries), lambda batch: adapter.logits(batch.to(self.full_logits.device)))

    def patched_logits(self, model: nn.Module | None = None) -> Tensor:
        if model is None:
            return self.logits_on(self.continuation)
        if not isinstance(self.continuation, tuple):
            return super().patched_logits(model)
        return torch.cat([replace(self, continuation=q[None]).patched_logits(model) for q in self.continuation])

    def compare_on(self, prefix: Tensor, queries: Tensor | Sequence[Tensor]) -> dict:
        """The patch on held-out ``queries`` alone (``[m, K]``, or m sequences of any lengths) against the full model
        on ``prefix + query``, at every query position: top-1 agreement rate, mean KL(full || patched), max |logit
        diff|."""
        from implicit_updates.adapters import adapter_for

        prefix, listed = token_batch(prefix), _query_list(queries)
        module = torch_module(self.model)
        with untouched(module), computed_in(module, self.dtype):
            adapter = adapter_for(module)
            full = _by_query(listed, lambda batch: adapter.logits(after_prefix(prefix, batch))[:, -batch.shape[1]:])
        patched = self.logits_on(listed)
        logp, logq = torch.log_softmax(full.double(), -1), torch.log_softmax(patched.double(), -1)
        return {"agree": float((patched.argmax(-1) == full.argmax(-1)).double().mean()),
                "kl": sum(kl_divergence(p, q) for p, q in zip(logp, logq, strict=True)) / len(logp),
                "max_abs_logit_diff": float((patched - full).abs().max())}

    def save_lora(self, path) -> None:
        """The matrix part as a PEFT LoRA directory (its thought vectors: :meth:`save_steering`)."""
        from implicit_updates.analyses.lora import save_lora

        save_lora(replace(self, blocks=self._weights_only()), path)

    def save_steering(self, path: str | Path) -> Path:
        """The thought vectors as a safetensors file ``{"blocks.{b}": vector}``, each added to block b's output
        (the residual stream after it), with the fit in its metadata."""
        from safetensors.torch import save_file

        vectors = self.steering_vectors()
        if not vectors:
            raise ValueError("this patch has no thought vectors (kind='matrix'): export it with save_lora")
        path = Path(path)
        save_file({f"blocks.{b}": v.detach().cpu().contiguous() for b, v in vectors.items()}, str(path),
                  metadata={"added_to": "block output (residual stream after the block)", "kind": self.fit.kind,
                            "ridge": str(self.fit.ridge), "rank": str(self.fit.rank), "dtype": str(self.dtype)})
        return path


@dataclass
class ThoughtSystems:
    """Every block's rows over n training queries, gathered once (one run with the prefix per query length, one per
    block alone); :meth:`fit` solves a thought patch from them, so a sweep over ridges, ranks, kinds or subsets of
    the queries costs one gathering. Rows are query-major: query 0's positions, then query 1's, ..."""

    model: nn.Module
    dtype: torch.dtype
    systems: list[BlockSystem]
    queries: tuple[Tensor, ...]  # n 1-D token-id sequences, of any lengths
    full_logits: Tensor  # [sum of lengths, d_vocab], query-major
    rcond: float
    prefix: Tensor | None = None  # [1, P] token ids the queries ran after (None: not recorded)

    def fit(self, ridge: float = 0.0, rank: int | None = None, kind: str = "matrix",
            queries: Sequence[int] | None = None) -> ThoughtPatch:
        """The thought patch over all queries, or over ``queries`` (their indices): as :func:`thought_patch`."""
        _check(ridge, rank, kind)
        chosen = list(range(len(self.queries))) if queries is None else [int(i) for i in queries]
        starts = torch.tensor([0, *(len(q) for q in self.queries)]).cumsum(0)
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in chosen])
        fit = Fit(self.rcond, float(ridge), rank, kind)
        solved = rows
        if fit.exact:  # a position whose query tokens so far repeat another's is the same constraint: kept once
            solved = rows[_first_occurrences([self.queries[i] for i in chosen])]
        with torch.no_grad():  # the maps are the model's parameters: no graph through them
            blocks = [solve_block(select_rows(system, solved), fit, "matrix") for system in self.systems]
        return ThoughtPatch(self.model, self.dtype, blocks, _stacked([self.queries[i] for i in chosen]),
                            self.full_logits[rows], fit=fit)


def thought_systems(model: nn.Module, prefix: Tensor, queries: Tensor | Sequence[Tensor],
                    dtype: torch.dtype | str | None = None, rcond: float | None = None) -> ThoughtSystems:
    """Gather every block's rows over ``queries`` (``[n, K]``, or n sequences of any lengths) run after ``prefix``,
    to fit many thought patches (:meth:`ThoughtSystems.fit`). Queries of one length run as one batch; each other
    length as its own. Any backend with the ``continuation`` capability; the user's model is untouched."""
    listed = _query_list(queries)
    groups = _by_length(listed)
    gathered = [gathered_systems(model, prefix, torch.stack([listed[i] for i in idx]), dtype)
                for idx in groups.values()]
    compute_dtype = gathered[0][0]
    # the groups' rows (each query-major within its group) back in the queries' order
    owner = [(i, j) for idx in groups.values() for i in idx for j in range(len(listed[i]))]
    order = torch.tensor(sorted(range(len(owner)), key=owner.__getitem__))
    systems = [select_rows(concat_rows([g[1][b] for g in gathered]), order) for b in range(len(gathered[0][1]))]
    full_logits = torch.cat([g[3] for g in gathered])[order]
    inputs = tuple(q.to(gathered[0][2].device) for q in listed)
    return ThoughtSystems(model, compute_dtype, systems, inputs, full_logits,
                          default_rcond(compute_dtype) if rcond is None else rcond, token_batch(prefix))


def _query_list(queries: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """The queries as 1-D token-id sequences: the rows of ``[n, K]``, or each of a sequence (``[K]`` or ``[1, K]``)."""
    if isinstance(queries, (list, tuple)):
        if not queries:
            raise ValueError("no queries given: give at least one")
        out = []
        for q in queries:
            q = token_batch(q)
            if q.shape[0] != 1:
                raise ValueError(f"each query in a list is one sequence ([K] or [1, K]), got shape {tuple(q.shape)}")
            out.append(q[0])
        return out
    return list(token_batch(queries))


def _stacked(queries: list[Tensor]) -> Tensor | tuple[Tensor, ...]:
    """``[n, K]`` when the queries have one length, else the tuple of 1-D sequences."""
    if len({len(q) for q in queries}) == 1:
        return torch.stack(queries)
    return tuple(queries)


def _by_length(queries: list[Tensor]) -> dict[int, list[int]]:
    """The queries' indices grouped by length (each group runs as one batch), in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault(len(q), []).append(i)
    return groups


def _by_query(queries: list[Tensor], run) -> Tensor:
    """``run`` (token ids ``[b, K]`` -> logits ``[b, K, d_vocab]``) on the queries, one batch per length, as
    ``[sum of lengths, d_vocab]`` rows in the queries' order (query-major)."""
    groups = _by_length(queries)
    out: list[Tensor] = [None] * len(queries)  # type: ignore[list-item]
    for idx in groups.values():
        logits = run(torch.stack([queries[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = logits[j]
    return torch.cat(out)


def _first_occurrences(queries: Sequence[Tensor]) -> Tensor:
    """Indices of the rows (query-major, ``sum of lengths``) whose query tokens up to and including that position
    appear for the first time: the others are the same row (same prefix, same tokens), with and without the
    context."""
    seen: set[tuple] = set()
    keep, row = [], 0
    for query in queries:
        tokens = query.tolist()
        for j in range(len(tokens)):
            if tuple(tokens[: j + 1]) not in seen:
                seen.add(tuple(tokens[: j + 1]))
                keep.append(row)
            row += 1
    return torch.tensor(keep)


def _check(ridge, rank, kind) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, not {ridge!r}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, not {rank!r}")


def thought_patch(model: nn.Module, prefix: Tensor, queries: Tensor | Sequence[Tensor], rank: int | None = None,
                  ridge: float = 0.0, kind: str = "matrix", dtype: torch.dtype | str | None = None,
                  rcond: float | None = None) -> ThoughtPatch:
    """One query-independent patch per block, fitted over every position of ``queries`` run after ``prefix``.

    ``queries``: token ids ``[n, K]``, or n 1-D sequences of any lengths (one batch per length). ``kind``:
    ``"matrix"`` (the first-layer maps and the output matrix, by ridge / reduced-rank least squares), ``"vector"``
    (one additive change of each block's output), or ``"both"`` (the maps, and the output matrix with the vector as
    its intercept). ``ridge >= 0``, ``rank``: a cap on each map's update's rank. ``ridge=0``, ``rank=None``,
    ``kind="matrix"`` is the exact stacked update (``absorb_continuation(..., output="matrix")``), exact on all n K
    positions when their rows are independent (positions whose query tokens so far repeat another query's are the
    same row, kept once). ``ridge`` is relative to the fitted rows' mean squared norm
    (:class:`~implicit_updates.math.lowrank.Solver`), so one value means the same in every block. For sweeps,
    :func:`thought_systems` gathers once. Any backend with the ``continuation`` capability; the user's model is
    untouched.
    """
    _check(ridge, rank, kind)
    return thought_systems(model, prefix, queries, dtype, rcond).fit(ridge, rank, kind)



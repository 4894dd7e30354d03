"""Thought patches: one query-independent update per block, fitted by least squares over many queries' exact
per-token updates (Mazzawi, Dherin, Munn, Wunder & Gonzalvo 2025, "Transmuting prompts into weights", arXiv
2510.08734: thought matrices and thought vectors).

For n training queries of K tokens each, run after the prefix, every block gives N = n K rows: the MLP inputs with
context ``M`` and of the block run on the queries alone ``M'`` (its input the with-context one, as the continuation
absorption runs it), the hidden activations ``P`` and the change ``D`` the MLP output needs
(:class:`~implicit_updates.math.lowrank.BlockSystem`). The exact stacked update solves ``M' dW = (M - M') W`` and
``P dW_out = D`` exactly (rank <= N); a *thought matrix* solves both by ridge and/or reduced-rank least squares
(:class:`~implicit_updates.math.lowrank.Solver`), a *thought vector* is the least-squares constant change of each
block's output, and ``kind="both"`` fits the output matrix with that vector as its intercept
(:func:`~implicit_updates.math.lowrank.solve_block`). With ``ridge=0``, no rank cap and ``kind="matrix"`` the fit is
the exact stacked update (exact on all N rows when they are independent, as :func:`absorb_continuation`).

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

    def logits_on(self, queries: Tensor) -> Tensor:
        """``[n * K, d_vocab]``: the patched model on each query alone (token ids ``[n, K]``)."""
        from implicit_updates.adapters import adapter_for

        queries = token_batch(queries)
        with self.applied() as module:
            logits = adapter_for(module).logits(queries.to(self.continuation.device))
        return logits.reshape(-1, logits.shape[-1])

    def patched_logits(self, model: nn.Module | None = None) -> Tensor:
        return self.logits_on(self.continuation) if model is None else super().patched_logits(model)

    def compare_on(self, prefix: Tensor, queries: Tensor) -> dict:
        """The patch on held-out ``queries`` alone against the full model on ``prefix + query``, at every query
        position: top-1 agreement rate, mean KL(full || patched), max |logit diff|."""
        from implicit_updates.adapters import adapter_for

        prefix, queries = token_batch(prefix), token_batch(queries)
        module = torch_module(self.model)
        full_ids = after_prefix(prefix, queries)
        with untouched(module), computed_in(module, self.dtype):
            full = adapter_for(module).logits(full_ids)[:, -queries.shape[1]:].reshape(-1, self.full_logits.shape[-1])
        patched = self.logits_on(queries)
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
    """Every block's rows over n training queries, gathered once (one run with the prefix, one per block alone);
    :meth:`fit` solves a thought patch from them, so a sweep over ridges, ranks, kinds or subsets of the queries
    costs one gathering."""

    model: nn.Module
    dtype: torch.dtype
    systems: list[BlockSystem]
    queries: Tensor  # [n, K] token ids
    full_logits: Tensor  # [n * K, d_vocab], sequence-major
    rcond: float
    prefix: Tensor | None = None  # [1, P] token ids the queries ran after (None: not recorded)

    def fit(self, ridge: float = 0.0, rank: int | None = None, kind: str = "matrix",
            queries: Sequence[int] | None = None) -> ThoughtPatch:
        """The thought patch over all queries, or over ``queries`` (their indices): as :func:`thought_patch`."""
        _check(ridge, rank, kind)
        k = self.queries.shape[1]
        chosen = torch.arange(self.queries.shape[0]) if queries is None else torch.as_tensor(list(queries))
        rows = (chosen[:, None] * k + torch.arange(k)).reshape(-1)
        fit = Fit(self.rcond, float(ridge), rank, kind)
        solved = rows
        if fit.exact:  # a position whose query tokens so far repeat another's is the same constraint: kept once
            solved = rows[_first_occurrences(self.queries[chosen])]
        with torch.no_grad():  # the maps are the model's parameters: no graph through them
            blocks = [solve_block(select_rows(system, solved), fit, "matrix") for system in self.systems]
        return ThoughtPatch(self.model, self.dtype, blocks, self.queries[chosen], self.full_logits[rows], fit=fit)


def thought_systems(model: nn.Module, prefix: Tensor, queries: Tensor | Sequence[Tensor],
                    dtype: torch.dtype | str | None = None, rcond: float | None = None) -> ThoughtSystems:
    """Gather every block's rows over ``queries`` (``[n, K]``) run after ``prefix``, to fit many thought patches
    (:meth:`ThoughtSystems.fit`). Any backend with the ``continuation`` capability; the user's model is untouched."""
    if isinstance(queries, (list, tuple)):
        queries = torch.stack([token_batch(q)[0] for q in queries])
    dtype, systems, inputs, full_logits = gathered_systems(model, prefix, queries, dtype)
    return ThoughtSystems(model, dtype, systems, inputs, full_logits, default_rcond(dtype) if rcond is None else rcond,
                          token_batch(prefix))


def _first_occurrences(queries: Tensor) -> Tensor:
    """Indices of the ``[n * K]`` rows (sequence-major) whose query tokens up to and including that position appear
    for the first time: the others are the same row (same prefix, same tokens), with and without the context."""
    seen: set[tuple] = set()
    keep = []
    for i, query in enumerate(queries.tolist()):
        for j in range(len(query)):
            if tuple(query[: j + 1]) not in seen:
                seen.add(tuple(query[: j + 1]))
                keep.append(i * len(query) + j)
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

    ``queries``: token ids ``[n, K]`` (or n sequences of K ids). ``kind``: ``"matrix"`` (the first-layer maps and
    the output matrix, by ridge / reduced-rank least squares), ``"vector"`` (one additive change of each block's
    output), or ``"both"`` (the maps, and the output matrix with the vector as its intercept). ``ridge >= 0``,
    ``rank``: a cap on each map's update's rank. ``ridge=0``, ``rank=None``, ``kind="matrix"`` is the exact stacked
    update (``absorb_continuation(..., output="matrix")``), exact on all n K positions when their rows are
    independent (positions whose query tokens so far repeat another query's are the same row, kept once). ``ridge`` is
    relative to the fitted rows' mean squared norm (:class:`~implicit_updates.math.lowrank.Solver`), so one value
    means the same in every block. For sweeps, :func:`thought_systems` gathers once. Any backend with the
    ``continuation`` capability; the user's model is untouched.
    """
    _check(ridge, rank, kind)
    return thought_systems(model, prefix, queries, dtype, rcond).fit(ridge, rank, kind)



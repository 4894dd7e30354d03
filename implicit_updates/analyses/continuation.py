"""Exact absorption over a continuation: a rank-K update per block such that the patched model, run on a
continuation S of K tokens alone, reproduces the full model's logits at all K positions of ``prefix + S``.

Per block l, with ``M`` the with-context MLP inputs at S's positions and ``M'`` those of block l run on S alone (its
input is the with-context one, which the patched blocks before it reproduce; block 0 starts from S's own embedding),
every first-layer map ``W`` (``m @ W``) gets ``delta_W = pinv(M') (M - M') W`` (rank <= K), so ``M' (W + delta_W) =
M W``: the hidden activations become the with-context ones, ``P``. The residual difference ``D = R - R'`` then goes
into the output matrix, ``delta_W_out = pinv(P) D`` (rank <= K), or into the output bias when K = 1 (Dherin et al.
Thm A.2, as :func:`implicit_updates.analyses.absorb`). Both are exact when ``M'`` and ``P`` have full row rank K (K <=
d_model, K <= d_mlp); their condition numbers are reported, and numerically dependent rows are refused. This is Eq. 8
of Dherin et al. 2025 with the rank-one ``m_x^T/||m_x||^2`` replaced by the pseudo-inverse of K query inputs (for
K = 1 the two coincide). The math is in :mod:`implicit_updates.math.lowrank`; this module runs HookedTransformers, and
:mod:`implicit_updates.adapters.module_continuation` Hugging Face models and TransformerBridges.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from implicit_updates.adapters.base import require
from implicit_updates.analyses.decompose import check_copy_is_its_own, prepared, untouched, working_model
from implicit_updates.math.lowrank import (  # noqa: F401 (re-exported: the public names of this module)
    BlockContinuation,
    BlockSystem,
    Fit,
    LowRankUpdate,
    at_continuation,
    checked_pinv,
    default_rcond,
    first_layer_updates,
    output_correction,
    output_update,
    positive_solution,
    post_norm_target,
    solve_block,
)
from implicit_updates.runtime.precision import exact_formula

Output = Literal["auto", "matrix"]


@dataclass
class ContinuationAbsorption:
    """Per-block low-rank updates; ``patched()`` writes them into a copy's real weights, ``save_lora(dir)`` into a
    PEFT LoRA adapter (Hugging Face models and bridges)."""

    model: nn.Module
    dtype: torch.dtype
    blocks: list[BlockContinuation]
    continuation: Tensor  # [n, K] token ids (n stacked sequences, each after the prefix)
    full_logits: Tensor  # [n * K, d_vocab], the full model's at S's positions (sequence-major)

    def patch(self) -> dict[str, Tensor]:
        """``{parameter name: dense delta}`` over every block."""
        out: dict[str, Tensor] = {}
        for block in self.blocks:
            for u in block.updates:
                name, delta = (u.name, u.dense()) if isinstance(u, LowRankUpdate) else u
                out[name] = out.get(name, 0) + delta
        return out

    def patched(self) -> nn.Module:
        """A deep copy in this absorption's dtype with every block's update added to its parameters (any backend;
        the user's model is not touched)."""
        from implicit_updates.adapters import adapter_for

        copy_ = working_model(self.model, self.dtype)
        copy_ = copy.deepcopy(copy_) if copy_ is self.model else copy_
        adapter = adapter_for(copy_)  # adapters clean what a copy inherits (a bridge's hooks bound to the original)
        with untouched(copy_):
            check_copy_is_its_own(self.model, copy_, lambda: adapter.logits(self.continuation[:1, :1]))
        with torch.no_grad():
            for name, delta in self.patch().items():
                copy_.get_parameter(name).add_(delta)
        return copy_

    def patched_logits(self, model: nn.Module | None = None) -> Tensor:
        """``[K, d_vocab]``: the patched copy (or ``model``, e.g. a loaded LoRA) run on the continuation alone, in the
        forward the update is exact in (:func:`~implicit_updates.runtime.precision.exact_formula` of the absorbed
        model)."""
        from implicit_updates.adapters import adapter_for

        model = self.patched() if model is None else model
        with untouched(model), exact_formula(self.model, self.dtype):
            if hasattr(model, "peft_config"):  # a PeftModel: its own forward applies the adapter
                logits = model(input_ids=self.continuation, use_cache=False).logits
            else:
                logits = adapter_for(model).logits(self.continuation)
            return logits.reshape(-1, logits.shape[-1])

    def compare(self, model: nn.Module | None = None) -> dict:
        """Logits of the patched copy (or ``model``) on S alone against the full model's at S's positions."""
        return self.report(self.patched_logits(model))

    def report(self, logits: Tensor) -> dict:
        """``logits`` ``[K, d_vocab]`` (a patched model's on S alone) against the full model's, with the ranks and
        condition numbers of every block."""
        diff = (logits.to(self.full_logits.dtype) - self.full_logits).abs().max()
        return {"max_abs_logit_diff": float(diff), "top1_agree": bool((logits.argmax(-1) ==
                                                                       self.full_logits.argmax(-1)).all()),
                "rank": [b.rank for b in self.blocks], "cond_mlp_input": [b.cond_mlp_input for b in self.blocks],
                "cond_hidden": [b.cond_hidden for b in self.blocks]}

    def save_lora(self, path) -> None:
        """Write the update as a PEFT LoRA adapter directory (:func:`implicit_updates.analyses.lora.save_lora`)."""
        from implicit_updates.analyses.lora import save_lora

        save_lora(self, path)


def absorb_continuation(model: nn.Module, prefix: Tensor, continuation: Tensor,
                        dtype: torch.dtype | str | None = None, rcond: float | None = None,
                        output: Output = "auto") -> ContinuationAbsorption:
    """Absorb ``prefix`` into a rank-K update per block, exact on the K tokens of ``continuation`` (token ids).

    ``continuation`` ``[n, K]`` stacks n sequences (queries q_1..q_n, each run after the prefix): one update of rank
    <= n K exact on all of them (the rows of every sequence go through the same pseudo-inverses; n K <= d_model).

    Any backend: a TransformerLens ``HookedTransformer`` (dense, gated and mixture-of-experts MLPs, the routed
    experts' output matrices taking the output change together through the pseudo-inverse of their weighted hidden
    activations; RMSNorms after the MLP through :func:`post_norm_target`), a Hugging Face causal LM or a
    ``TransformerBridge`` (every layout :mod:`implicit_updates.adapters.structure` describes, but norms after the
    MLP); others raise ``UnsupportedArchitectureError`` naming the part. ``rcond``: relative singular-value floor
    below which the K inputs count as numerically dependent (refused; default
    :func:`~implicit_updates.math.lowrank.default_rcond` of the compute dtype: 1e-10 in float64). ``output="matrix"``
    puts the output change into the output matrix for K = 1 too (a rank-one update through the hidden, as a LoRA
    needs), instead of the bias.
    """
    if output not in ("auto", "matrix"):
        raise ValueError(f"output must be 'auto' or 'matrix', not {output!r}")
    return ContinuationAbsorption(model, *solved_blocks(model, prefix, continuation, dtype, Fit(rcond), output))


def solved_blocks(model: nn.Module, prefix: Tensor, continuation: Tensor, dtype, fit: Fit, output: Output
                  ) -> tuple[torch.dtype, list[BlockContinuation], Tensor, Tensor]:
    """Every block's update over ``continuation`` (``[n, K]``, each run after ``prefix``) as ``fit`` solves it (its
    ``rcond`` None: the compute dtype's default): the compute dtype, the blocks, the continuation's inputs and
    the full model's logits there. Shared by the continuation and the thought patches."""
    compute_dtype, systems, inputs, full_logits = gathered_systems(model, prefix, continuation, dtype)
    if fit.rcond is None:
        fit = replace(fit, rcond=default_rcond(compute_dtype))
    with torch.no_grad():  # the maps are the model's parameters: no graph through them
        blocks = [solve_block(system, fit, output) for system in systems]
    return compute_dtype, blocks, inputs, full_logits


def gathered_systems(model: nn.Module, prefix: Tensor, continuation: Tensor, dtype
                     ) -> tuple[torch.dtype, list[BlockSystem], Tensor, Tensor]:
    """What every block's update over ``continuation`` (``[n, K]``, each run after ``prefix``) is solved from: the
    compute dtype, each block's :class:`~implicit_updates.math.lowrank.BlockSystem` (rows at all n K positions,
    sequence-major), the continuation's inputs and the full model's logits there. The user's model is guarded by
    :func:`prepared` (untouched); the adapter needs the ``continuation`` capability."""
    prefix, continuation = token_batch(prefix), token_batch(continuation)
    if continuation.shape[1] < 1:
        raise ValueError("the continuation is empty: give at least one token")
    if prefix.shape[0] != 1:
        raise ValueError(f"one prefix (batch 1) is absorbed, got a batch of {prefix.shape[0]}")
    # n stacked continuations [n, K], each run after the prefix: one update exact on all n * K positions
    # (any trailing shape: continuous inputs reach prepared(), whose adapter refuses them by its capability)
    with prepared(model, after_prefix(prefix, continuation), None, dtype) as (adapter, block_ids, inputs):
        require(adapter, "continuation")
        systems, full_logits = adapter.continuation_systems(inputs, block_ids, continuation.shape[1])
    return adapter.compute_dtype, systems, inputs[:, -continuation.shape[1]:], full_logits


def after_prefix(prefix: Tensor, continuation: Tensor) -> Tensor:
    """``[n, P + K]``: the prefix ``[1, P]`` before each of the n stacked continuations ``[n, K]``."""
    return torch.cat([prefix.expand(continuation.shape[0], *prefix.shape[1:]), continuation.to(prefix.device)], dim=1)


def token_batch(tokens) -> Tensor:
    """Token ids as a batch: ``[pos]`` -> ``[1, pos]``; ``[batch, pos]`` as it is."""
    tokens = torch.as_tensor(tokens)
    return tokens[None] if tokens.dim() == 1 else tokens

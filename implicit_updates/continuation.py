"""Exact absorption over a continuation: a rank-K update per block such that the patched model, run on a
continuation S of K tokens alone, reproduces the full model's logits at all K positions of ``prefix + S``.

Per block l, with ``M`` the with-context MLP inputs at S's positions and ``M'`` those of block l run on S alone (its
input is the with-context one, which the patched blocks before it reproduce; block 0 starts from S's own embedding),
every first-layer map ``W`` (``m @ W``) gets ``delta_W = pinv(M') (M - M') W`` (rank <= K), so ``M' (W + delta_W) =
M W``: the hidden activations become the with-context ones, ``P``. The residual difference ``D = R - R'`` then goes
into the output matrix, ``delta_W_out = pinv(P) D`` (rank <= K), or into the output bias when K = 1 (Dherin et al.
Thm A.2, as :func:`implicit_updates.absorb`). Both are exact when ``M'`` and ``P`` have full row rank K (K <=
d_model, K <= d_mlp); their condition numbers are reported, and numerically dependent rows are refused. This is Eq. 8
of Dherin et al. 2025 with the rank-one ``m_x^T/||m_x||^2`` replaced by the pseudo-inverse of K query inputs (for
K = 1 the two coincide). The math is in :mod:`implicit_updates.lowrank`; this module runs HookedTransformers, and
:mod:`implicit_updates.continuation_modules` Hugging Face models and TransformerBridges.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from implicit_updates.decompose import check_copy_is_its_own, prepared, untouched, working_model
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.lowrank import (  # noqa: F401 (re-exported: the public names of this module)
    LowRankUpdate,
    at_continuation,
    checked_pinv,
    default_rcond,
    first_layer_updates,
    output_correction,
    output_update,
    positive_solution,
    post_norm_target,
)
from implicit_updates.precision import exact_formula

Output = Literal["auto", "matrix"]


@dataclass(frozen=True)
class BlockContinuation:
    block: int
    updates: tuple[LowRankUpdate | tuple[str, Tensor], ...]  # low-rank maps, or (bias / norm scale name, delta)
    cond_mlp_input: float  # condition number of M' (the S-alone MLP inputs)
    cond_hidden: float  # condition number of P (the with-context hidden activations), inf when K = 1 (bias)
    rank: int


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
        forward the update is exact in (:func:`~implicit_updates.precision.exact_formula` of the absorbed model)."""
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
        """Write the update as a PEFT LoRA adapter directory (:func:`implicit_updates.lora.save_lora`)."""
        from implicit_updates.lora import save_lora

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
    :func:`~implicit_updates.lowrank.default_rcond` of the compute dtype: 1e-10 in float64). ``output="matrix"``
    puts the output change into the output matrix for K = 1 too (a rank-one update through the hidden, as a LoRA
    needs), instead of the bias.
    """
    if output not in ("auto", "matrix"):
        raise ValueError(f"output must be 'auto' or 'matrix', not {output!r}")
    prefix, continuation = _ids(prefix), _ids(continuation)
    if continuation.shape[1] < 1:
        raise ValueError("the continuation is empty: give at least one token")
    if prefix.shape[0] != 1:
        raise ValueError(f"one prefix (batch 1) is absorbed, got a batch of {prefix.shape[0]}")
    # n stacked continuations [n, K], each run after the prefix: one update exact on all n * K positions
    full = torch.cat([prefix.expand(continuation.shape[0], -1), continuation.to(prefix.device)], dim=1)
    with prepared(model, full, None, dtype) as (adapter, block_ids, inputs):
        from implicit_updates.adapters import is_module_based
        from implicit_updates.adapters.hooked_transformer import HookedTransformerAdapter

        rcond = default_rcond(adapter.compute_dtype) if rcond is None else rcond
        if isinstance(adapter, HookedTransformerAdapter):
            blocks, full_logits = _hooked_blocks(adapter, inputs, block_ids, continuation.shape[1], rcond, output)
        elif is_module_based(adapter):
            from implicit_updates.continuation_modules import module_blocks

            blocks, full_logits = module_blocks(adapter, inputs, block_ids, continuation.shape[1], rcond, output)
        else:
            raise UnsupportedArchitectureError(
                f"absorbing a continuation is implemented for HookedTransformer, TransformerBridge and Hugging Face "
                f"models (got {type(adapter).__name__}); use iu.absorb for one token")
    return ContinuationAbsorption(model, adapter.compute_dtype, blocks, inputs[:, -continuation.shape[1]:],
                                  full_logits)


def _hooked_blocks(adapter, inputs: Tensor, block_ids: list[int], k: int, rcond: float,
                   output: Output) -> tuple[list[BlockContinuation], Tensor]:
    """The per-block updates of a HookedTransformer, and the full model's logits at the continuation."""
    _check(adapter)
    model_ = adapter.model
    store: dict[str, Tensor] = {}
    hidden_hooks = [(f"blocks.{b}.mlp.hook_post", lambda act, hook: store.__setitem__(hook.name, act.detach()))
                    for b in block_ids if adapter.kind != "MoE"]  # a mixture's hidden are its experts
    with adapter._capturing(block_ids, store), model_.hooks(fwd_hooks=hidden_hooks):
        full_logits = at_continuation(model_(inputs), k)
    x = model_(inputs[:, -k:], stop_at_layer=0)  # block 0's input on S alone (positions 0..K-1)
    blocks = []
    for b in block_ids:
        p = f"blocks.{b}"
        alone: dict[str, Tensor] = {}
        with adapter._capturing([b], alone):  # (its hooks include fresh ALiBi tables)
            model_.blocks[b](x)
        m, m_alone = at_continuation(store[f"{p}.mlp.input"], k), at_continuation(alone[f"{p}.mlp.input"], k)
        r, r_alone = at_continuation(adapter._residual(store, b), k), at_continuation(adapter._residual(alone, b), k)
        updates, cond_m = first_layer_updates(m, m_alone, adapter._first_layer_maps(b), rcond,
                                              f"block {b}: the continuation's MLP inputs run alone")
        # with these, the MLP's hidden (and its output h) at S alone is the with-context one; what the output
        # layer must still add to it:
        change = r - r_alone
        if adapter.output_norm:
            norm = getattr(model_.blocks[b], adapter.output_norm)
            h = at_continuation(store[f"{p}.mlp.output"], k)
            wanted = at_continuation(store[f"{p}.hook_resid_post"], k) - r_alone
            target, scale_delta = post_norm_target(wanted, h, norm.eps, norm.w)
            change = target - h
            updates.append((f"{p}.{adapter.output_norm}.w", scale_delta))
        if adapter.kind == "MoE":
            experts = adapter._experts(b, store)
            pairs = zip(experts["routing_weights"].unbind(-1), experts["expert_hidden"], strict=True)
            # [K, n_experts * d_mlp]: what the experts' output matrices read, weighted by the routing
            weighted = torch.cat([at_continuation(w[..., None] * hid, k) for w, hid in pairs], dim=-1)
            pinv_q, cond_p = checked_pinv(weighted, rcond, f"block {b}: the routed experts' weighted hidden "
                                                           "activations")
            d_mlp = experts["expert_hidden"][0].shape[-1]
            updates += [LowRankUpdate(name, pinv_q[e * d_mlp:(e + 1) * d_mlp], change, transposed=True)
                        for e, name in enumerate(experts["names"])]
        else:
            bias = f"{p}.mlp.b_out" if output == "auto" and not adapter.output_norm else None
            update, cond_p = output_correction(at_continuation(store[f"{p}.mlp.hook_post"], k), change,
                                               f"{p}.mlp.W_out", False, bias, rcond, b)
            updates.append(update)
        blocks.append(BlockContinuation(b, tuple(updates), cond_m, cond_p, m.shape[0]))
        x = store[f"{p}.hook_resid_post"][:, -k:]  # the next block's input, which this block's patch reproduces
    return blocks, full_logits


def _ids(tokens: Tensor) -> Tensor:
    tokens = torch.as_tensor(tokens)
    return tokens[None] if tokens.dim() == 1 else tokens


def _check(adapter) -> None:
    """What the HookedTransformer path refuses, and why."""
    norm = getattr(adapter.model.blocks[0], adapter.output_norm) if adapter.output_norm else None
    if norm is not None and (hasattr(norm, "b") or not getattr(norm, "eps", 0) > 0):
        raise UnsupportedArchitectureError(
            f"absorbing a continuation through a {type(norm).__name__} after the MLP ({adapter.output_norm}) is "
            "implemented for RMSNorm with eps > 0 only (a LayerNorm centres every output, and without eps the "
            "norm's output has a fixed size)")
    if adapter.model.cfg.positional_embedding_type == "shortformer":
        raise UnsupportedArchitectureError("shortformer positions are not implemented for continuations")

"""The absorbed-context model: the context's updates written into real weights, run on the query token alone.

Block l's update is computed for the query's input at block l, which the patched blocks before it reproduce
exactly (Innocenti & Achour's multi-block form); block 0 starts from the query token's own embedding at position 0,
and its correction absorbs the difference from the with-context input (positions included).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from implicit_updates.decompose import Decomposition, decompose, untouched, working_model
from implicit_updates.precision import computed_in


def absorb(model: nn.Module, prompt, dtype: torch.dtype | str | None = None,
           progress: bool | None = None) -> nn.Module:
    """A patched copy of ``model``: on the prompt's last token alone it gives the logits of ``model(prompt)[-1]``.

    The user's model is untouched; the copy computes in ``dtype`` (the model's by default).
    """
    return absorbed_model(decompose_for_absorb(model, prompt, dtype, progress))


def decompose_for_absorb(model: nn.Module, prompt, dtype=None, progress: bool | None = None) -> Decomposition:
    result = decompose(model, prompt, query="last", dtype=dtype, progress=progress, _absorb=True)
    if result.inputs.shape[0] != 1:
        raise ValueError("absorb takes one prompt (batch 1): each prompt absorbs into its own copy of the model")
    return result


def absorbed_model(result: Decomposition) -> nn.Module:
    """Deep copy of the decomposed model, in the decomposition's dtype, with every block's update for the last
    position added to its weights (the literal proof: real weights, the model's own forward)."""
    patched = working_model(result.adapter.model, result.dtype)
    if patched is result.adapter.model:
        patched = copy.deepcopy(patched)
    type(result.adapter)(patched)  # adapters clean what a copy inherits (a bridge's hooks bound to the original)
    with torch.no_grad():
        for update in result.blocks:
            for name, delta in result.patch(update.block, position=-1).items():
                patched.get_parameter(name).add_(delta)
    return patched


@dataclass(frozen=True)
class AbsorbReport:
    """The full model on the prompt vs the absorbed and the unpatched (control) model on the query token alone."""

    max_abs_logit_diff: float
    top1_agree: bool
    kl_full_vs_absorbed: float
    kl_full_vs_control: float
    max_abs_logit_diff_control: float
    top_k: dict[str, list[tuple[int, float]]]  # run -> [(token id, probability)]

    def to_dict(self) -> dict:
        return asdict(self)


def compare_absorbed(model: nn.Module, prompt, dtype=None, k: int = 5) -> AbsorbReport:
    """Logits of the full prompt, the absorbed model and the control on the query alone, with KL and top-k."""
    result = decompose_for_absorb(model, prompt, dtype)
    patched = absorbed_model(result)
    adapter, inputs = result.adapter, result.inputs
    alone = inputs[:, -1:]
    with untouched(adapter.model), computed_in(adapter.model, result.dtype):
        full = adapter.logits(inputs)[0, -1]
        control = adapter.logits(alone)[0, -1]
    with untouched(patched):
        absorbed = type(adapter)(patched).logits(alone)[0, -1]
    logp = {name: torch.log_softmax(t.double(), -1) for name, t in
            (("full", full), ("absorbed", absorbed), ("control", control))}
    return AbsorbReport(
        max_abs_logit_diff=float((absorbed - full).abs().max()),
        top1_agree=bool(absorbed.argmax() == full.argmax()),
        kl_full_vs_absorbed=_kl(logp["full"], logp["absorbed"]),
        kl_full_vs_control=_kl(logp["full"], logp["control"]),
        max_abs_logit_diff_control=float((control - full).abs().max()),
        top_k={name: _top(lp, k) for name, lp in logp.items()},
    )


def _kl(logp: Tensor, logq: Tensor) -> float:
    return float((logp.exp() * (logp - logq)).sum().clamp_min(0))


def _top(logp: Tensor, k: int) -> list[tuple[int, float]]:
    values, ids = logp.topk(k)
    return [(int(i), float(v.exp())) for v, i in zip(values, ids, strict=True)]

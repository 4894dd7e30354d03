"""The absorbed-context model: the context's updates written into real weights, run on the query token alone.

Block l's update is computed for the query's input at block l, which the patched blocks before it reproduce
exactly (Innocenti & Achour's multi-block form); block 0 starts from the query token's own embedding at position 0,
and its correction absorbs the difference from the with-context input (positions included).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import Tensor, nn

from implicit_updates.adapters.base import require
from implicit_updates.analyses.decompose import (
    Decomposition,
    check_copy_is_its_own,
    decompose,
    torch_module,
    untouched,
    working_model,
)
from implicit_updates.math.core import kl_divergence
from implicit_updates.runtime.dispatch import Replacement, is_dispatched, swapped_while_running
from implicit_updates.runtime.precision import computed_in, exact_formula


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
    if is_dispatched(result.adapter.model):
        raise ValueError("absorb() copies the model, and a model dispatched by accelerate (device_map, offload) "
                         "cannot be copied faithfully: use `with implicit_updates.absorbed(model, prompt):`, which "
                         "patches the model itself while it runs")
    require(result.adapter, "copy")
    patched = working_model(result.adapter.model, result.dtype)
    if patched is result.adapter.model:
        patched = copy.deepcopy(patched)
    adapter = result.adapter.rebind(patched)  # adapters clean what a copy inherits (a bridge's hooks bound to it)
    with untouched(patched):
        check_copy_is_its_own(result.adapter.model, patched, lambda: adapter.logits(result.inputs[:1, -1:]))
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

    def __repr__(self) -> str:
        from implicit_updates.views.html import absorb_repr

        return absorb_repr(self)

    def _repr_html_(self) -> str:
        from implicit_updates.views.html import absorb_html

        return absorb_html(self)


def compare_absorbed(model: nn.Module, prompt, dtype=None, k: int = 5) -> AbsorbReport:
    """Logits of the full prompt, the absorbed model and the control on the query alone, with KL and top-k.

    The absorbed model is a patched deep copy where the model computes in its own dtype, and the model itself
    patched while it runs (:func:`absorbed`, the same literal weights) where it is upcast or dispatched: no copy of
    the whole model in the compute dtype is made."""
    result = decompose_for_absorb(model, prompt, dtype)
    adapter, inputs = result.adapter, result.inputs
    alone = inputs[:, -1:]
    with untouched(adapter.model), computed_in(adapter.model, result.dtype):
        full = adapter.logits(inputs)[0, -1]
        control = adapter.logits(alone)[0, -1]
    # patched while it runs (as `absorbed`), not copied: a dispatched model cannot be, and an upcast copy would hold
    # the whole model again in the compute dtype (12 GB for a 1.5B held in bfloat16, computed in float64)
    if is_dispatched(adapter.model) or next(adapter.model.parameters()).dtype != result.dtype:
        with untouched(adapter.model), _patched_while_running(adapter.model, result):
            absorbed = adapter.logits(alone)[0, -1]
    else:
        patched = absorbed_model(result)
        with untouched(patched), exact_formula(adapter.model, result.dtype):
            absorbed = adapter.rebind(patched).logits(alone)[0, -1]
    logp = {name: torch.log_softmax(t.double(), -1) for name, t in
            (("full", full), ("absorbed", absorbed), ("control", control))}
    return AbsorbReport(
        max_abs_logit_diff=float((absorbed - full).abs().max()),
        top1_agree=bool(absorbed.argmax() == full.argmax()),
        kl_full_vs_absorbed=kl_divergence(logp["full"], logp["absorbed"]),
        kl_full_vs_control=kl_divergence(logp["full"], logp["control"]),
        max_abs_logit_diff_control=float((control - full).abs().max()),
        top_k={name: _top(lp, k) for name, lp in logp.items()},
    )


def _top(logp: Tensor, k: int) -> list[tuple[int, float]]:
    values, ids = logp.topk(k)
    return [(int(i), float(v.exp())) for v, i in zip(values, ids, strict=True)]


@contextmanager
def absorbed(model: nn.Module, prompt, dtype: torch.dtype | str | None = None,
             progress: bool | None = None) -> Iterator[Decomposition]:
    """Inside the block, ``model`` itself carries the prompt's context in its weights: ``model(query_token)`` and
    generation from the query give the full prompt's next-token logits. No copy of the model is made.

    Every block's update for the last position (as :func:`absorb`) is kept factored; a module that owns a patched
    parameter gets ``param + outer(row, column)`` (or ``+ delta``) only while it runs, through its own forward, so
    exactly what a literal weight edit computes, and one module's dense update exists at a time. With ``dtype``
    different from the model's, the model also computes in ``dtype`` (each module upcast while it runs). Every hook
    is removed and every parameter put back on exit, exceptions included. A model dispatched by accelerate
    (``device_map``, CPU or disk offload) is patched inside each module's accelerate hook, after it loaded the
    module's parameters. Yields the decomposition.
    """
    result = decompose_for_absorb(model, prompt, dtype, progress)
    with _patched_while_running(torch_module(model), result):  # an nnsight model: the torch model it wraps
        yield result


@contextmanager
def _patched_while_running(model: nn.Module, result: Decomposition) -> Iterator[None]:
    """``model`` with every block's last-position update applied to each owning module while it runs, computing in
    the decomposition's dtype."""
    owners: dict[nn.Module, list[tuple[str, object]]] = {}
    for block in result.blocks:
        for update in block.updates:
            module_path, _, attr = update.name.rpartition(".")
            owners.setdefault(model.get_submodule(module_path), []).append((attr, update))

    def patched(module: nn.Module) -> list[Replacement]:  # one module's dense update exists at a time
        summed: dict[str, Tensor] = {}  # a stacked-experts parameter takes one update per expert
        for attr, update in owners[module]:
            delta = update.dense(0, -1)
            summed[attr] = summed.get(attr, module._parameters[attr].detach().to(delta.dtype)) + delta
        return [(module, attr, value) for attr, value in summed.items()]

    # patch before the upcast (so the sum is in the compute dtype); on an accelerate-dispatched module after its
    # offload's load
    inputs = [(model, "pre", _inputs_in(result.dtype))]  # continuous inputs (the toy's) in the computed dtype too
    with swapped_while_running({m: partial(patched, m) for m in owners}, inputs), computed_in(model, result.dtype):
        yield


def _inputs_in(dtype: torch.dtype):
    """A pre-hook giving the model its floating-point positional inputs (residuals fed at block 0) in ``dtype``;
    token ids are left as they are."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)

    return hook

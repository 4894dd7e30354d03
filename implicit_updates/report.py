"""Everything about one prompt as plain numbers (``report(model, prompt)``), the data behind the HTML views.

Each ``*_data`` function reads a result object through its public API and returns JSON-able dicts of lists; the HTML
views (:mod:`implicit_updates.views.html`) only format them, and ``--json`` writes the very same dict, so the page and
the file cannot disagree. No number is computed here beyond the norms of the stored factors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.views.data import (  # noqa: F401 (re-exported)
    absorb_data,
    attribution_data,
    decomposition_data,
    dynamics_data,
    finite,
    floats,
    floats_in,
    token_strings,
    token_text,
    verify_data,
)

MAX_DYNAMICS_TOKENS = 64


@dataclass
class Report:
    """Everything about one prompt: ``to_dict()`` (the ``--json``), ``to_html()`` (one self-contained page)."""

    payload: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return self.payload

    def to_html(self) -> str:
        from implicit_updates.views.html import report_html

        return report_html(self.payload)

    def _repr_html_(self) -> str:
        from implicit_updates.views.html import fragment, report_body

        return fragment(report_body(self.payload))

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_html())


def report(model: nn.Module, prompt, dtype: torch.dtype | str | None = None, tokens: Sequence[str] | None = None,
           top_k: int = 5, attribution: bool = True, name: str | None = None, progress: bool | None = None) -> Report:
    """Decompose ``prompt`` (``query="last"``), verify every block and position, the prefix dynamics of at most its
    first 64 tokens (one pass on a HookedTransformer, else one decompose per prefix), the absorbed model against the
    full one, and the attribution where the architecture supports it. ``tokens``: one label per position (else the
    model's tokenizer decodes the ids). The user's model is untouched (each step guards it)."""
    from implicit_updates.analyses.absorb import compare_absorbed
    from implicit_updates.analyses.decompose import decompose
    from implicit_updates.analyses.dynamics import prefix_dynamics

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    result = decompose(model, prompt, query="last", dtype=dtype, progress=progress)
    if result.inputs.shape[0] != 1:
        raise ValueError(f"a report is about one prompt (batch 1), got batch {result.inputs.shape[0]}")
    inputs = result.inputs
    labels = token_strings(model, inputs, tokens)
    checked = result.verify(progress=progress)
    seconds["decompose_verify"] = time.perf_counter() - start
    payload = {"model": name or type(model).__name__, "dtype": str(result.dtype).removeprefix("torch."),
               "n_tokens": int(inputs.shape[1]), "tokens": labels,
               "decomposition": decomposition_data(result, labels), "verify": verify_data(checked)}
    notes: dict[str, str] = {}

    start = time.perf_counter()
    prefix = inputs[:, :MAX_DYNAMICS_TOKENS]
    if prefix.shape[1] >= 3:  # two prefixes at least, so one step
        try:  # the one pass where the backend and architecture allow it (refused before any work), else naive
            dyn = prefix_dynamics(model, prefix, dtype=result.dtype, method="onepass", progress=progress)
        except UnsupportedArchitectureError as err:
            notes["dynamics_method"] = str(err)
            dyn = prefix_dynamics(model, prefix, dtype=result.dtype, method="naive", progress=progress)
        payload["dynamics"] = dynamics_data(dyn, labels[: prefix.shape[1]])
    else:
        notes["dynamics"] = "the prompt needs 3 tokens or more (two prefixes) for prefix dynamics"
    seconds["dynamics"] = time.perf_counter() - start

    start = time.perf_counter()
    tokenizer = getattr(model, "tokenizer", None)
    decode = (lambda i: token_text(tokenizer, i)) if hasattr(tokenizer, "decode") else None
    payload["absorb"] = absorb_data(compare_absorbed(model, inputs, dtype=result.dtype, k=top_k), decode)
    seconds["absorb"] = time.perf_counter() - start

    if attribution:
        from implicit_updates.analyses.attribution import attribute

        start = time.perf_counter()
        try:
            payload["attribution"] = attribution_data(attribute(model, inputs, dtype=result.dtype), labels)
        except UnsupportedArchitectureError as err:
            notes["attribution"] = str(err)
        seconds["attribution"] = time.perf_counter() - start
    payload["notes"] = notes
    payload["seconds"] = seconds
    return Report(payload)

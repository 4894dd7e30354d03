"""Result objects as plain, JSON-able dicts: the data the HTML views format and ``--json`` writes, so the page and
the file cannot disagree. Each ``*_data`` function reads a result through its public attributes (no analysis is
imported); no number is computed here beyond the norms of the stored factors."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn


def finite(x: float) -> float | None:
    """A float JSON can hold: NaN and infinities become ``None`` (``JSON.parse`` rejects ``NaN``)."""
    x = float(x)
    return x if math.isfinite(x) else None


def floats(t) -> list:
    """A tensor (any shape) as nested lists of finite floats or ``None``."""
    if isinstance(t, torch.Tensor):
        t = t.detach().double().cpu().tolist()
    if isinstance(t, list | tuple):
        return [floats(x) for x in t]
    return finite(t)


def token_strings(model: nn.Module | None, inputs: torch.Tensor, tokens: Sequence[str] | None = None) -> list[str]:
    """One label per position: ``tokens`` if given, else each id decoded by the model's tokenizer (TransformerLens and
    TransformerBridge carry one; Hugging Face models do not), else the id; continuous inputs get ``x0, x1, ...``."""
    n = inputs.shape[1]
    if tokens is not None:
        tokens = [str(t) for t in tokens]
        if len(tokens) != n:
            raise ValueError(f"tokens has {len(tokens)} labels for {n} positions: give one string per position")
        return tokens
    if inputs.is_floating_point():
        return [f"x{i}" for i in range(n)]
    tokenizer = getattr(model, "tokenizer", None)
    ids = inputs[0].tolist()
    return [token_text(tokenizer, i) for i in ids] if hasattr(tokenizer, "decode") else [str(i) for i in ids]


def token_text(tokenizer, token_id: int) -> str:
    """One token's text. SentencePiece tokenizers drop a word's leading space when decoding it alone (``'▁Once'``
    decodes to ``'Once'``), so it is put back from the piece; byte-level BPE (GPT-2) decodes with its space."""
    text = tokenizer.decode([token_id])
    piece = getattr(tokenizer, "convert_ids_to_tokens", lambda i: "")(token_id)
    return " " + text if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" ") else text


def decomposition_data(result, tokens: Sequence[str] | None = None, batch: int = 0) -> dict:
    """Per block and position: ``||dW_i||_F = ||u_i|| ||v_i||`` (every first-layer map, stacked; rank one, so also
    the spectral norm) and ``||delta_b_i||`` (the output correction ``r_i - r_x``), batch element ``batch``."""
    from implicit_updates.math.analysis import update_norms

    n = result.n_positions
    labels = token_strings(getattr(result.adapter, "model", None), result.inputs, tokens)[:n]
    return {
        "query": result.query,
        "dtype": str(result.dtype).removeprefix("torch."),
        "n_positions": n,
        "batch": batch,
        "n_batch": int(result.inputs.shape[0]),
        "tokens": labels,
        "blocks": [u.block for u in result.blocks],
        "maps": [[m.name for m in u.first_layer] for u in result.blocks],
        "correction": [u.correction for u in result.blocks],
        "update_norms": [floats(update_norms(result, u.block, batch)) for u in result.blocks],
        "delta_b_norms": [floats(u.delta_b[batch].norm(dim=-1)) for u in result.blocks],
    }


def verify_data(report) -> dict:
    return floats_in(report.to_dict())


def dynamics_data(dyn, tokens: Sequence[str] | None = None) -> dict:
    """``PrefixDynamics.to_dict()``, plus the label of each prefix's last context token (prefix i ends at c_i)."""
    inputs = dyn.decomposition.inputs
    labels = token_strings(getattr(dyn.decomposition.adapter, "model", None), inputs, tokens)
    return {**floats_in(dyn.to_dict()), "tokens": labels[: dyn.n_prefixes], "query_token": labels[-1]}


def absorb_data(report, decode: Callable[[int], str] | None = None) -> dict:
    """``AbsorbReport.to_dict()`` with each top-k entry as ``[id, probability, text]`` (text: ``decode(id)``)."""
    out = floats_in(report.to_dict())
    name = decode or str
    out["top_k"] = {run: [[i, finite(p), name(i)] for i, p in entries] for run, entries in report.top_k.items()}
    return out


def attribution_data(att, tokens: Sequence[str] | None = None, position: int = -1, batch: int = 0) -> dict:
    """Each source token's share of position ``position``'s first-layer update at every block (summed over heads;
    per position the shares and the named extras sum to 1), the extras' shares and each block's completeness."""
    d = att.decomposition
    n = d.n_positions
    labels = token_strings(getattr(d.adapter, "model", None), d.inputs, tokens)[:n]
    extras = {name: [] for name in ("residual", "sink", "norm_rounding")}
    for b in att.blocks:
        for name, values in b.scores()[1].items():
            extras[name].append(finite(values[batch, position]))
    return {"position": position % n, "tokens": labels, "blocks": [b.block for b in att.blocks],
            "token_scores": floats(att.token_scores(position, batch)), "extras": extras,
            "completeness_err": [finite(b.max_completeness_error()) for b in att.blocks],
            "max_completeness_err": finite(att.completeness_error())}


def floats_in(payload):
    """``payload`` with every float made JSON-safe (:func:`finite`), tuples as lists."""
    if isinstance(payload, dict):
        return {k: floats_in(v) for k, v in payload.items()}
    if isinstance(payload, list | tuple):
        return [floats_in(v) for v in payload]
    if isinstance(payload, float):
        return finite(payload)
    return payload

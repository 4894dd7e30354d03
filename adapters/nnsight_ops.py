"""What runs inside an nnsight trace: server-safe (torch only, no project import), so that NDIF can run it.

nnsight ships the body of a ``with model.trace(...)`` block and the functions it calls to where the model runs
(``remote=True``: NDIF; ``remote="local"``: here, serialised and with every non-server module hidden, as a server
would see it). This module is registered with ``nnsight.register`` and shipped by value; it imports nothing but
torch and reads only module paths, tensors and plain dicts. It saves activations (the with-context run, the
query-alone runs of many blocks in one batch) and adds the factored updates where the patched maps act; the math
that turns those activations into updates runs where the caller is (:mod:`implicit_updates.math.updates`).

A block plan is a dict of module paths from the model root (``layer``, ``attention``, ``mlp``, ``out``,
``mlp_norm``, ``post_norm``; the last two may be None) and ``hidden`` (save the output projection's input). The keys
saved are those of :mod:`implicit_updates.adapters.modules` (``"{b}.resid_pre"``, ``"{b}.m"``, ...).
"""

from __future__ import annotations

import torch
from nnsight import save


def _first(value):
    """A module's tensor output (attention and some layers return tuples)."""
    return value if isinstance(value, torch.Tensor) else value[0]


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` ``[rows, n, d]`` shaped like a module's flattened ``[rows, d]`` input or output (OPT's MLP)."""
    return t.reshape(*ref.shape[:-1], t.shape[-1]) if t.dim() != ref.dim() else t


def _save_block(model, plan: dict, store: dict, b: int, rows: slice | None) -> None:
    """Save block ``b``'s quantities (the ``rows`` of the batch, or all), in the order the layer computes them."""

    def take(value) -> torch.Tensor:
        value = _first(value)
        return (value if rows is None else value[rows]).clone()

    store[f"{b}.resid_pre"] = take(model.get(plan["layer"]).input)
    store[f"{b}.attn_out"] = take(model.get(plan["attention"]).output)
    if plan["mlp_norm"] is not None:
        norm = model.get(plan["mlp_norm"])
        store[f"{b}.r"] = take(norm.input)
        store[f"{b}.mlp_norm_out"] = take(norm.output)
    store[f"{b}.m"] = take(model.get(plan["mlp"]).input)
    out = model.get(plan["out"])
    if plan["hidden"]:
        store[f"{b}.hidden"] = take(out.input)
    store[f"{b}.mlp_out"] = take(out.output)
    if plan["post_norm"] is not None:
        post = model.get(plan["post_norm"])
        store[f"{b}.h"] = take(post.input)
        store[f"{b}.post_out"] = take(post.output)
    output = model.get(plan["layer"]).output
    store[f"{b}.resid_post"] = take(output)
    if rows is None:  # how the layer returns (for skipping it later)
        store[f"{b}.returns_tuple"] = torch.tensor(not isinstance(output, torch.Tensor))


def _skip(model, layers: list) -> None:
    """Layers before the first one a run needs are not run (their input passed on as their output): only the rows
    swapped in later matter, so what those layers would compute is never read. ``layers``: ``[(path, returns a
    tuple), ...]`` in order."""
    for path, returns_tuple in layers:
        envoy = model.get(path)
        x = envoy.input
        envoy.skip((x,) if returns_tuple else x)


def _replace_input(envoy, rows: slice | None, value: torch.Tensor) -> None:
    """Swap ``value`` in as a layer's hidden-states input (on ``rows`` of the batch, or all of it)."""
    if rows is None:
        envoy.input = value
        return
    x = envoy.input.clone()
    x[rows] = value.to(x.dtype)
    envoy.input = x


def capture(model, ids: torch.Tensor, plans: list, embeds: torch.Tensor | None, first_layer: str, remote,
            kwargs: dict) -> dict:
    """One trace on the prompt: every planned block's with-context quantities; the run stops after the last.

    ``plans``: ``[(block, plan), ...]`` ascending. ``embeds``: continuous inputs swapped in at ``first_layer``.
    """
    with model.trace(ids, remote=remote, **kwargs) as tracer:
        store = {}
        if embeds is not None:
            _replace_input(model.get(first_layer), None, embeds)
        for b, plan in plans:
            _save_block(model, plan, store, b, None)
        save(store)
        tracer.stop()
    return store


def alone(model, n_rows: int, plans: list, queries: list, skip: list, remote, kwargs: dict) -> dict:
    """Blocks on their queries alone, all in one trace: rows ``[start, stop)`` of a batch of one-token sequences
    carry block b's query residuals, swapped in as layer b's input; each block's quantities are saved from its rows.

    ``queries``: ``[(start, stop, query residuals [stop - start, 1, d_model]), ...]`` in the order of ``plans``;
    ``skip``: the layers before the first planned one (see :func:`_skip`).
    """
    dummy = torch.zeros(n_rows, 1, dtype=torch.long, device=queries[0][2].device)
    with model.trace(dummy, remote=remote, **kwargs) as tracer:
        store = {}
        _skip(model, skip)
        for (b, plan), (start, stop, x) in zip(plans, queries, strict=True):
            rows = slice(start, stop)
            _replace_input(model.get(plan["layer"]), rows, x)
            _save_block(model, plan, store, b, rows)
        save(store)
        tracer.stop()
    return store


def patched(model, layer: str, x: torch.Tensor, rank_one: list, additive: list, skip: list, remote, kwargs: dict
            ) -> torch.Tensor:
    """Layer ``layer`` run on ``x`` (``[rows, 1, d_model]``) with factored updates added where they act.

    ``rank_one``: ``[(module path, row, column), ...]``: the module's output gains ``(input . row) column``, which is
    its output under ``W + outer(row, column)`` (no weight is changed). ``additive``: ``[(module path, delta), ...]``
    added to that module's output (a bias patch). A row or column with more positions than ``x`` fans the MLP out to
    one output per position; ``skip``: the layers before ``layer`` (see :func:`_skip`). Returns the layer's output.
    """
    dummy = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
    with model.trace(dummy, remote=remote, **kwargs) as tracer:
        _skip(model, skip)
        _replace_input(model.get(layer), None, x)
        for path, row, column in rank_one:
            envoy = model.get(path)
            inp = envoy.input
            envoy.output = envoy.output + (inp * _like(row, inp)).sum(-1, keepdim=True) * _like(column, envoy.output)
        for path, delta in additive:
            envoy = model.get(path)
            envoy.output = envoy.output + _like(delta, envoy.output)
        out = save(_first(model.get(layer).output).clone())
        tracer.stop()
    return out

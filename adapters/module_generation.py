"""Absorbed generation on Hugging Face models, TransformerBridge and nnsight's wrapped model: a step costs one
KV-cached forward of the new token and one forward of it alone, not a forward of the whole history.

- :func:`cached_step`: the model's own forward on the new tokens with its own KV cache (``use_cache=True``; the
  model builds its cache on the first step, sliding-window layers included), recording every block's with-context
  quantities (``ModuleAdapter._capturing``) at the last position only.
- :func:`run_absorbing`: the model's own forward on the token alone, as two rows. At each block's MLP input (row 0)
  the block's capture is complete (its input, attention output, residual and MLP input on the query alone; the
  with-context ones from the cached step), so the caller's ``update_for`` computes the block's update there, and
  forward hooks add it in factored form (:func:`~implicit_updates.adapters.module_hooks.edit_hooks`, the edits verify
  applies) to the MLP's maps as they run. Row 1 gets zero factors: the unpatched control, in the same forward.

Block 0's input is the token's own embedding at position 0, as in ``absorb``; block l's is what the patched blocks
before it output, which is the with-context input up to rounding (``absorb`` computes block l's update at the
with-context input itself; tests/test_generate.py checks both agree to 1e-12 on every step). An update computed
at the input a block actually receives would hide an earlier block's error (each block maps whatever it receives to
its with-context output), so every block's output in the absorbed row is returned, for the caller to compare with
the with-context output: the logits alone check only the last block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from implicit_updates.adapters.hf_cache import cache_kwarg, forward_hf
from implicit_updates.adapters.module_hooks import edit_hooks, unflatten
from implicit_updates.errors import UnsupportedArchitectureError


def check_support(adapter) -> None:
    """Refuse, in one line naming the part, what the cached step or the absorbing run cannot do exactly."""
    name = type(adapter.hf).__name__
    if getattr(adapter, "remote", False) is not False:
        raise UnsupportedArchitectureError(
            f"absorbed generation runs the wrapped module here; remote={adapter.remote!r} is not supported: use "
            "remote=False")
    if cache_kwarg(adapter.hf) is None:
        raise UnsupportedArchitectureError(f"{name}: its forward takes no KV cache, which each generation step reuses")
    whole = [b for b, p in enumerate(adapter.parts) if p.whole]
    if whole:
        raise UnsupportedArchitectureError(
            f"{name}: block {whole[0]}'s MLP is a mixture of experts read as a whole module, whose routed calls the "
            "absorbing run does not patch while it runs: use compare_absorbed on each prefix")


def cached_step(adapter, inputs: Tensor, cache: object | None) -> tuple[dict[str, Tensor], Tensor, object]:
    """The model's own forward on token ids ``inputs`` ``[1, new]`` after ``cache``; every block's with-context
    quantities at the last position, the logits there ``[1, d_vocab]`` and the grown cache."""
    if inputs.is_floating_point() or inputs.shape[0] != 1:
        raise ValueError("a generation step takes token ids of one sequence, [1, new tokens]")
    check_support(adapter)
    blocks = list(range(adapter.n_blocks))
    store: dict[str, Tensor] = {}
    kwargs = {"use_cache": True} | ({cache_kwarg(adapter.hf): cache} if cache is not None else {})
    output = forward_hf(adapter, inputs, adapter._capturing(blocks, store), **kwargs)
    unflatten(store, inputs.shape[:2])
    for b in blocks:
        adapter.check_structure(store, b)
    last = {key: value[:, -1:] for key, value in store.items()}
    return last, adapter._final_logits(output)[:, -1], output.past_key_values


def run_absorbing(adapter, token: Tensor, context: dict[str, Tensor], update_for: Callable,
                  control: bool = True) -> tuple[Tensor, Tensor]:
    """Rows 0 (absorbed) and 1 (control; none with ``control=False``) of the model on ``token`` ``[1, 1]`` alone:
    their logits ``[2 or 1, d_vocab]``,
    and every block's output in row 0 ``[n_blocks, d_model]``."""
    check_support(adapter)
    blocks = list(range(adapter.n_blocks))
    alone: dict[str, Tensor] = {}
    edits: dict[int, list] = {}  # id(module) -> the hooks adding the current update to that module's output

    def absorbed_row(t: Tensor) -> Tensor:  # a [1, ...] factor on row 0, zeros on the control's row 1
        return torch.cat([t, torch.zeros_like(t)]) if control else t

    def compute(b: int) -> Callable:
        def hook(module, args):
            query = {key: value[:1] for key, value in alone.items() if key.startswith(f"{b}.")}
            update = update_for(adapter.block_capture(b, context, query, query[f"{b}.resid_pre"]))
            for target, _, fn in edit_hooks(adapter.parts[b], update.edits(absorbed_row)):
                edits.setdefault(id(target), []).append(fn)

        return hook

    def apply(module, args, output):
        for fn in edits.pop(id(module), ()):
            output = fn(module, args, output)
        return output

    hooks = adapter._capturing(blocks, alone)
    for b in blocks:
        p = adapter.parts[b]
        hooks.append((p.mlp, "pre", compute(b)))  # after _capturing's hooks there: the MLP input is recorded
        targets = [module for _, module in p.first] + [p.out] + ([p.post_norm[1]] if p.post_norm else [])
        hooks += [(module, "fwd", apply) for module in dict.fromkeys(targets)]
    output = forward_hf(adapter, token.expand(2 if control else 1, 1), hooks, use_cache=False)
    if edits:
        raise RuntimeError(f"edits computed but never applied (modules {sorted(edits)}): the block structure does "
                           "not match the modules the forward ran")
    outputs = torch.stack([alone[f"{b}.resid_post"][0, -1] for b in blocks])
    return adapter._final_logits(output)[:, -1], outputs

"""Absorbed generation on a TransformerLens ``HookedTransformer``: a step costs one KV-cached forward of the new token
and one forward of it alone, not a forward of the whole history (the HookedTransformer twin of
:mod:`.module_generation`).

- :func:`cached_step`: the model's own forward on the new tokens with TransformerLens's own key-value cache
  (``model(tokens, past_kv_cache=cache)``: absolute/shortformer positions and rotary angles are offset by the cached
  length, ALiBi and local windows read the key positions), recording every block's with-context quantities
  (``HookedTransformerAdapter._capturing``) at the last position only. The attention mask passed is all ones (one
  sequence, nothing padded): TransformerLens needs one with a cache, and would otherwise derive it from a tokenizer.
- :func:`run_absorbing`: the model's own forward on the token alone (position 0, as ``absorb``'s copy runs it), as
  two rows. At each block's MLP input (row 0) the block's capture is complete, so the caller's ``update_for``
  computes the block's update there, and the factored-edit hooks of the patched block run
  (``HookedTransformerAdapter.edit_hooks``) are registered for the rest of that forward; they act on the MLP as it
  runs. Row 1 gets zero factors: the unpatched control, in the same forward.

Block 0's input is the token's own embedding at position 0, as in ``absorb``; block l's is what the patched blocks
before it output. Every block's output in the absorbed row is returned, for the caller to compare with the
with-context output (the logits alone check only the last block). Hooks are removed on any exit.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch import Tensor

from implicit_updates.adapters.tl_common import expert_rows
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.runtime.hooks import module_hooks

POSITIONS = ("standard", "shortformer", "rotary", "alibi")


def check_support(adapter) -> None:
    """Refuse, in one line naming the part, what TransformerLens's cached step cannot run exactly."""
    cfg = adapter.model.cfg
    if getattr(cfg, "attention_dir", "causal") != "causal":
        raise UnsupportedArchitectureError(
            f"attention_dir={cfg.attention_dir!r}: with bidirectional attention every new token changes the earlier "
            "tokens' keys and values, so no KV cache carries the context from step to step")
    if cfg.positional_embedding_type not in POSITIONS:
        raise UnsupportedArchitectureError(
            f"positional_embedding_type={cfg.positional_embedding_type!r}: TransformerLens's KV-cached step supports "
            f"{', '.join(POSITIONS)} positions")
    if getattr(cfg, "ungroup_grouped_query_attention", False) and cfg.n_key_value_heads:
        raise UnsupportedArchitectureError(
            "ungroup_grouped_query_attention=True: TransformerLens's key-value cache, which each generation step "
            "reuses, does not support ungrouped keys (its own generation fails the same way)")
    if getattr(cfg, "n_devices", 1) > 1:
        raise UnsupportedArchitectureError(
            f"n_devices={cfg.n_devices}: absorbed generation runs a model on one device; load it with n_devices=1")


def cached_step(adapter, inputs: Tensor, cache: object | None) -> tuple[dict[str, Tensor], Tensor, object]:
    """The model's own forward on token ids ``inputs`` ``[1, new]`` after ``cache`` (a
    ``TransformerLensKeyValueCache``; None: a new one); every block's with-context quantities at the last position,
    the logits there ``[1, d_vocab]`` and the grown cache."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    if inputs.is_floating_point() or inputs.shape[0] != 1:
        raise ValueError("a generation step takes token ids of one sequence, [1, new tokens]")
    check_support(adapter)
    model, blocks = adapter.model, list(range(adapter.n_blocks))
    if cache is None:
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, adapter.device, batch_size=1)
    store: dict[str, Tensor] = {}
    mask = torch.ones(inputs.shape, dtype=torch.long, device=inputs.device)
    with adapter._capturing(blocks, store):  # (exact ALiBi tables of the cached length + the new tokens)
        logits = model(inputs, past_kv_cache=cache, attention_mask=mask)
    return last_position(adapter, store, inputs.shape[1]), logits[:, -1], cache


def last_position(adapter, store: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """``store`` of one sequence of ``n`` tokens cut to its last token: activations ``[1, n, ...]`` -> ``[1, 1, ...]``;
    a mixture's per-token rows (its routing ``[n, k]``, each expert's hidden in the MoE's own routed order) -> the
    last token's."""
    last = {key: value[:, -1:] for key, value in store.items() if value.dim() >= 3}
    for b in range(adapter.n_blocks) if adapter.kind == "MoE" else ():
        p, experts = f"blocks.{b}.mlp", adapter.model.blocks[b].mlp.num_experts
        indices = store[f"{p}.hook_expert_indices"]
        for e in range(experts):
            rows = expert_rows(indices, e, experts)
            last[f"{p}.experts.{e}.hook_post"] = store[f"{p}.experts.{e}.hook_post"][rows == n - 1]
        last[f"{p}.hook_expert_indices"] = indices[-1:]
        last[f"{p}.hook_expert_weights"] = store[f"{p}.hook_expert_weights"][-1:]
    return last


def run_absorbing(adapter, token: Tensor, context: dict[str, Tensor], update_for: Callable,
                  control: bool = True) -> tuple[Tensor, Tensor]:
    """Rows 0 (absorbed) and 1 (control; none with ``control=False``) of the model on ``token`` ``[1, 1]`` alone:
    their logits ``[2 or 1, d_vocab]``,
    and every block's output in row 0 ``[n_blocks, d_model]``."""
    check_support(adapter)
    model, blocks = adapter.model, list(range(adapter.n_blocks))
    alone: dict[str, Tensor] = {}
    pending: set[object] = set()  # the edit hooks registered and not yet run
    computed: list[int] = []

    def absorbed_row(t: Tensor) -> Tensor:  # a [1, ...] factor on row 0, zeros on the control's row 1
        return torch.cat([t, torch.zeros_like(t)]) if control else t

    def once(fn: Callable) -> Callable:
        key = object()
        pending.add(key)

        def hook(*args, **kwargs):  # TransformerLens passes its hook point as the keyword ``hook``
            pending.discard(key)
            return fn(*args, **kwargs)

        return hook

    with ExitStack() as stack:
        def compute(b: int) -> Callable:
            def hook(module, args):  # at block b's MLP input, after _capturing's hook there recorded it
                query = {key: value[:1] for key, value in alone.items() if key.startswith(f"blocks.{b}.")}
                update = update_for(adapter.block_capture(b, context, query, query[f"blocks.{b}.hook_resid_pre"]))
                live = {"m": args[0]}  # the MLP input of both rows (the control's factors are zero)
                hook_points, torch_hooks = adapter.edit_hooks(b, update.edits(absorbed_row), live)
                # registered now, they run as the MLP (and its output norm) run; removed when the stack closes
                stack.enter_context(model.hooks(fwd_hooks=[(name, once(fn)) for name, fn in hook_points]))
                stack.enter_context(module_hooks([(m, kind, once(fn)) for m, kind, fn in torch_hooks]))
                computed.append(b)

            return hook

        stack.enter_context(adapter._capturing(blocks, alone))  # its MLP pre-hooks run before compute's
        stack.enter_context(module_hooks([(model.blocks[b].mlp, "pre", compute(b)) for b in blocks]))
        logits = model(token.expand(2 if control else 1, 1))
    if computed != blocks or pending:
        raise RuntimeError(f"blocks {computed} computed an update and {len(pending)} edit hooks never ran: the block "
                           "structure does not match the hook points the forward ran")
    outputs = torch.stack([alone[f"blocks.{b}.hook_resid_post"][0, -1] for b in blocks])
    return logits[:, -1], outputs

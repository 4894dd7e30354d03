"""All prefixes ``[c_1..c_i, x]`` of a prompt in one pass, on a TransformerLens ``HookedTransformer``.

With causal attention the context tokens' keys and values at every block are the same in every prefix: the prompt
``[c_1..c_i, x]`` differs from the full one only in the query's own path, which attends to the cached keys/values of
``c_1..c_i`` and to itself, at its position i. So the context ``[c_1..c_N]`` runs once with TransformerLens's own
``TransformerLensKeyValueCache`` (its keys are cached before rotary), and the N query paths run block by block as a
batch of N one-token sequences. Row r (prefix i = r + 1) gets a *left-padded* frozen cache entry whose last i slots
hold the context keys/values ``0..i-1`` and an attention mask ``[0]*(L-i) + [1]*i + [1]`` (the last column is the
query itself). TransformerLens derives the rotary positions from the mask's cumsum (the query sits at position i),
and left padding keeps index-based ALiBi and local windows right, so its own attention (masks, GQA, soft-caps, q/k
norms) is reused unchanged. Absolute and shortformer positions give the query ``W_pos[i]`` through ``pos_embed``
with the same mask.

The captured per-block quantities are assembled into :class:`BlockCapture` s with batch 1 and one "position" per
prefix (query inputs per position, as ``query="self"``), so the core's ``decompose_block`` does the math unchanged.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from implicit_updates.adapters.hooked_transformer import HookedTransformerAdapter, _expert_rows
from implicit_updates.capture import BlockCapture
from implicit_updates.errors import UnsupportedArchitectureError


def check_prefix_support(adapter) -> None:
    """Raise unless ``adapter`` is a HookedTransformer adapter of a causal model (the one-pass needs both)."""
    if not isinstance(adapter, HookedTransformerAdapter):
        raise UnsupportedArchitectureError(
            f"the one-pass prefix dynamics needs a TransformerLens HookedTransformer (got {type(adapter).__name__}); "
            "use method='naive' (one decompose per prefix) for other frameworks")
    cfg = adapter.model.cfg
    if getattr(cfg, "attention_dir", "causal") != "causal":
        raise UnsupportedArchitectureError(
            f"attention_dir={cfg.attention_dir!r}: with bidirectional attention the context's activations change "
            "with every prefix, so no single pass can reuse them; use method='naive'")
    if cfg.positional_embedding_type not in ("standard", "shortformer", "rotary", "alibi"):
        raise UnsupportedArchitectureError(
            f"positional_embedding_type={cfg.positional_embedding_type!r} is not supported by the one-pass prefix "
            "dynamics; use method='naive'")


def context_cache(adapter: HookedTransformerAdapter, inputs: Tensor, n_blocks: int):
    """Run the context ``inputs[:, :-1]`` (batch 1) once through blocks ``0..n_blocks-1``; return TL's KV cache."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    model = adapter.model
    context = inputs[:, :-1]
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, adapter.device, batch_size=1)
    mask = torch.ones(context.shape[:2], dtype=torch.long, device=adapter.device)
    if inputs.is_floating_point():
        model(context, start_at_layer=0, stop_at_layer=n_blocks, past_kv_cache=cache, attention_mask=mask)
    else:
        model(context, stop_at_layer=n_blocks, past_kv_cache=cache, attention_mask=mask)
    return cache


def left_padded(cached: Tensor, prefix_lengths: Tensor, length: int) -> Tensor:
    """``[n, ...]`` cached context rows -> ``[rows, length + 1, ...]``: row r holds rows ``0..i_r-1`` in the slots
    just before the last one, which is left for the query's own key/value (see :class:`SlotEntry`).

    The first ``length - i_r`` slots are zero-filled pads (masked out by the attention mask): one gather from the
    cache with a zero row prepended.
    """
    padded = torch.cat([cached.new_zeros(1, *cached.shape[1:]), cached])
    slots = torch.arange(length + 1, device=cached.device)
    source = (slots[None, :] - (length - prefix_lengths[:, None]) + 1).clamp_min(0)  # 0 = the zero row
    source[:, -1] = 0
    return padded[source]


def slot_entry(keys: Tensor, values: Tensor):
    """A frozen TransformerLens cache entry over ``[rows, L + 1, ...]`` buffers whose last slot takes the query.

    TransformerLens's ``append`` concatenates (a copy of the whole padded cache); this one writes the query's key
    and value into the reserved last slot and returns the buffers, which is the same tensor ``cat`` would build.
    """
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    class SlotEntry(TransformerLensKeyValueCacheEntry):
        def append(self, new_keys: Tensor, new_values: Tensor) -> tuple[Tensor, Tensor]:
            keys[:, -1:] = new_keys
            values[:, -1:] = new_values
            return keys, values

    return SlotEntry(keys[:, :-1], values[:, :-1], frozen=True)


def prefix_mask(prefix_lengths: Tensor, length: int) -> Tensor:
    """Attention mask ``[rows, length + 1]``: zeros for the pads, ones for the i context slots and the query."""
    slots = torch.arange(length + 1, device=prefix_lengths.device)
    return (slots[None, :] >= length - prefix_lengths[:, None]).long()


def query_block0_input(adapter: HookedTransformerAdapter, inputs: Tensor, mask: Tensor
                       ) -> tuple[Tensor, Tensor | None]:
    """Block 0's input for the query rows (``[rows, 1, d_model]``) and the shortformer positional embedding.

    Tokens: ``embed(x)`` plus, for absolute positions, ``pos_embed`` at the query's position i (read from ``mask``
    by TransformerLens, as for a left-padded prompt). Continuous inputs are fed at block 0 as they are (no
    positional embedding, as ``start_at_layer=0``).
    """
    model, rows = adapter.model, mask.shape[0]
    if inputs.is_floating_point():
        return inputs[:, -1:].expand(rows, 1, inputs.shape[-1]), None
    x = inputs[:, -1:].expand(rows, 1)
    embed = model.embed(x)
    kind = model.cfg.positional_embedding_type
    if kind not in ("standard", "shortformer"):
        return embed, None
    pos = model.pos_embed(x, mask.shape[1] - 1, mask)
    return (embed + pos, None) if kind == "standard" else (embed, pos)


def capture_prefixes(adapter: HookedTransformerAdapter, inputs: Tensor, blocks: list[int], chunk_size: int = 64,
                     progress: bool | None = None) -> list[BlockCapture]:
    """Per block in ``blocks``, a :class:`BlockCapture` whose N "positions" are the N prefixes ``[c_1..c_i, x]``.

    ``inputs`` is one prompt ``[1, N+1]`` (token ids) or ``[1, N+1, d_model]`` (continuous, fed at block 0). Query
    rows are processed ``chunk_size`` at a time; a chunk's padded cache is ``[rows, i_max, kv_heads, d_head]``.
    """
    check_prefix_support(adapter)
    if inputs.shape[0] != 1:
        raise ValueError(f"prefix dynamics takes one prompt (batch 1), got batch {inputs.shape[0]}")
    n = inputs.shape[1] - 1
    if n < 1:
        raise ValueError("the prompt needs at least one context token before the query")
    model, last = adapter.model, max(blocks) + 1
    cache = context_cache(adapter, inputs, last)
    parts: dict[int, list[dict[str, Tensor]]] = {b: [] for b in blocks}
    store: dict[str, Tensor] = {}
    with adapter._capturing(blocks, store):  # one set of hooks for every chunk and block
        for start in tqdm(range(0, n, chunk_size), desc="prefixes", disable=not progress, leave=False):
            lengths = torch.arange(start + 1, min(start + chunk_size, n) + 1, device=adapter.device)
            length = int(lengths[-1])
            mask = prefix_mask(lengths, length)
            resid, shortformer = query_block0_input(adapter, inputs, mask)
            for b in range(last):
                entry = slot_entry(left_padded(cache[b].past_keys[0], lengths, length),
                                   left_padded(cache[b].past_values[0], lengths, length))
                resid = model.blocks[b](resid, shortformer_pos_embed=shortformer, past_kv_cache_entry=entry,
                                        attention_mask=mask)
                if b in parts:
                    mine = {k: v for k, v in store.items() if k.startswith(f"blocks.{b}.")}
                    parts[b].append(_densify_experts(adapter, b, mine))
    captures = []
    for b in blocks:
        ctx = _merge(adapter, b, parts[b])
        alone = adapter.run_block_alone(b, ctx[f"blocks.{b}.hook_resid_pre"])  # every query row at once
        captures.append(adapter._block_capture(b, ctx, alone, ctx[f"blocks.{b}.hook_resid_pre"]))
    return captures


def _densify_experts(adapter: HookedTransformerAdapter, b: int, store: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-token rows ``[rows, d_mlp]`` (zero where unrouted) for each expert's ``hook_post``, so chunks concatenate."""
    if adapter.kind != "MoE":
        return store
    p, mlp = f"blocks.{b}.mlp", adapter.model.blocks[b].mlp
    indices = store[f"{p}.hook_expert_indices"]
    out = dict(store)
    for e in range(mlp.num_experts):
        dense = indices.new_zeros(indices.shape[0], mlp.d_mlp, dtype=store[f"blocks.{b}.hook_resid_pre"].dtype)
        rows = _expert_rows(indices, e, mlp.num_experts)
        if rows.numel():
            dense[rows] = store[f"{p}.experts.{e}.hook_post"]
        out[f"{p}.experts.{e}.hook_post"] = dense
    return out


def _merge(adapter: HookedTransformerAdapter, b: int, parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate chunk stores: ``[rows, 1, ...]`` activations -> ``[1, N, ...]``; per-token rows along dim 0.

    Experts' ``hook_post`` go back to the MoE's own sparse order (``_expert_rows`` over all N query tokens).
    """
    merged: dict[str, Tensor] = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if values[0].dim() >= 3:
            merged[key] = rearrange(torch.cat(values), "r 1 ... -> 1 r ...")
        else:
            merged[key] = torch.cat(values)
    if adapter.kind == "MoE" and f"blocks.{b}.mlp.hook_expert_indices" in merged:
        p, mlp = f"blocks.{b}.mlp", adapter.model.blocks[b].mlp
        indices = merged[f"{p}.hook_expert_indices"]
        for e in range(mlp.num_experts):
            merged[f"{p}.experts.{e}.hook_post"] = merged[f"{p}.experts.{e}.hook_post"][
                _expert_rows(indices, e, mlp.num_experts)]
    return merged

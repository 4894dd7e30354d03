"""All prefixes ``[c_1..c_i, x]`` of a prompt in one pass, on a TransformerLens ``HookedTransformer``.

With causal attention the context tokens' keys and values at every block are the same in every prefix: the prompt
``[c_1..c_i, x]`` differs from the full one only in the query's own path, which attends to the keys/values of
``c_1..c_i`` and to itself, at its position i. So the context ``[c_1..c_N]`` runs once with TransformerLens's own
``TransformerLensKeyValueCache`` (keys after q/k-norms and clipping, before rotary), and the N query paths run block by
block as a batch of N one-token sequences (row r is prefix i = r + 1).

Inside each block only the attention of the query rows is replaced (:func:`replaced_forward`); the norms, hooks,
residual adds and the MLP run through TransformerLens's modules, so every capture hook fires as in a forward. The
replacement (:func:`query_attention`) shares one copy of the context's keys and values between all rows and uses
TransformerLens's own pieces wherever the value of a term is decided:

- q, k, v of the query token: ``calculate_qkv_matrices`` (projections, ``use_qk_norm``), OLMo's q/k-norm and
  ``clip_qkv`` as ``AbstractAttention.forward`` applies them;
- rotary: ``apply_rotary`` of the context keys at positions ``0..N-1`` (what a forward does to them) and of the
  query's q and k at each row's own position i, read from a left-padded mask's cumsum (:func:`prefix_mask`), so
  the sin/cos come from TransformerLens's tables;
- scores: ``AbstractAttention.calculate_attention_scores`` (``attn_scale``, soft-cap) of all rows against the
  shared context keys in one batched matmul, grouped-query heads grouped over the rows rather than keys repeated,
  and of each row's query against its own key;
- masks and biases: row i sees context ``j < i`` intersected with TransformerLens's causal/local-window mask at
  ``(i, j)`` (:func:`context_visible`), and the ALiBi table at ``(i, j)`` (:func:`alibi_bias`); the query always sees
  itself;
- softmax over ``[context, self]`` (and the attention sink where the model has one) in the scores' dtype, then
  ``z = pattern_ctx @ V_ctx + p_self v_self`` and TransformerLens's output projection (``F.linear`` or the
  ``hook_result`` path).

Every term is the same sum of the same products as the forward of ``[c_1..c_i, x]`` computes; only the order of
floating-point additions differs (the context and self parts of the softmax-weighted sum). ``hook_attn_scores`` and
``hook_pattern`` see ``[rows, heads, 1, i_max + 1]``: context slots first (slots ``j >= i`` masked), the query last.

The captured per-block quantities are assembled into :class:`BlockCapture` s with batch 1 and one "position" per
prefix (query inputs per position, as ``query="self"``), so the core's ``decompose_block`` does the math unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn
from tqdm.auto import tqdm

from implicit_updates.adapters.tl_common import alibi_table, exact_alibi, expert_rows
from implicit_updates.capture import BlockCapture
from implicit_updates.errors import UnsupportedArchitectureError

OLMO_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")  # q/k-norm over all heads at once


def check_prefix_support(adapter, n_tokens: int | None = None) -> None:
    """Raise unless the HookedTransformer behind ``adapter`` is a causal model the one pass can run exactly.

    ``n_tokens`` (the prompt length, when known) checks Qwen-1's length-dependent rotary/query scalings.
    """
    cfg = adapter.model.cfg
    if getattr(cfg, "attention_dir", "causal") != "causal":
        raise UnsupportedArchitectureError(
            f"attention_dir={cfg.attention_dir!r}: with bidirectional attention the context's activations change "
            "with every prefix, so no single pass can reuse them; use method='naive'")
    if cfg.positional_embedding_type not in ("standard", "shortformer", "rotary", "alibi"):
        raise UnsupportedArchitectureError(
            f"positional_embedding_type={cfg.positional_embedding_type!r} is not supported by the one-pass prefix "
            "dynamics; use method='naive'")
    if getattr(cfg, "ungroup_grouped_query_attention", False) and cfg.n_key_value_heads:
        raise UnsupportedArchitectureError(
            "ungroup_grouped_query_attention=True: TransformerLens's key-value cache, which the one pass reads the "
            "context through, does not support ungrouped keys (its own generation fails the same way); use "
            "method='naive'")
    if getattr(cfg, "load_in_4bit", False):
        raise UnsupportedArchitectureError(
            "4-bit attention weights are not supported by the one-pass prefix dynamics; load the model unquantized "
            "or use method='naive'")
    long_scaled = getattr(cfg, "use_logn_attn", False) or getattr(cfg, "use_dynamic_ntk_rope", False)
    train_length = getattr(cfg, "train_seq_length", None) or cfg.n_ctx
    if long_scaled and n_tokens is not None and n_tokens > train_length:
        raise UnsupportedArchitectureError(
            f"the prompt ({n_tokens} tokens) is longer than the training length {train_length}, where log-n "
            "attention / dynamic NTK rotary scale every prefix by its own length; use method='naive' or a prompt "
            f"of at most {train_length} tokens")


# -- the context, once --------------------------------------------------------------------------------------------


def context_keys_values(adapter, inputs: Tensor, n_blocks: int
                        ) -> list[tuple[Tensor, Tensor]]:
    """Run the context ``inputs[:, :-1]`` (batch 1) once through blocks ``0..n_blocks-1``; per block the keys and
    values ``[n, kv_heads, d_head]`` as the attention scores and z use them (keys rotated at positions ``0..n-1``)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    model = adapter.model
    context = inputs[:, :-1]
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, adapter.device, batch_size=1)
    mask = torch.ones(context.shape[:2], dtype=torch.long, device=adapter.device)
    with exact_alibi(model):
        if inputs.is_floating_point():
            model(context, start_at_layer=0, stop_at_layer=n_blocks, past_kv_cache=cache, attention_mask=mask)
        else:
            model(context, stop_at_layer=n_blocks, past_kv_cache=cache, attention_mask=mask)
    out = []
    for b in range(n_blocks):
        keys, values = cache[b].past_keys, cache[b].past_values  # [1, n, kv_heads, d_head]
        if model.cfg.positional_embedding_type == "rotary":
            keys = model.blocks[b].attn.apply_rotary(keys, 0, None)  # what the forward does to the cached keys
        out.append((keys[0], values[0]))
    return out


# -- small pieces of the query rows' attention --------------------------------------------------------------------


def prefix_mask(prefix_lengths: Tensor, length: int) -> Tensor:
    """Left-padded mask ``[rows, length + 1]``: row r has ``i_r + 1`` trailing ones, so TransformerLens's cumsum puts
    the last slot (the query) at position ``i_r`` (``apply_rotary`` and ``pos_embed`` with offset ``length``)."""
    slots = torch.arange(length + 1, device=prefix_lengths.device)
    return (slots[None, :] >= length - prefix_lengths[:, None]).long()


def context_visible(attn: nn.Module, prefix_lengths: Tensor, length: int) -> Tensor:
    """``[rows, length]`` bool: which context slots ``j`` row r (query at position ``i_r``) attends to.

    ``j < i_r`` (the prefix), and TransformerLens's own causal mask at ``(i_r, j)`` (local windows).
    """
    keys = torch.arange(length, device=prefix_lengths.device)
    visible = keys[None, :] < prefix_lengths[:, None]
    if not hasattr(attn, "_make_causal_mask"):  # older TransformerLens: a registered [n_ctx, n_ctx] mask buffer
        return visible & attn.mask[prefix_lengths, :length].bool()
    rows, start = prefix_lengths.shape[0], int(prefix_lengths[0])
    causal = attn._make_causal_mask(query_ctx_length=rows, key_ctx_length=length, past_kv_pos_offset=start,
                                    device=prefix_lengths.device)[0, 0]  # queries at positions i_r = start + r
    return visible & causal


def alibi_bias(attn: nn.Module, prefix_lengths: Tensor, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """ALiBi terms ``[heads, rows, length]`` (context) and ``[heads, rows]`` (self): TransformerLens's bias table at
    ``(i_r, j)`` and ``(i_r, i_r)``, computed in ``dtype`` (:func:`exact_alibi`)."""
    table = alibi_table(attn.cfg.n_heads, length + 1, dtype, prefix_lengths.device)
    return table[:, prefix_lengths, :length], table[:, prefix_lengths, prefix_lengths]


def olmo_qk_norm(x: Tensor, norm: nn.Module) -> Tensor:
    """OLMo's q/k-norm over the whole projected vector, as ``AbstractAttention.forward`` applies it."""
    return rearrange(norm(rearrange(x, "b p h d -> b p (h d)")), "b p (h d) -> b p h d", h=x.shape[2])


def output_projection(attn: nn.Module, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """``z [rows, 1, heads, d_head]`` -> ``[rows, 1, d_model]`` as TransformerLens projects it (``F.linear``, or the
    ``hook_result`` path where ``use_attn_result``), in ``dtype``; ``W_O`` is rearranged once, for every chunk."""
    bias = attn.b_O.to(dtype)
    if not attn.cfg.use_attn_result:
        w = rearrange(attn.W_O.to(dtype), "h d m -> m (h d)").contiguous()
        return lambda z: F.linear(rearrange(z.to(w.dtype), "r p h d -> r p (h d)"), w, bias)
    w = rearrange(attn.W_O.to(dtype), "h d m -> 1 1 h d m")

    def project(z: Tensor) -> Tensor:
        result = attn.hook_result((rearrange(z.to(w.dtype), "r p h d -> r p h d 1") * w).sum(-2))
        return reduce(result, "r p h m -> r p m", "sum") + bias

    return project


def query_attention(attn: nn.Module, keys: Tensor, values: Tensor, prefix_lengths: Tensor, mask: Tensor,
                    alibi: tuple[Tensor, Tensor] | None, project: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    """A replacement ``attn.forward`` for the query rows of prefixes ``prefix_lengths`` (``i_r``, increasing).

    ``keys``/``values``: the context's ``[L, kv_heads, d_head]`` (L = ``i_max``; keys rotated), shared by all rows;
    ``mask``: the chunk's :func:`prefix_mask`; ``alibi``: its :func:`alibi_bias` (None without ALiBi); ``project``:
    :func:`output_projection` of ``attn``. Takes TransformerLens's attention arguments (the cache entry and mask a
    block passes are not used).
    """
    from transformer_lens.components import AbstractAttention

    cfg = attn.cfg
    length, heads, kv_heads = keys.shape[0], cfg.n_heads, keys.shape[1]
    groups = heads // kv_heads
    visible = context_visible(attn, prefix_lengths, length)
    sinks = getattr(cfg, "use_attention_sinks", False)

    def forward(query_input: Tensor, key_input: Tensor, value_input: Tensor, **unused) -> Tensor:
        q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)  # [rows, 1, heads|kv, d_head]
        if cfg.original_architecture in OLMO_QK_NORM:
            q, k = olmo_qk_norm(q, attn.q_norm), olmo_qk_norm(k, attn.k_norm)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(min=-cfg.clip_qkv, max=cfg.clip_qkv) for t in (q, k, v))
        if cfg.positional_embedding_type == "rotary":
            q = attn.hook_rot_q(attn.apply_rotary(q, length, mask))  # position i_r
            k = attn.hook_rot_k(attn.apply_rotary(k, length, mask))
        # all rows against the shared keys: kv heads are TL's "heads", (group, row) its query positions
        grouped = rearrange(q, "r 1 (kv g) d -> 1 (g r) kv d", g=groups)
        ctx = AbstractAttention.calculate_attention_scores(attn, grouped, keys[None])  # [1, kv, (g r), L]
        ctx = rearrange(ctx, "1 kv (g r) n -> (kv g) r n", g=groups)
        own = AbstractAttention.calculate_attention_scores(
            attn, q, torch.repeat_interleave(k, groups, dim=2))  # [rows, heads, 1, 1]
        own = rearrange(own, "r h 1 1 -> h r")
        if alibi is not None:
            ctx, own = ctx + alibi[0], own + alibi[1]
        ctx = torch.where(visible, ctx, attn.IGNORE)
        scores = attn.hook_attn_scores(rearrange(torch.cat([ctx, own[..., None]], -1), "h r n -> r h 1 n"))
        if sinks:  # the learned sink joins the softmax as an extra column and is dropped after it
            sink = rearrange(attn.sinks, "h -> 1 h 1 1").expand(*scores.shape[:-1], 1).to(scores.dtype)
            combined = torch.cat([scores, sink], -1)
            pattern = F.softmax(combined - combined.max(-1, keepdim=True).values, dim=-1)[..., :-1]
        else:
            pattern = F.softmax(scores, dim=-1)
        pattern = attn.hook_pattern(pattern).to(dtype=v.dtype)  # [rows, heads, 1, L + 1]
        z_ctx = rearrange(pattern[..., :-1], "r (kv g) 1 n -> kv (g r) n", g=groups) @ rearrange(
            values, "n kv d -> kv n d")
        z_ctx = rearrange(z_ctx, "kv (g r) d -> r 1 (kv g) d", g=groups)
        z = attn.hook_z(z_ctx + rearrange(pattern[..., -1], "r h 1 -> r 1 h 1")
                        * torch.repeat_interleave(v, groups, dim=2))
        return project(z)

    return forward


@contextmanager
def replaced_forward(module: nn.Module, forward: Callable[..., Tensor]) -> Iterator[None]:
    """``module(...)`` runs ``forward`` (its hooks still fire) until the block exits; restored on any exit."""
    before = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if before is None:
            del module.forward
        else:
            module.forward = before


def query_block0_input(adapter, inputs: Tensor, mask: Tensor
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


# -- all prefixes ---------------------------------------------------------------------------------------------------


def capture_prefixes(adapter, inputs: Tensor, blocks: list[int], chunk_size: int = 64,
                     progress: bool | None = None) -> list[BlockCapture]:
    """Per block in ``blocks``, a :class:`BlockCapture` whose N "positions" are the N prefixes ``[c_1..c_i, x]``.

    ``inputs`` is one prompt ``[1, N+1]`` (token ids) or ``[1, N+1, d_model]`` (continuous, fed at block 0). Query
    rows are processed ``chunk_size`` at a time; a chunk's scores are ``[heads, rows, i_max + 1]``.
    """
    check_prefix_support(adapter, inputs.shape[1])
    n = inputs.shape[1] - 1  # (one prompt with a context: checked by prefix_decomposition)
    model, last = adapter.model, max(blocks) + 1
    adapter.continuous = inputs.is_floating_point()  # its query-alone runs follow the inputs' convention
    context = context_keys_values(adapter, inputs, last)
    dtype = context[0][0].dtype  # the compute dtype (the model's parameters may be upcast only while they run)
    projections = [output_projection(model.blocks[b].attn, dtype) for b in range(last)]
    alibi_positions = model.cfg.positional_embedding_type == "alibi"
    parts: dict[int, list[dict[str, Tensor]]] = {b: [] for b in blocks}
    store: dict[str, Tensor] = {}
    with adapter._capturing(blocks, store):  # one set of hooks for every chunk and block
        for start in tqdm(range(0, n, chunk_size), desc="prefixes", disable=not progress, leave=False):
            lengths = torch.arange(start + 1, min(start + chunk_size, n) + 1, device=adapter.device)
            length = int(lengths[-1])
            mask = prefix_mask(lengths, length)  # the same for every block of the chunk, as is the ALiBi table
            alibi = alibi_bias(model.blocks[0].attn, lengths, length, dtype) if alibi_positions else None
            resid, shortformer = query_block0_input(adapter, inputs, mask)
            for b in range(last):
                keys, values = context[b]
                attn = model.blocks[b].attn
                forward = query_attention(attn, keys[:length], values[:length], lengths, mask, alibi, projections[b])
                with replaced_forward(attn, forward):
                    resid = model.blocks[b](resid, shortformer_pos_embed=shortformer)
                if b in parts:
                    mine = {k: v for k, v in store.items() if k.startswith(f"blocks.{b}.")}
                    parts[b].append(_densify_experts(adapter, b, mine))
    captures = []
    for b in blocks:
        ctx = _merge(adapter, b, parts[b])
        alone = adapter.run_block_alone(b, ctx[f"blocks.{b}.hook_resid_pre"])  # every query row at once
        captures.append(adapter.block_capture(b, ctx, alone, ctx[f"blocks.{b}.hook_resid_pre"]))
    return captures


def _densify_experts(adapter, b: int, store: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-token rows ``[rows, d_mlp]`` (zero where unrouted) for each expert's ``hook_post``, so chunks concatenate."""
    if adapter.kind != "MoE":
        return store
    p, mlp = f"blocks.{b}.mlp", adapter.model.blocks[b].mlp
    indices = store[f"{p}.hook_expert_indices"]
    out = dict(store)
    for e in range(mlp.num_experts):
        dense = indices.new_zeros(indices.shape[0], mlp.d_mlp, dtype=store[f"blocks.{b}.hook_resid_pre"].dtype)
        rows = expert_rows(indices, e, mlp.num_experts)
        if rows.numel():
            dense[rows] = store[f"{p}.experts.{e}.hook_post"]
        out[f"{p}.experts.{e}.hook_post"] = dense
    return out


def _merge(adapter, b: int, parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate chunk stores: ``[rows, 1, ...]`` activations -> ``[1, N, ...]``; per-token rows along dim 0.

    Experts' ``hook_post`` go back to the MoE's own sparse order (``expert_rows`` over all N query tokens).
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
                expert_rows(indices, e, mlp.num_experts)]
    return merged

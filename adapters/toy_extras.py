"""Attribution and the one-pass prefix dynamics on the toy model (:class:`~implicit_updates.models.toy.ToyTransformer`),
read through its own hook points and modules; the adapter's ``capture_attention`` and ``prefix_captures``.

**Attribution** (:func:`capture_attention`, the math in :mod:`implicit_updates.math.attribution`). The toy's
attention is ``output_proj(concat_h pattern^h v^h)`` without biases, so ``P^h_j = v^h_j W_O^h`` with ``v`` read off
``attn.value_proj``'s own output and ``W_O^h`` the head's columns of ``attn.output_proj.weight``; the pattern is
``attn.hook_pattern``. No norm follows attention (T is the identity); the MLP reads ``ln2(resid_mid)`` (N = a private
copy of ``ln2``, none without LayerNorm). Without the attention skip (``attn_skip=False``) the MLP's residual is the
attention output alone: the block input reaches the MLP only through attention, so the capture's block and query
inputs are given as zeros and the ``residual`` term is exactly zero (``r_i - r_x = A_i - A(x)``).

**Prefixes** (:func:`capture_prefixes`). With the causal mask the context tokens' activations at every block are the
same in every prefix ``[c_1..c_i, x]`` (the toy has no positions), so the context ``[c_1..c_N]`` runs once, its keys
and values read off ``attn.key_proj``/``value_proj``, and the N query paths run block by block as a batch of N
one-token sequences (row r is prefix i = r + 1): only the query rows' attention is replaced
(:func:`query_attention`: the row's own q, k, v by the block's projections, scores against the context keys
``j < i`` and against its own key, the softmax, ``attn.hook_pattern`` and ``output_proj``); the norms, hooks,
residual adds and the MLP run through the block's own modules. Every term is the same sum of the same products as
the forward of ``[c_1..c_i, x]``; only the order of floating-point additions differs. Without the mask
(``causal=False``) every context token attends to the query, so its activations change with the prefix: refused.
"""

from __future__ import annotations

import contextlib
import math
from contextlib import AbstractContextManager

import torch
from einops import einsum, rearrange
from torch import Tensor, nn
from tqdm.auto import tqdm

from implicit_updates.adapters.attribution_hooks import HookedAttention, own_copy
from implicit_updates.adapters.hooked_prefixes import replaced_forward
from implicit_updates.capture import BlockCapture
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.math.attribution import AttentionCapture
from implicit_updates.runtime.hooks import module_hooks

# -- attribution ------------------------------------------------------------------------------------------------------


class ToyAttention(HookedAttention):
    """The toy's sites for the one hook-point attention capture: values off ``attn.value_proj``'s output, ``W_O^h``
    the head's columns of ``output_proj.weight``, the attention output, MLP residual and input at their hook points,
    no norm after attention, ``ln2`` before the MLP (none without LayerNorm)."""

    post_norm = parallel = False  # no norm after attention; attention and MLP in sequence

    def _hook_names(self, b: int) -> list[str]:
        return [f"blocks.{b}.{h}" for h in ("hook_resid_pre", "attn.hook_pattern", "hook_attn_out", "hook_resid_mid",
                                            "hook_mlp_in")]

    def _module_reads(self, b: int) -> list[tuple[nn.Module, str, str]]:
        return [(self.model.blocks[b].attn.value_proj, "output", f"blocks.{b}.attn.v")]

    def _exact(self) -> AbstractContextManager:
        return contextlib.nullcontext()

    def _values(self, store: dict[str, Tensor], b: int) -> Tensor:
        return store[f"blocks.{b}.attn.v"]

    def _projected(self, b: int, v: Tensor) -> Tensor:
        """``P^h_j = v^h_j W_O^h`` ``[batch, head, pos, d_model]`` from ``value_proj``'s output ``[batch, pos, (h e)]``
        (``W_O^h``: head h's columns of ``output_proj.weight``, upcast exactly to ``v``'s dtype)."""
        attn = self.model.blocks[b].attn
        heads = attn.cfg.n_heads
        w_o = rearrange(attn.output_proj.weight.detach().to(v.dtype), "d (h e) -> h e d", h=heads)
        return einsum(rearrange(v, "b j (h e) -> b h j e", h=heads), w_o, "b h j e, h e d -> b h j d")

    def _attention(self, store: dict[str, Tensor], b: int) -> Tensor:
        return store[f"blocks.{b}.hook_attn_out"]

    def _mlp_residual(self, store: dict[str, Tensor], b: int) -> Tensor:
        return store[f"blocks.{b}.hook_resid_mid"]

    def _mlp_input(self, store: dict[str, Tensor], b: int) -> Tensor:
        return store[f"blocks.{b}.hook_mlp_in"]

    def _block_input(self, x: Tensor) -> Tensor:
        # without the attention skip the block input reaches the MLP only through attention
        return x if self.model.cfg.attn_skip else torch.zeros_like(x)

    def _output_map(self, b: int, dtype: torch.dtype):
        return None

    def _mlp_norm(self, b: int, dtype: torch.dtype):
        ln2 = self.model.blocks[b].ln2
        return None if isinstance(ln2, nn.Identity) else own_copy(ln2, dtype)


def capture_attention(adapter, inputs: Tensor, blocks: list[int], query: str) -> list[AttentionCapture]:
    """Per block in ``blocks``: the pattern, the values through each head's ``W_O``, the same on the query alone,
    and the pre-MLP norm (:mod:`implicit_updates.math.attribution`), by the one hook-point capture."""
    return ToyAttention(adapter).capture(inputs, blocks, query)


# -- all prefixes in one pass -----------------------------------------------------------------------------------------


def check_prefix_support(model: nn.Module) -> None:
    """Refuse, in one line, a toy model whose context activations depend on the prefix."""
    if not model.cfg.causal:
        raise UnsupportedArchitectureError(
            "causal=False: without the causal mask every context token attends to the query, so the context's "
            "activations change with every prefix and no single pass can reuse them; use method='naive'")


def context_keys_values(model: nn.Module, context: Tensor, n_blocks: int) -> list[tuple[Tensor, Tensor]]:
    """Run the context ``[1, N, d_model]`` once through blocks ``0..n_blocks-1``; per block its keys and values
    ``[head, N, d_head]`` as ``attn.key_proj``/``value_proj`` computed them."""
    store: dict[str, Tensor] = {}

    def save(key: str):
        def hook(module, args, out):
            store[key] = out.detach()
        return hook

    hooks = [(model.blocks[b].attn.key_proj, "fwd", save(f"{b}.k")) for b in range(n_blocks)]
    hooks += [(model.blocks[b].attn.value_proj, "fwd", save(f"{b}.v")) for b in range(n_blocks)]
    with module_hooks(hooks):
        model(context, stop_at_layer=n_blocks)
    heads = model.cfg.n_heads
    return [tuple(rearrange(store[f"{b}.{t}"][0], "n (h e) -> h n e", h=heads) for t in "kv")
            for b in range(n_blocks)]


def query_attention(attn: nn.Module, keys: Tensor, values: Tensor, lengths: Tensor):
    """A replacement ``attn.forward`` for the query rows of prefixes ``lengths`` (``i_r``): row r attends to the
    context slots ``j < i_r`` of ``keys``/``values`` ``[head, L, d_head]`` and to itself (the last slot of the
    pattern ``[rows, head, 1, L + 1]`` that ``attn.hook_pattern`` sees)."""
    heads, scale = attn.cfg.n_heads, math.sqrt(attn.cfg.head_size)
    visible = torch.arange(keys.shape[1], device=keys.device)[None, :] < lengths[:, None]  # [rows, L]

    def forward(x: Tensor) -> Tensor:  # x: [rows, 1, d_model]
        q, k, v = (rearrange(proj(x), "r 1 (h e) -> h r e", h=heads)
                   for proj in (attn.query_proj, attn.key_proj, attn.value_proj))
        ctx = einsum(q, keys, "h r e, h n e -> h r n") / scale
        own = einsum(q, k, "h r e, h r e -> h r") / scale
        ctx = ctx.masked_fill(~visible, float("-inf"))
        pattern = attn.hook_pattern(rearrange(torch.cat([ctx, own[..., None]], -1).softmax(-1), "h r n -> r h 1 n"))
        z = einsum(pattern[:, :, 0, :-1], values, "r h n, h n e -> r h e")
        z = z + pattern[:, :, 0, -1:] * rearrange(v, "h r e -> r h e")
        return attn.output_proj(rearrange(z, "r h e -> r 1 (h e)"))

    return forward


def capture_prefixes(adapter, inputs: Tensor, blocks: list[int], chunk_size: int = 64,
                     progress: bool | None = None) -> list[BlockCapture]:
    """Per block in ``blocks``, a :class:`BlockCapture` whose N "positions" are the N prefixes ``[c_1..c_i, x]`` of
    the prompt ``inputs`` ``[1, N+1, d_model]``; query rows ``chunk_size`` at a time."""
    model = adapter.model
    check_prefix_support(model)
    inputs = adapter._continuous(inputs)
    n = inputs.shape[1] - 1  # (one prompt with a context: checked by prefix_decomposition)
    last = max(blocks) + 1
    context = context_keys_values(model, inputs[:, :-1], last)
    parts: dict[int, list[dict[str, Tensor]]] = {b: [] for b in blocks}
    store: dict[str, Tensor] = {}
    with adapter._capturing(blocks, store):
        for start in tqdm(range(0, n, chunk_size), desc="prefixes", disable=not progress, leave=False):
            lengths = torch.arange(start + 1, min(start + chunk_size, n) + 1, device=inputs.device)
            length = int(lengths[-1])
            resid = inputs[:, -1:].expand(lengths.shape[0], 1, inputs.shape[-1])
            for b in range(last):
                keys, values = context[b]
                attn = model.blocks[b].attn
                with replaced_forward(attn, query_attention(attn, keys[:, :length], values[:, :length], lengths)):
                    resid = model.blocks[b](resid)
                if b in parts:
                    parts[b].append({k: v for k, v in store.items() if k.startswith(f"blocks.{b}.")})
    captures = []
    for b in blocks:
        ctx = {key: rearrange(torch.cat([part[key] for part in parts[b]]), "r 1 d -> 1 r d") for key in parts[b][0]}
        query_input = ctx[f"blocks.{b}.hook_resid_pre"]
        alone = adapter.run_block_alone(b, query_input)  # every query row at once
        captures.append(adapter.block_capture(b, ctx, alone, query_input))
    return captures

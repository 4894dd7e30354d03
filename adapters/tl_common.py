"""What the TransformerLens-based adapters share: post-norm architectures, exact ALiBi tables, MoE expert rows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from implicit_updates.runtime.hooks import module_hooks

try:  # TransformerLens >= 3.8 names its post-norm (OLMo 2/3) architectures
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
except ImportError:  # pragma: no cover - older TransformerLens
    POST_NORM_ARCHITECTURES = set()


def alibi_table(n_heads: int, length: int, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """TransformerLens's ALiBi bias ``m_h (j - i)`` (``AbstractAttention.create_alibi_bias``) computed in ``dtype``
    (TransformerLens computes it in float32): ``[heads, length, length]``."""
    from transformer_lens.components import AbstractAttention

    start = 2 ** (-8 / n_heads)
    multipliers = start * start ** torch.arange(n_heads, device=device, dtype=dtype)
    return multipliers[:, None, None] * AbstractAttention.create_alibi_slope(length, device).to(dtype)


@contextmanager
def exact_alibi(model: nn.Module) -> Iterator[None]:
    """Every forward inside reads a fresh ALiBi table of exactly its key length, in the residual's dtype.

    TransformerLens caches its float32 table on the module and reuses a larger one from an earlier, longer forward,
    slicing its *last* rows: the bias then shifts by a per-row constant, which changes the output once attention
    sinks or a float32 rounding make it count, so a model's logits for one prompt depend on what it ran before. Here
    each forward sees what a model with fresh tables computes, in the compute dtype; the modules' own tables are put
    back on exit.
    """
    if model.cfg.positional_embedding_type != "alibi":
        yield
        return
    attentions = [block.attn for block in model.blocks]
    saved = [attn.alibi for attn in attentions]
    tables: dict[tuple, Tensor] = {}

    def fresh(module, args, kwargs):
        query = kwargs["query_input"] if "query_input" in kwargs else args[0]
        entry = kwargs.get("past_kv_cache_entry")
        length = query.shape[1] + (entry.past_keys.shape[1] if entry is not None else 0)
        key = (length, query.dtype, query.device)  # the residual's dtype: parameters may be upcast only later
        if key not in tables:
            tables[key] = alibi_table(module.cfg.n_heads, length, query.dtype, query.device)
        module.alibi = tables[key]

    try:
        with module_hooks([(attn, "pre_kw", fresh) for attn in attentions]):
            yield
    finally:
        for attn, table in zip(attentions, saved, strict=True):
            attn.alibi = table


def expert_rows(indices: Tensor, expert: int, num_experts: int) -> Tensor:
    """Token rows routed to ``expert``, ordered as TransformerLens's ``MoE.forward`` processes them."""
    mask = torch.nn.functional.one_hot(indices, num_classes=num_experts).permute(2, 1, 0)
    _, rows = torch.where(mask[expert])
    return rows

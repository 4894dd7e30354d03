"""The model's own forward with a KV cache, for Hugging Face models and TransformerBridge (whose forward is the
wrapped model's): under which name the forward takes the cache, and the alias bridge attention components need."""

from __future__ import annotations

import inspect

from torch import Tensor, nn

from implicit_updates.runtime.hooks import module_hooks


def cache_kwarg(hf: nn.Module) -> str | None:
    """The name the model's forward takes its KV cache under (``cache`` in transformers 5.x, ``past_key_values``
    before), or None."""
    params = inspect.signature(hf.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def cache_alias(module, args, kwargs):
    """TransformerBridge attention components read the KV cache as ``past_key_values`` (or ``layer_past``), while
    transformers 5's decoder layers pass it as ``cache``: hand it over under the name they read."""
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        return args, {**kwargs, "past_key_values": kwargs["cache"]}
    return args, kwargs


def forward_hf(adapter, ids: Tensor, hooks: list, **kwargs):
    """The wrapped Hugging Face model's own forward on ``ids`` with ``hooks`` (removed on any exit) and extra
    forward arguments; the model is left as found (a bridge's capture hooks)."""
    bridged = [(p.attention, "pre_kw", cache_alias) for p in adapter.parts
               if hasattr(p.attention, "_update_kv_cache")]
    with module_hooks(bridged + hooks), adapter.left_as_found():
        return adapter.hf(input_ids=ids, output_attentions=False, output_hidden_states=False, **kwargs)

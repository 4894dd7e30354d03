"""Framework adapters, installed as ``implicit_updates.adapters``: they translate a live model into plain tensors."""

from __future__ import annotations

from torch import nn

from implicit_updates.errors import UnsupportedArchitectureError


def adapter_for(model: nn.Module):
    """The adapter for ``model``'s framework (TransformerLens ``HookedTransformer`` and look-alikes)."""
    if hasattr(model, "cfg") and hasattr(model, "blocks") and hasattr(model, "hooks"):
        from implicit_updates.adapters.hooked_transformer import HookedTransformerAdapter

        return HookedTransformerAdapter(model)
    raise UnsupportedArchitectureError(
        f"no adapter for {type(model).__name__}: pass a TransformerLens HookedTransformer (or a HookedRootModule "
        "with its blocks.L hook names)")

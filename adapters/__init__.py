"""Framework adapters, installed as ``implicit_updates.adapters``: they translate a live model into plain tensors."""

from __future__ import annotations

from torch import nn

from implicit_updates.errors import UnsupportedArchitectureError


def adapter_for(model: nn.Module):
    """The adapter for ``model``'s framework: HookedTransformer (and look-alikes), TransformerBridge, Hugging Face."""
    from implicit_updates.toy import ToyTransformer

    if isinstance(model, ToyTransformer):  # the seed papers' own model (before the HookedTransformer look-alikes)
        from implicit_updates.adapters.toy import ToyAdapter

        return ToyAdapter(model)
    if _is_bridge(model):  # before the look-alike test: a TransformerBridge has cfg, blocks and hooks too
        from implicit_updates.adapters.bridge import BridgeAdapter

        return BridgeAdapter(model)
    if hasattr(model, "cfg") and hasattr(model, "blocks") and hasattr(model, "hooks"):
        from implicit_updates.adapters.hooked_transformer import HookedTransformerAdapter

        return HookedTransformerAdapter(model)
    if _is_hf(model):
        from implicit_updates.adapters.hf import HFAdapter

        return HFAdapter(model)
    raise UnsupportedArchitectureError(
        f"no adapter for {type(model).__name__}: pass a TransformerLens HookedTransformer (or a HookedRootModule "
        "with its blocks.L hook names), a TransformerBridge, or a Hugging Face causal LM (PreTrainedModel)")


def _is_bridge(model: nn.Module) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - TransformerLens without the bridge
        return False
    return isinstance(model, TransformerBridge)


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers not installed
        return False
    return isinstance(model, PreTrainedModel)

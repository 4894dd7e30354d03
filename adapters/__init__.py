"""Framework adapters, installed as ``implicit_updates.adapters``: they translate a live model into plain tensors."""

from __future__ import annotations

import sys

from torch import nn

from implicit_updates.errors import UnsupportedArchitectureError


def adapter_for(model: nn.Module, remote: bool | str = False):
    """The adapter for ``model``'s framework: nnsight (traces, run where ``remote`` says), HookedTransformer (and
    look-alikes), TransformerBridge, Hugging Face."""
    from implicit_updates.toy import ToyTransformer

    if is_nnsight(model):  # first: an nnsight model forwards attribute reads to the model it wraps
        from implicit_updates.adapters.nnsight_adapter import NNsightAdapter

        return NNsightAdapter(model, remote)
    if remote is not False:
        raise ValueError(f"remote={remote!r} needs an nnsight model (nnsight.LanguageModel / TransformersModel), not "
                         f"a {type(model).__name__}")
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
        "with its blocks.L hook names), a TransformerBridge, a Hugging Face causal LM (PreTrainedModel) or an nnsight "
        "LanguageModel over one")


def is_nnsight(model) -> bool:
    """An nnsight model (``Envoy``: ``LanguageModel``, ``TransformersModel``, ``NNsight``); nnsight is not imported
    here: a model of it exists only once nnsight has been imported."""
    nnsight = sys.modules.get("nnsight")
    envoy = getattr(nnsight, "Envoy", None)
    return envoy is not None and isinstance(model, envoy)


def is_module_based(adapter) -> bool:
    """A plain Hugging Face model's or a TransformerBridge's adapter (hooks on the live modules), not nnsight's
    (traces) nor the HookedTransformer's or toy model's."""
    from implicit_updates.adapters.bridge import BridgeAdapter
    from implicit_updates.adapters.hf import HFAdapter

    return type(adapter) in (HFAdapter, BridgeAdapter)


def torch_module(model) -> nn.Module:
    """The torch module ``model`` computes with: the one an nnsight model wraps, else ``model`` itself."""
    if is_nnsight(model):
        from implicit_updates.adapters.nnsight_adapter import wrapped_module

        return wrapped_module(model)
    return model


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

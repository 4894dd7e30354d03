"""Framework adapters, installed as ``implicit_updates.adapters``: they translate a live model into plain tensors.

The interface is :class:`~implicit_updates.adapters.base.Adapter`; backends are found through a registry (pyvene's
model-type registry is the model): ``register(name, detector, "module:Class", priority)``, the highest-priority
detector that accepts the model wins. A new backend is one module plus one ``register`` line below.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from implicit_updates.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Backend:
    name: str
    detect: Callable[[object], bool]
    target: str  # "module:Class" under implicit_updates.adapters, imported only when chosen
    priority: int

    def adapter_class(self) -> type:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(f"implicit_updates.adapters.{module}"), cls)


BACKENDS: list[Backend] = []


def register(name: str, detect: Callable[[object], bool], target: str, priority: int) -> None:
    """Add a backend: ``detect(model)`` says whether it serves ``model``; higher ``priority`` is asked first."""
    BACKENDS[:] = sorted([b for b in BACKENDS if b.name != name] + [Backend(name, detect, target, priority)],
                         key=lambda b: -b.priority)


def backend_for(model) -> Backend:
    """The registered backend that serves ``model``."""
    for backend in BACKENDS:
        if backend.detect(model):
            return backend
    raise UnsupportedArchitectureError(
        f"no adapter for {type(model).__name__}: pass a TransformerLens HookedTransformer (or a HookedRootModule "
        "with its blocks.L hook names), a TransformerBridge, a Hugging Face causal LM (PreTrainedModel) or an nnsight "
        "LanguageModel over one")


def adapter_for(model, remote: bool | str = False):
    """The adapter for ``model``'s framework; ``remote`` (where traces run) only for backends that ship traces."""
    cls = backend_for(model).adapter_class()
    if "remote" in getattr(cls, "options", ()):
        return cls(model, remote=remote)
    if remote is not False:
        raise ValueError(f"remote={remote!r} needs an nnsight model (nnsight.LanguageModel / TransformersModel), not "
                         f"a {type(model).__name__}")
    return cls(model)


def adapter_classes() -> dict[str, type]:
    """Every registered backend's adapter class, by name, in priority order."""
    return {b.name: b.adapter_class() for b in BACKENDS}


def torch_module(model) -> nn.Module:
    """The torch module ``model`` computes with: the one an nnsight model wraps, else ``model`` itself."""
    if is_nnsight(model):
        from implicit_updates.adapters.nnsight_adapter import wrapped_module

        return wrapped_module(model)
    return model


# -- detectors (no framework is imported to ask) ----------------------------------------------------------------


def is_nnsight(model) -> bool:
    """An nnsight model (``Envoy``: ``LanguageModel``, ``TransformersModel``, ``NNsight``); an nnsight model exists
    only once nnsight has been imported, and it forwards attribute reads to the model it wraps."""
    envoy = getattr(sys.modules.get("nnsight"), "Envoy", None)
    return envoy is not None and isinstance(model, envoy)


def is_toy(model) -> bool:
    from implicit_updates.models.toy import ToyTransformer

    return isinstance(model, ToyTransformer)


def is_bridge(model) -> bool:
    bridge = getattr(sys.modules.get("transformer_lens.model_bridge"), "TransformerBridge", None)
    return bridge is not None and isinstance(model, bridge)


def is_hooked(model) -> bool:
    """A HookedTransformer, or a look-alike ``HookedRootModule`` with its ``cfg``, ``blocks`` and hook names."""
    return hasattr(model, "cfg") and hasattr(model, "blocks") and hasattr(model, "hooks")


def is_hf(model) -> bool:
    pretrained = getattr(sys.modules.get("transformers"), "PreTrainedModel", None)
    return pretrained is not None and isinstance(model, pretrained)


# nnsight first: its models forward attribute reads to the model they wrap; the toy model and a bridge before the
# HookedTransformer look-alike test, which both would pass.
register("nnsight", is_nnsight, "nnsight_adapter:NNsightAdapter", 50)
register("toy", is_toy, "toy:ToyAdapter", 40)
register("TransformerBridge", is_bridge, "bridge:BridgeAdapter", 30)
register("HookedTransformer", is_hooked, "hooked_transformer:HookedTransformerAdapter", 20)
register("Hugging Face", is_hf, "hf:HFAdapter", 10)

"""TransformerLens ``TransformerBridge`` (TL 4.x's model; TL 3.x ships it too).

A bridge wraps a Hugging Face model: every HF module sits inside a bridge component (``blocks.L.mlp.gate`` around
``gate_proj`` ...) and the bridge's forward runs the HF model's own forward. The block structure is the one
TransformerLens booted the bridge with (``bridge.adapter.component_mapping``), located by canonical names: those are
the components the bridge's forward calls (a ``JointGateUpMLPBridge`` runs its split ``gate``/``in`` copies, not
the HF ``gate_up_proj``). The machinery of :mod:`implicit_updates.adapters.hf` then applies unchanged. Patches are keyed
by the bridge's own ``named_parameters()`` (``model.layers.L._original_component.mlp...``), which ``get_parameter``
on the bridge resolves.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from implicit_updates.adapters.hf import HFAdapter
from implicit_updates.adapters.structure import BlockStructure, structure_of_bridge
from implicit_updates.errors import UnsupportedArchitectureError


class BridgeAdapter(HFAdapter):
    """Adapter for ``transformer_lens.model_bridge.TransformerBridge`` (numerics: the wrapped HF model's)."""

    backend = "TransformerBridge"

    def __init__(self, model: nn.Module):
        if getattr(model, "compatibility_mode", False):
            # compatibility mode runs folded/processed weight copies that are not parameters, so a patch of the
            # bridge's named_parameters() would not act on what the model computes
            raise UnsupportedArchitectureError(
                "this TransformerBridge is in compatibility mode (processed weights): boot it without "
                "enable_compatibility_mode() so its parameters are the weights it computes with")
        _drop_stale_capture_hooks(model)
        super().__init__(model, hf_model=model.original_model)

    def _structure(self) -> BlockStructure:
        return structure_of_bridge(self.model)  # the adapter it was booted with, in canonical names

    def _root(self) -> nn.Module:
        return self.model  # blocks.L.ln2, blocks.L.mlp.gate...: the components the bridge's forward calls

    def _forward(self, ids: Tensor):
        # The wrapped HF model's forward runs every bridge component (hook points fire).
        with self.left_as_found():
            return super()._forward(ids)

    @contextmanager
    def left_as_found(self) -> Iterator[None]:
        """A bridge block wires its own capture hooks on its first forward: unwire what a run inside wired, so the
        model is left as found and a deep copy of it (absorb's patched copy) inherits no hooks bound to it."""
        unwired = [b for b in _blocks(self.model) if b._capture_hooks_wired is False]
        try:
            yield
        finally:
            for block in unwired:
                if block._capture_hooks_wired:
                    block._teardown_capture_hooks()


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [b for b in getattr(model, "blocks", []) if hasattr(b, "_capture_hooks_wired")
            and hasattr(b, "_teardown_capture_hooks")]


def _drop_stale_capture_hooks(model: nn.Module) -> None:
    """A deep copy of a bridge that has run keeps its blocks' capture hooks, whose closures hold weak proxies to
    the *original* modules (TransformerLens binds them with ``weakref.proxy``): they would write into the original
    or fail once it is freed. Remove such hooks (via the copy's own handles) so the copy wires its own; a bridge
    whose hooks are its own is left untouched."""
    for block in _blocks(model):
        if not block._capture_hooks_wired:
            continue
        own = {id(r) for m in block.modules() for r in weakref.getweakrefs(m)}
        for handle in block._capture_hook_handles:
            hooks = handle.hooks_dict_ref()
            fn = hooks.get(handle.id) if hooks is not None else None
            cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
            if any(isinstance(c, weakref.ProxyTypes) and id(c) not in own for c in cells):
                block._teardown_capture_hooks()
                break

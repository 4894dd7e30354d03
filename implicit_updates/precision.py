"""Layer-streamed precision: a model computes in float64 (or float32) without a float64 copy of itself.

Each module with parameters gets them upcast just before it runs and put back just after (a TransformerBridge
component also its wrapped module's, which it may read without calling it), so at most one module's
upcast parameters exist at a time (a block's attention or MLP, never the whole model). Upcasting a float32 value to
float64 is exact, so the forward sees the very numbers an upcast deep copy (``copy.deepcopy(model).to(float64)``)
holds: results equal the whole-copy path's. A module's floating buffers are upcast with its parameters, as the copy's
are. Embedding tables are not upcast at all: a lookup of float32 rows cast to float64 is the lookup of
the float64 table, so an embedding's output is cast instead (Gemma's scaled embedding multiplies in the compute
dtype, as the upcast copy does). The user's ``Parameter`` objects are put back on every exit, exceptions included.
On a model dispatched by accelerate (``device_map``, offload) the upcast runs inside each module's accelerate hook,
after it loaded the offloaded parameters and before it offloads them (:mod:`implicit_updates.dispatch`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from implicit_updates.dispatch import inside_forward


def needs_upcast(model: nn.Module, dtype: torch.dtype) -> bool:
    return any(p.dtype != dtype for p in model.parameters())


@contextmanager
def computed_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Inside the block every forward of ``model``'s modules computes in ``dtype``, one module upcast at a time."""
    if not needs_upcast(model, dtype):
        yield
        return
    swapped: dict[nn.Module, list[tuple[nn.Module, str, nn.Parameter]]] = {}

    def upcast(module: nn.Module, args) -> None:
        for owner in _owners(module):
            for name, p in owner._parameters.items():
                if p is not None and p.is_floating_point() and p.dtype != dtype:
                    swapped.setdefault(module, []).append((owner, name, p))
                    owner._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            for name, t in owner._buffers.items():  # as the upcast copy's (a bridge's lm_head bias is a buffer)
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    swapped.setdefault(module, []).append((owner, name, t))
                    owner._buffers[name] = t.to(dtype)

    def restore(module: nn.Module, args, output) -> None:
        _put_back(swapped.pop(module, []))

    hooks = []
    for module in model.modules():
        own = [p for owner in _owners(module) for p in owner.parameters(recurse=False)
               if p.is_floating_point() and p.dtype != dtype]
        if not own:
            continue
        if _is_lookup(module):
            hooks.append((module, "fwd", _cast_lookup(dtype)))
        else:
            hooks += [(module, "pre", upcast), (module, "fwd", restore)]
    cfg = getattr(model, "cfg", None)
    cfg_dtype = getattr(cfg, "dtype", None)
    try:
        if isinstance(cfg_dtype, torch.dtype):  # TransformerLens builds masks and tables in cfg.dtype
            cfg.dtype = dtype
        with inside_forward(hooks):  # on an accelerate-dispatched module: after its offload loaded the parameters
            try:
                yield
            finally:
                for originals in swapped.values():  # a forward that raised left these upcast
                    _put_back(originals)
                swapped.clear()
    finally:
        if isinstance(cfg_dtype, torch.dtype):
            cfg.dtype = cfg_dtype


def _put_back(originals: list[tuple[nn.Module, str, Tensor]]) -> None:
    for owner, name, t in reversed(originals):
        if isinstance(t, nn.Parameter):
            owner._parameters[name] = t
        else:
            owner._buffers[name] = t


def _owners(module: nn.Module) -> list[nn.Module]:
    """Whose parameters a module's forward reads: its own, and for a TransformerLens bridge component (which may
    reimplement the wrapped Hugging Face module's forward with its weights) the wrapped module's too; a bridge's
    attention or MLP reads its projections' weights before calling them (to match their dtype), so all of them."""
    wrapped = getattr(module, "original_component", None)
    if not isinstance(wrapped, nn.Module):
        return [module]
    name = type(module).__name__
    if name.endswith("Bridge") and any(part in name for part in ("Attention", "MLP", "MoE")):
        return [module, *wrapped.modules()]
    return [module, wrapped]


def _is_lookup(module: nn.Module) -> bool:
    """A pure table lookup whose output can be cast instead of its table upcast: ``nn.Embedding`` (and Gemma's
    scaled embedding), TransformerLens's ``Embed`` (without a post-embedding norm) and ``PosEmbed``."""
    name = type(module).__name__
    if type(module) is nn.Embedding or (isinstance(module, nn.Embedding) and name.endswith("ScaledWordEmbedding")):
        return True
    return name in ("Embed", "PosEmbed") and not any(True for _ in module.children()) and hasattr(module, "cfg")


def _cast_lookup(dtype: torch.dtype):
    def hook(module: nn.Module, args, output: Tensor) -> Tensor:
        if isinstance(module, nn.Embedding) and hasattr(module, "embed_scale"):  # Gemma: scale in the compute dtype
            rows = F.embedding(args[0], module.weight, module.padding_idx)
            return rows.to(dtype) * torch.as_tensor(module.embed_scale).to(dtype)  # XGLM: a Python float
        return output.to(dtype)

    return hook

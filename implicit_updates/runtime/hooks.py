"""Plain torch module hooks that are always removed, for the few places a framework has no hook point."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn


@contextmanager
def module_hooks(hooks: list[tuple[nn.Module, str, Callable]]) -> Iterator[None]:
    """Register ``(module, "pre" | "pre_kw" | "fwd", fn)`` hooks for the duration of the block, removing them on
    any exit (``pre_kw`` pre-hooks also see and may replace the keyword arguments)."""
    handles = []
    try:
        for module, kind, fn in hooks:
            if kind == "fwd":
                handles.append(module.register_forward_hook(fn))
            else:
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=kind == "pre_kw"))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def swapped_parameters(model: nn.Module, values: dict[str, Tensor]) -> Iterator[None]:
    """``model``'s parameters ``values`` (keys of ``named_parameters()``) replaced by the given tensors inside the
    block: the model's own forward then reads them wherever it reads the parameter, exactly as after a literal
    weight edit. The original ``Parameter`` objects are put back on any exit, so the model ends bit-identical."""
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for name, value in values.items():
            module_path, _, attr = name.rpartition(".")
            module = model.get_submodule(module_path)
            original = module._parameters[attr]
            if value.shape != original.shape:
                raise ValueError(f"{name}: replacement of shape {tuple(value.shape)} for a parameter of shape "
                                 f"{tuple(original.shape)}")
            saved.append((module, attr, original))
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        yield
    finally:
        for module, attr, original in reversed(saved):
            module._parameters[attr] = original

"""Plain torch module hooks that are always removed, for the few places a framework has no hook point."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def module_hooks(hooks: list[tuple[nn.Module, str, Callable]]) -> Iterator[None]:
    """Register ``(module, "pre" | "fwd", fn)`` hooks for the duration of the block, removing them on any exit."""
    handles = []
    try:
        for module, kind, fn in hooks:
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handles.append(register(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()

"""Plain torch module hooks that are always removed, for the few places a framework has no hook point."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn


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

"""Models dispatched by accelerate (``device_map``, CPU and disk offload): our hooks run inside accelerate's own.

accelerate replaces a dispatched module's ``forward`` by a wrapper around its ``_hf_hook``: ``pre_forward`` moves
the inputs to the module's execution device and, for an offloaded module, loads its parameters (on ``meta`` outside
the forward) from the offload map; ``post_forward`` puts them back on ``meta``. A torch forward pre-hook runs before
that wrapper, so it would see ``meta`` parameters, and a parameter it swapped in would be overwritten by the load.
So on such a module a hook that reads or swaps parameters runs inside accelerate's chain: after its ``pre_forward``
and before its ``post_forward``. The wrapper reads ``module._hf_hook`` at call time, so we put a chain in its place
and the very same hook object back on exit: nothing is detached or re-initialised, and no ``.to()`` is called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from implicit_updates.runtime.hooks import module_hooks, swapped_parameters


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks drive ``model`` (``from_pretrained(device_map=...)``, ``dispatch_model``,
    ``cpu_offload``)."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def execution_device(model: nn.Module) -> torch.device:
    """Where inputs go: the first execution device accelerate names (the embedding's, as ``hf_device_map`` lists it
    first), else the device of the model's first parameter."""
    for module in model.modules():
        device = _execution_device(getattr(module, "_hf_hook", None))
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return next(model.parameters()).device


def _execution_device(hook) -> object:
    if hook is None:
        return None
    for inner in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        device = getattr(inner, "execution_device", None)
        if device is None and isinstance(inner, _Inside):
            device = _execution_device(inner.outer)
        if device is not None:
            return device
    return None


class _Inside:
    """Stands in for a module's ``_hf_hook``: the original's ``pre_forward``, then ours; ours, then its
    ``post_forward`` (so an offloaded module's loaded parameters are what ours read, and theirs go back to meta)."""

    def __init__(self, outer) -> None:
        self.outer = outer
        self.pre: list[Callable] = []
        self.post: list[Callable] = []
        self.open: list[tuple] = []  # the args of forwards whose post_forward has not run (a forward that raised)

    @property
    def no_grad(self) -> bool:
        return self.outer.no_grad

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        args, kwargs = self.outer.pre_forward(module, *args, **kwargs)
        self.open.append(args)
        for fn in self.pre:
            fn(module, args)
        return args, kwargs

    def post_forward(self, module: nn.Module, output):
        args = self.open.pop() if self.open else ()
        for fn in self.post:
            result = fn(module, args, output)
            output = output if result is None else result
        return self.outer.post_forward(module, output)


@contextmanager
def inside_forward(hooks: list[tuple[nn.Module, str, Callable]]) -> Iterator[None]:
    """``module_hooks`` (kinds ``"pre"`` and ``"fwd"``), except that on a module accelerate drives each runs inside
    its hook: after its ``pre_forward`` loaded the parameters, before its ``post_forward`` offloads them. Removed on
    any exit; a forward that raised inside gets accelerate's ``post_forward`` (its parameters back on meta) after the
    caller's own cleanup, which must run before this block exits."""
    plain = [h for h in hooks if getattr(h[0], "_hf_hook", None) is None]
    chains: dict[nn.Module, _Inside] = {}
    try:
        for module, kind, fn in hooks:
            if getattr(module, "_hf_hook", None) is None:
                continue
            if module not in chains:
                chains[module] = _Inside(module._hf_hook)
                module._hf_hook = chains[module]
            (chains[module].pre if kind == "pre" else chains[module].post).append(fn)
        with module_hooks(plain):
            yield
    finally:
        for module, chain in chains.items():
            module._hf_hook = chain.outer
            while chain.open:  # accelerate's own cleanup of a forward that raised
                chain.open.pop()
                chain.outer.post_forward(module, None)


def loaded_parameter(model: nn.Module, name: str) -> Tensor:
    """The values of ``model``'s parameter ``name`` as its module's forward sees them: the parameter itself, or for
    an offloaded module (``meta`` outside its forward) the tensor its accelerate hook loads (through that hook's
    ``pre_forward``; its ``post_forward`` then offloads the module again)."""
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    hook = getattr(module, "_hf_hook", None)
    if not module._parameters[attr].is_meta or hook is None:
        return module._parameters[attr].detach()
    hook.pre_forward(module)
    try:
        return module._parameters[attr].detach()
    finally:
        hook.post_forward(module, None)


def own_forward(module: nn.Module) -> Callable:
    """The module's forward without accelerate's hook (which would load the offloaded parameters over the ones
    the caller set): for a module whose parameters the caller has just put in place itself."""
    return module.__dict__.get("_old_forward", module.forward)


Replacement = tuple[nn.Module, str, Tensor]  # (owner module, parameter or buffer name, the tensor it reads instead)


@contextmanager
def swapped_while_running(replacements: dict[nn.Module, Callable[[], list[Replacement]]],
                          extra: list[tuple[nn.Module, str, Callable]] = ()) -> Iterator[None]:
    """The one parameter swap: while each module of ``replacements`` runs its own forward, the tensors its function
    returns stand in for its (or its children's) parameters and buffers, exactly as after a literal edit; put back
    when the forward returns, and on any exit. On a module accelerate drives, inside its hook (after its offload
    loaded the parameters, before it offloads them). ``extra``: more ``(module, "pre" | "fwd", fn)`` hooks to hold
    for the same span. A replacement of another shape than the tensor it replaces raises ``ValueError``."""
    saved: dict[nn.Module, list[Replacement]] = {}
    with inside_forward(swap_hooks(replacements, saved) + list(extra)):
        try:
            yield
        finally:  # a forward that raised left its replacements in: back before accelerate's own cleanup
            for originals in saved.values():
                put_back(originals)
            saved.clear()


def swap_hooks(replacements: dict[nn.Module, Callable[[], list[Replacement]]],
               saved: dict[nn.Module, list[Replacement]]) -> list[tuple[nn.Module, str, Callable]]:
    """The pre-hook that swaps each module's replacements in (recording the originals in ``saved``) and the forward
    hook that puts them back, for :func:`swapped_while_running`."""

    def swap(module: nn.Module, args) -> None:
        for owner, name, value in replacements[module]():
            table = owner._parameters if name in owner._parameters else owner._buffers
            original = table[name]
            if value.shape != original.shape:
                raise ValueError(f"{name}: replacement of shape {tuple(value.shape)} for a tensor of shape "
                                 f"{tuple(original.shape)}")
            saved.setdefault(module, []).append((owner, name, original))
            table[name] = nn.Parameter(value, requires_grad=False) if isinstance(original, nn.Parameter) else value

    def restore(module: nn.Module, args, output) -> None:
        put_back(saved.pop(module, []))

    return [(m, "pre", swap) for m in replacements] + [(m, "fwd", restore) for m in replacements]


def put_back(originals: list[Replacement]) -> None:
    """Undo :func:`swapped_while_running`'s swaps of one forward, last first."""
    for owner, name, t in reversed(originals):
        if isinstance(t, nn.Parameter):
            owner._parameters[name] = t
        else:
            owner._buffers[name] = t


@contextmanager
def forward_swapped(model: nn.Module, values: dict[str, Tensor]) -> Iterator[None]:
    """:func:`~implicit_updates.runtime.hooks.swapped_parameters`, except that on a module accelerate drives the
    values are swapped in inside its hook (after the offload's load, which would overwrite them) and only while it
    runs (:func:`swapped_while_running`)."""
    plain: dict[str, Tensor] = {}
    inside: dict[nn.Module, list[Replacement]] = {}
    for name, value in values.items():
        module_path, _, attr = name.rpartition(".")
        module = model.get_submodule(module_path)
        if getattr(module, "_hf_hook", None) is None:
            plain[name] = value
        else:
            inside.setdefault(module, []).append((module, attr, value))
    with swapped_parameters(model, plain), swapped_while_running(
            {module: (lambda swaps=swaps: swaps) for module, swaps in inside.items()}):
        yield

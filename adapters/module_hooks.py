"""Torch hooks and helpers for models run by their own forward (Hugging Face, TransformerBridge, nnsight's wrapped
model): read, substitute and add at a module's input or output, stop a forward after a layer, norms' parameters in
the compute dtype. Every hook is registered through :func:`~implicit_updates.runtime.hooks.module_hooks`, which
removes it on any exit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from implicit_updates.capture import FirstLayerMap
from implicit_updates.math.updates import AdditiveUpdate, RankOneUpdate
from implicit_updates.runtime.dispatch import loaded_parameter, own_forward


class Stop(Exception):
    """Raised after the last layer a run needs, so the layers after it do not run."""


def hidden_states_arg(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def first_tensor(output) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def substitute(x: Tensor) -> Callable:
    """A ``pre_kw`` hook that replaces a layer's hidden-states input by ``x``."""

    def hook(module, args, kwargs):
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    return hook


def unwrap(module: nn.Module) -> nn.Module:
    """The Hugging Face module inside a TransformerBridge wrapper (the module itself for plain HF models)."""
    while isinstance(getattr(module, "original_component", None), nn.Module):
        module = module.original_component
    return module


def weight_view(name: str, module: nn.Module) -> FirstLayerMap:
    """``m @ weight`` view of a map: ``nn.Linear`` stores ``[d_out, d_in]``, GPT-2's ``Conv1D`` ``[d_in, d_out]``."""
    module = unwrap(module)
    weight = loaded_parameter(module, "weight")  # an accelerate-offloaded map's weight is on meta until loaded
    if isinstance(module, nn.Linear):
        return FirstLayerMap(name, weight.T, transposed=True)
    return FirstLayerMap(name, weight)


def unflatten(store: dict[str, Tensor], leading: torch.Size) -> None:
    """Tensors an MLP saw flattened to ``[batch * pos, d]`` (OPT), back to ``[batch, pos, d]``."""
    for key, value in store.items():
        if value.dim() == 2:
            store[key] = value.reshape(*leading, value.shape[-1])


def like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` ``[rows, 1, d]`` shaped like a module's flattened ``[rows, d]`` input or output."""
    return t.reshape(*ref.shape[:-1], t.shape[-1]) if t.dim() != ref.dim() else t


def raise_stop(module, args, output):
    raise Stop


def save_hidden(store: dict, key: str) -> Callable:
    def hook(module, args, kwargs):
        store[key] = hidden_states_arg(args, kwargs).detach()

    return hook


def save_input(store: dict, key: str) -> Callable:
    def hook(module, args):
        store[key] = args[0].detach().clone()  # a copy: model code may modify it in place later

    return hook


def save_output(store: dict, key: str) -> Callable:
    def hook(module, args, output):
        store[key] = first_tensor(output).detach().clone()  # Falcon adds attention into the MLP output in place

    return hook


def close(a: Tensor, b: Tensor, size: Tensor) -> bool:
    """``a == b`` up to rounding: per position, ``||a - b|| <= 1e4 eps ||size||`` (size: the summands' scale)."""
    tol = 1e4 * torch.finfo(a.dtype).eps
    return bool(((a - b).norm(dim=-1) <= tol * size.norm(dim=-1) + torch.finfo(a.dtype).tiny).all())


@contextmanager
def norm_params(norm: nn.Module, dtype: torch.dtype, weight: float | None = None) -> Iterator[nn.Module]:
    """``norm`` with its parameters in ``dtype`` (the compute dtype: a model computing layer-streamed in float64
    keeps float32 parameters outside each module's own forward), or with its scale set to ``weight`` everywhere
    and its bias to 0; restored on exit."""
    module = unwrap(norm)
    saved = dict(module._parameters)
    try:
        for key, value in ((k, v) for k, v in saved.items() if v is not None and v.is_floating_point()):
            value = loaded_parameter(module, key)  # an accelerate-offloaded norm's scale is on meta until loaded
            new = value.to(dtype) if weight is None else torch.full(value.shape, weight if key == "weight"
                                                                             else 0.0, dtype=dtype,
                                                                             device=value.device)
            module._parameters[key] = nn.Parameter(new, requires_grad=False)
        yield norm
    finally:
        module._parameters.update(saved)


def normalized(norm: nn.Module, x: Tensor) -> Tensor:
    """What a norm multiplies by its scale: its own forward on ``x`` with the scale set to 1 (and bias 0), or to 0
    for norms computing ``(1 + weight)`` (Gemma: detected by a nonzero output at weight 0). Either way a scale patch
    ``delta`` changes the norm's output by exactly ``delta * normalized``, in the precision the module computes."""
    with norm_params(norm, x.dtype, 0.0) as zero:
        base = own_forward(zero)(x)
    if torch.any(base != 0):  # (1 + weight) * z: at weight 0 the output is z itself
        return base
    with norm_params(norm, x.dtype, 1.0) as one:
        return own_forward(one)(x)


def run_post_norm(norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The post-MLP norm's ``(normalized, output)`` on ``x``, as the module computes them in ``x``'s dtype."""
    with norm_params(norm, x.dtype) as upcast:
        return normalized(norm, x), own_forward(upcast)(x)


def add_rank_one(row: Tensor, column: Tensor) -> Callable:
    """Forward hook adding ``(input . row) column``: a module's output under ``W + outer(row, column)``."""

    def hook(module, args, output: Tensor) -> Tensor:
        return output + (args[0] * like(row, args[0])).sum(-1, keepdim=True) * like(column, output)

    return hook


def add(delta: Tensor) -> Callable:
    def hook(module, args, output: Tensor) -> Tensor:
        return output + like(delta, output)

    return hook


def add_first(delta: Tensor) -> Callable:
    """Forward hook adding ``delta`` to a module's output, or to the first tensor of a tuple output."""

    def hook(module, args, output):
        if isinstance(output, Tensor):
            return output + like(delta, output)
        return (output[0] + like(delta, output[0]), *output[1:])

    return hook


def add_scaled(delta: Tensor, norm: nn.Module) -> Callable:
    def hook(module, args, output: Tensor) -> Tensor:
        return output + delta * normalized(norm, args[0])

    return hook


def edit_hooks(p, edits: list[RankOneUpdate | AdditiveUpdate]) -> list[tuple]:
    """Forward hooks applying ``edits`` (``BlockUpdate.edits``: factors shaped for the rows the block runs on) to
    block ``p`` (a ``modules.BlockParts``) as the literal weight edits act: a rank-one ``W + outer(row, column)``
    adds ``(input . row) column`` to its map's output, a post-MLP norm's scale change adds ``delta * normalized`` to
    the norm's output, a bias change of the output layer adds ``delta`` to its output."""
    modules = {name: module for name, module in p.first} | {p.out_weight: p.out}
    hooks = []
    for u in edits:
        if isinstance(u, RankOneUpdate):
            hooks.append((modules[u.name], "fwd", add_rank_one(u.row, u.column)))
        elif u.acts_as == "norm_scale":
            hooks.append((p.post_norm[1], "fwd", add_scaled(u.delta, p.post_norm[1])))
        else:
            hooks.append((p.out, "fwd", add(u.delta)))
    return hooks

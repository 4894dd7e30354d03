"""Layer-streamed precision: a model computes in float64 (or float32) without a float64 copy of itself.

Each module with parameters gets them upcast just before it runs and put back just after (a module made of leaf
modules, such as an attention of projections, its children's with its own; a TransformerBridge component also its
wrapped module's, which it may read without calling it), so at most one module's
upcast parameters exist at a time (a block's attention or MLP, never the whole model). Upcasting a float32 value to
float64 is exact, so the forward sees the very numbers an upcast deep copy (``copy.deepcopy(model).to(float64)``)
holds: results equal the whole-copy path's. A module's floating buffers are upcast with its parameters, as the copy's
are. Embedding tables are not upcast at all: a lookup of float32 rows cast to float64 is the lookup of
the float64 table, so an embedding's output is cast instead (Gemma's scaled embedding multiplies in the compute
dtype, as the upcast copy does). A vocabulary-sized projection (an ``nn.Linear`` or TransformerLens ``Unembed``
with more than :data:`CHUNK_ELEMENTS` weights: the unembedding, 151,936 x 1,536 for Qwen2.5-1.5B) is not upcast
whole either: while it runs its forward computes its output in slices of output rows, each slice of the weight upcast
only for its own product: one slice's upcast copy alive at a time, the same dot products (within the summation
order the matrix kernel picks for a slice's shape: Gemma-3-270M's float64 logits agree with the whole upcast to
5e-14, ~1e-15 relative).
The user's ``Parameter`` objects are put back on every exit, exceptions included.
On a model dispatched by accelerate (``device_map``, offload) the upcast runs inside each module's accelerate hook,
after it loaded the offloaded parameters and before it offloads them (:mod:`implicit_updates.runtime.dispatch`).

``transformers`` writes ``x.float()`` in norms and routers as an upcast from half precision; in a float64 computation
it is a float32 detour. Where a parameter takes it (Gemma's ``1 + weight.float()``, a router's
``F.linear(m.float(), w.float())``), a float64 weight patch would be rounded, so for such a model every cast to a less
precise dtype keeps float64 (:func:`exact_formula`). Other models compute as written: a Llama's float32 RMSNorm
statistics round the same way with and without context, and the decomposition is exact against them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from implicit_updates.runtime.dispatch import Replacement, execution_device, swapped_while_running


def needs_upcast(model: nn.Module, dtype: torch.dtype) -> bool:
    return any(p.dtype != dtype for p in model.parameters())


class KeepPrecision(TorchFunctionMode):
    """A cast of a ``dtype`` tensor to a less precise floating dtype keeps ``dtype`` (``x.float()``, ``x.half()``,
    ``x.to(torch.float32)``, ``x.type(torch.float32)``, ``x.type_as(y)`` with a float32 ``y``, and a
    ``dtype=torch.float32`` argument of an operation on it, as in ``softmax(x, dim, dtype=torch.float32)``); a matrix
    product of a ``dtype`` tensor with a less precise one computes in ``dtype`` (a float64 rotary frequency table
    times float32 positions), as elementwise operations promote. Casts of other tensors, and tensors made from
    nothing, are left alone (a library's loading code, such as accelerate reading an offloaded weight, runs as
    written)."""

    DROPPED = {torch.Tensor.float: torch.float32, torch.Tensor.half: torch.float16,
               torch.Tensor.bfloat16: torch.bfloat16}
    CASTS = {torch.Tensor.to, torch.Tensor.type, torch.Tensor.type_as}
    PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm,
                torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, F.linear}

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def _lower(self, d) -> bool:
        if isinstance(d, str):  # x.type("torch.FloatTensor")
            d = {"torch.FloatTensor": torch.float32, "torch.HalfTensor": torch.float16,
                 "torch.BFloat16Tensor": torch.bfloat16}.get(d)
        return isinstance(d, torch.dtype) and d.is_floating_point and torch.finfo(d).eps > torch.finfo(self.dtype).eps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], Tensor) and args[0].dtype == self.dtype:
            if func in self.DROPPED:
                return args[0]
            if func in self.CASTS:
                args = (args[0], *(self._kept(a) for a in args[1:]))
            if self._lower(kwargs.get("dtype")):
                kwargs = {**kwargs, "dtype": self.dtype}
        if func in self.PRODUCTS and any(isinstance(a, Tensor) and a.dtype == self.dtype for a in args):
            args = tuple(a.to(self.dtype) if isinstance(a, Tensor) and self._lower(a.dtype) else a for a in args)
        return func(*args, **kwargs)

    def _kept(self, arg):
        if isinstance(arg, Tensor) and arg.is_floating_point() and self._lower(arg.dtype):  # x.to(other)
            return torch.empty((), dtype=self.dtype, device=arg.device)  # only its dtype and device are read
        return self.dtype if self._lower(arg) else arg


class _ParameterCasts(KeepPrecision):
    """Records whether a forward reads a parameter through a cast to a less precise dtype; changes nothing."""

    def __init__(self, dtype: torch.dtype):
        super().__init__(dtype)
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        lowered = ((func in self.DROPPED and self._lower(self.DROPPED[func])) or self._lower(kwargs.get("dtype"))
                   or (func in self.CASTS and any(self._lower(self._dtype_of(a)) for a in args[1:])))
        if isinstance(first, nn.Parameter) and first.dtype == self.dtype and lowered:
            self.seen = True
        return func(*args, **kwargs)

    @staticmethod
    def _dtype_of(arg):
        return arg.dtype if isinstance(arg, Tensor) else arg


_CASTS_PARAMETERS: WeakKeyDictionary[nn.Module, dict[torch.dtype, bool]] = WeakKeyDictionary()


def casts_parameters(model: nn.Module, dtype: torch.dtype) -> bool:
    """Whether ``model`` computing in float64 reads one of its parameters through a float32 cast (Gemma's
    ``1 + weight.float()``, a router's ``F.linear(m.float(), w.float())``), where a float64 weight patch would be
    rounded. Probed once per model by a forward of two tokens (RNG state kept); ``False`` for other dtypes, for a
    HookedTransformer, and for a model the probe cannot run (its casts, if any, then round as written)."""
    if dtype != torch.float64 or any(c.__name__ == "HookedTransformer" for c in type(model).__mro__):
        return False  # (TransformerLens's own modules compute in cfg.dtype throughout)
    known = _CASTS_PARAMETERS.setdefault(model, {})
    if dtype not in known:
        probe = _ParameterCasts(dtype)
        try:
            ids = torch.zeros((1, 2), dtype=torch.long, device=execution_device(model))
            with torch.no_grad(), torch.random.fork_rng(devices=[]), _no_trace(model), _upcast(model, dtype), probe:
                if any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__):  # Hugging Face
                    model(input_ids=ids, use_cache=False)
                else:  # TransformerLens
                    model(ids)
        except Exception:  # noqa: BLE001 - not a token model (a toy block stack): nothing to lift
            probe.seen = False
        known[dtype] = probe.seen
    return known[dtype]


@contextmanager
def _no_trace(model: nn.Module) -> Iterator[None]:
    """The probe's forward leaves the model as it found it: transformers installs output-capturing hooks on a model's
    first forward (and marks it so); those are removed and the mark put back."""
    before = _hook_state(model)
    try:
        yield
    finally:
        _restore_hook_state(before)


_MARK = "_output_capturing_hooks_installed"


def _hook_state(model: nn.Module) -> dict[nn.Module, tuple[set, set, object]]:
    """Each module's forward hooks, forward pre-hooks and transformers' mark (``None`` when unmarked)."""
    return {m: (set(m._forward_hooks), set(m._forward_pre_hooks), m.__dict__.get(_MARK)) for m in model.modules()}


def _restore_hook_state(before: dict[nn.Module, tuple[set, set, object]]) -> None:
    """Removes the hooks added since :func:`_hook_state` and puts each module's mark back as it was."""
    for m, (hooks, pre_hooks, marked) in before.items():
        for key in set(m._forward_hooks) - hooks:
            del m._forward_hooks[key]
            m._forward_hooks_with_kwargs.pop(key, None)
            m._forward_hooks_always_called.pop(key, None)
        for key in set(m._forward_pre_hooks) - pre_hooks:
            del m._forward_pre_hooks[key]
            m._forward_pre_hooks_with_kwargs.pop(key, None)
        if marked is None:
            m.__dict__.pop(_MARK, None)
        else:
            m.__dict__[_MARK] = marked


@contextmanager
def exact_formula(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The forward every decomposition of ``model`` in ``dtype`` computes and verifies: the model's own, except that
    where it reads a parameter through a float32 cast (:func:`casts_parameters`) every cast to a less precise dtype
    keeps ``dtype`` (:class:`KeepPrecision`). ``with exact_formula(model, torch.float64): model(ids)`` is the
    reference to compare a decomposition or an absorbed model with."""
    with _formula(model, dtype):
        yield


def _formula(model: nn.Module, dtype: torch.dtype) -> KeepPrecision | nullcontext:
    """:func:`exact_formula`'s mode: :class:`KeepPrecision` where ``model`` casts a parameter, else nothing."""
    return KeepPrecision(dtype) if casts_parameters(model, dtype) else nullcontext()


@contextmanager
def computed_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Inside the block every forward of ``model``'s modules computes in ``dtype``, one module upcast at a time,
    in its :func:`exact_formula`."""
    with exact_formula(model, dtype), _upcast(model, dtype):
        yield


@contextmanager
def _upcast(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    plan = _upcast_plan(model, dtype)
    if plan is None:
        yield
        return
    replacements, lookups, chunked = plan
    cfg_dtype = None
    try:
        cfg_dtype = _set_cfg_dtype(model, dtype)  # TransformerLens builds masks and tables in cfg.dtype
        # on an accelerate-dispatched module: after its offload loaded the parameters
        with swapped_while_running(replacements, lookups), _chunked_forwards(chunked, dtype):
            yield
    finally:
        if cfg_dtype is not None:
            _set_cfg_dtype(model, cfg_dtype)


def _upcast_plan(model: nn.Module, dtype: torch.dtype) -> tuple[dict, list, list] | None:
    """What :func:`_upcast` swaps while each module runs: per module with parameters or floating buffers not in
    ``dtype``, its (and its :func:`_owners`') values upcast, for a table lookup its output cast, and the large
    projections computed in slices (:func:`_is_chunked`); ``None`` when every parameter is in ``dtype`` already."""
    if not needs_upcast(model, dtype):
        return None
    replacements, lookups, chunked = {}, [], []
    for module in model.modules():
        if not any(value.dtype != dtype for _, _, value in _floating(module)):  # a rotary table too, as in the copy
            continue
        if _is_lookup(module):
            lookups.append((module, "fwd", _cast_lookup(dtype)))
        elif _is_chunked(module):
            chunked.append(module)
        else:
            replacements[module] = partial(_upcast_values, module, dtype)
    return replacements, lookups, chunked


def _floating(module: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """The floating parameters and buffers of ``module``'s :func:`_owners`, as ``(owner, name, value)``."""
    return [(owner, name, value) for owner in _owners(module)
            for name, value in (*owner._parameters.items(), *owner._buffers.items())  # a bridge's lm_head bias
            if value is not None and value.is_floating_point()]  # is a buffer


def _upcast_values(module: nn.Module, dtype: torch.dtype) -> list[Replacement]:
    """The floating parameters and buffers of ``module``'s :func:`_owners` not in ``dtype``, upcast."""
    return [(owner, name, value.detach().to(dtype)) for owner, name, value in _floating(module)
            if value.dtype != dtype and not _is_chunked(owner)]  # a bridge's unembedding: its lm_head in slices


def _set_cfg_dtype(model: nn.Module, dtype: torch.dtype) -> torch.dtype | None:
    """Sets a TransformerLens model's ``cfg.dtype`` to ``dtype``; returns the one it replaced (``None``, and nothing
    set, for a model without one)."""
    cfg = getattr(model, "cfg", None)
    previous = getattr(cfg, "dtype", None)
    if not isinstance(previous, torch.dtype):
        return None
    cfg.dtype = dtype
    return previous


CHUNK_ELEMENTS = 1 << 24  # a projection with more weights than this computes in slices of at most this many


def _is_chunked(module: nn.Module) -> bool:
    """A large projection (in practice the unembedding) computed in slices of output rows instead of upcast whole:
    a plain ``nn.Linear``, or TransformerLens's ``Unembed``, with more than :data:`CHUNK_ELEMENTS` weights."""
    if type(module) is nn.Linear:
        return module.weight.numel() > CHUNK_ELEMENTS
    return (type(module).__name__ == "Unembed" and hasattr(module, "cfg") and isinstance(getattr(module, "W_U", None),
            Tensor) and {n for n, _ in module.named_children()} <= {"hook_in", "hook_out"}
            and module.W_U.numel() > CHUNK_ELEMENTS)


@contextmanager
def _chunked_forwards(modules: list[nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """While the block runs, each of ``modules`` computes its output in ``dtype`` slice by slice of output rows (at
    most :data:`CHUNK_ELEMENTS` upcast weights at a time); its own ``forward`` is back on any exit. On a module
    accelerate drives, its inner ``_old_forward`` is the one replaced (the hook has loaded the weights by then)."""
    saved = []
    try:
        for module in modules:
            attr = "_old_forward" if "_old_forward" in module.__dict__ else "forward"
            original = module.__dict__.get(attr)
            setattr(module, attr, partial(_chunked_forward, module, dtype))
            saved.append((module, attr, original))  # once set: what is put back is always there
    except BaseException:
        _put_back_forwards(saved)
        raise
    try:
        yield
    finally:
        _put_back_forwards(saved)


def _put_back_forwards(saved: list) -> None:
    for module, attr, original in reversed(saved):
        if original is None:
            del module.__dict__[attr]
        else:
            setattr(module, attr, original)


def _chunked_forward(module: nn.Module, dtype: torch.dtype, x: Tensor) -> Tensor:
    """``module(x)`` with its weight and bias upcast to ``dtype``, computed over slices of output rows: an
    ``nn.Linear``'s ``x W^T + b`` or an ``Unembed``'s ``x W_U + b_U`` (through its ``hook_in`` / ``hook_out``), each
    slice's weights upcast just for its own product."""
    linear = isinstance(module, nn.Linear)
    if hasattr(module, "hook_in"):  # an Unembed's (TransformerLens 3.9 on; an nn.Linear has none)
        x = module.hook_in(x)
    weight = module.weight if linear else module.W_U
    bias = module.bias if linear else module.b_U
    n_out, n_in = (weight.shape if linear else weight.shape[::-1])
    step = max(1, CHUNK_ELEMENTS // n_in)  # one row if a row exceeds it (n_in > 0: it is large)
    out = None
    for start in range(0, n_out, step):
        rows = slice(start, start + step)
        w = (weight[rows] if linear else weight[:, rows].T).to(dtype)
        b = None if bias is None else bias[rows].to(dtype)
        part = F.linear(x, w, b)
        if out is None:
            out = part.new_empty((*part.shape[:-1], n_out))
        out[..., rows] = part
    return module.hook_out(out) if hasattr(module, "hook_out") else out


def _owners(module: nn.Module) -> list[nn.Module]:
    """Whose parameters a module's forward reads: its own; for a module made only of leaf modules (an attention or
    MLP of projections) its children's too; and for a TransformerLens bridge component (which may reimplement the
    wrapped Hugging Face module's forward with its weights) the wrapped module's too; a bridge's attention or MLP
    reads its projections' weights before calling them (to match their dtype), so all of them."""
    wrapped = getattr(module, "original_component", None)
    if not isinstance(wrapped, nn.Module):
        children = list(module.children())
        if not module._parameters and children and not any(True for c in children for _ in c.children()):
            # an attention or MLP of leaf projections may read one's dtype before calling it (GLM-DSA's indexer:
            # ``weights_proj(h.to(weights_proj.weight.dtype))``): all of them, as the upcast copy has them
            return [module, *(c for c in children if not _is_lookup(c) and not _is_chunked(c))]
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
            rows = nn.Embedding.forward(module, args[0])  # the unscaled lookup
            # the scale as an upcast copy holds it: Gemma's buffer upcast, XGLM's Python float exact (not via float32)
            return rows.to(dtype) * torch.as_tensor(module.embed_scale, dtype=dtype)
        return output.to(dtype)

    return hook

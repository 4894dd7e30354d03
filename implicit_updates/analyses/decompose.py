"""``decompose(model, prompt)``: the context's effect on every block, as factored weight updates, and their proof."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from implicit_updates.adapters.assemble import run_patched_block
from implicit_updates.analyses.verify import BlockReport, VerifyReport
from implicit_updates.capture import BlockCapture
from implicit_updates.errors import NonFiniteActivationError, UnsupportedArchitectureError
from implicit_updates.math import core
from implicit_updates.math.updates import BlockUpdate, decompose_block
from implicit_updates.runtime.dispatch import forward_swapped, is_dispatched, loaded_parameter
from implicit_updates.runtime.inputs import as_model_inputs
from implicit_updates.runtime.precision import computed_in

HALF = (torch.float16, torch.bfloat16)


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run in eval mode without gradients, then restore every submodule's train/eval mode (on any exit)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def resolve_dtype(model: nn.Module, dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype to compute in: the model's, or the one asked for; half precision is upcast to float32 (warned)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError("dtype must be a torch floating dtype or its name, e.g. 'float32' or 'float64'")
    model_dtype = next(model.parameters()).dtype
    wanted = dtype or model_dtype
    if wanted in HALF:
        warnings.warn(
            f"{wanted} cannot resolve the rank-one updates (errors would be ~1e-3); computing in float32 (each "
            "module upcast while it runs). Pass dtype=torch.float64 for the tightest check.", stacklevel=3)
        wanted = torch.float32
    return wanted


def working_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model itself when it already computes in ``dtype``, else an upcast deep copy (the user's stays as is)."""
    if all(p.dtype == dtype for p in model.parameters()):  # a model of mixed dtypes computes in neither
        return model
    if is_dispatched(model):
        raise ValueError("this model is dispatched by accelerate (device_map, CPU or disk offload), and a deep copy "
                         "of it would copy meta tensors and hooks, not its weights: use upcast='stream' (the "
                         "default), which computes each module in the asked dtype while accelerate has it loaded")
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints "Changing model dtype"
        work = copy.deepcopy(model).to(dtype)
    if hasattr(work, "cfg") and hasattr(work.cfg, "dtype"):
        work.cfg.dtype = dtype
    return work


ABSORBED_INSTEAD = ("use `with implicit_updates.absorbed(model, prompt):`, which patches the model itself while "
                    "it runs")


def check_copy_is_its_own(model: nn.Module, twin: nn.Module, run: Callable[[], object],
                          instead: str = ABSORBED_INSTEAD) -> None:
    """Refuse a deep copy ``twin`` of ``model`` whose forward still reads ``model``'s parameters (a module whose
    patched forward holds the original's weights in a closure, as TransformerLens 4.3's Falcon bridge): a weight
    patch of the copy would then silently compute with the unpatched weights. ``run()`` runs the copy once (a
    one-token forward); every tensor an operation reads is compared, by storage, with ``model``'s parameters.
    Exact and generic: nothing is perturbed, and both models are left as they were."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    theirs = {_storage(p) for p in model.parameters()} - {None}
    if not theirs or twin is model:
        return
    read: list[bool] = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not read and any(isinstance(t, Tensor) and _storage(t) in theirs for t in tree_leaves((args, kwargs))):
                read.append(True)
            return func(*args, **(kwargs or {}))

    try:
        with torch.no_grad(), Reads():
            run()
    except Exception:
        if not read:  # a failure of its own: the caller's run would meet it anyway
            raise
    if read:
        raise UnsupportedArchitectureError(
            f"a deep copy of this {type(model).__name__} still computes with the original's weights (its forward "
            f"reads the parameters of the model it was copied from), so a patched copy would silently run "
            f"unpatched: {instead}")


def _storage(t: Tensor) -> int | None:
    """The address of ``t``'s storage (shared by every view of it), or None where it has none."""
    if t.device.type == "meta":
        return None
    try:
        return t.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None


@contextmanager
def prepared(model: nn.Module, prompt, blocks, dtype, upcast: str = "stream", remote: bool | str = False
             ) -> Iterator[tuple[object, list[int], Tensor]]:
    """Guard the user's model; yield its adapter (computing in ``dtype``), the checked block indices and inputs.

    ``upcast="stream"`` computes on the user's model itself, each module upcast only while it runs
    (:func:`implicit_updates.runtime.precision.computed_in`: no copy of the model); ``"copy"`` on an upcast deep copy
    (the whole-copy path, kept as a reference; both give the same numbers). ``adapter.compute_dtype`` is the dtype.
    An nnsight model is guarded through the torch model it wraps; its traces run where ``remote`` says.
    """
    if upcast not in ("stream", "copy"):
        raise ValueError(f"upcast must be 'stream' or 'copy', not {upcast!r}")
    module = torch_module(model)
    if upcast == "copy" and module is not model:
        raise ValueError("upcast='copy' deep-copies a torch model, not an nnsight one: use upcast='stream'")
    compute_dtype = resolve_dtype(module, dtype)
    with untouched(module):
        work = working_model(module, compute_dtype) if upcast == "copy" else module
        with computed_in(work, compute_dtype):
            adapter = adapter_for(model if work is module else work, remote)
            adapter.compute_dtype = compute_dtype
            inputs = as_model_inputs(adapter, prompt, compute_dtype)
            if work is not module:
                with untouched(work):
                    check_copy_is_its_own(module, work, lambda: adapter.logits(inputs[:1, -1:]),
                                          "use upcast='stream' (the default), which computes on the model itself")
            # the query-alone runs follow the model's own convention for this kind of input (a HookedTransformer
            # adds no positional embedding to continuous inputs), also where no with-context forward of ours ran
            adapter.continuous = inputs.is_floating_point()
            try:
                yield adapter, _block_indices(blocks, adapter.n_blocks), inputs
            except RuntimeError as err:
                own_dtype = next(module.parameters()).dtype
                if compute_dtype != own_dtype:
                    refuse_if_own_forward_fails(adapter, inputs, compute_dtype, own_dtype, err)
                raise


def refuse_if_own_forward_fails(adapter, inputs: Tensor, dtype: torch.dtype, own_dtype: torch.dtype,
                                err: RuntimeError) -> None:
    """After ``err`` inside our run in ``dtype`` (not the model's ``own_dtype``): if the model's own plain forward
    (no hooks of ours) fails on ``inputs`` in ``dtype`` too, the model cannot compute in that dtype at all: refuse in
    one line, quoting its first line. Otherwise return (the error is ours to show as it is)."""
    try:
        with untouched(adapter.model):
            adapter.logits(inputs)
    except Exception as own:  # noqa: BLE001 - any failure of the model's own forward is the model's, not ours
        first = (str(own).strip().splitlines() or [""])[0][:200]
        name = str(dtype).removeprefix("torch.")
        raise UnsupportedArchitectureError(
            f"this model's own forward fails in {name} ({type(own).__name__}: {first}), so nothing can be "
            f"decomposed in it: compute in the model's own dtype, {str(own_dtype).removeprefix('torch.')} "
            "(dtype=None; on the command line, leave out --dtype)") from err


def decompose_captures(captures: list[BlockCapture]) -> list[BlockUpdate]:
    """Check every capture is finite, then apply the core math to each block."""
    for c in captures:
        _check_finite(c)
    return [decompose_block(c) for c in captures]


def _dtype(adapter) -> torch.dtype:
    """The dtype the adapter's model computes in (upcast module by module, or an upcast copy's)."""
    return adapter.compute_dtype


def adapter_for(model: nn.Module, remote: bool | str = False):
    from implicit_updates.adapters import adapter_for as pick

    return pick(model, remote)


def torch_module(model) -> nn.Module:
    from implicit_updates.adapters import torch_module as unwrap

    return unwrap(model)


def decompose(
    model: nn.Module,
    prompt: str | Sequence[str] | Tensor,
    query: str = "last",
    blocks: int | Sequence[int] | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool | None = None,
    upcast: str = "stream",
    _absorb: bool = False,
    remote: bool | str = False,
) -> Decomposition:
    """Decompose the effect of the context on every block into exact rank-one MLP updates and output corrections.

    ``prompt``: text (needs the model's tokenizer), token ids ``[pos]``/``[batch, pos]``, or continuous residual
    inputs ``[batch, pos, d_model]`` fed at block 0. ``query="last"``: the last token is the query and every position
    i gets ``dW_i = W (m_i - m_x) m_x^T/||m_x||^2`` (Innocenti & Achour's all-position form); ``query="self"``: each
    position is its own query with the tokens before it as context. ``dtype`` computes in that dtype, each module
    upcast only while it runs (``upcast="stream"``, no copy of the model) or on an upcast deep copy (``"copy"``).
    The user's model is left bit-identical, without hooks, in its train/eval mode, on its device. ``remote``
    (nnsight models only): where the traces run, ``False`` (here), ``"local"`` (here, serialised as for a server)
    or ``True`` (NDIF).
    """
    if query not in ("last", "self"):
        raise ValueError(f"query must be 'last' or 'self', not {query!r}")
    with prepared(model, prompt, blocks, dtype, upcast, remote) as (adapter, block_ids, inputs):
        if inputs.shape[1] == 1:
            warnings.warn("one-token prompt: there is no context, so every update is exactly zero", stacklevel=2)
        with untouched(adapter.model):
            # the absorbed model sees the query token alone, so block 0 starts from its own embedding
            overrides = {0: adapter.embed_alone(inputs)} if _absorb else None
            captures = adapter.capture(inputs, block_ids, query, progress=progress, query_inputs=overrides)
        updates = decompose_captures(captures)
    return Decomposition(adapter, updates, query, _dtype(adapter), inputs)


class Decomposition:
    """Factored per-block, per-position updates; ``patch`` gives real parameter deltas, ``verify`` proves them."""

    def __init__(self, adapter, updates: list[BlockUpdate], query: str, dtype: torch.dtype, inputs: Tensor):
        self.adapter = adapter
        self.blocks = updates
        self.query = query
        self.dtype = dtype
        self.inputs = inputs
        self._by_block = {u.block: u for u in updates}

    @property
    def n_positions(self) -> int:
        return self.inputs.shape[1]

    def __repr__(self) -> str:
        from implicit_updates.views.html import decomposition_repr

        return decomposition_repr(self)

    def _repr_html_(self) -> str:  # notebooks: tokens shaded by each position's update size, a block selector
        from implicit_updates.views.html import decomposition_html

        return decomposition_html(self)

    def block(self, block: int) -> BlockUpdate:
        if block not in self._by_block:
            raise IndexError(f"block {block} was not decomposed; decomposed blocks: {sorted(self._by_block)}")
        return self._by_block[block]

    def _index(self, position: int, batch: int) -> tuple[int, int]:
        n, nb = self.n_positions, self.inputs.shape[0]
        if not -n <= position < n or not -nb <= batch < nb:
            raise IndexError(f"position {position} / batch {batch} out of range for {nb} x {n} positions")
        return position % n, batch % nb

    def patch(self, block: int, position: int = -1, batch: int = 0) -> dict[str, Tensor]:
        """``{parameter_name: delta}`` keyed like ``model.named_parameters()``, each shaped like its parameter.

        Adding them to a copy of the model (in this decomposition's dtype) and running ``copy.blocks[block]`` on
        ``query_input(block, position)`` reproduces the with-context block output at ``position``.
        """
        position, batch = self._index(position, batch)
        out: dict[str, Tensor] = {}
        for u in self.block(block).updates:  # one stacked-experts parameter may take one update per expert
            delta = u.dense(batch, position)
            out[u.name] = out[u.name] + delta if u.name in out else delta
        return out

    def query_input(self, block: int, position: int = -1, batch: int = 0) -> Float[Tensor, "1 1 d_model"]:
        """The residual block ``block`` is run on alone, shaped ``[1, 1, d_model]`` (one sequence of one token)."""
        position, batch = self._index(position, batch)
        x = self.block(block).query_input
        return x[batch, position if x.shape[1] > 1 else 0][None, None]

    def target_output(self, block: int, position: int = -1, batch: int = 0) -> Float[Tensor, " d_model"]:
        """The with-context output of block ``block`` at ``position`` (``hook_resid_post``), ``[d_model]``."""
        position, batch = self._index(position, batch)
        return self.block(block).target_output[batch, position]

    def verify(self, progress: bool | None = None, chunk_size: int = 512, literal_positions: int = 3) -> VerifyReport:
        """Run every block on its query alone with each position's updates applied, and compare with context.

        Two checks per block. Factored, at every position: the updates are added where the patched maps act
        (``(m . row) column``; no dense matrix). Literal, at ``literal_positions`` positions (the last, the factored
        check's worst, the largest output correction): the dense ``param + delta`` of :meth:`patch` swapped into the
        model and run through the model's own forward, so a parameter the block reads in more than one place (e.g. a
        norm used before and after the MLP) is patched everywhere it is read, as a real weight edit is. Reports per
        block the MSD, max absolute and relative errors (the worse of both checks), and the rank of the summed
        first-layer update (Innocenti & Achour: 1 for ``query="last"``).
        """
        reports = []
        with untouched(self.adapter.model), computed_in(self.adapter.model, self.dtype):
            for u in tqdm(self.blocks, desc="verify", disable=not progress, leave=False):
                outs = [run_patched_block(self.adapter, u, slice(s, s + chunk_size))
                        for s in range(0, self.n_positions, chunk_size)]
                patched = torch.cat(outs, dim=1)
                errors = core.reproduction_errors(patched, u.target_output)
                rel = core.relative_errors(patched, u.target_output)  # [batch, pos]
                literal = {at: self._literal_error(u.block, *at) for at in _literal_sites(u, rel, literal_positions)}
                worst = max([(float(rel.max()), _unravel(rel))] + [(e, at) for at, e in literal.items()])
                rank = max(u.summed_rank(b) for b in range(u.row.shape[0]))
                reports.append(BlockReport(
                    u.block, msd=errors["msd"], max_abs_err=errors["max_abs_err"], max_rel_err=worst[0], rank=rank,
                    factored_max_rel_err=errors["max_rel_err"], literal_max_rel_err=max(literal.values()),
                    literal_positions=tuple(sorted({i for _, i in literal})), worst_batch=worst[1][0],
                    worst_position=worst[1][1], position_rel_errs=tuple(float(e) for e in rel.max(0).values)))
        return VerifyReport(tuple(reports), self.n_positions, self.query, str(self.dtype).removeprefix("torch."))

    def _literal_error(self, block: int, batch: int, position: int) -> float:
        """Relative error of block ``block`` run by the model's own forward on the query alone, with the dense
        ``param + delta`` of :meth:`patch` in place of its parameters (restored afterwards)."""
        model = self.adapter.model
        edited = {name: loaded_parameter(model, name) + delta  # an offloaded module's weights loaded by accelerate
                  for name, delta in self.patch(block, position, batch).items()}
        with forward_swapped(model, edited):
            out = self.adapter.run_block_output(block, self.query_input(block, position, batch))[0, 0]
        return float(core.relative_errors(out, self.target_output(block, position, batch)))

    def computing(self):
        """A context in which the decomposed model computes in this decomposition's dtype (each module upcast while
        it runs), for running adapter-level code such as ``run_patched_block(self.adapter, ...)`` directly."""
        return computed_in(self.adapter.model, self.dtype)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The factors as numpy arrays, keyed ``"{block}/{parameter}/row|column|delta"`` (for ``np.savez``)."""
        out: dict[str, np.ndarray] = {}
        for u in self.blocks:
            out[f"{u.block}/query_input"] = u.query_input.cpu().numpy()
            out[f"{u.block}/delta_b"] = u.delta_b.cpu().numpy()
            for p in u.updates:
                for field in ("row", "column", "delta"):
                    if hasattr(p, field):
                        out[f"{u.block}/{p.name}/{field}"] = getattr(p, field).cpu().numpy()
        return out


def _literal_sites(update: BlockUpdate, rel: Tensor, count: int) -> list[tuple[int, int]]:
    """(batch, position) pairs for the literal check: the last position, the factored check's worst, the largest
    output correction, then evenly spread positions, ``count`` in all (at least one)."""
    batch, n = rel.shape
    sites = [(0, n - 1), _unravel(rel), _unravel(update.delta_b.norm(dim=-1))]
    sites += [(b, i) for i in torch.linspace(0, n - 1, max(count, 1)).long().tolist() for b in range(batch)]
    return list(dict.fromkeys(sites))[:max(count, 1)]


def _unravel(values: Tensor) -> tuple[int, int]:
    """(batch, position) of the largest entry of a ``[batch, pos]`` tensor."""
    flat = int(values.argmax())
    return flat // values.shape[1], flat % values.shape[1]


def _block_indices(blocks: int | Sequence[int] | None, n_blocks: int) -> list[int]:
    if blocks is None:
        return list(range(n_blocks))
    ids = [blocks] if isinstance(blocks, int) else list(blocks)
    if not ids:
        raise ValueError("blocks is empty; pass None for every block")
    bad = [b for b in ids if not -n_blocks <= b < n_blocks]
    if bad:
        raise IndexError(f"block index {bad} out of range for a model with {n_blocks} blocks (0..{n_blocks - 1})")
    return sorted({b % n_blocks for b in ids})


def _check_finite(capture: BlockCapture) -> None:
    for name in ("mlp_input", "query_mlp_input", "residual", "query_residual", "output"):
        t = getattr(capture, name)
        if not torch.isfinite(t).all():
            raise NonFiniteActivationError(
                f"block {capture.block}: {name} contains NaN or Inf; the model (or its inputs) produce non-finite "
                "activations here, so no update is defined. Check the weights and try dtype=torch.float64")

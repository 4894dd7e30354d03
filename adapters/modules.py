"""The adapter machinery shared by plain Hugging Face models and TransformerBridge: torch hooks on the model's own
modules, described per block by :class:`BlockParts`.

How a block runs on its query alone: decoder layers need what the model's forward builds before them (rotary
``position_embeddings``, attention masks, Gemma's per-layer-type masks), and its signature differs across
architectures and ``transformers`` versions. So the whole model runs on a one-token dummy input; a pre-hook on
layer l swaps in the query residual, and a hook after layer l saves its output and raises a private exception
that ends the forward. The model's own code thus computes everything for position 0, exactly as a one-token
prompt would, and layers after l never run. Every hook is removed on any exit (``module_hooks``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from implicit_updates.adapters.experts import Patch, eager_experts, read_flow, stacked_view
from implicit_updates.capture import BlockCapture, FirstLayerMap, OutputCorrection, captures_per_block
from implicit_updates.dispatch import execution_device, loaded_parameter, own_forward
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.hooks import module_hooks
from implicit_updates.updates import BlockUpdate, RankOneUpdate


@dataclass(frozen=True)
class BlockParts:
    """The modules of one decoder layer that the theory touches, and their parameter names (from a
    :class:`~implicit_updates.adapters.structure.BlockStructure`).

    ``mlp``: the module whose input is the MLP input m (the MLP, or its first map where the MLP has no module of
    its own). ``first``: (weight name, module) of each map reading m (``nn.Linear`` or GPT-2 ``Conv1D``).
    ``out``: the MLP's output projection; ``out_bias`` its bias name, or None (the correction is then a rank-one
    update of ``out_weight``). ``mlp_norm``: the norm whose output is m; the residual r the MLP output joins is its
    input (sequential blocks), the layer input plus the ``attention`` output (``parallel``), or m itself (no pre-MLP
    norm: OLMo 2's post-norm-only blocks). ``post_norm``: (scale name, norm) after the MLP (Gemma 2/3, OLMo 2),
    whose scale takes the correction. ``residual_scale``: s in ``y = r + s * post_norm(mlp(m))`` (Granite).
    """

    layer: nn.Module
    mlp: nn.Module
    first: tuple[tuple[str, nn.Module], ...]
    out: nn.Module
    out_weight: str
    out_bias: str | None
    attention: nn.Module
    mlp_norm: nn.Module | None
    post_norm: tuple[str, nn.Module] | None = None
    parallel: bool = False
    residual_scale: float = 1.0
    whole: bool = False  # an MLP located as a whole module (mixtures of experts): ``mlp`` is it, ``first`` empty


class _Stop(Exception):
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


class ModuleAdapter:
    """Same interface as ``HookedTransformerAdapter``; subclasses give ``parts`` (one :class:`BlockParts` per
    block), ``_forward(ids)`` (the model's own forward on token ids) and the model facts."""

    model: nn.Module
    parts: list[BlockParts]
    n_blocks: int

    def _forward(self, ids: Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def _final_logits(self, output) -> Tensor:
        return output if isinstance(output, Tensor) else output.logits

    @property
    def device(self) -> torch.device:
        return execution_device(self.model)  # accelerate-dispatched: where its hooks run the first layer

    # -- running ---------------------------------------------------------------------------------------------

    def _run(self, inputs: Tensor, hooks: list, stop_after: int | None = None):
        """Forward on token ids, or on residual inputs ``[batch, pos, d_model]`` swapped in at layer 0 (dummy ids).

        ``stop_after``: end the forward after that layer's output is computed (returns None then).
        """
        hooks = list(hooks)
        ids = inputs
        if inputs.is_floating_point():
            ids = torch.zeros(inputs.shape[:2], dtype=torch.long, device=inputs.device)
            hooks.insert(0, (self.parts[0].layer, "pre_kw", substitute(inputs)))  # before hooks that read it
        if stop_after is not None:
            hooks.append((self.parts[stop_after].layer, "fwd", _raise_stop))
        calls = getattr(self, "linear_calls", None)
        experts: set[nn.Module] = set()
        if calls is not None:  # fused experts: see and patch the linear calls inside whole MLPs (experts.py)
            calls.calls, calls.routing, calls.active = {}, {}, None
            for b in calls.params:
                p = self.parts[b]
                owners = {param.owner for param in calls.params[b] if param.current().dim() == 3}
                experts |= owners
                hooks += [(p.mlp, "pre", calls.enter(b)), (p.mlp, "fwd", calls.leave)]
                hooks += [(owner, "pre_kw", calls.save_routing(b)) for owner in owners]
        try:
            with module_hooks(hooks), eager_experts(experts), calls if calls is not None else contextlib.nullcontext():
                return self._forward(ids)
        except _Stop:
            return None

    def logits(self, inputs: Tensor) -> Tensor:
        """The model's logits ``[batch, pos, d_vocab]``."""
        return self._final_logits(self._run(inputs, []))

    def embed_alone(self, inputs: Tensor) -> Tensor:
        """Block 0's input when the model sees only the last token (at position 0): ``[batch, 1, d_model]``."""
        if inputs.is_floating_point():
            return inputs[:, -1:]
        store: dict[str, Tensor] = {}
        self._run(inputs[:, -1:], [(self.parts[0].layer, "pre_kw", _save_hidden(store, "x"))], stop_after=0)
        return store["x"]

    # -- capture ---------------------------------------------------------------------------------------------

    def _capturing(self, blocks: list[int], store: dict[str, Tensor]) -> list:
        hooks = []
        for b in blocks:
            p = self.parts[b]
            hooks += [(p.layer, "pre_kw", _save_hidden(store, f"{b}.resid_pre")),
                      (p.layer, "fwd", _save_output(store, f"{b}.resid_post")),
                      (p.mlp, "pre", _save_input(store, f"{b}.m")),
                      (p.attention, "fwd", _save_output(store, f"{b}.attn_out")),
                      (p.out, "fwd", _save_output(store, f"{b}.mlp_out"))]
            if p.mlp_norm is not None:
                hooks += [(p.mlp_norm, "pre", _save_input(store, f"{b}.r")),
                          (p.mlp_norm, "fwd", _save_output(store, f"{b}.mlp_norm_out"))]
            if p.post_norm is not None:
                hooks += [(p.post_norm[1], "pre", _save_input(store, f"{b}.h")),  # the MLP output
                          (p.post_norm[1], "fwd", _save_output(store, f"{b}.post_out"))]
            if (p.post_norm is not None or p.out_bias is None) and not p.whole:
                hooks.append((p.out, "pre", _save_input(store, f"{b}.hidden")))
        return hooks

    def _residual(self, store: dict[str, Tensor], b: int) -> Tensor:
        p = self.parts[b]
        if p.parallel:
            return store[f"{b}.resid_pre"] + store[f"{b}.attn_out"]  # (mlp + attn) + resid_pre
        if p.mlp_norm is not None:
            return store[f"{b}.r"]
        return store[f"{b}.m"]  # no pre-MLP norm: the MLP reads the residual itself

    def check_structure(self, store: dict[str, Tensor], b: int) -> None:
        """The data flow the block structure claims, checked on the with-context run: the MLP reads its norm's
        output, and the layer output is ``r + s * (post-norm of) the MLP output``. A block computing something else
        (post-LN, a join the structure does not describe) is refused here instead of decomposed wrongly."""
        p = self.parts[b]
        m, y = store[f"{b}.m"], store[f"{b}.resid_post"]
        if not (torch.isfinite(m).all() and torch.isfinite(y).all()):
            return  # non-finite activations: decompose names the block (NonFiniteActivationError)
        if p.mlp_norm is not None and not _close(store[f"{b}.mlp_norm_out"], m, m):
            raise UnsupportedArchitectureError(
                f"block {b} ({type(unwrap(p.layer)).__name__}): the MLP input is not the output of its pre-MLP norm "
                f"{type(unwrap(p.mlp_norm)).__name__} as the block structure says (a post-LN block?), so no exact "
                "update through it is known")
        added = p.residual_scale * store[f"{b}.post_out" if p.post_norm is not None else f"{b}.mlp_out"]
        r = self._residual(store, b)
        if not _close(r + added, y, r.abs() + added.abs()):
            where = "input + attention + MLP" if p.parallel else "residual + MLP"
            raise UnsupportedArchitectureError(
                f"block {b} ({type(unwrap(p.layer)).__name__}): its output is not {where} output"
                f"{f' x {p.residual_scale:g}' if p.residual_scale != 1 else ''} as the block structure says (a "
                "post-LN block, or a residual join this decomposition does not know), so no exact output correction "
                "is known")

    def capture(self, inputs: Tensor, blocks: list[int], query: str, progress: bool | None = None,
                query_inputs: dict[int, Tensor] | None = None) -> list[BlockCapture]:
        """With-context quantities of ``blocks`` in one forward, then each block on its query alone."""
        store: dict[str, Tensor] = {}
        self._run(inputs, self._capturing(blocks, store), stop_after=max(blocks))
        calls = getattr(self, "linear_calls", None)
        self.flows = {b: read_flow(calls.calls.get(b, []), calls.params[b], store[f"{b}.m"], calls.routing.get(b),
                                   b, self.parts[b].out_bias if self.parts[b].post_norm is None else None)
                      for b in blocks if self.parts[b].whole}
        self.flat_mlps = {b for b in blocks if store[f"{b}.m"].dim() == 2}  # OPT's MLP reads [batch * pos, d]
        _unflatten(store, store[f"{blocks[0]}.resid_pre"].shape[:2])
        for b in blocks:
            self.check_structure(store, b)
        return captures_per_block(self, store, lambda b: f"{b}.resid_pre", blocks, query, query_inputs, progress)

    def run_block_alone(self, block: int, query_input: Tensor, hooks: list | None = None) -> dict[str, Tensor]:
        """Run layer ``block`` on each query residual as its own one-token sequence; return its quantities."""
        store: dict[str, Tensor] = {}
        rows = rearrange(query_input, "b q d -> (b q) 1 d")
        all_hooks = [(self.parts[block].layer, "pre_kw", substitute(rows)), *self._capturing([block], store),
                     *(hooks or [])]
        dummy = torch.zeros(rows.shape[0], 1, dtype=torch.long, device=rows.device)
        self._run(dummy, all_hooks, stop_after=block)
        _unflatten(store, rows.shape[:2])
        return {k: rearrange(v, "(b q) 1 ... -> b q ...", b=query_input.shape[0]) for k, v in store.items()}

    def prefix_captures(self, inputs: Tensor, blocks: list[int], chunk_size: int = 64,
                        progress: bool | None = None) -> list[BlockCapture]:
        """One :class:`BlockCapture` per block whose N "positions" are the N prefixes ``[c_1..c_i, x]`` of the
        prompt ``inputs``, in one pass (:mod:`implicit_updates.adapters.module_prefixes`)."""
        from implicit_updates.adapters.module_prefixes import capture_prefixes

        return capture_prefixes(self, inputs, blocks, chunk_size, progress)

    def run_block_output(self, block: int, query_input: Tensor) -> Tensor:
        """Layer ``block``'s output on each query residual alone, run by the model's own code: ``[batch, q, d]``."""
        return self.run_block_alone(block, query_input)[f"{block}.resid_post"]

    def _block_capture(self, b: int, ctx: dict[str, Tensor], alone: dict[str, Tensor],
                       query_input: Tensor) -> BlockCapture:
        return BlockCapture(
            block=b, query_input=query_input, mlp_input=ctx[f"{b}.m"], query_mlp_input=alone[f"{b}.m"],
            residual=self._residual(ctx, b), query_residual=self._residual(alone, b),
            output=ctx[f"{b}.resid_post"], attention_output=ctx[f"{b}.attn_out"],
            query_attention_output=alone[f"{b}.attn_out"],
            maps=self._maps(b), correction=self._correction(b, ctx))

    def _maps(self, b: int) -> list[FirstLayerMap]:
        if not self.parts[b].whole:
            return [weight_view(name, module) for name, module in self.parts[b].first]
        return [FirstLayerMap(param.name, stacked_view(param.current().detach(), experts, transposed), transposed,
                              experts) for param, experts, transposed in self.flows[b].first]

    def _correction(self, b: int, ctx: dict[str, Tensor]) -> OutputCorrection:
        p = self.parts[b]
        scale = p.residual_scale
        if p.whole:
            return self._whole_correction(b, ctx)
        if p.post_norm is not None:
            norm, h = p.post_norm[1], ctx[f"{b}.h"]
            return OutputCorrection("scale", p.post_norm[0], normalized=normalized(norm, h), output_weight=p.out_weight,
                                    output_transposed=isinstance(unwrap(p.out), nn.Linear), hidden=ctx[f"{b}.hidden"],
                                    mlp_output=h, post_norm=partial(_run_post_norm, norm), residual_scale=scale)
        if p.out_bias is not None:
            return OutputCorrection("bias", p.out_bias, residual_scale=scale)
        # No bias (Llama, Gemma, Qwen): the output projection itself takes r_i - r_x as a rank-one update through
        # its input (the core's single-"expert" form with routing weight 1): W_out += (r_i - r_x) p_i^T/||p_i||^2.
        hidden = ctx[f"{b}.hidden"]
        return OutputCorrection("expert_out", names=(p.out_weight,), expert_hidden=(hidden,),
                                routing_weights=hidden.new_ones(*hidden.shape[:2], 1), residual_scale=scale)

    def _whole_correction(self, b: int, ctx: dict[str, Tensor]) -> OutputCorrection:
        """A whole MLP's output correction on its routed experts' output maps (or its one output map), through the
        hidden activations and routing weights its with-context calls showed (``experts.read_flow``)."""
        p, flow = self.parts[b], self.flows[b]
        if flow.output_bias is not None:
            return OutputCorrection("bias", flow.output_bias, residual_scale=p.residual_scale)
        leading = ctx[f"{b}.m"].shape[:-1]
        slots = tuple(range(flow.output_experts)) if flow.output_experts else (None,)
        width = next(iter(flow.hidden.values())).shape[-1]
        zero = flow.routing_weights.new_zeros(flow.routing_weights.shape[0], width)
        experts = dict(names=(flow.output.name,) * len(slots), expert_slots=slots, stacked_experts=flow.output_experts,
                       expert_hidden=tuple(flow.hidden.get(e, zero).reshape(*leading, -1) for e in slots),
                       routing_weights=flow.routing_weights.reshape(*leading, -1),
                       output_transposed=flow.output_transposed, residual_scale=p.residual_scale)
        if p.post_norm is None:
            return OutputCorrection("expert_out", **experts)
        norm, h = p.post_norm[1], ctx[f"{b}.h"]
        return OutputCorrection("scale", p.post_norm[0], normalized=normalized(norm, h), mlp_output=h,
                                post_norm=partial(_run_post_norm, norm), **experts)

    # -- verification ----------------------------------------------------------------------------------------

    def run_patched_block(self, update: BlockUpdate, positions: slice = slice(None)) -> Tensor:
        """Run the layer on the query alone with each position's updates added in factored form.

        ``W + outer(row, column)`` changes a map's output by ``(input . row) column``, added by a forward hook on
        the map's own module; with one query for all positions the layer runs on that one token and the MLP fans
        out to one row per position (attention runs once). Returns ``[batch, pos, d_model]``.
        """
        p = self.parts[update.block]
        if p.whole:
            return self._run_patched_whole(update, positions)
        batch, n_pos = update.target_output[:, positions].shape[:2]
        # one query for all positions: run it once and fan the MLP out (not where the MLP flattens its input)
        fan_out = update.query_input.shape[1] == 1 and update.block not in getattr(self, "flat_mlps", ())

        def rows(t: Tensor) -> Tensor:
            t = t if t.shape[1] == 1 else t[:, positions]
            return t if fan_out else rearrange(t.expand(batch, n_pos, *t.shape[2:]), "b n ... -> (b n) 1 ...")

        modules = {name: module for name, module in p.first} | {p.out_weight: p.out}
        hooks = []
        for u in update.updates:
            if isinstance(u, RankOneUpdate):
                hooks.append((modules[u.name], "fwd", _add_rank_one(rows(u.row), rows(u.column))))
            elif update.correction == "scale":
                hooks.append((p.post_norm[1], "fwd", _add_scaled(rows(u.delta), p.post_norm[1])))
            else:
                hooks.append((p.out, "fwd", _add(rows(u.delta))))
        x = update.query_input if fan_out else rows(update.query_input)  # [rows, 1, d_model] either way
        store: dict[str, Tensor] = {}
        hooks += [(p.layer, "pre_kw", substitute(x)), (p.layer, "fwd", _save_output(store, "out"))]
        self._run(torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device), hooks, stop_after=update.block)
        out = store["out"]
        return out if fan_out else rearrange(out, "(b n) 1 d -> b n d", b=batch)


    def _run_patched_whole(self, update: BlockUpdate, positions: slice) -> Tensor:
        """:meth:`run_patched_block` for a whole MLP: one position per forward, the factored updates added to its
        linear calls (an expert's rows are the tokens routed to it, so positions in one forward could not be told
        apart)."""
        p = self.parts[update.block]
        out = []
        for b in range(update.target_output.shape[0]):
            for i in range(update.target_output.shape[1])[positions]:
                def at(t: Tensor, b: int = b, i: int = i) -> Tensor:
                    return t[b, i if t.shape[1] > 1 else 0]

                patches: dict[str, list[Patch]] = {}
                hooks = []
                for u in update.updates:
                    if isinstance(u, RankOneUpdate):
                        patches.setdefault(u.name, []).append(Patch(at(u.row), at(u.column), u.experts, u.expert))
                    elif update.correction == "scale":  # the post-MLP norm's scale
                        hooks.append((p.post_norm[1], "fwd", _add_scaled(at(u.delta)[None, None], p.post_norm[1])))
                    else:  # the mixture's own output bias
                        hooks.append((p.out, "fwd", _add_first(at(u.delta)[None, None])))
                store: dict[str, Tensor] = {}
                hooks += [(p.layer, "pre_kw", substitute(at(update.query_input)[None, None])),
                          (p.layer, "fwd", _save_output(store, "out"))]
                self.linear_calls.patches = patches
                try:
                    self._run(torch.zeros(1, 1, dtype=torch.long, device=self.device), hooks, stop_after=update.block)
                finally:
                    self.linear_calls.patches = {}
                out.append(store["out"][0, 0])
        return torch.stack(out).reshape(update.target_output.shape[0], -1, out[0].shape[-1])


def _unflatten(store: dict[str, Tensor], leading: torch.Size) -> None:
    """Tensors an MLP saw flattened to ``[batch * pos, d]`` (OPT), back to ``[batch, pos, d]``."""
    for key, value in store.items():
        if value.dim() == 2:
            store[key] = value.reshape(*leading, value.shape[-1])


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` ``[rows, 1, d]`` shaped like a module's flattened ``[rows, d]`` input or output."""
    return t.reshape(*ref.shape[:-1], t.shape[-1]) if t.dim() != ref.dim() else t


def _raise_stop(module, args, output):
    raise _Stop


def _save_hidden(store: dict, key: str) -> Callable:
    def hook(module, args, kwargs):
        store[key] = hidden_states_arg(args, kwargs).detach()

    return hook


def _save_input(store: dict, key: str) -> Callable:
    def hook(module, args):
        store[key] = args[0].detach().clone()  # a copy: model code may modify it in place later

    return hook


def _save_output(store: dict, key: str) -> Callable:
    def hook(module, args, output):
        store[key] = first_tensor(output).detach().clone()  # Falcon adds attention into the MLP output in place

    return hook


def _close(a: Tensor, b: Tensor, size: Tensor) -> bool:
    """``a == b`` up to rounding: per position, ``||a - b|| <= 1e4 eps ||size||`` (size: the summands' scale)."""
    tol = 1e4 * torch.finfo(a.dtype).eps
    return bool(((a - b).norm(dim=-1) <= tol * size.norm(dim=-1) + torch.finfo(a.dtype).tiny).all())


@contextmanager
def _norm_params(norm: nn.Module, dtype: torch.dtype, weight: float | None = None) -> Iterator[nn.Module]:
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
    with _norm_params(norm, x.dtype, 0.0) as zero:
        base = own_forward(zero)(x)
    if torch.any(base != 0):  # (1 + weight) * z: at weight 0 the output is z itself
        return base
    with _norm_params(norm, x.dtype, 1.0) as one:
        return own_forward(one)(x)


def _run_post_norm(norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The post-MLP norm's ``(normalized, output)`` on ``x``, as the module computes them in ``x``'s dtype."""
    with _norm_params(norm, x.dtype) as upcast:
        return normalized(norm, x), own_forward(upcast)(x)


def _add_rank_one(row: Tensor, column: Tensor) -> Callable:
    """Forward hook adding ``(input . row) column``: a module's output under ``W + outer(row, column)``."""

    def hook(module, args, output: Tensor) -> Tensor:
        return output + (args[0] * _like(row, args[0])).sum(-1, keepdim=True) * _like(column, output)

    return hook


def _add(delta: Tensor) -> Callable:
    def hook(module, args, output: Tensor) -> Tensor:
        return output + _like(delta, output)

    return hook


def _add_first(delta: Tensor) -> Callable:
    """Forward hook adding ``delta`` to a module's output, or to the first tensor of a tuple output."""

    def hook(module, args, output):
        if isinstance(output, Tensor):
            return output + _like(delta, output)
        return (output[0] + _like(delta, output[0]), *output[1:])

    return hook


def _add_scaled(delta: Tensor, norm: nn.Module) -> Callable:
    def hook(module, args, output: Tensor) -> Tensor:
        return output + delta * normalized(norm, args[0])

    return hook

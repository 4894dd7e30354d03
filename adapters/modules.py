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
from dataclasses import dataclass
from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from implicit_updates.adapters.assemble import assemble
from implicit_updates.adapters.experts import Patch, eager_experts, read_flow, stacked_view
from implicit_updates.adapters.module_hooks import (
    Stop,
    add_first,
    add_scaled,
    close,
    edit_hooks,
    normalized,
    raise_stop,
    run_post_norm,
    save_hidden,
    save_input,
    save_output,
    substitute,
    unflatten,
    unwrap,
    weight_view,
)
from implicit_updates.capture import BlockCapture, FirstLayerMap, OutputCorrection
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.math.updates import RankOneUpdate
from implicit_updates.runtime.dispatch import execution_device
from implicit_updates.runtime.hooks import module_hooks


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

    @property
    def user_model(self) -> nn.Module:
        return self.model

    def left_as_found(self):
        """A context leaving the model as found after runs the adapter makes outside its own forward."""
        return contextlib.nullcontext()

    def rebind(self, model: nn.Module):
        """The same adapter over ``model`` (a patched copy; a bridge's copy drops hooks bound to the original)."""
        return type(self)(model)

    # -- optional capabilities (adapters/base.py) -----------------------------------------------------------------

    def output_shifts(self, vectors: dict[int, Tensor]):
        """A context adding ``vectors[b]`` to layer b's output while it is open (hooks removed on any exit)."""
        return module_hooks([(self.parts[b].layer, "fwd", add_first(v[None, None])) for b, v in vectors.items()])

    def continuation_systems(self, inputs: Tensor, blocks: list[int], k: int):
        """What each block's update over the last ``k`` tokens is solved from (:mod:`.module_continuation`)."""
        from implicit_updates.adapters.module_continuation import module_systems

        return module_systems(self, inputs, blocks, k)

    def attention_readable(self):
        """Eager attention while attribution runs (both captures), after checking every block can be read."""
        from implicit_updates.adapters.attribution_hf import check_supported_modules, eager_attention

        check_supported_modules(self)
        return eager_attention(self)

    def capture_attention(self, inputs: Tensor, blocks: list[int], query: str):
        from implicit_updates.adapters.attribution_hf import capture_modules

        return capture_modules(self, inputs, blocks, query)

    def peft_base(self) -> nn.Module:
        """The Hugging Face model a PEFT LoRA attaches to (a bridge's ``original_model``)."""
        return self.hf

    def cached_step(self, inputs: Tensor, cache: object | None):
        """The KV-cached forward of absorbed generation (:mod:`.module_generation`)."""
        from implicit_updates.adapters.module_generation import cached_step

        return cached_step(self, inputs, cache)

    def run_absorbing(self, token: Tensor, context: dict[str, Tensor], update_for, control: bool = True):
        """The absorbed and the control model on the token alone, in one batch (:mod:`.module_generation`)."""
        from implicit_updates.adapters.module_generation import run_absorbing

        return run_absorbing(self, token, context, update_for, control)

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
            hooks.append((self.parts[stop_after].layer, "fwd", raise_stop))
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
        except Stop:
            return None

    def logits(self, inputs: Tensor) -> Tensor:
        """The model's logits ``[batch, pos, d_vocab]``."""
        return self._final_logits(self._run(inputs, []))

    def embed_alone(self, inputs: Tensor) -> Tensor:
        """Block 0's input when the model sees only the last token (at position 0): ``[batch, 1, d_model]``."""
        if inputs.is_floating_point():
            return inputs[:, -1:]
        store: dict[str, Tensor] = {}
        self._run(inputs[:, -1:], [(self.parts[0].layer, "pre_kw", save_hidden(store, "x"))], stop_after=0)
        return store["x"]

    # -- capture ---------------------------------------------------------------------------------------------

    def _capturing(self, blocks: list[int], store: dict[str, Tensor]) -> list:
        hooks = []
        for b in blocks:
            p = self.parts[b]
            hooks += [(p.layer, "pre_kw", save_hidden(store, f"{b}.resid_pre")),
                      (p.layer, "fwd", save_output(store, f"{b}.resid_post")),
                      (p.mlp, "pre", save_input(store, f"{b}.m")),
                      (p.attention, "fwd", save_output(store, f"{b}.attn_out")),
                      (p.out, "fwd", save_output(store, f"{b}.mlp_out"))]
            if p.mlp_norm is not None:
                hooks += [(p.mlp_norm, "pre", save_input(store, f"{b}.r")),
                          (p.mlp_norm, "fwd", save_output(store, f"{b}.mlp_norm_out"))]
            if p.post_norm is not None:
                hooks += [(p.post_norm[1], "pre", save_input(store, f"{b}.h")),  # the MLP output
                          (p.post_norm[1], "fwd", save_output(store, f"{b}.post_out"))]
            if (p.post_norm is not None or p.out_bias is None) and not p.whole:
                hooks.append((p.out, "pre", save_input(store, f"{b}.hidden")))
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
        if p.mlp_norm is not None and not close(store[f"{b}.mlp_norm_out"], m, m):
            raise UnsupportedArchitectureError(
                f"block {b} ({type(unwrap(p.layer)).__name__}): the MLP input is not the output of its pre-MLP norm "
                f"{type(unwrap(p.mlp_norm)).__name__} as the block structure says (a post-LN block?), so no exact "
                "update through it is known")
        added = p.residual_scale * store[f"{b}.post_out" if p.post_norm is not None else f"{b}.mlp_out"]
        r = self._residual(store, b)
        if not close(r + added, y, r.abs() + added.abs()):
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
        unflatten(store, store[f"{blocks[0]}.resid_pre"].shape[:2])
        for b in blocks:
            self.check_structure(store, b)
        return assemble(self, store, lambda b: f"{b}.resid_pre", blocks, query, query_inputs, progress)

    def run_block_alone(self, block: int, query_input: Tensor, hooks: list | None = None) -> dict[str, Tensor]:
        """Run layer ``block`` on each query residual as its own one-token sequence; return its quantities."""
        store: dict[str, Tensor] = {}
        rows = rearrange(query_input, "b q d -> (b q) 1 d")
        all_hooks = [(self.parts[block].layer, "pre_kw", substitute(rows)), *self._capturing([block], store),
                     *(hooks or [])]
        dummy = torch.zeros(rows.shape[0], 1, dtype=torch.long, device=rows.device)
        self._run(dummy, all_hooks, stop_after=block)
        unflatten(store, rows.shape[:2])
        return {k: rearrange(v, "(b q) 1 ... -> b q ...", b=query_input.shape[0]) for k, v in store.items()}

    def prefix_captures(self, inputs: Tensor, blocks: list[int], chunk_size: int = 64,
                        progress: bool | None = None) -> list[BlockCapture]:
        """One :class:`BlockCapture` per block whose N "positions" are the N prefixes ``[c_1..c_i, x]`` of the
        prompt ``inputs``, in one pass (:mod:`implicit_updates.adapters.module_prefixes`)."""
        from implicit_updates.adapters.module_prefixes import capture_prefixes

        return capture_prefixes(self, inputs, blocks, chunk_size, progress)

    def suffix_runs(self, inputs: Tensor, block: int) -> dict:
        """Layer ``block`` on every suffix ``(c_{i+1..n}, x)`` of its with-context input sequence (Dherin et al.
        Appendix B), by the model's own forward (:mod:`implicit_updates.adapters.module_suffix`)."""
        from implicit_updates.adapters.module_suffix import suffix_runs

        return suffix_runs(self, inputs, block)

    def run_block_output(self, block: int, query_input: Tensor) -> Tensor:
        """Layer ``block``'s output on each query residual alone, run by the model's own code: ``[batch, q, d]``."""
        return self.run_block_alone(block, query_input)[f"{block}.resid_post"]

    def block_capture(self, b: int, ctx: dict[str, Tensor], alone: dict[str, Tensor],
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
                                    mlp_output=h, post_norm=partial(run_post_norm, norm), residual_scale=scale)
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
                                post_norm=partial(run_post_norm, norm), **experts)

    # -- verification ----------------------------------------------------------------------------------------

    def fans_out(self, block: int) -> bool:
        # not where the MLP flattens its input (OPT), nor where a whole MLP routes rows to experts by index
        return block not in getattr(self, "flat_mlps", ()) and not self.parts[block].whole

    def run_edited(self, block: int, rows: Tensor, edits: list) -> Tensor:
        """Layer ``block`` on the one-token rows ``[n, 1, d_model]`` with ``edits`` added by forward hooks on the
        maps' own modules (:func:`~.module_hooks.edit_hooks`)."""
        p = self.parts[block]
        if p.whole:
            return self._run_edited_whole(block, rows, edits)
        store: dict[str, Tensor] = {}
        hooks = [*edit_hooks(p, edits), (p.layer, "pre_kw", substitute(rows)),
                 (p.layer, "fwd", save_output(store, "out"))]
        self._run(torch.zeros(rows.shape[0], 1, dtype=torch.long, device=rows.device), hooks, stop_after=block)
        return store["out"]

    def _run_edited_whole(self, block: int, rows: Tensor, edits: list) -> Tensor:
        """:meth:`run_edited` for a whole MLP: one row per forward, the factored updates added to its linear calls
        (an expert's rows are the tokens routed to it, so rows in one forward could not be told apart)."""
        p = self.parts[block]
        out = []
        for r in range(rows.shape[0]):
            def at(t: Tensor, r: int = r) -> Tensor:  # row r's factor of the [n, 1, ...] edits
                return t[r, 0]

            patches: dict[str, list[Patch]] = {}
            hooks = []
            for u in edits:
                if isinstance(u, RankOneUpdate):
                    patches.setdefault(u.name, []).append(Patch(at(u.row), at(u.column), u.experts, u.expert))
                elif u.acts_as == "norm_scale":  # the post-MLP norm's scale
                    hooks.append((p.post_norm[1], "fwd", add_scaled(at(u.delta)[None, None], p.post_norm[1])))
                else:  # the mixture's own output bias
                    hooks.append((p.out, "fwd", add_first(at(u.delta)[None, None])))
            store: dict[str, Tensor] = {}
            hooks += [(p.layer, "pre_kw", substitute(rows[r : r + 1])), (p.layer, "fwd", save_output(store, "out"))]
            self.linear_calls.patches = patches
            try:
                self._run(torch.zeros(1, 1, dtype=torch.long, device=self.device), hooks, stop_after=block)
            finally:
                self.linear_calls.patches = {}
            out.append(store["out"])
        return torch.cat(out)



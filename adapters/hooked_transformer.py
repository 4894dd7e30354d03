"""TransformerLens ``HookedTransformer`` adapter: captures by the model's own hook points and modules.

The only code here that knows TransformerLens: it names the hook points and parameters the theory touches, runs
each block on its query-only input, and runs a block with factored updates added where the patched parameters act.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from implicit_updates.adapters.assemble import assemble
from implicit_updates.adapters.tl_common import POST_NORM_ARCHITECTURES, exact_alibi, expert_rows
from implicit_updates.capture import BlockCapture, FirstLayerMap, OutputCorrection
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.math.updates import AdditiveUpdate, RankOneUpdate
from implicit_updates.runtime.hooks import module_hooks


class HookPointCapture:
    """``capture`` and ``run_block_alone`` for models whose blocks carry TransformerLens hook points.

    Subclasses say which hooks save what (``_capturing``) and how to run the model up to a block (``_forward_to``).
    """

    model: nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def user_model(self) -> nn.Module:
        return self.model

    def rebind(self, model: nn.Module):
        """The same adapter over ``model`` (a patched copy)."""
        return type(self)(model)

    @property
    def d_model(self) -> int:
        return self.model.cfg.d_model

    def _capturing(self, blocks: list[int], store: dict[str, Tensor]):
        raise NotImplementedError

    def _forward_to(self, inputs: Tensor, stop: int) -> None:
        raise NotImplementedError

    def block_capture(self, b: int, ctx: dict[str, Tensor], alone: dict[str, Tensor],
                       query_input: Tensor) -> BlockCapture:
        raise NotImplementedError

    def capture(self, inputs: Tensor, blocks: list[int], query: str, progress: bool | None = None,
                query_inputs: dict[int, Tensor] | None = None) -> list[BlockCapture]:
        """With-context quantities of ``blocks`` in one forward, then each block on its query alone.

        ``query_inputs`` overrides a block's query-only input (the absorbed model starts block 0 from the query
        token's own embedding, at position 0).
        """
        store: dict[str, Tensor] = {}
        with self._capturing(blocks, store):
            self._forward_to(inputs, max(blocks) + 1)
        return assemble(self, store, lambda b: f"blocks.{b}.hook_resid_pre", blocks, query, query_inputs,
                                  progress)

    def run_block_alone(self, block: int, query_input: Tensor) -> dict[str, Tensor]:
        """Run block ``block`` on each query residual as its own one-token sequence; return its quantities."""
        store: dict[str, Tensor] = {}
        with self._capturing([block], store):
            self._run_alone(block, rearrange(query_input, "b q d -> (b q) 1 d"))
        batch = query_input.shape[0]
        return {k: rearrange(v, "(b q) 1 ... -> b q ...", b=batch) for k, v in store.items()
                if v.dim() >= 3}

    def _run_alone(self, block: int, rows: Tensor) -> Tensor:
        """Block ``block`` on ``rows`` ``[n, 1, d_model]``, each a one-token sequence at position 0."""
        return self.model.blocks[block](rows)

    def run_block_output(self, block: int, query_input: Tensor) -> Tensor:
        """Block ``block``'s output on each query residual alone, run by the model's own code: ``[batch, q, d]``."""
        return self.run_block_alone(block, query_input)[f"blocks.{block}.hook_resid_post"]


class HookedTransformerAdapter(HookPointCapture):
    """Adapter for ``transformer_lens.HookedTransformer`` (and ``HookedRootModule`` models with its hook names)."""

    backend = "HookedTransformer"
    capabilities = frozenset({"decompose", "copy", "absorbed", "attribution", "continuation", "prefix_onepass",
                              "suffix_removal", "generation"})
    limits = {"lora": "a PEFT LoRA attaches to Hugging Face modules, and this is not a Hugging Face model or a "
                      "TransformerBridge: apply the update with absorption.patched() (a copy with the weights edited)"}

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = model.cfg
        if cfg.attn_only:
            raise UnsupportedArchitectureError(
                "this model is attn_only: its blocks have no MLP, so there is no first-layer weight for the context "
                "to update; use a model with MLP blocks"
            )
        self.n_blocks = cfg.n_layers
        self.parallel = bool(cfg.parallel_attn_mlp)
        self.kind = type(model.blocks[0].mlp).__name__
        if self.kind not in ("MLP", "GatedMLP", "MoE"):
            raise UnsupportedArchitectureError(
                f"cannot decompose MLP type {self.kind}: supported are MLP, GatedMLP and MoE (quantized and "
                "gpt-oss MoE layers are not); dequantize the model or open an issue with the architecture"
            )
        self.output_norm = _output_norm(cfg, model.blocks[0])
        refuse_unexact_output_norm(cfg, model.blocks[0], self.output_norm)

    continuous = False  # the decomposed inputs are residuals fed at block 0 (set by each with-context forward)

    def _run_alone(self, block: int, rows: Tensor) -> Tensor:
        """Block ``block`` on one-token sequences ``rows`` ``[n, 1, d_model]``, as the model runs a one-token prompt
        of the decomposed kind: for token ids shortformer attention also reads position 0's embedding (it matters
        once attention sinks make a single key's score count); continuous inputs (``start_at_layer=0``) get no
        positional embedding from TransformerLens, so none here either."""
        if self.model.cfg.positional_embedding_type != "shortformer" or self.continuous:
            return self.model.blocks[block](rows)
        position_0 = self.model.pos_embed(torch.zeros(rows.shape[:2], dtype=torch.long, device=rows.device))
        return self.model.blocks[block](rows, shortformer_pos_embed=position_0.to(rows.dtype))

    def embed_alone(self, inputs: Tensor) -> Tensor:
        """Block 0's input when the model sees only the last token (at position 0): ``[batch, 1, d_model]``."""
        if inputs.is_floating_point():
            return inputs[:, -1:]
        return self.model(inputs[:, -1:], stop_at_layer=0)

    def logits(self, inputs: Tensor) -> Tensor:
        """The model's logits ``[batch, pos, d_vocab]``."""
        with exact_alibi(self.model):
            if inputs.is_floating_point():
                return self.model(inputs, start_at_layer=0)
            return self.model(inputs)

    # -- capture ---------------------------------------------------------------------------------------------------

    def _hook_names(self, block: int) -> list[str]:
        p = f"blocks.{block}"
        names = [f"{p}.hook_resid_pre", f"{p}.hook_attn_out", f"{p}.hook_mlp_out", f"{p}.hook_resid_post"]
        if not self.parallel:
            names.append(f"{p}.hook_resid_mid")
        if self.output_norm:
            names.append(f"{p}.{self.output_norm}.hook_normalized")
            if self.kind != "MoE":  # a mixture's hidden activations are its experts' hook_post
                names.append(f"{p}.mlp.hook_post")
        if self.kind == "MoE":
            names += [f"{p}.mlp.hook_expert_weights", f"{p}.mlp.hook_expert_indices"]
            names += [f"{p}.mlp.experts.{e}.hook_post" for e in range(self.model.cfg.num_experts)]
        return names

    def _capturing(self, blocks: list[int], store: dict[str, Tensor]) -> ExitStack:
        """Hooks that save every quantity of ``blocks`` into ``store``; removed when the stack closes."""

        def save(act: Tensor, hook) -> None:
            store[hook.name] = act.detach()

        def save_input(name: str) -> Callable:
            def pre_hook(module, args):
                store[name] = args[0].detach()

            return pre_hook

        def save_output(name: str) -> Callable:
            def hook(module, args, output):
                store[name] = output.detach()

            return hook

        stack = ExitStack()
        stack.enter_context(exact_alibi(self.model))
        stack.enter_context(self.model.hooks(fwd_hooks=[(n, save) for b in blocks for n in self._hook_names(b)]))
        # ln2's hook_normalized is taken before ln2's weight and bias, so the MLP input is read off the MLP itself;
        # the MLP output before a post-MLP norm has no hook point either.
        torch_hooks = [(self.model.blocks[b].mlp, "pre", save_input(f"blocks.{b}.mlp.input")) for b in blocks]
        if self.output_norm:
            torch_hooks += [(self.model.blocks[b].mlp, "fwd", save_output(f"blocks.{b}.mlp.output")) for b in blocks]
        stack.enter_context(module_hooks(torch_hooks))
        return stack

    # -- what the input checks need ----------------------------------------------------------------------------

    @property
    def d_vocab(self) -> int:
        return self.model.cfg.d_vocab

    @property
    def n_ctx(self) -> int | None:
        """Longest prompt the positions support: absolute position tables and TransformerLens's rotary sin/cos tables
        stop at ``n_ctx``; ALiBi's table is built for any length (None: no limit)."""
        return None if self.model.cfg.positional_embedding_type == "alibi" else self.model.cfg.n_ctx

    def tokenize(self, text: str) -> Tensor:
        if getattr(self.model, "tokenizer", None) is None:
            raise ValueError("this model has no tokenizer: pass token ids (a LongTensor) instead of text")
        return self.model.to_tokens(text)[0]

    # -- capture -----------------------------------------------------------------------------------------------

    def _forward_to(self, inputs: Tensor, stop: int) -> None:
        self.continuous = inputs.is_floating_point()  # the query-alone runs then follow the same convention
        if self.continuous:
            self.model(inputs, start_at_layer=0, stop_at_layer=stop)
        else:
            self.model(inputs, stop_at_layer=stop)

    def _residual(self, store: dict[str, Tensor], block: int) -> Tensor:
        p = f"blocks.{block}"
        if self.parallel:  # GPT-J/NeoX: resid_post = (resid_pre + attn_out) + mlp_out
            return store[f"{p}.hook_resid_pre"] + store[f"{p}.hook_attn_out"]
        return store[f"{p}.hook_resid_mid"]

    def block_capture(self, b: int, ctx: dict[str, Tensor], alone: dict[str, Tensor],
                       query_input: Tensor) -> BlockCapture:
        p = f"blocks.{b}"
        return BlockCapture(
            block=b,
            query_input=query_input,
            mlp_input=ctx[f"{p}.mlp.input"],
            query_mlp_input=alone[f"{p}.mlp.input"],
            residual=self._residual(ctx, b),
            query_residual=self._residual(alone, b),
            output=ctx[f"{p}.hook_resid_post"],
            attention_output=ctx[f"{p}.hook_attn_out"],
            query_attention_output=alone[f"{p}.hook_attn_out"],
            maps=self._first_layer_maps(b),
            correction=self._correction(b, ctx),
        )

    def _first_layer_maps(self, b: int) -> list[FirstLayerMap]:
        p, mlp = f"blocks.{b}.mlp", self.model.blocks[b].mlp
        if self.kind == "MLP":
            return [FirstLayerMap(f"{p}.W_in", mlp.W_in)]
        if self.kind == "GatedMLP":
            return [FirstLayerMap(f"{p}.W_gate", mlp.W_gate), FirstLayerMap(f"{p}.W_in", mlp.W_in)]
        maps = [FirstLayerMap(f"{p}.W_gate.weight", mlp.W_gate.weight.T, transposed=True)]
        for e, expert in enumerate(mlp.experts):
            for lin in ("W_gate", "W_in"):
                maps.append(FirstLayerMap(f"{p}.experts.{e}.{lin}.weight", getattr(expert, lin).weight.T, True))
        return maps

    def _correction(self, b: int, ctx: dict[str, Tensor]) -> OutputCorrection:
        p = f"blocks.{b}"
        experts = self._experts(b, ctx) if self.kind == "MoE" else {}
        if self.output_norm:
            norm = getattr(self.model.blocks[b], self.output_norm)
            if hasattr(norm, "b"):  # LayerNorm after the MLP: its bias takes the difference directly
                return OutputCorrection("bias", f"{p}.{self.output_norm}.b")
            hidden = None if experts else ctx[f"{p}.mlp.hook_post"]
            return OutputCorrection("scale", f"{p}.{self.output_norm}.w",
                                    normalized=ctx[f"{p}.{self.output_norm}.hook_normalized"],
                                    output_weight=f"{p}.mlp.W_out", output_bias=f"{p}.mlp.b_out", hidden=hidden,
                                    mlp_output=ctx[f"{p}.mlp.output"], post_norm=partial(_run_norm, norm), **experts)
        if self.kind != "MoE":
            return OutputCorrection("bias", f"{p}.mlp.b_out")
        return OutputCorrection("expert_out", **experts)

    def _experts(self, b: int, ctx: dict[str, Tensor]) -> dict:
        """A mixture's expert output matrices, each expert's hidden activation per token (zero where not routed)
        and the routing weights: the ``names``/``expert_hidden``/``routing_weights`` of an ``OutputCorrection``."""
        p, mlp = f"blocks.{b}", self.model.blocks[b].mlp
        batch, pos = ctx[f"{p}.hook_resid_pre"].shape[:2]
        indices = ctx[f"{p}.mlp.hook_expert_indices"]
        weights = self._routing_weights(mlp, ctx[f"{p}.mlp.hook_expert_weights"], indices,
                                        ctx[f"{p}.hook_resid_pre"].dtype)
        hidden = []
        for e in range(mlp.num_experts):
            rows = expert_rows(indices, e, mlp.num_experts)
            h = ctx[f"{p}.hook_resid_pre"].new_zeros(batch * pos, mlp.d_mlp)
            if rows.numel():
                h[rows] = ctx[f"{p}.mlp.experts.{e}.hook_post"]
            hidden.append(h.view(batch, pos, -1))
        return dict(names=tuple(f"{p}.mlp.experts.{e}.W_out.weight" for e in range(mlp.num_experts)),
                    expert_hidden=tuple(hidden), routing_weights=weights.view(batch, pos, -1))

    @staticmethod
    def _routing_weights(mlp, probs: Tensor, indices: Tensor, dtype: torch.dtype) -> Tensor:
        """The weight each expert's output gets per token (zero when not routed), as TransformerLens's MoE."""
        top = probs.gather(-1, indices)
        if mlp.cfg.norm_topk_prob:
            top = top / top.sum(-1, keepdim=True)
        return torch.zeros(probs.shape, dtype=dtype, device=probs.device).scatter(-1, indices, top.to(dtype))

    # -- optional capabilities (adapters/base.py) -------------------------------------------------------------------

    def prefix_captures(self, inputs: Tensor, blocks: list[int], chunk_size: int = 64,
                        progress: bool | None = None) -> list[BlockCapture]:
        """Every prefix in one pass: the context with TransformerLens's KV cache, the query paths as one batch."""
        from implicit_updates.adapters.hooked_prefixes import capture_prefixes

        return capture_prefixes(self, inputs, blocks, chunk_size=chunk_size, progress=progress)

    def output_shifts(self, vectors: dict[int, Tensor]):
        """A context adding ``vectors[b]`` to block b's output (``hook_resid_post``) while it is open."""
        return self.model.hooks(fwd_hooks=[(f"blocks.{b}.hook_resid_post", partial(_shifted, v))
                                           for b, v in vectors.items()])

    def continuation_systems(self, inputs: Tensor, blocks: list[int], k: int):
        """What each block's update over the last ``k`` tokens is solved from (:mod:`.hooked_continuation`)."""
        from implicit_updates.adapters.hooked_continuation import hooked_systems

        return hooked_systems(self, inputs, blocks, k)

    def cached_step(self, inputs: Tensor, cache: object | None):
        """The KV-cached forward of absorbed generation, on TransformerLens's cache (:mod:`.hooked_generation`)."""
        from implicit_updates.adapters.hooked_generation import cached_step

        return cached_step(self, inputs, cache)

    def run_absorbing(self, token: Tensor, context: dict[str, Tensor], update_for, control: bool = True):
        """The absorbed and the control model on the token alone, in one batch (:mod:`.hooked_generation`)."""
        from implicit_updates.adapters.hooked_generation import run_absorbing

        return run_absorbing(self, token, context, update_for, control)

    def attention_readable(self):
        from implicit_updates.adapters.attribution_hooks import check_hooked

        check_hooked(self)
        return contextlib.nullcontext()

    def capture_attention(self, inputs: Tensor, blocks: list[int], query: str):
        from implicit_updates.adapters.attribution_hooks import HookedAttention, check_hooked

        check_hooked(self)
        return HookedAttention(self).capture(inputs, blocks, query)

    def suffix_runs(self, inputs: Tensor, block: int) -> dict:
        """Block ``block`` run alone on each suffix ``(c_{i+1..n}, x)`` of its with-context input sequence (Dherin et
        al. Appendix B): per suffix the query's MLP input and residual, the maps, and the full run's correction.
        Truncating the sequence keeps relative positions (rotary, ALiBi, none); absolute positions are already in
        the residual; shortformer positions are re-added to keys by each block, so they are refused."""
        if self.model.cfg.positional_embedding_type == "shortformer":
            raise UnsupportedArchitectureError(
                "shortformer positions are added to each block's keys, not to its input, so a truncated input "
                "sequence would lose them; suffix removal supports rotary, ALiBi, absolute and no positions")
        if self.kind == "MoE":
            raise UnsupportedArchitectureError(
                "a mixture of experts routes on the MLP input, which suffix removal changes step by step, so its "
                "experts' outputs are not reproduced by first-layer updates")
        stop = dict(start_at_layer=0) if inputs.is_floating_point() else {}
        sequence = self.model(inputs, stop_at_layer=block, **stop) if block > 0 or not stop else inputs
        runs = []
        for i in range(inputs.shape[1]):
            store: dict[str, Tensor] = {}
            with self._capturing([block], store):
                out = self.model.blocks[block](sequence[:, i:])
            residual = self._residual(store, block)
            store = {k: v[:, -1:] if v.dim() >= 3 else v for k, v in store.items()}
            runs.append({"mlp_input": store[f"blocks.{block}.mlp.input"][0, -1], "residual": residual[0, -1],
                         "output": out[0, -1], "store": store})
        return {"sequence": sequence, "runs": runs, "maps": self._first_layer_maps(block),
                "correction": self._correction(block, runs[0]["store"])}

    # -- verification ----------------------------------------------------------------------------------------------

    def fans_out(self, block: int) -> bool:
        return self.kind != "MoE"  # a mixture of experts routes rows by index

    def run_edited(self, block: int, rows: Tensor, edits: list) -> Tensor:
        """Block ``block`` on the one-token rows ``[n, 1, d_model]`` with ``edits`` applied (:meth:`edit_hooks`)."""
        live: dict[str, Tensor] = {}
        hook_points, torch_hooks = self.edit_hooks(block, edits, live)
        mlp = self.model.blocks[block].mlp
        torch_hooks.insert(0, (mlp, "pre", lambda module, args: live.__setitem__("m", args[0])))
        with self.model.hooks(fwd_hooks=hook_points), module_hooks(torch_hooks), exact_alibi(self.model):
            return self._run_alone(block, rows)

    def edit_hooks(self, block: int, edits: list[RankOneUpdate | AdditiveUpdate], live: dict[str, Tensor]
                   ) -> tuple[list[tuple[str, Callable]], list[tuple[nn.Module, str, Callable]]]:
        """The hooks adding ``edits`` (``BlockUpdate.edits``: factors shaped for the rows) to block ``block``, as the
        literal weight edits act: hook-point hooks ``(name, fn)`` for ``model.hooks`` and torch hooks ``(module,
        kind, fn)`` for ``module_hooks``.

        A rank-one ``W + outer(row, column)`` adds ``(m . row) column`` where the map's output appears (``m``: the
        MLP input, which the caller puts in ``live["m"]`` before the MLP runs); a post-MLP norm's scale change adds
        ``delta * z`` to the MLP output (``z`` its normalized input, recorded into ``live`` by these hooks); a bias
        adds ``delta``. Shared by the patched block run (``run_edited``) and absorbed generation's absorbing forward
        (:mod:`.hooked_generation`), which registers them at the MLP input, once the update is known."""
        p = f"blocks.{block}"
        hook_points: list[tuple[str, Callable]] = []
        torch_hooks: list[tuple[nn.Module, str, Callable]] = []
        mlp = self.model.blocks[block].mlp
        if self.output_norm:
            hook_points.append((f"{p}.{self.output_norm}.hook_normalized",
                                lambda act, hook: live.__setitem__("z", act)))
        if self.kind == "MoE":
            hook_points.append((f"{p}.mlp.hook_expert_indices", lambda act, hook: live.__setitem__("idx", act)))

        for u in edits:
            if isinstance(u, RankOneUpdate) and u.name == f"{p}.mlp.W_out":  # flattening before a post-MLP norm
                hook_points.append((f"{p}.mlp.hook_post", lambda act, hook: live.__setitem__("p", act)))
                torch_hooks.append((mlp, "fwd", _add_rank_one_at_output(live, u.row, u.column)))
            elif isinstance(u, RankOneUpdate):
                site = self._site(u.name)
                if isinstance(site, str):
                    hook_points.append((site, _add_rank_one_at_hook(live, u.row, u.column)))
                else:
                    module, expert = site
                    row, column = (rearrange(t, "r 1 d -> r d") for t in (u.row, u.column))
                    torch_hooks.append((module, "fwd", _add_rank_one_at_linear(live, row, column, expert, mlp)))
            elif u.name == f"{p}.mlp.b_out" and self.output_norm:  # the MLP's own bias: before the norm after it
                torch_hooks.append((mlp, "fwd", _add_at_output(u.delta)))
            else:  # hook_mlp_out: the MLP's output, or the output norm's (whose scale moves it by delta * z)
                hook_points.append((f"{p}.hook_mlp_out", _add_output_correction(live, u.delta,
                                                                                 u.acts_as == "norm_scale")))
        return hook_points, torch_hooks

    def _site(self, name: str):
        """Where a parameter's map output appears: a hook point name, or (nn.Linear module, expert index)."""
        module_path, param = name.rsplit(".", 1)
        if self.kind == "MLP":
            return f"{module_path}.hook_pre"
        if self.kind == "GatedMLP":
            return f"{module_path}.hook_pre" if param == "W_gate" else f"{module_path}.hook_pre_linear"
        module = self.model.get_submodule(module_path)
        parts = module_path.split(".")
        expert = int(parts[parts.index("experts") + 1]) if "experts" in parts else None
        return module, expert


def refuse_unexact_output_norm(cfg, block: nn.Module, output_norm: str | None) -> None:
    """Raise where a norm after the MLP admits no exact correction here (each refusal says why)."""
    if output_norm == "ln2" and cfg.parallel_attn_mlp:
        raise UnsupportedArchitectureError(
            "this post-norm block with parallel attention + MLP reads ln2 both before and after the MLP (its input "
            "and its output norm): patching ln2 to absorb the context would also move the MLP's input, so no "
            "rank-one first-layer update stays exact; no released model has this structure")
    if output_norm and cfg.use_normalization_before_and_after and cfg.original_architecture in POST_NORM_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            "this post-norm block also has use_normalization_before_and_after: two norms after the MLP (ln2_post, "
            "then ln2), and flattening the MLP output through the first one is not implemented; no released model "
            "has this structure")
    if output_norm and not hasattr(getattr(block, output_norm), "w"):
        raise UnsupportedArchitectureError(
            f"the norm after the MLP ({output_norm}, {type(getattr(block, output_norm)).__name__}) has no learnable "
            "scale or bias: its output always has unit size, so no parameter can add the residual difference the "
            "context makes; if the model's norms were folded, load it with fold_ln=False")


def _output_norm(cfg, block: nn.Module) -> str | None:
    """The norm after the MLP: ``ln2_post`` (Gemma 2/3), ``ln2`` in post-norm blocks (OLMo 2), or None; an
    ``Identity`` there (no normalization) is no norm, and the MLP's own output bias takes the correction."""
    name = "ln2_post" if cfg.use_normalization_before_and_after else "ln2" if (
        cfg.original_architecture in POST_NORM_ARCHITECTURES) else None
    if name is None or isinstance(getattr(block, name), nn.Identity):
        return None
    return name


def _run_norm(norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """A TransformerLens norm's ``(hook_normalized, output)`` on ``x``, computed by the module itself."""
    seen: dict[str, Tensor] = {}
    with module_hooks([(norm.hook_normalized, "fwd", lambda module, args, out: seen.__setitem__("z", out))]):
        out = norm(x)
    return seen["z"], out


def _add_rank_one_at_hook(live: dict, row: Tensor, column: Tensor) -> Callable:
    """Hook adding ``(m . row) column`` to a map's output, ``m`` being the MLP input of this same run."""

    def hook(act: Tensor, hook) -> Tensor:  # act [rows, 1, d_out] fans out to [rows, fan, d_out]
        return act + (live["m"] * row).sum(-1, keepdim=True) * column

    return hook


def _add_rank_one_at_output(live: dict, row: Tensor, column: Tensor) -> Callable:
    """Forward hook on the MLP: ``W_out + outer(row, column)`` adds ``(p . row) column``, ``p`` its hidden."""

    def hook(module, args, out: Tensor) -> Tensor:
        return out + (live["p"] * row).sum(-1, keepdim=True) * column

    return hook


def _add_at_output(delta: Tensor) -> Callable:
    """Forward hook on the MLP: its output bias plus ``delta``."""

    def hook(module, args, out: Tensor) -> Tensor:
        return out + delta

    return hook


def _add_output_correction(live: dict, delta: Tensor, scale: bool) -> Callable:
    """Hook on the MLP output: a bias patch adds ``delta``; a post-norm scale patch adds ``delta * z``."""

    def hook(act: Tensor, hook) -> Tensor:
        return act + (delta * live["z"] if scale else delta)

    return hook


def _add_rank_one_at_linear(live: dict, row: Tensor, column: Tensor, expert: int | None, mlp) -> Callable:
    """Forward hook on an ``nn.Linear``; an expert's rows are the tokens routed to it, in the MoE's own order."""

    def hook(module, args, out: Tensor) -> Tensor:
        inp = args[0]
        if expert is None:
            rows = torch.arange(inp.shape[0], device=inp.device)
        else:
            rows = expert_rows(live["idx"], expert, mlp.num_experts)
        return out + (inp * row[rows]).sum(-1, keepdim=True) * column[rows]

    return hook


def _shifted(vector: Tensor, act: Tensor, hook) -> Tensor:
    return act + vector.to(act.dtype)

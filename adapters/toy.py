"""Adapter for :class:`implicit_updates.models.toy.ToyTransformer`, the seed papers' own model (same interface as
:class:`~implicit_updates.adapters.hooked_transformer.HookedTransformerAdapter`).

It captures by the toy model's hook points; the first-layer map is ``mlp.layers.0.weight`` (an ``nn.Linear``, so
stored transposed) and the output correction goes to the MLP's last bias, or nowhere for a block without the MLP
skip connection (Dherin et al. Sec. 4: the first-layer update alone is exact there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from torch import Tensor

from implicit_updates.adapters.hooked_transformer import (
    HookPointCapture,
    _add_output_correction,
    _add_rank_one_at_hook,
)
from implicit_updates.capture import BlockCapture, FirstLayerMap, OutputCorrection
from implicit_updates.math.updates import RankOneUpdate
from implicit_updates.models.toy import ToyTransformer

HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "hook_resid_post")


class ToyAdapter(HookPointCapture):
    """Runs a :class:`ToyTransformer` with context and each block on its query alone; patches in factored form."""

    backend = "toy"
    capabilities = frozenset({"decompose", "copy", "absorbed", "attribution", "prefix_onepass", "suffix_removal"})
    limits = {
        "continuation": "a continuation is token ids, and the toy model reads continuous inputs",
        "lora": "a PEFT LoRA attaches to Hugging Face modules",
        "generation": "generation emits token ids, and the toy model reads continuous inputs",
    }

    def __init__(self, model: ToyTransformer):
        self.model = model
        self.n_blocks = model.cfg.n_layers
        self.n_ctx = None  # no positional encoding: any length

    @property
    def d_vocab(self) -> int:  # the "logits" are the last block's residual output
        return self.model.cfg.d_model

    def tokenize(self, text: str) -> Tensor:
        raise ValueError("the toy model reads continuous tokens: pass a float tensor [batch, pos, d_model]")

    def _continuous(self, inputs: Tensor) -> Tensor:
        if not inputs.is_floating_point():
            raise ValueError("the toy model has no embedding: pass continuous tokens [batch, pos, d_model], "
                             "not token ids")
        return inputs

    def embed_alone(self, inputs: Tensor) -> Tensor:
        """Block 0's input for the query token alone: the token itself (no embedding, no positions)."""
        return self._continuous(inputs)[:, -1:]

    def logits(self, inputs: Tensor) -> Tensor:
        """The residual after the last block, ``[batch, pos, d_model]`` (its last coordinate is the prediction)."""
        return self.model(self._continuous(inputs))

    # -- capture -------------------------------------------------------------------------------------------------

    def _capturing(self, blocks: list[int], store: dict[str, Tensor]):
        def save(act: Tensor, hook) -> None:
            store[hook.name] = act.detach()

        return self.model.hooks(fwd_hooks=[(f"blocks.{b}.{h}", save) for b in blocks for h in HOOKS])

    def _forward_to(self, inputs: Tensor, stop: int) -> None:
        self.model(self._continuous(inputs), stop_at_layer=stop)

    def block_capture(self, b: int, ctx: dict[str, Tensor], alone: dict[str, Tensor],
                       query_input: Tensor) -> BlockCapture:
        p, mlp = f"blocks.{b}", self.model.blocks[b].mlp
        last = len(mlp.layers) - 1
        correction = (OutputCorrection("bias", f"{p}.mlp.layers.{last}.bias") if self.model.cfg.mlp_skip
                      else OutputCorrection("none"))
        return BlockCapture(
            block=b,
            query_input=query_input,
            mlp_input=ctx[f"{p}.hook_mlp_in"],
            query_mlp_input=alone[f"{p}.hook_mlp_in"],
            residual=ctx[f"{p}.hook_resid_mid"],
            query_residual=alone[f"{p}.hook_resid_mid"],
            output=ctx[f"{p}.hook_resid_post"],
            attention_output=ctx[f"{p}.hook_attn_out"],
            query_attention_output=alone[f"{p}.hook_attn_out"],
            maps=[FirstLayerMap(f"{p}.mlp.layers.0.weight", mlp.layers[0].weight.T, transposed=True)],
            correction=correction,
        )

    # -- optional capabilities (adapters/base.py) -------------------------------------------------------------------

    def attention_readable(self):
        """The pattern is a hook point of the toy's own attention: nothing to switch."""
        return contextlib.nullcontext()

    def capture_attention(self, inputs: Tensor, blocks: list[int], query: str):
        """Per block the pattern, the values through each head's ``W_O`` and the pre-MLP norm (:mod:`.toy_extras`)."""
        from implicit_updates.adapters.toy_extras import capture_attention

        return capture_attention(self, self._continuous(inputs), blocks, query)

    def prefix_captures(self, inputs: Tensor, blocks: list[int], chunk_size: int = 64,
                        progress: bool | None = None) -> list[BlockCapture]:
        """Every prefix in one pass: the context once, the query paths as one batch (causal; :mod:`.toy_extras`)."""
        from implicit_updates.adapters.toy_extras import capture_prefixes

        return capture_prefixes(self, inputs, blocks, chunk_size=chunk_size, progress=progress)

    def suffix_runs(self, inputs: Tensor, block: int) -> dict:
        """Block ``block`` run alone on each suffix ``(c_{i+1..n}, x)`` of its with-context input sequence (Dherin et
        al. Appendix B), as :meth:`HookedTransformerAdapter.suffix_runs`: the toy model has no positions, so a
        truncated input sequence is exactly the block's input without the removed tokens."""
        sequence = self.model(self._continuous(inputs), stop_at_layer=block)
        p, runs = f"blocks.{block}", []
        for i in range(sequence.shape[1]):
            store: dict[str, Tensor] = {}
            with self._capturing([block], store):
                out = self.model.blocks[block](sequence[:, i:])
            store = {k: v[:, -1:] for k, v in store.items()}
            runs.append({"mlp_input": store[f"{p}.hook_mlp_in"][0, -1], "residual": store[f"{p}.hook_resid_mid"][0, -1],
                         "output": out[0, -1], "store": store})
        capture = self.block_capture(block, runs[0]["store"], runs[0]["store"], sequence[:, -1:])
        return {"sequence": sequence, "runs": runs, "maps": capture.maps, "correction": capture.correction}

    # -- verification --------------------------------------------------------------------------------------------

    def fans_out(self, block: int) -> bool:
        return True

    def run_edited(self, block: int, rows: Tensor, edits: list) -> Tensor:
        """Block ``block`` on the one-token rows ``[n, 1, d_model]`` with ``edits`` added: ``W + outer(column,
        row)`` changes the first map's output by ``(m . row) column``, added at ``mlp.hook_pre``; a bias change of
        the output layer adds ``delta`` at ``hook_mlp_out`` (the toy has no norm after its MLP)."""
        p = f"blocks.{block}"
        live: dict[str, Tensor] = {}
        hooks: list[tuple[str, Callable]] = [(f"{p}.hook_mlp_in", lambda act, hook: live.__setitem__("m", act))]
        for u in edits:
            if isinstance(u, RankOneUpdate):
                hooks.append((f"{p}.mlp.hook_pre", _add_rank_one_at_hook(live, u.row, u.column)))
            else:
                hooks.append((f"{p}.hook_mlp_out", _add_output_correction(live, u.delta, scale=False)))
        with self.model.hooks(fwd_hooks=hooks):
            return self._run_alone(block, rows)

"""nnsight models (``LanguageModel`` / ``TransformersModel`` over a Hugging Face causal LM): activations by traces.

The blocks are located exactly as for the plain Hugging Face model nnsight wraps (:class:`HFAdapter`: the same
:class:`~implicit_updates.adapters.structure.BlockStructure`, parameter names and math), but every run is an nnsight
trace whose body is :mod:`implicit_updates.adapters.nnsight_ops` (torch only, shipped by value with
``nnsight.register``), so it can run where nnsight runs: here (``remote=False``), serialised and with the project's
modules hidden as on a server (``remote="local"``), or on NDIF (``remote=True``, untested: no network reaches it).

- capture: one trace on the prompt saves every block's with-context quantities (stopping after the last block);
  one more trace runs the query alone for *all* blocks at once, rows ``[start, stop)`` of a batch of one-token
  sequences carrying block b's query residuals, swapped in as layer b's input;
- suffix removal runs the wrapped model here, by its own forward with torch hooks (as :class:`HFAdapter`; the
  weights are here: see below), not through traces;
- verify: one trace per block adds ``(m . row) column`` to the outputs of the maps the update patches, never
  changing a weight; only the saved activations and the layer outputs come back.

The maps' weights are read where the caller is (the wrapped model must hold them: an already-loaded HF model).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from implicit_updates.adapters.hf import HFAdapter
from implicit_updates.adapters.module_hooks import unflatten
from implicit_updates.adapters.modules import BlockParts
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.math.updates import RankOneUpdate
from implicit_updates.runtime.dispatch import is_dispatched

REMOTE = (False, True, "local")
# what the traced forward is called with (as the HF adapter's forward): no KV cache, no output-capturing hooks
FORWARD_KWARGS = {"use_cache": False, "output_attentions": False, "output_hidden_states": False}


def wrapped_module(model) -> nn.Module:
    """The torch module an nnsight model wraps."""
    module = getattr(model, "_module", None)
    if not isinstance(module, nn.Module):
        raise UnsupportedArchitectureError(f"{type(model).__name__} wraps no torch module")
    return module


class NNsightAdapter(HFAdapter):
    """Adapter for an nnsight model over a ``transformers`` causal LM; ``model`` is the HF model it wraps (what
    ``decompose`` guards: parameters, hooks, mode), ``nnsight_model`` the nnsight model the traces run through."""

    backend = "nnsight"
    options = ("remote",)
    # decompose and verify run as traces (remote=False, "local" or True); the other analyses take no ``remote`` and
    # run on the wrapped model here, by the Hugging Face adapter's hooks (as verify's literal check does)
    capabilities = frozenset({"decompose", "absorbed", "attribution", "continuation", "lora", "prefix_onepass",
                              "suffix_removal", "generation"})
    limits = {
        "copy": "in a copy of a model nnsight wraps the modules' forwards still run the original's: use "
                "`with implicit_updates.absorbed(model, prompt):`, which patches the model itself while it runs",
    }

    def __init__(self, nnsight_model, remote: bool | str = False):
        if remote not in REMOTE:
            raise ValueError(f"remote must be False, True or 'local', not {remote!r}")
        import nnsight

        from implicit_updates.adapters import (
            nnsight_ops,  # imports nnsight: here, not where the registry reads the class
        )

        nnsight.register(nnsight_ops)  # its functions are shipped by value (the project is not on the server)
        self.ops = nnsight_ops
        self.nnsight_model = nnsight_model
        self.remote = remote
        module = wrapped_module(nnsight_model)
        if not is_dispatched(module) and any(p.is_meta for p in module.parameters()):
            raise ValueError("this nnsight model holds no weights here (meta tensors: loaded for remote use only), "
                             "and the first-layer columns W (m_i - m_x) and verify()'s literal check read the "
                             "weights here: wrap an already-loaded Hugging Face model (or load with dispatch=True)")
        super().__init__(module)
        paths = {id(m): name for name, m in self.hf.named_modules()}
        self.plans = [self._plan(b, p, paths) for b, p in enumerate(self.parts)]

    def _plan(self, b: int, p: BlockParts, paths: dict[int, str]) -> dict:
        if p.post_norm is not None:
            raise UnsupportedArchitectureError(
                f"block {b}: a norm after the MLP ({type(p.post_norm[1]).__name__}: Gemma 2/3, OLMo 2) takes its "
                "correction as a scale patch, which the nnsight backend does not apply yet; decompose the Hugging "
                "Face model itself (nnsight_model._module)")
        return {"layer": paths[id(p.layer)], "attention": paths[id(p.attention)], "mlp": paths[id(p.mlp)],
                "out": paths[id(p.out)], "mlp_norm": paths[id(p.mlp_norm)] if p.mlp_norm is not None else None,
                "post_norm": None, "hidden": p.out_bias is None,
                "first": [paths[id(module)] for _, module in p.first]}

    @property
    def user_model(self):
        return self.nnsight_model

    def tokenize(self, text: str) -> Tensor:
        tokenizer = getattr(self.nnsight_model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("this nnsight model has no tokenizer: pass token ids (a LongTensor)")
        return tokenizer(text, return_tensors="pt").input_ids[0].to(self.device)

    # -- capture -----------------------------------------------------------------------------------------------

    def capture(self, inputs: Tensor, blocks: list[int], query: str, progress: bool | None = None,
                query_inputs: dict[int, Tensor] | None = None):
        """With-context quantities of ``blocks`` in one trace, then every block on its query alone in one more."""
        embeds = inputs if inputs.is_floating_point() else None
        ids = torch.zeros(inputs.shape[:2], dtype=torch.long, device=inputs.device) if embeds is not None else inputs
        store = self.ops.capture(self.nnsight_model, ids, [(b, self.plans[b]) for b in blocks], embeds,
                                    self.plans[0]["layer"], self.remote, FORWARD_KWARGS)
        store = dict(store)
        self.returns_tuple = {b: bool(store.pop(f"{b}.returns_tuple")) for b in blocks}
        self.flat_mlps = {b for b in blocks if store[f"{b}.m"].dim() == 2}  # OPT's MLP reads [batch * pos, d]
        unflatten(store, store[f"{blocks[0]}.resid_pre"].shape[:2])
        for b in blocks:
            self.check_structure(store, b)
        query_inputs = query_inputs or {}
        queries = {b: query_inputs.get(b, store[f"{b}.resid_pre"][:, -1:] if query == "last"
                                       else store[f"{b}.resid_pre"]) for b in blocks}
        alone = self.run_blocks_alone(queries)
        return [self.block_capture(b, store, alone[b], queries[b]) for b in blocks]

    def run_blocks_alone(self, queries: dict[int, Tensor]) -> dict[int, dict[str, Tensor]]:
        """Each block on its query residuals ``[batch, q, d_model]`` alone (one-token sequences), all blocks in one
        trace; returns each block's quantities keyed as :meth:`_capturing`'s, shaped ``[batch, q, ...]``."""
        order = sorted(queries)
        rows = [rearrange(queries[b], "b q d -> (b q) 1 d") for b in order]
        spans, start = [], 0
        for x in rows:
            spans.append((start, start + x.shape[0], x))
            start += x.shape[0]
        store = dict(self.ops.alone(self.nnsight_model, start, [(b, self.plans[b]) for b in order], spans,
                                       self._skipped(order[0]), self.remote, FORWARD_KWARGS))
        out = {}
        for b, x in zip(order, rows, strict=True):
            mine = {k: v for k, v in store.items() if k.split(".")[0] == str(b)}
            unflatten(mine, x.shape[:2])
            out[b] = {k: rearrange(v, "(b q) 1 ... -> b q ...", b=queries[b].shape[0]) for k, v in mine.items()}
        return out

    def _skipped(self, block: int) -> list[tuple[str, bool]]:
        """The layers before ``block`` a query-alone run need not compute (they all return alike; unknown before a
        capture has seen them return: then none is skipped)."""
        kinds = set(getattr(self, "returns_tuple", {}).values())
        if len(kinds) != 1:
            return []
        returns_tuple = kinds.pop()
        return [(self.plans[b]["layer"], returns_tuple) for b in range(block)]

    def run_block_alone(self, block: int, query_input: Tensor, hooks: list | None = None) -> dict[str, Tensor]:
        """Layer ``block`` on each query residual alone, through a trace. With extra torch ``hooks``, or on NDIF
        (whose model a local weight swap cannot reach: ``verify()``'s literal check), the wrapped model runs here."""
        if hooks or self.remote is True:
            return super().run_block_alone(block, query_input, hooks)
        return self.run_blocks_alone({block: query_input})[block]

    # -- verification ------------------------------------------------------------------------------------------

    def run_edited(self, block: int, rows: Tensor, edits: list) -> Tensor:
        """The layer on the one-token ``rows``, each edit shipped as an intervention: ``(m . row) column`` on the
        output of every map it patches, a bias change on the output projection's output."""
        p, plan = self.parts[block], self.plans[block]
        paths = dict(zip((name for name, _ in p.first), plan["first"], strict=True)) | {p.out_weight: plan["out"]}
        rank_one, additive = [], []
        for u in edits:
            if isinstance(u, RankOneUpdate) and u.name in paths:
                rank_one.append((paths[u.name], u.row, u.column))
            elif not isinstance(u, RankOneUpdate) and u.acts_as == "bias":
                additive.append((plan["out"], u.delta))
            else:
                what = "rank-one update" if isinstance(u, RankOneUpdate) else u.acts_as.replace("_", " ")
                raise UnsupportedArchitectureError(f"block {block}: the {what} of {u.name} has no nnsight "
                                                   "intervention yet")
        order = [*plan["first"], plan["out"]]  # interventions in the order the layer runs its maps
        rank_one.sort(key=lambda item: order.index(item[0]))
        return self.ops.patched(self.nnsight_model, plan["layer"], rows, rank_one, additive, self._skipped(block),
                                self.remote, FORWARD_KWARGS)

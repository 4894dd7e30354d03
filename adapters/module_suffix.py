"""Suffix removal (Dherin et al. 2025, Appendix B) on Hugging Face causal LMs, TransformerBridge and local nnsight
models: block b on every suffix ``(c_{i+1..n}, x)`` of its with-context input sequence, by the model's own forward.

The with-context input sequence of layer b is captured from one forward of the prompt (stopped after layer b); it
already holds everything the layers before b and the embeddings put there, absolute position embeddings included
(GPT-2's ``wpe`` is added before layer 0, so the suffix starting at token i + 1 carries positions i+1..n, as
Appendix B's truncated input sequence does). Each suffix then runs through the model's own forward on dummy token
ids of its length, with layer b's input substituted by the suffix and the forward stopped after layer b: the model
builds its own rotary tables and masks for positions 0..len-1, and rotary, ALiBi and position-free attention only
see relative positions, which truncating from the front keeps. The dummy ids' embeddings never reach layer b (its
input is replaced); the layers before it run on them and are discarded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_updates.adapters.module_hooks import substitute, unflatten, unwrap
from implicit_updates.errors import UnsupportedArchitectureError


def suffix_runs(adapter, inputs: Tensor, block: int) -> dict:
    """``{"sequence", "runs", "maps", "correction"}`` as :meth:`HookedTransformerAdapter.suffix_runs`: the block's
    with-context input sequence ``[1, n+1, d_model]``, per suffix i = 0..n the query's MLP input, residual and block
    output (and the run's quantities at the query), the first-layer maps, and the with-context run's correction."""
    p = adapter.parts[block]
    if p.whole:
        raise UnsupportedArchitectureError(
            f"block {block} ({type(unwrap(p.layer)).__name__}): a mixture of experts routes on the MLP input, which "
            "suffix removal changes step by step, so the experts' outputs are not reproduced by first-layer updates")
    full: dict[str, Tensor] = {}
    adapter._run(inputs, adapter._capturing([block], full), stop_after=block)
    unflatten(full, inputs.shape[:2])
    adapter.check_structure(full, block)  # a block computing something else than its structure says is refused
    sequence = full[f"{block}.resid_pre"]
    runs = []
    for i in range(sequence.shape[1]):
        suffix = sequence[:, i:]
        store: dict[str, Tensor] = {}
        hooks = [(p.layer, "pre_kw", substitute(suffix)), *adapter._capturing([block], store)]
        adapter._run(torch.zeros(suffix.shape[:2], dtype=torch.long, device=suffix.device), hooks, stop_after=block)
        unflatten(store, suffix.shape[:2])
        at_query = {k: v[:, -1:] for k, v in store.items()}
        runs.append({"mlp_input": at_query[f"{block}.m"][0, -1],
                     "residual": adapter._residual(at_query, block)[0, -1],
                     "output": at_query[f"{block}.resid_post"][0, -1], "store": at_query})
    return {"sequence": sequence, "runs": runs, "maps": adapter._maps(block),
            "correction": adapter._correction(block, runs[0]["store"])}


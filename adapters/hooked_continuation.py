"""A continuation absorbed into a HookedTransformer: every block's rank-K update over the K continuation tokens,
through TransformerLens's hook points (the math is :mod:`implicit_updates.math.lowrank`)."""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.math.lowrank import (
    BlockContinuation,
    LowRankUpdate,
    at_continuation,
    checked_pinv,
    first_layer_updates,
    output_correction,
    post_norm_target,
)


def hooked_blocks(adapter, inputs: Tensor, block_ids: list[int], k: int, rcond: float,
                   output: str) -> tuple[list[BlockContinuation], Tensor]:
    """The per-block updates of a HookedTransformer, and the full model's logits at the continuation."""
    check(adapter)
    model_ = adapter.model
    store: dict[str, Tensor] = {}
    hidden_hooks = [(f"blocks.{b}.mlp.hook_post", lambda act, hook: store.__setitem__(hook.name, act.detach()))
                    for b in block_ids if adapter.kind != "MoE"]  # a mixture's hidden are its experts
    with adapter._capturing(block_ids, store), model_.hooks(fwd_hooks=hidden_hooks):
        full_logits = at_continuation(model_(inputs), k)
    x = model_(inputs[:, -k:], stop_at_layer=0)  # block 0's input on S alone (positions 0..K-1)
    blocks = []
    for b in block_ids:
        p = f"blocks.{b}"
        alone: dict[str, Tensor] = {}
        with adapter._capturing([b], alone):  # (its hooks include fresh ALiBi tables)
            model_.blocks[b](x)
        m, m_alone = at_continuation(store[f"{p}.mlp.input"], k), at_continuation(alone[f"{p}.mlp.input"], k)
        r, r_alone = at_continuation(adapter._residual(store, b), k), at_continuation(adapter._residual(alone, b), k)
        updates, cond_m = first_layer_updates(m, m_alone, adapter._first_layer_maps(b), rcond,
                                              f"block {b}: the continuation's MLP inputs run alone")
        # with these, the MLP's hidden (and its output h) at S alone is the with-context one; what the output
        # layer must still add to it:
        change = r - r_alone
        if adapter.output_norm:
            norm = getattr(model_.blocks[b], adapter.output_norm)
            h = at_continuation(store[f"{p}.mlp.output"], k)
            wanted = at_continuation(store[f"{p}.hook_resid_post"], k) - r_alone
            target, scale_delta = post_norm_target(wanted, h, norm.eps, norm.w)
            change = target - h
            updates.append((f"{p}.{adapter.output_norm}.w", scale_delta))
        if adapter.kind == "MoE":
            experts = adapter._experts(b, store)
            pairs = zip(experts["routing_weights"].unbind(-1), experts["expert_hidden"], strict=True)
            # [K, n_experts * d_mlp]: what the experts' output matrices read, weighted by the routing
            weighted = torch.cat([at_continuation(w[..., None] * hid, k) for w, hid in pairs], dim=-1)
            pinv_q, cond_p = checked_pinv(weighted, rcond, f"block {b}: the routed experts' weighted hidden "
                                                           "activations")
            d_mlp = experts["expert_hidden"][0].shape[-1]
            updates += [LowRankUpdate(name, pinv_q[e * d_mlp:(e + 1) * d_mlp], change, transposed=True)
                        for e, name in enumerate(experts["names"])]
        else:
            bias = f"{p}.mlp.b_out" if output == "auto" and not adapter.output_norm else None
            update, cond_p = output_correction(at_continuation(store[f"{p}.mlp.hook_post"], k), change,
                                               f"{p}.mlp.W_out", False, bias, rcond, b)
            updates.append(update)
        blocks.append(BlockContinuation(b, tuple(updates), cond_m, cond_p, m.shape[0]))
        x = store[f"{p}.hook_resid_post"][:, -k:]  # the next block's input, which this block's patch reproduces
    return blocks, full_logits


def check(adapter) -> None:
    """What the HookedTransformer path refuses, and why."""
    norm = getattr(adapter.model.blocks[0], adapter.output_norm) if adapter.output_norm else None
    if norm is not None and (hasattr(norm, "b") or not getattr(norm, "eps", 0) > 0):
        raise UnsupportedArchitectureError(
            f"absorbing a continuation through a {type(norm).__name__} after the MLP ({adapter.output_norm}) is "
            "implemented for RMSNorm with eps > 0 only (a LayerNorm centres every output, and without eps the "
            "norm's output has a fixed size)")
    if adapter.model.cfg.positional_embedding_type == "shortformer":
        raise UnsupportedArchitectureError("shortformer positions are not implemented for continuations")

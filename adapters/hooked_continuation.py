"""A continuation absorbed into a HookedTransformer: every block's rank-K update over the K continuation tokens,
through TransformerLens's hook points (the math is :mod:`implicit_updates.math.lowrank`)."""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.math.lowrank import BlockSystem, PostNorm, RoutedOutputs, at_continuation


def hooked_systems(adapter, inputs: Tensor, block_ids: list[int], k: int) -> tuple[list[BlockSystem], Tensor]:
    """Each block's :class:`~implicit_updates.math.lowrank.BlockSystem` of a HookedTransformer at the continuation,
    and the full model's logits there."""
    check(adapter)
    model_ = adapter.model
    store: dict[str, Tensor] = {}
    hidden_hooks = [(f"blocks.{b}.mlp.hook_post", lambda act, hook: store.__setitem__(hook.name, act.detach()))
                    for b in block_ids if adapter.kind != "MoE"]  # a mixture's hidden are its experts
    with adapter._capturing(block_ids, store), model_.hooks(fwd_hooks=hidden_hooks):
        full_logits = at_continuation(model_(inputs), k)
    x = model_(inputs[:, -k:], stop_at_layer=0)  # block 0's input on S alone (positions 0..K-1)
    systems = []

    def rows(t: Tensor) -> Tensor:
        return at_continuation(t, k)

    for b in block_ids:
        p = f"blocks.{b}"
        alone: dict[str, Tensor] = {}
        with adapter._capturing([b], alone):  # (its hooks include fresh ALiBi tables)
            model_.blocks[b](x)
        r, r_alone = rows(adapter._residual(store, b)), rows(adapter._residual(alone, b))
        post_norm = routed = None
        if adapter.output_norm:
            norm = getattr(model_.blocks[b], adapter.output_norm)
            post_norm = PostNorm(f"{p}.{adapter.output_norm}.w", norm.eps, norm.w, rows(store[f"{p}.mlp.output"]),
                                 rows(store[f"{p}.hook_resid_post"]) - r_alone)
        if adapter.kind == "MoE":
            experts = adapter._experts(b, store)
            pairs = zip(experts["routing_weights"].unbind(-1), experts["expert_hidden"], strict=True)
            # [K, n_experts * d_mlp]: what the experts' output matrices read, weighted by the routing
            weighted = torch.cat([rows(w[..., None] * hid) for w, hid in pairs], dim=-1)
            routed = RoutedOutputs(weighted, tuple(experts["names"]), experts["expert_hidden"][0].shape[-1])
        systems.append(BlockSystem(
            b, rows(store[f"{p}.mlp.input"]), rows(alone[f"{p}.mlp.input"]), tuple(adapter._first_layer_maps(b)),
            r - r_alone, rows(store[f"{p}.mlp.hook_post"]) if routed is None else None, f"{p}.mlp.W_out", False,
            None if adapter.output_norm else f"{p}.mlp.b_out", rows(store[f"{p}.hook_resid_post"]),
            rows(alone[f"{p}.hook_resid_post"]), post_norm=post_norm, routed=routed))
        x = store[f"{p}.hook_resid_post"][:, -k:]  # the next block's input, which this block's patch reproduces
    return systems, full_logits


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

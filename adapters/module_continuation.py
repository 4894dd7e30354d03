"""Continuation absorption for Hugging Face causal LMs and TransformerBridges (the module-hook adapters).

The same rank-K math as the HookedTransformer path (:mod:`implicit_updates.math.lowrank`), located by each block's
:class:`~implicit_updates.adapters.modules.BlockParts`: ``first`` (every map reading the MLP input m), ``out`` (the
output projection), the residual ``r`` the MLP output joins (sequential, parallel, post-norm-only) and the residual
scale s (Granite: ``y = r + s * mlp(m)``, so the MLP output must move by ``(r - r') / s``). Every block runs on the
continuation alone, as a K-token sequence, in one forward of the model on S (a pre-hook on each layer l > 0 swaps
in the with-context inputs at S's positions, which the patched blocks before it reproduce), so the model builds its
own rotary tables and masks for positions 0..K-1, as the patched model on S does.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from implicit_updates.adapters.module_hooks import (
    norm_params,
    save_input,
    substitute,
    unflatten,
    unwrap,
    weight_view,
)
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.math.lowrank import BlockSystem, PostNorm, at_continuation
from implicit_updates.runtime.dispatch import loaded_parameter, own_forward


def module_systems(adapter, inputs: Tensor, block_ids: list[int], k: int) -> tuple[list[BlockSystem], Tensor]:
    """Each block's :class:`~implicit_updates.math.lowrank.BlockSystem` at the continuation (the last ``k`` of
    ``inputs``), and the full model's logits there ``[n * K, d_vocab]``."""
    if inputs.is_floating_point():
        raise ValueError("absorbing a continuation takes token ids")
    whole = [b for b in block_ids if getattr(adapter.parts[b], "whole", False)]
    if whole:
        raise UnsupportedArchitectureError(
            f"block {whole[0]}: a mixture of experts with fused expert weights; absorbing a continuation through it "
            "is not implemented for Hugging Face models (a HookedTransformer's mixture is)")
    store: dict[str, Tensor] = {}
    full_logits = at_continuation(adapter._final_logits(adapter._run(inputs, _hooks(adapter, block_ids, store))), k)
    unflatten(store, inputs.shape[:2])
    for b in block_ids:
        adapter.check_structure(store, b)
    # Every block on S alone in one forward of the model on S: layer l's input is swapped for the with-context
    # one at S's positions (which the patched layers before it reproduce); layer 0 reads S's own embedding.
    ids, alone = inputs[:, -k:], {}
    swaps = [(adapter.parts[b].layer, "pre_kw", substitute(store[f"{b - 1}.resid_post"][:, -k:]))
             for b in block_ids if b > 0]
    adapter._run(ids, [*swaps, *_hooks(adapter, block_ids, alone)], stop_after=max(block_ids))
    unflatten(alone, ids.shape)
    systems, norm_err = [], 0.0

    def rows(t: Tensor) -> Tensor:
        return at_continuation(t, k)

    for b in block_ids:
        p = adapter.parts[b]
        r, r_alone = rows(adapter._residual(store, b)), rows(adapter._residual(alone, b))
        post_norm = None
        if p.post_norm is not None:  # the norm's output must move; the solver finds the MLP outputs that do it
            h = rows(store[f"{b}.h"])
            wanted = (rows(store[f"{b}.resid_post"]) - r_alone) / p.residual_scale
            eps, scale, err = _post_norm(p.post_norm[1], h, b)
            post_norm, norm_err = PostNorm(p.post_norm[0], eps, scale, h, wanted), max(norm_err, err)
        systems.append(BlockSystem(
            b, rows(store[f"{b}.m"]), rows(alone[f"{b}.m"]), tuple(weight_view(n, mod) for n, mod in p.first),
            (r - r_alone) / p.residual_scale, rows(store[f"{b}.hidden"]), p.out_weight,
            isinstance(unwrap(p.out), nn.Linear), p.out_bias, rows(store[f"{b}.resid_post"]),
            rows(alone[f"{b}.resid_post"]), p.residual_scale, post_norm))
    dtype = systems[0].mlp_input.dtype
    if norm_err > 1e3 * torch.finfo(dtype).eps:
        warnings.warn(f"the norms after the MLP compute in a lower precision than {dtype} (their output is up to "
                      f"{norm_err:.1e} off the {dtype} formula; transformers computes Gemma's in float32), so the "
                      "continuation is absorbed only to about that relative precision, not to float64 rounding",
                      stacklevel=3)
    return systems, full_logits


def _hooks(adapter, blocks: list[int], store: dict[str, Tensor]) -> list:
    """The adapter's capture hooks, plus each output projection's input (the hidden activations P)."""
    return [*adapter._capturing(blocks, store),
            *((adapter.parts[b].out, "pre", save_input(store, f"{b}.hidden")) for b in blocks)]


def _post_norm(norm: nn.Module, h: Tensor, b: int) -> tuple[float, Tensor, float]:
    """``(eps, effective scale, err)`` of a Hugging Face RMSNorm after the MLP, which multiplies ``z(h)`` by its scale
    ``w`` or by ``1 + w`` (Gemma), for :func:`~implicit_updates.math.lowrank.post_norm_target`. transformers computes
    some of these norms in float32 whatever the model's dtype (Gemma, OLMo 2): measured on the with-context MLP
    outputs, the norm's own output is compared with the formula in ``h``'s dtype, and that relative difference is
    returned (the caller warns where it exceeds rounding); a norm computing something else (off by more than 1e-5)
    is refused."""
    module = unwrap(norm)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    if not isinstance(eps, float) or not eps > 0 or weight is None or getattr(module, "bias", None) is not None:
        raise UnsupportedArchitectureError(
            f"block {b}: the norm after the MLP ({type(module).__name__}) is not an RMSNorm with a scale and eps > 0, "
            "the only post-MLP norm a continuation is absorbed through (a LayerNorm centres every output; without "
            "eps the output has a fixed size)")
    with norm_params(norm, h.dtype, 0.0) as zero:
        offset = 1.0 if bool((own_forward(zero)(h) != 0).any()) else 0.0  # (1 + w) z: nonzero at w = 0
    scale = loaded_parameter(module, "weight").to(h.dtype) + offset  # the delta of offset + w is w's
    with norm_params(norm, h.dtype) as upcast:
        own = own_forward(upcast)(h)
    exact = scale * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    err = float(((own - exact).norm(dim=-1) / exact.norm(dim=-1)).max())
    if not err <= 1e-5:
        raise UnsupportedArchitectureError(
            f"block {b}: the norm after the MLP ({type(module).__name__}) does not compute (w or 1 + w) * h / "
            f"sqrt(mean(h^2) + eps) (off by {err:.1e}), the RMSNorm a continuation is absorbed through")
    return eps, scale, err

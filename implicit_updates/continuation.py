"""Exact absorption over a continuation: a rank-K update per block such that the patched model, run on a
continuation S of K tokens alone, reproduces the full model's logits at all K positions of ``prefix + S``.

Per block l, with ``M`` the with-context MLP inputs at S's positions and ``M'`` those of block l run on S alone (its
input is the with-context one, which the patched blocks before it reproduce; block 0 starts from S's own embedding),
every first-layer map ``W`` (``m @ W``) gets ``delta_W = pinv(M') (M - M') W`` (rank <= K), so ``M' (W + delta_W) =
M W``: the hidden activations become the with-context ones, ``P``. The residual difference ``D = R - R'`` then goes
into the output matrix, ``delta_W_out = pinv(P) D`` (rank <= K), or into the output bias when K = 1 (Dherin et al.
Thm A.2, as :func:`implicit_updates.absorb`). Both are exact when ``M'`` and ``P`` have full row rank K (K <=
d_model, K <= d_mlp); their condition numbers are reported, and numerically dependent rows are refused. This is Eq. 8
of Dherin et al. 2025 with the rank-one ``m_x^T/||m_x||^2`` replaced by the pseudo-inverse of K query inputs (for
K = 1 the two coincide).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from implicit_updates.decompose import prepared, untouched, working_model
from implicit_updates.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class LowRankUpdate:
    """``delta = rows @ columns`` for parameter ``name`` (``[d_in, K] @ [K, d_out]``; transposed for nn.Linear)."""

    name: str
    rows: Tensor
    columns: Tensor
    transposed: bool = False

    def dense(self) -> Tensor:
        delta = self.rows @ self.columns
        return delta.T if self.transposed else delta


@dataclass(frozen=True)
class BlockContinuation:
    block: int
    updates: tuple[LowRankUpdate | tuple[str, Tensor], ...]  # low-rank maps, or (bias name, delta)
    cond_mlp_input: float  # condition number of M' (the S-alone MLP inputs)
    cond_hidden: float  # condition number of P (the with-context hidden activations), inf when K = 1 (bias)
    rank: int


@dataclass
class ContinuationAbsorption:
    """Per-block low-rank updates; ``patched()`` writes them into a copy's real weights."""

    model: nn.Module
    dtype: torch.dtype
    blocks: list[BlockContinuation]
    continuation: Tensor  # [1, K] token ids
    full_logits: Tensor  # [K, d_vocab], the full model's at S's positions

    def patch(self) -> dict[str, Tensor]:
        """``{parameter name: dense delta}`` over every block."""
        out: dict[str, Tensor] = {}
        for block in self.blocks:
            for u in block.updates:
                name, delta = (u.name, u.dense()) if isinstance(u, LowRankUpdate) else u
                out[name] = out.get(name, 0) + delta
        return out

    def patched(self) -> nn.Module:
        """A deep copy in this absorption's dtype with every block's update added to its parameters."""
        copy_ = working_model(self.model, self.dtype)
        copy_ = copy.deepcopy(copy_) if copy_ is self.model else copy_
        with torch.no_grad():
            for name, delta in self.patch().items():
                copy_.get_parameter(name).add_(delta)
        return copy_

    def compare(self) -> dict:
        """Logits of the patched copy on S alone against the full model's at S's positions."""
        patched = self.patched()
        with untouched(patched):
            logits = patched(self.continuation)[0]
        diff = (logits - self.full_logits).abs().max()
        return {"max_abs_logit_diff": float(diff), "top1_agree": bool((logits.argmax(-1) ==
                                                                       self.full_logits.argmax(-1)).all()),
                "rank": [b.rank for b in self.blocks], "cond_mlp_input": [b.cond_mlp_input for b in self.blocks],
                "cond_hidden": [b.cond_hidden for b in self.blocks]}


def absorb_continuation(model: nn.Module, prefix: Tensor, continuation: Tensor,
                        dtype: torch.dtype | str | None = None, rcond: float = 1e-10) -> ContinuationAbsorption:
    """Absorb ``prefix`` into a rank-K update per block, exact on the K tokens of ``continuation`` (token ids).

    HookedTransformer models: dense, gated and mixture-of-experts MLPs (the routed experts' output matrices take the
    output change together, through the pseudo-inverse of their weighted hidden activations), and RMSNorms after the
    MLP (:func:`post_norm_target`); others raise ``UnsupportedArchitectureError`` naming the part. ``rcond``:
    relative singular-value floor below which the K inputs count as numerically dependent (refused).
    """
    prefix, continuation = _ids(prefix), _ids(continuation)
    full = torch.cat([prefix, continuation], dim=1)
    k = continuation.shape[1]
    with prepared(model, full, None, dtype) as (adapter, block_ids, inputs):
        _check(adapter, k)
        model_ = adapter.model
        store: dict[str, Tensor] = {}
        hidden_hooks = [(f"blocks.{b}.mlp.hook_post", lambda act, hook: store.__setitem__(hook.name, act.detach()))
                        for b in block_ids if adapter.kind != "MoE"]  # a mixture's hidden are its experts
        with adapter._capturing(block_ids, store), model_.hooks(fwd_hooks=hidden_hooks):
            full_logits = model_(inputs)[0, -k:]
        x = model_(inputs[:, -k:], stop_at_layer=0)  # block 0's input on S alone (positions 0..K-1)
        blocks = []
        for b in block_ids:
            p = f"blocks.{b}"
            alone: dict[str, Tensor] = {}
            with adapter._capturing([b], alone):  # (its hooks include fresh ALiBi tables)
                model_.blocks[b](x)
            m, m_alone = store[f"{p}.mlp.input"][0, -k:], alone[f"{p}.mlp.input"][0]
            r, r_alone = adapter._residual(store, b)[0, -k:], adapter._residual(alone, b)[0]
            pinv_m, cond_m = _pinv(m_alone, rcond, f"block {b}: the continuation's MLP inputs run alone")
            updates: list = [LowRankUpdate(w.name, pinv_m, (m - m_alone) @ w.weight.to(m.dtype), w.transposed)
                             for w in adapter._first_layer_maps(b)]
            # with these, the MLP's hidden (and its output h) at S alone is the with-context one; what the output
            # layer must still add to it:
            change = r - r_alone
            if adapter.output_norm:
                norm = getattr(model_.blocks[b], adapter.output_norm)
                h = store[f"{p}.mlp.output"][0, -k:]
                target, scale_delta = post_norm_target(store[f"{p}.hook_resid_post"][0, -k:] - r_alone, h, norm)
                change = target - h
                updates.append((f"{p}.{adapter.output_norm}.w", scale_delta))
            if adapter.kind == "MoE":
                experts = adapter._experts(b, store)
                pairs = zip(experts["routing_weights"].unbind(-1), experts["expert_hidden"], strict=True)
                # [K, n_experts * d_mlp]: what the experts' output matrices read, weighted by the routing
                weighted = torch.cat([w[0, -k:, None] * hid[0, -k:] for w, hid in pairs], dim=-1)
                pinv_q, cond_p = _pinv(weighted, rcond, f"block {b}: the routed experts' weighted hidden activations")
                d_mlp = experts["expert_hidden"][0].shape[-1]
                updates += [LowRankUpdate(name, pinv_q[e * d_mlp:(e + 1) * d_mlp], change, transposed=True)
                            for e, name in enumerate(experts["names"])]
            elif k == 1 and not adapter.output_norm:
                updates.append((f"{p}.mlp.b_out", change[0]))
                cond_p = float("inf")
            else:
                pinv_p, cond_p = _pinv(store[f"{p}.mlp.hook_post"][0, -k:], rcond,
                                       f"block {b}: the with-context hidden activations")
                updates.append(LowRankUpdate(f"{p}.mlp.W_out", pinv_p, change))
            blocks.append(BlockContinuation(b, tuple(updates), cond_m, cond_p, k))
            x = store[f"{p}.hook_resid_post"][:, -k:]  # the next block's input, which this block's patch reproduces
    return ContinuationAbsorption(model, adapter.compute_dtype, blocks, continuation.to(inputs.device),
                                  full_logits)


def _ids(tokens: Tensor) -> Tensor:
    tokens = torch.as_tensor(tokens)
    return tokens[None] if tokens.dim() == 1 else tokens


def _check(adapter, k: int) -> None:
    from implicit_updates.adapters.hooked_transformer import HookedTransformerAdapter

    if not isinstance(adapter, HookedTransformerAdapter):
        raise UnsupportedArchitectureError(
            f"absorbing a continuation is implemented for TransformerLens HookedTransformer models (got "
            f"{type(adapter).__name__}); use iu.absorb for one token")
    norm = getattr(adapter.model.blocks[0], adapter.output_norm) if adapter.output_norm else None
    if norm is not None and (hasattr(norm, "b") or not getattr(norm, "eps", 0) > 0):
        raise UnsupportedArchitectureError(
            f"absorbing a continuation through a {type(norm).__name__} after the MLP ({adapter.output_norm}) is "
            "implemented for RMSNorm with eps > 0 only (a LayerNorm centres every output, and without eps the "
            "norm's output has a fixed size)")
    if adapter.model.cfg.positional_embedding_type == "shortformer":
        raise UnsupportedArchitectureError("shortformer positions are not implemented for continuations")
    if k < 1:
        raise ValueError("the continuation is empty: give at least one token")


def post_norm_target(wanted: Tensor, mlp_output: Tensor, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """MLP outputs ``h'_k`` and a scale patch ``delta_w`` with ``(w + delta_w) * z(h'_k) = wanted_k`` for every k,
    for an RMSNorm ``z(h) = h / sqrt(mean(h^2) + eps)`` after the MLP whose scale ``w`` is shared by all positions.

    With ``w' = 1/sqrt(u)`` and ``z_k = wanted_k sqrt(u)``, ``z(h'_k) = z_k`` for ``h'_k = lam_k z_k`` exactly when
    ``mean(z_k^2) = 1 - eps/lam_k^2``: K linear equations ``mean(wanted_k^2 u) = 1 - eps/lam_k^2`` for ``u > 0``.
    ``lam_k = max(rms(h_k), 1)`` keeps ``h'_k`` as large as the MLP's own output, so the output-matrix update that
    produces it does not cancel down to a tiny vector (which would amplify rounding block after block, as the
    single-token flattening in :func:`implicit_updates.updates.post_norm_updates` avoids too). ``u`` comes from
    :func:`positive_solution`; where none is found no exact update of this form is offered (refused).
    """
    lam = mlp_output.pow(2).mean(-1).sqrt().clamp_min(1.0)  # [K]
    a = wanted.pow(2) / wanted.shape[-1]  # [K, d]: mean(wanted_k^2 u) = a_k . u
    b = 1 - norm.eps / lam.pow(2)
    u = positive_solution(a, b)
    if u is None:
        raise ValueError("no positive scale for the norm after the MLP reaches every continuation position (the "
                         "residual differences are too unlike in size per coordinate); use fewer tokens")
    z = wanted * u.sqrt()
    return lam[:, None] * z, u.rsqrt() - norm.w.detach().to(wanted.dtype)


def positive_solution(a: Tensor, b: Tensor, steps: int = 100) -> Tensor | None:
    """A solution ``u > 0`` of ``a u = b`` (``a`` ``[K, d]`` non-negative), or None.

    The maximum-entropy one, ``u = u0 exp(a^T theta)`` around the uniform ``u0``: Newton's method on the convex dual
    ``sum(u) - b . theta`` (gradient ``a u - b``, Hessian ``a diag(u) a^T``), with backtracking; accepted when the
    relative residual is at rounding level.
    """
    u0 = torch.full_like(a[0], float(b.mean() / a.sum(-1).mean().clamp_min(torch.finfo(a.dtype).tiny)))
    theta = torch.zeros_like(b)

    def dual(t: Tensor) -> Tensor:
        return (u0 * torch.exp(a.T @ t)).sum() - b @ t

    for _ in range(steps):
        u = u0 * torch.exp(a.T @ theta)
        grad = a @ u - b
        if grad.norm() <= 64 * torch.finfo(a.dtype).eps * b.norm():
            return u
        step = torch.linalg.solve(a @ (u[:, None] * a.T), grad)
        size, before = 1.0, dual(theta)
        while dual(theta - size * step) > before and size > 1e-12:
            size /= 2
        theta = theta - size * step
    u = u0 * torch.exp(a.T @ theta)
    return u if (a @ u - b).norm() <= 1e-12 * b.norm() else None


def _pinv(rows: Tensor, rcond: float, what: str) -> tuple[Tensor, float]:
    """``pinv(rows)`` (``[d, K]`` for ``rows`` ``[K, d]``) and its condition number; refuses dependent rows."""
    sv = torch.linalg.svdvals(rows)
    if rows.shape[0] > rows.shape[1]:  # more rows than dimensions: at most d of them are independent
        sv = torch.cat([sv, sv.new_zeros(rows.shape[0] - rows.shape[1])])
    cond = float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf")
    if sv[-1] <= rcond * sv[0]:
        raise ValueError(f"{what} are numerically dependent (condition number {cond:.3g}): no exact update of rank "
                         f"{rows.shape[0]} through them; use fewer or other continuation tokens")
    return torch.linalg.pinv(rows), cond

"""Implicit learning dynamics: the update of every block as the context grows token by token (Dherin et al. 2025).

**Prefix dynamics** (Dherin et al. 2025, Sec. 3, Prop. 3.1). The prompt is ``[c_1..c_N, x]`` with the query x last.
For prefix i = 1..N the prompt ``[c_1..c_i, x]`` puts x at position i, and block l's update is exactly what
``decompose(model, [c_1..c_i, x], query="last")`` gives for block l at the last position:

    dW_i = u_i v_i^T,  u_i = W (m_i - m_x,i),  v_i = m_x,i / ||m_x,i||^2,  delta_b_i = r_i - r_x,i

(``m_i`` the with-context MLP input at the query, ``m_x,i`` block l's MLP input on the query's block-l input alone,
``r`` the residual the MLP output is added to; Eq. 8 and Thm A.2). ``h_i = 1/||m_x,i||^2`` is the implicit learning
rate. Where the query's row is shared by all prefixes (block 0 with rotary, ALiBi or no positions, or Dherin's
single block) the step is Prop. 3.1's gradient step,

    dW_{i+1} - dW_i = -h grad L_i,   grad L_i = W (m_i - m_{i+1}) m_x^T.

With absolute positions (the query's embedding moves with i) or at deeper blocks (its input depends on the context)
the row changes with i and the step has a second, row-change term:

    dW_{i+1} - dW_i = (u_{i+1} - u_i) v_{i+1}^T + u_i (v_{i+1} - v_i)^T = -h_{i+1} G_i + u_i (v_{i+1} - v_i)^T,

with ``G_i = g_i m_x,i+1^T`` and ``g_i = u_i - u_{i+1}`` (``= W (m_i - m_{i+1})`` when the row is shared). Both
terms are reported, in factored form; step norms come from the factors without cancellation.

``prefix_decomposition(method="onepass")`` computes all N prefixes in one pass (the adapter's ``prefix_captures``:
``adapters/hooked_prefixes.py`` for a HookedTransformer, ``adapters/module_prefixes.py`` for Hugging Face models,
TransformerBridge and local nnsight models, ``adapters/toy_extras.py`` for the causal toy model);
``method="naive"`` runs one ``decompose`` per prefix and is the reference the tests compare it with.

**Suffix removal** (Dherin et al. 2025, Appendix B): see :func:`suffix_removal`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor, nn

from implicit_updates.adapters.base import require
from implicit_updates.analyses.decompose import (
    Decomposition,
    _dtype,
    check_copy_is_its_own,
    decompose,
    decompose_captures,
    prepared,
    untouched,
)
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.math import core
from implicit_updates.math.analysis import difference_frobenius_norm, first_layer_factors
from implicit_updates.math.updates import AdditiveUpdate, BlockUpdate, RankOneUpdate, dead_hidden

METHODS = ("onepass", "naive")


class PrefixDecomposition(Decomposition):
    """A :class:`Decomposition` whose "positions" are the N prefixes ``[c_1..c_i, x]`` (position i-1 = prefix i).

    Each position has its own query input (block l's input for the query at position i of prefix i), so
    ``patch``, ``query_input``, ``target_output`` and ``verify`` work unchanged. ``inputs`` is the full prompt.
    """

    def __init__(self, adapter, updates: list[BlockUpdate], dtype: torch.dtype, inputs: Tensor):
        super().__init__(adapter, updates, "prefix", dtype, inputs)

    @property
    def n_positions(self) -> int:
        return self.inputs.shape[1] - 1


def prefix_decomposition(model: nn.Module, prompt, blocks: int | Sequence[int] | None = None,
                         dtype: torch.dtype | str | None = None, method: str = "onepass", chunk_size: int = 64,
                         progress: bool | None = None) -> PrefixDecomposition:
    """Every prefix's update of every block, factored (Dherin et al. 2025 Prop. 3.1; Eq. 8 per prefix).

    ``prompt``: one prompt ``[c_1..c_N, x]`` (text, token ids, or continuous ``[1, N+1, d_model]`` inputs fed at
    block 0). ``method="onepass"``: the context once with a KV cache, then the N query paths as one batch
    (HookedTransformer, Hugging Face, TransformerBridge, the toy model; causal); ``"naive"``: one ``decompose`` per
    prefix. The user's model is untouched.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    with prepared(model, prompt, blocks, dtype) as (adapter, block_ids, inputs):
        if inputs.shape[0] != 1:
            raise ValueError(f"prefix dynamics takes one prompt (batch 1), got batch {inputs.shape[0]}; "
                             "loop over the prompts")
        if inputs.shape[1] < 2:
            raise ValueError("the prompt needs at least one context token before the query (2 tokens or more)")
        if method == "naive":  # (an nnsight model's prefixes run through its own traces)
            updates = _naive_updates(adapter.user_model, inputs, block_ids, _dtype(adapter))
        else:
            require(adapter, "prefix_onepass")
            if not isinstance(chunk_size, int) or chunk_size < 1:
                raise ValueError(f"chunk_size must be a positive integer, not {chunk_size!r}")
            with untouched(adapter.model):
                captures = adapter.prefix_captures(inputs, block_ids, chunk_size=chunk_size, progress=progress)
            updates = decompose_captures(captures)
    return PrefixDecomposition(adapter, updates, _dtype(adapter), inputs)


def max_relative_difference(a: Decomposition, b: Decomposition, atol: float = 0.0) -> float:
    """Largest relative difference ``||x - y|| / ||y||`` between two decompositions of the same blocks (e.g. the
    one-pass and the naive prefix dynamics): over every factor and correction, and each block's row, ``delta_b``,
    query inputs and targets. Differences no larger than ``atol`` count as none (a context that changes nothing,
    e.g. a window of one token, leaves updates of rounding size, whose relative difference means nothing).
    Raises ``ValueError`` when the blocks, parameter names or shapes differ."""
    pairs = []
    for x, y in zip(a.blocks, b.blocks, strict=True):
        if x.block != y.block or [u.name for u in x.updates] != [u.name for u in y.updates]:
            raise ValueError(f"block {x.block} ({[u.name for u in x.updates]}) and block {y.block} "
                             f"({[u.name for u in y.updates]}) are not the same updates")
        pairs += [(getattr(u, f), getattr(v, f)) for u, v in zip(x.updates, y.updates, strict=True)
                  for f in ("row", "column", "delta") if hasattr(u, f)]
        pairs += [(getattr(x, f), getattr(y, f)) for f in ("row", "delta_b", "query_input", "target_output")]
    worst = 0.0
    for p, q in pairs:
        if p.shape != q.shape:
            raise ValueError(f"shapes differ: {tuple(p.shape)} vs {tuple(q.shape)}")
        if (p - q).norm() > atol:
            worst = max(worst, float((p - q).norm() / q.norm().clamp_min(torch.finfo(q.dtype).tiny)))
    return worst


def _naive_updates(work: nn.Module, inputs: Tensor, block_ids: list[int], dtype: torch.dtype
                   ) -> list[BlockUpdate]:
    """The reference: ``decompose(model, [c_1..c_i, x])`` for i = 1..N, last position of each, stacked."""
    per_prefix = [decompose(work, torch.cat([inputs[:, :i], inputs[:, -1:]], dim=1), query="last", blocks=block_ids,
                            dtype=dtype) for i in range(1, inputs.shape[1])]
    return [stack_last_positions([d.block(b) for d in per_prefix]) for b in block_ids]


def stack_last_positions(updates: list[BlockUpdate]) -> BlockUpdate:
    """One :class:`BlockUpdate` whose position k is the last position of ``updates[k]`` (rows per position)."""

    def last(t: Tensor) -> Tensor:
        return t[:, -1:]

    def cat(ts) -> Tensor:
        return torch.cat([last(t) for t in ts], dim=1)

    first = updates[0]
    row = cat(u.row for u in updates)
    stacked: list[RankOneUpdate | AdditiveUpdate] = []
    for k, p in enumerate(first.updates):
        if isinstance(p, AdditiveUpdate):
            stacked.append(AdditiveUpdate(p.name, cat(u.updates[k].delta for u in updates), p.acts_as))
        elif p.row is first.row:  # a first-layer map: keep the shared row object (BlockUpdate.first_layer)
            stacked.append(RankOneUpdate(p.name, row, cat(u.updates[k].column for u in updates), p.transposed))
        else:
            stacked.append(RankOneUpdate(p.name, cat(u.updates[k].row for u in updates),
                                         cat(u.updates[k].column for u in updates), p.transposed))
    return BlockUpdate(first.block, row, cat(u.delta_b for u in updates), stacked,
                       cat(u.query_input for u in updates), cat(u.target_output for u in updates), first.correction)


@dataclass
class BlockDynamics:
    """One block's prefix dynamics, factored (Prop. 3.1). Index k is prefix i = k + 1; step k goes k -> k + 1.

    ``columns`` ``[N, d_out]`` are the ``u_i`` of every map reading the MLP input, stacked along d_out (they share
    the row); ``rows`` ``[N, d_in]`` the ``v_i``. Dense matrices use the papers' layout ``[d_out, d_in]``.
    """

    block: int
    columns: Tensor
    rows: Tensor
    delta_b: Tensor
    implicit_lr: Tensor  # h_i = 1/||m_x,i||^2, [N]
    update_norms: Tensor  # ||dW_i||_F, [N]
    step_norms: Tensor  # ||dW_{i+1} - dW_i||_F, [N-1]
    gradient_norms: Tensor  # h_{i+1} ||G_i||_F, the gradient term of each step, [N-1]
    row_change_norms: Tensor  # ||u_i (v_{i+1} - v_i)^T||_F, [N-1]
    delta_b_step_norms: Tensor  # ||delta_b_{i+1} - delta_b_i||, [N-1]
    shared_row: bool
    map_names: list[str] = field(default_factory=list)

    @property
    def gradient_columns(self) -> Float[Tensor, "step d_out"]:
        """``g_i = u_i - u_{i+1}`` (``= W (m_i - m_{i+1})`` with a shared row), ``[N-1, d_out]``."""
        return self.columns[:-1] - self.columns[1:]

    @property
    def gradient_rows(self) -> Float[Tensor, "step d_in"]:
        """``m_x,i+1 = v_{i+1} / ||v_{i+1}||^2`` (the query's MLP input), ``[N-1, d_in]``."""
        v = self.rows[1:]
        return v / v.pow(2).sum(-1, keepdim=True)

    def update(self, k: int) -> Float[Tensor, "d_out d_in"]:
        """Dense ``dW`` of prefix k + 1, ``[d_out, d_in]`` (tests and small models only)."""
        return torch.outer(self.columns[k], self.rows[k])

    def gradient(self, k: int) -> Float[Tensor, "d_out d_in"]:
        """Dense ``G_k = g_k m_x^T`` (Prop. 3.1's ``grad L``), ``[d_out, d_in]``."""
        return torch.outer(self.gradient_columns[k], self.gradient_rows[k])

    def to_dict(self) -> dict:
        def floats(t: Tensor) -> list[float]:
            return [float(x) for x in t]

        return {"block": self.block, "shared_row": self.shared_row, "implicit_lr": floats(self.implicit_lr),
                "update_norms": floats(self.update_norms), "step_norms": floats(self.step_norms),
                "gradient_norms": floats(self.gradient_norms), "row_change_norms": floats(self.row_change_norms),
                "delta_b_norms": floats(self.delta_b.norm(dim=-1)),
                "delta_b_step_norms": floats(self.delta_b_step_norms)}


def block_dynamics(update: BlockUpdate, batch: int = 0) -> BlockDynamics:
    """Step norms, implicit learning rates and Prop. 3.1 gradient terms of one block, from its factors alone."""
    columns, rows = first_layer_factors(update, batch)
    rows = rows.expand(columns.shape[0], rows.shape[-1])
    implicit_lr = rows.pow(2).sum(-1)  # ||v||^2 = 1/||m_x||^2 = h
    u1, v1, u2, v2 = columns[1:], rows[1:], columns[:-1], rows[:-1]
    gradient_term = (u1 - u2).norm(dim=-1) * v1.norm(dim=-1)  # ||(u_{i+1}-u_i) v_{i+1}^T|| = h ||G_i||
    row_change = u2.norm(dim=-1) * (v1 - v2).norm(dim=-1)
    tol = 100 * torch.finfo(rows.dtype).eps
    shared = bool(((rows - rows[:1]).norm(dim=-1) <= tol * rows[:1].norm()).all())
    delta_b = update.delta_b[batch]
    return BlockDynamics(update.block, columns, rows, delta_b, implicit_lr,
                         update_norms=columns.norm(dim=-1) * rows.norm(dim=-1),
                         step_norms=difference_frobenius_norm(u1, v1, u2, v2),
                         gradient_norms=gradient_term, row_change_norms=row_change,
                         delta_b_step_norms=(delta_b[1:] - delta_b[:-1]).norm(dim=-1), shared_row=shared,
                         map_names=[u.name for u in update.first_layer])


@dataclass
class PrefixDynamics:
    """Prefix dynamics of every decomposed block, and the decomposition it was computed from."""

    decomposition: PrefixDecomposition
    blocks: dict[int, BlockDynamics]
    method: str

    @property
    def n_prefixes(self) -> int:
        return self.decomposition.n_positions

    def to_dict(self) -> dict:
        return {"n_prefixes": self.n_prefixes, "method": self.method,
                "dtype": str(self.decomposition.dtype).removeprefix("torch."),
                "blocks": [b.to_dict() for b in self.blocks.values()]}

    def __str__(self) -> str:
        lines = [f"{'block':>5}  {'shared row':>10}  {'h first':>9}  {'h last':>9}  {'|dW| last':>9}  "
                 f"{'step first':>10}  {'step last':>10}  {'row-change':>10}"]
        for b in self.blocks.values():
            first = float(b.step_norms[0]) if len(b.step_norms) else float("nan")
            last = float(b.step_norms[-1]) if len(b.step_norms) else float("nan")
            change = float(b.row_change_norms.max()) if len(b.row_change_norms) else float("nan")
            lines.append(f"{b.block:>5}  {str(b.shared_row):>10}  {float(b.implicit_lr[0]):9.3e}  "
                         f"{float(b.implicit_lr[-1]):9.3e}  {float(b.update_norms[-1]):9.3e}  {first:10.3e}  "
                         f"{last:10.3e}  {change:10.3e}")
        lines.append(f"{self.n_prefixes} prefixes ({self.method}); step k: ||dW(c_1..c_k+1) - dW(c_1..c_k)||_F")
        return "\n".join(lines)

    def __repr__(self) -> str:
        from implicit_updates.views.html import dynamics_repr

        return dynamics_repr(self)

    def _repr_html_(self) -> str:  # notebooks: step-norm curves per block (inline SVG)
        from implicit_updates.views.html import dynamics_html

        return dynamics_html(self)


def prefix_dynamics(model: nn.Module, prompt, blocks: int | Sequence[int] | None = None,
                    dtype: torch.dtype | str | None = None, method: str = "onepass", chunk_size: int = 64,
                    progress: bool | None = None) -> PrefixDynamics:
    """:func:`prefix_decomposition`, then :func:`block_dynamics` for each block (Dherin et al. Prop. 3.1)."""
    result = prefix_decomposition(model, prompt, blocks, dtype, method, chunk_size, progress)
    return PrefixDynamics(result, {u.block: block_dynamics(u) for u in result.blocks}, method)


# -- Appendix B: removing context tokens from the front --------------------------------------------------------------


@dataclass
class SuffixRemoval:
    """Dherin et al. 2025 Appendix B for one block: remove c_1, then c_2, ... from the block's input sequence.

    ``a[i] = A(c_{i+1..n}, x)`` (``[n+1, d_in]``; ``a[0] = A(C, x)``, ``a[n] = A(x)``), ``deltas[i-1] = a[i-1] -
    a[i]``, ``implicit_lr[i-1] = h_i = 1/||a_i||^2``, and ``A_i = delta_i a_i^T``. Every first-layer map moves by
    ``W_i = W_{i-1} (I + h_i A_i)`` (dense ``[d_out, d_in]``, papers' layout), so ``W_i a_i = W_{i-1} a_{i-1} =
    W_0 A(C, x)``; the output correction moves by ``r(c_{i..n}, x) - r(c_{i+1..n}, x)`` per step (``output_steps``,
    divided by the normalized MLP output for a post-MLP norm's scale, and by s where the block adds ``s *`` the MLP
    output), telescoping to Thm A.2's ``delta_b``.

    Without an MLP output bias (Llama and most Hugging Face models) the residual step goes to the output matrix
    ``W_out`` as the rank-one update ``output_steps[i-1] p^T / ||p||^2`` (``output_row = p / ||p||^2``): every
    first-layer map's output on ``a_i`` is ``W_0 A(C, x)`` after step i, so the hidden activation at the query is
    the with-context ``p`` at every step, and each step moves the MLP output by exactly ``output_steps[i-1]``.
    Without an MLP skip connection (``output_name`` None) the first-layer updates alone are exact.
    """

    block: int
    a: Tensor
    residuals: Tensor  # r(c_{i+1..n}, x), [n+1, d_model]
    implicit_lr: Tensor  # [n]
    maps: dict[str, Tensor]  # name -> W_0 [d_out, d_in]
    transposed: dict[str, bool]
    output_name: str | None  # None: no MLP skip connection, no output correction
    output_steps: Tensor  # [n, d_model]: the bias or norm-scale steps, or the columns of W_out's rank-one steps
    inputs: Tensor  # the block's with-context input sequence [1, n+1, d_model]
    target_output: Tensor  # T_{W_0}(C, x) [d_model]
    output_row: Tensor | None = None  # p / ||p||^2 [d_hidden]: the output correction is rank one in W_out
    output_transposed: bool = True  # W_out stored [d_model, d_hidden] (nn.Linear)

    @property
    def n(self) -> int:
        return self.a.shape[0] - 1

    @property
    def deltas(self) -> Tensor:
        return self.a[:-1] - self.a[1:]

    def factor(self, i: int) -> Float[Tensor, "d_in d_in"]:
        """``I + h_i A_i`` for step i = 1..n, ``[d_in, d_in]``."""
        a, delta = self.a[i], self.deltas[i - 1]
        return torch.eye(a.shape[0], dtype=a.dtype, device=a.device) + self.implicit_lr[i - 1] * torch.outer(delta, a)

    def weights(self, i: int) -> dict[str, Tensor]:
        """``W_i`` of every map, computed sequentially: ``W_i = W_{i-1} (I + h_i A_i)``, one rank-one step at a time."""
        out = dict(self.maps)
        for j in range(1, i + 1):
            a, delta, h = self.a[j], self.deltas[j - 1], self.implicit_lr[j - 1]
            out = {name: w + h * torch.outer(w @ delta, a) for name, w in out.items()}
        return out

    def product(self, i: int) -> Float[Tensor, "d_in d_in"]:
        """``(I + h_1 A_1) ... (I + h_i A_i)``, the factorised form (``W_i = W_0 @ product(i)``)."""
        out = torch.eye(self.a.shape[1], dtype=self.a.dtype, device=self.a.device)
        for j in range(1, i + 1):
            out = out @ self.factor(j)
        return out

    def patch(self, i: int) -> dict[str, Tensor]:
        """``{parameter name: delta}`` after removing c_1..c_i, shaped like the parameters (a literal edit)."""
        out = {}
        for name, w in self.weights(i).items():
            delta = w - self.maps[name]
            out[name] = delta if self.transposed[name] else delta.T
        if self.output_name is not None:
            out[self.output_name] = self.output_delta(i)
        return out

    def output_delta(self, i: int) -> Tensor:
        """The output correction after removing c_1..c_i, shaped like its parameter: the summed steps of a bias or
        norm scale, or ``outer(sum of the steps' columns, output_row)`` for ``W_out`` (all steps share the row)."""
        total = self.output_steps[:i].sum(0)
        if self.output_row is None:
            return total
        delta = torch.outer(total, self.output_row)  # [d_model, d_hidden]
        return delta if self.output_transposed else delta.T


def suffix_removal(model: nn.Module, prompt, block: int, dtype: torch.dtype | str | None = None) -> SuffixRemoval:
    """Appendix B dynamics of ``block``, on its with-context input sequence ``resid_pre`` of ``prompt``.

    Runs the block alone on each suffix ``(c_{i+1..n}, x)`` of its input sequence (i = 0..n) and reads what the MLP
    reads at the query (``A = m``) and the residual the MLP output is added to (``r``). Truncating a block's input
    sequence keeps relative positions for rotary, ALiBi and no-position blocks (absolute positions are already in
    the residual); shortformer blocks need their positions re-fed and raise. Mixtures of experts raise (they route
    on the MLP input, which every step changes). A dense MLP without output bias takes each residual step as a
    rank-one update of its output matrix (:class:`SuffixRemoval`).
    """
    with prepared(model, prompt, block, dtype) as (adapter, (block,), inputs):
        if inputs.shape[0] != 1 or inputs.shape[1] < 2:
            raise ValueError("suffix removal takes one prompt (batch 1) with at least one context token")
        require(adapter, "suffix_removal")
        with untouched(adapter.model):
            found = adapter.suffix_runs(inputs, block)
    suffixes, capture_maps, correction = found["runs"], found["maps"], found["correction"]
    a = torch.stack([s["mlp_input"] for s in suffixes])
    residuals = torch.stack([s["residual"] for s in suffixes])
    maps = {m.name: m.weight.detach().T.to(a.dtype) for m in capture_maps}
    steps = (residuals[:-1] - residuals[1:]) / correction.residual_scale  # what the MLP output moves by
    name, row = correction.name, None
    if correction.kind == "scale":  # one block at a time, so Goldwaser's scale-only patch (no W_out flattening)
        steps = core.scale_correction(steps, torch.zeros_like(steps), correction.normalized[0, -1])
    elif correction.kind == "expert_out":
        name, row = _output_row(correction)
    elif correction.kind == "none":
        name, steps = None, torch.zeros_like(steps)
    elif correction.kind != "bias":
        raise UnsupportedArchitectureError(f"output correction {correction.kind!r} is not supported here")
    return SuffixRemoval(block, a, residuals, 1 / a[1:].pow(2).sum(-1), maps,
                         {m.name: m.transposed for m in capture_maps}, name, steps, found["sequence"],
                         suffixes[0]["output"], row)


def _output_row(correction) -> tuple[str, Tensor]:
    """A dense MLP without output bias: ``(W_out's name, p / ||p||^2)`` with ``p`` the with-context hidden
    activation at the query, which every step keeps (its first-layer outputs stay ``W_0 A(C, x)``)."""
    if len(correction.names) != 1 or correction.expert_slots or not bool((correction.routing_weights == 1).all()):
        raise UnsupportedArchitectureError(
            "a mixture of experts without output bias routes on the MLP input, which suffix removal changes step by "
            "step, so its experts' outputs are not reproduced; suffix removal needs a dense MLP")
    hidden = correction.expert_hidden[0][0, -1]
    squared = hidden.pow(2).sum()
    if not squared > 0:
        raise ValueError(dead_hidden(correction.names[0]))
    return correction.names[0], hidden / squared


def edited_block_output(result: SuffixRemoval, model: nn.Module, i: int) -> Tensor:
    """``T_{W_i}(c_{i+1..n}, x)``: a deep copy with the step-i weights written in, run on the shortened sequence."""
    edited = copy.deepcopy(model).to(result.a.dtype)
    with untouched(edited):
        check_copy_is_its_own(model, edited, lambda: edited.blocks[result.block](result.inputs[:, -1:]),
                              "run the block with the patch added in place and restored afterwards")
    with torch.no_grad():
        for name, delta in result.patch(i).items():
            edited.get_parameter(name).add_(delta)
        return edited.blocks[result.block](result.inputs[:, i:])[0, -1]

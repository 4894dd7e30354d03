"""Attribution's attention capture for plain Hugging Face models and TransformerBridge, from the model's own modules.

Each block is located by the adapter's :class:`~implicit_updates.adapters.modules.BlockParts` (``attention``,
``mlp_norm``, ``parallel``). One with-context forward (the adapter's ``_run``) and one run of each block on its query
alone (``run_block_alone``) read, by forward hooks:

- the pattern ``alpha^h_ij`` ``[batch, head, q, k]``, post-softmax: the second output of the attention module, which
  ``transformers`` returns with eager attention (``config._attn_implementation = "eager"`` for the duration of the
  call, restored on any exit; a TransformerBridge reimplements attention and returns it too). Sinks (gpt-oss: the
  returned rows exclude the sink's weight), soft-capping and sliding windows are already in it;
- the values ``v^h_j``: the output of the value projection (``v_proj``, a bridge's ``v``, or the value third of
  GPT-2's ``c_attn`` / GPT-NeoX's per-head ``query_key_value``), with grouped KV heads repeated as ``repeat_kv`` does
  (``num_key_value_groups`` consecutive query heads share one KV head); ``P^h_j = v^h_j W_O^h`` with ``W_O^h`` the
  head's slice of the output projection (``o_proj``, ``c_proj``, ``dense``, ``out_proj``; its bias cancels in
  ``A_i - A(x)``);
- T, the norm between attention and the residual (a bridge's ``ln1_post``, else ``post_attention_layernorm`` where it
  is not the pre-MLP norm: Gemma 2/3, OLMo 2), and N, the pre-MLP norm, as private hook-free copies computing in the
  compute dtype *without* the float32 detour ``transformers``' RMSNorms take (:func:`exact_norm`): the model's own
  rounding then shows as the named ``norm_rounding`` term.

The data flow is checked on both runs before anything is attributed, so a model whose returned pattern does not
describe its output (a value norm or gate, a kernel whose weights differ from what it computes) is refused by name:
the attention output is ``sum_h sum_j alpha^h_ij P^h_j + b_O``; the MLP's residual is ``h + T(A)``; the copies of T
and N reproduce the model's norms to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from implicit_updates.adapters.module_hooks import close, save_input, save_output, unflatten, unwrap
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.math.attribution import AttentionCapture
from implicit_updates.runtime.dispatch import loaded_parameter
from implicit_updates.runtime.precision import KeepPrecision

VALUE_NAMES = ("v", "v_proj")  # a bridge's canonical component, then the HF name
OUTPUT_NAMES = ("o", "o_proj", "c_proj", "dense", "out_proj")
POST_ATTENTION_NORMS = ("ln1_post", "post_attention_layernorm")
NORM_TOL = 1e-5  # copies of T and N against the model's norms: float32 rounding is ~1e-7 of the norm's output


def check_supported_modules(adapter) -> None:
    """Refuse, by name, what this capture cannot read (before any forward)."""
    for b, p in enumerate(adapter.parts):
        if p.whole:
            raise UnsupportedArchitectureError(
                f"attribute() on {type(adapter).__name__}: block {b}'s MLP is a mixture of experts located as a whole "
                f"module ({type(unwrap(p.mlp)).__name__}), which attribution does not read yet; decompose() handles it")
        _value_module(p.attention, b)
        _output_module(p.attention, b)


def capture_modules(adapter, inputs: Tensor, blocks: list[int], query: str) -> list[AttentionCapture]:
    """One :class:`AttentionCapture` per block of an HF or bridge adapter (eager attention while it runs)."""
    check_supported_modules(adapter)
    with eager_attention(adapter):
        return _ModuleAttention(adapter).capture(inputs, blocks, query)


# -- eager attention, restored -------------------------------------------------------------------------------------

def _configs(adapter) -> list:
    """Every config object whose ``_attn_implementation`` the forward reads: the model's, its sub-configs (a
    multimodal model's text config) and each attention module's own."""
    found: dict[int, object] = {}

    def add(cfg) -> None:
        if cfg is None or id(cfg) in found or not hasattr(cfg, "_attn_implementation"):
            return
        found[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            add(getattr(cfg, key, None))

    add(getattr(adapter.hf, "config", None))
    add(adapter.config)
    for p in adapter.parts:
        add(getattr(unwrap(p.attention), "config", None))
    return list(found.values())


@contextmanager
def eager_attention(adapter) -> Iterator[None]:
    """Inside: every config says ``_attn_implementation = "eager"`` (attention modules then return their weights);
    each config's own value is put back on any exit (set directly, so no setter recursion changes anything else)."""
    configs = _configs(adapter)
    missing = object()
    saved = [(c, c.__dict__.get("_attn_implementation_internal", missing)) for c in configs]
    try:
        for c in configs:
            c.__dict__["_attn_implementation_internal"] = "eager"
        yield
    finally:
        for c, value in saved:
            if value is missing:
                c.__dict__.pop("_attn_implementation_internal", None)
            else:
                c.__dict__["_attn_implementation_internal"] = value


# -- the norms as exact functions ----------------------------------------------------------------------------------

class ExactNorm(nn.Module):
    """A private, hook-free copy of a norm module computing in ``dtype`` throughout (:class:`KeepPrecision`)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        from implicit_updates.adapters.attribution_hooks import own_copy

        super().__init__()
        self.inner = own_copy(unwrap(module), dtype)
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        with KeepPrecision(self.dtype):
            return self.inner(x)


def exact_norm(module: nn.Module | None, dtype: torch.dtype) -> ExactNorm | None:
    return None if module is None else ExactNorm(module, dtype)


# -- locating the value and output projections ---------------------------------------------------------------------

def _child(attention: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The first of ``names`` on the attention module: a bridge's own component (which its forward calls), else the
    attribute of the HF module."""
    hf = unwrap(attention)
    for name in names:
        if name in attention._modules and name not in ("_original_component",):
            return name, attention._modules[name]
        if isinstance(getattr(hf, name, None), nn.Module):
            return name, getattr(hf, name)
    return None


def _value_module(attention: nn.Module, b: int) -> tuple[str, nn.Module]:
    found = _child(attention, VALUE_NAMES + ("c_attn", "query_key_value"))
    if found is None or (found[0] == "c_attn" and not hasattr(unwrap(attention), "split_size")):
        raise UnsupportedArchitectureError(
            f"attribute(): block {b}'s attention {type(unwrap(attention)).__name__} has no value projection this "
            "capture can split (v_proj, GPT-2's c_attn, GPT-NeoX's query_key_value), so its values are unknown")
    return found


def _output_module(attention: nn.Module, b: int) -> nn.Module:
    found = _child(attention, OUTPUT_NAMES)
    if found is None or unwrap(found[1]).weight.dim() != 2:
        raise UnsupportedArchitectureError(
            f"attribute(): block {b}'s attention {type(unwrap(attention)).__name__} has no output projection matrix "
            f"({', '.join(OUTPUT_NAMES[1:])}), so no per-head W_O is known")
    return found[1]


def _post_attention_norm(p) -> nn.Module | None:
    """T: the norm between attention and the residual, where the layer has one that is not the pre-MLP norm."""
    if p.parallel:
        return None
    found = _child(p.layer, POST_ATTENTION_NORMS)
    if found is None or (p.mlp_norm is not None and unwrap(found[1]) is unwrap(p.mlp_norm)):
        return None
    return found[1]


class _ModuleAttention:
    def __init__(self, adapter):
        self.adapter = adapter
        self.dtype = adapter.compute_dtype

    def _hooks(self, blocks: list[int], store: dict[str, Tensor]) -> list:
        def save_pattern(key: str) -> Callable:
            def hook(module, args, output):
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if isinstance(weights, Tensor):
                    store[key] = weights.detach().clone()
            return hook

        hooks = []
        for b in blocks:
            p = self.adapter.parts[b]
            hooks += [(p.attention, "fwd", save_pattern(f"{b}.pattern")),
                      (_value_module(p.attention, b)[1], "fwd", save_output(store, f"{b}.v"))]
            norm = _post_attention_norm(p)
            if norm is not None:
                hooks += [(norm, "pre", save_input(store, f"{b}.t_in")), (norm, "fwd", save_output(store, f"{b}.t"))]
        return hooks

    def _per_head(self, b: int, raw: Tensor, n_heads: int) -> Tensor:
        """``P^h_j = v^h_j W_O^h`` ``[batch, head, pos, d_model]`` from the value module's output
        ``[batch, pos, width]``."""
        attention = self.adapter.parts[b].attention
        name, _ = _value_module(attention, b)
        out = unwrap(_output_module(attention, b))
        weight = loaded_parameter(out, "weight").to(self.dtype)
        w_o = weight.T if isinstance(out, nn.Linear) else weight  # [n_heads * d_head, d_model] (Conv1D: as stored)
        d_head = w_o.shape[0] // n_heads
        if name == "c_attn":  # GPT-2: [q | k | v], each split_size wide
            split = unwrap(attention).split_size
            v = raw[..., 2 * split: 3 * split].reshape(*raw.shape[:-1], -1, d_head)
        elif name == "query_key_value":  # GPT-NeoX: per head [q | k | v]
            v = raw.reshape(*raw.shape[:-1], -1, 3 * d_head)[..., 2 * d_head:]
        else:
            v = raw.reshape(*raw.shape[:-1], -1, d_head)
        if n_heads % v.shape[-2]:
            raise UnsupportedArchitectureError(f"attribute(): block {b} has {v.shape[-2]} value heads for {n_heads} "
                                               "query heads, not a grouping repeat_kv describes")
        v = torch.repeat_interleave(v, n_heads // v.shape[-2], dim=-2)  # repeat_kv: head h reads KV head h // groups
        return einsum(v.to(self.dtype), w_o.reshape(n_heads, d_head, -1), "b j h e, h e d -> b h j d")

    def _output_bias(self, b: int) -> Tensor | float:
        out = unwrap(_output_module(self.adapter.parts[b].attention, b))
        return 0.0 if getattr(out, "bias", None) is None else loaded_parameter(out, "bias").to(self.dtype)

    def _residual(self, store: dict[str, Tensor], b: int) -> Tensor:
        """What N reads: the block input in parallel blocks, else N's input (or m itself without N)."""
        p = self.adapter.parts[b]
        if p.parallel:
            return store[f"{b}.resid_pre"]
        return store[f"{b}.r"] if p.mlp_norm is not None else store[f"{b}.m"]

    def _check(self, b: int, store: dict[str, Tensor], pattern: Tensor, values: Tensor, where: str,
               t: nn.Module | None, n: nn.Module | None) -> None:
        """The flow the attribution's equations assume, on one run (``where``), else a one-line refusal."""
        p, cls = self.adapter.parts[b], type(unwrap(self.adapter.parts[b].layer)).__name__
        a = store[f"{b}.attn_out"]
        rebuilt = einsum(pattern, values, "b h i j, b h j d -> b i d") + self._output_bias(b)
        size = einsum(pattern.abs(), values.abs(), "b h i j, b h j d -> b i d")
        if not close(rebuilt, a, size):
            raise UnsupportedArchitectureError(
                f"attribute(): block {b} ({cls}), {where}: the attention output is not the returned pattern times "
                "the values through W_O (a value norm or gate, or weights that are not what the kernel used), so no "
                "exact split over source tokens is known")
        if p.parallel:
            return
        h, r = store[f"{b}.resid_pre"], self._residual(store, b)
        if t is None:
            if not close(h + a, r, h.abs() + a.abs()):
                raise UnsupportedArchitectureError(
                    f"attribute(): block {b} ({cls}), {where}: the MLP's residual is not the block input plus the "
                    "attention output, and no norm after attention (ln1_post, post_attention_layernorm) was found")
        else:
            if f"{b}.t" not in store or not close(store[f"{b}.t_in"], a, a) or \
                    not close(h + store[f"{b}.t"], r, h.abs() + store[f"{b}.t"].abs()):
                raise UnsupportedArchitectureError(
                    f"attribute(): block {b} ({cls}), {where}: the MLP's residual is not the block input plus "
                    f"{type(t.inner).__name__}(attention output), as a norm after attention would make it")
            _same_function(t, a, store[f"{b}.t"], b, "the norm after attention")
        if n is not None:
            _same_function(n, r, store[f"{b}.m"], b, "the pre-MLP norm")

    def capture(self, inputs: Tensor, blocks: list[int], query: str) -> list[AttentionCapture]:
        adapter = self.adapter
        ctx: dict[str, Tensor] = {}
        adapter._run(inputs, adapter._capturing(blocks, ctx) + self._hooks(blocks, ctx), stop_after=max(blocks))
        unflatten(ctx, ctx[f"{blocks[0]}.resid_pre"].shape[:2])
        out = []
        for b in blocks:
            p = adapter.parts[b]
            if f"{b}.pattern" not in ctx:
                raise UnsupportedArchitectureError(
                    f"attribute(): block {b}'s attention ({type(unwrap(p.attention)).__name__}) returned no attention "
                    "weights even with eager attention, so its pattern is unknown")
            if f"{b}.v" not in ctx:
                raise UnsupportedArchitectureError(
                    f"attribute(): block {b}'s value projection ({_value_module(p.attention, b)[0]}) was not called by "
                    "its attention's forward, so its values are unknown")
            x = ctx[f"{b}.resid_pre"]
            query_input = x[:, -1:] if query == "last" else x
            pattern = ctx[f"{b}.pattern"].to(self.dtype)
            values = self._per_head(b, ctx[f"{b}.v"], pattern.shape[1])
            t, n = exact_norm(_post_attention_norm(p), self.dtype), exact_norm(p.mlp_norm, self.dtype)
            self._check(b, ctx, pattern, values, "with context", t, n)
            mine: dict[str, Tensor] = {}
            alone = adapter.run_block_alone(b, query_input, hooks=self._hooks([b], mine))
            batch = x.shape[0]
            mine = {k: rearrange(v, "(b q) ... -> b q ...", b=batch) for k, v in mine.items()}
            q_pattern = mine[f"{b}.pattern"].to(self.dtype)[:, :, :, 0, 0]  # [b, q, head]
            q_values = self._per_head(b, mine[f"{b}.v"][:, :, 0], pattern.shape[1])  # [b, head, q, d]
            norms = {k: v[:, :, 0] for k, v in mine.items() if k.endswith((".t", ".t_in"))}
            self._check_alone(b, {**alone, **norms}, q_pattern, q_values, t, n)
            out.append(AttentionCapture(
                block=b, block_input=x, query_input=query_input, pattern=pattern, values=values,
                query_values=q_values, query_weight=q_pattern.transpose(1, 2), attention=ctx[f"{b}.attn_out"],
                query_attention=alone[f"{b}.attn_out"], mlp_residual=self._residual(ctx, b),
                query_mlp_residual=self._residual(alone, b), mlp_input=ctx[f"{b}.m"],
                query_mlp_input=alone[f"{b}.m"], output_map=t, mlp_norm=n, parallel=p.parallel))
        return out

    def _check_alone(self, b: int, store: dict[str, Tensor], q_pattern: Tensor, q_values: Tensor,
                     t: nn.Module | None, n: nn.Module | None) -> None:
        """:meth:`_check` on the query-alone run: each query row is its own one-token sequence, so its pattern is
        ``[batch * q, head, 1, 1]`` and its values ``[batch * q, head, 1, d]``."""
        flat = {k: rearrange(v, "b q ... -> (b q) 1 ...") for k, v in store.items()}
        pattern = rearrange(q_pattern, "b q h -> (b q) h 1 1")
        values = rearrange(q_values, "b h q d -> (b q) h 1 d")
        self._check(b, flat, pattern, values, "on the query alone", t, n)


def _same_function(norm: nn.Module, x: Tensor, model_out: Tensor, b: int, what: str) -> None:
    """The copy computes the model's norm: ``||copy(x) - model(x)|| <= NORM_TOL ||model(x)||`` at every position
    (the difference is the model's own rounding, reported as ``norm_rounding``; a wrong module would be O(1))."""
    mine = norm(x)
    err = (mine - model_out).norm(dim=-1) / model_out.norm(dim=-1).clamp_min(torch.finfo(x.dtype).tiny)
    if not bool((err <= NORM_TOL).all()):
        raise UnsupportedArchitectureError(
            f"attribute(): block {b}: a copy of {what} ({type(norm.inner).__name__}) does not reproduce the model's "
            f"output (relative difference {float(err.max()):.1e}), so its Jacobian would not be the model's")

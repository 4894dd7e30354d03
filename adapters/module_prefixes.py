"""All prefixes ``[c_1..c_i, x]`` of a prompt in one pass, on a Hugging Face causal LM or a TransformerBridge.

The same decomposition as :mod:`implicit_updates.adapters.hooked_prefixes`, run by the model's own forward:

- the context ``[c_1..c_N]`` runs once (up to the last decomposed block) with the model's own KV cache
  (``transformers.DynamicCache``); Hugging Face caches keys after rotary, so they are what every prefix's query
  attends to;
- the N query paths run in chunks of ``chunk_size`` rows, row r = prefix ``i = r + 1``: token x at
  ``position_ids = i`` (rotary, or GPT-2's absolute ``wpe``), attending to context slots ``j < i`` and to itself.
  The context is shared by the rows through a cache layer that stores nothing. Prefixes of 63 tokens and more run
  as *one sequence* of the rows (:func:`query_sequence`: keys ``[context, rows]``, a 4-D additive mask), so the
  rows' scores against the context are one matrix product with the context's keys, never copied per row; shorter
  ones as a *batch* of one-token sequences with a 2-D padding-style ``attention_mask`` (:func:`query_rows`: the
  context expanded over the rows, one layer at a time). The adapter's own hooks (``_capturing``) record every
  block's with-context quantities;
- each block's query-alone run calls the decoder layer itself on the N rows' block inputs with the arguments the
  model passes it for a one-token sequence (captured once from a one-token dummy forward, batch 1, broadcast over
  the rows), stopping at the MLP once its input, the residual and the attention output are recorded: the MLP of the
  query alone is never needed, and no layer before the block runs again.

Every term is the same sum of the same products as the forward of ``[c_1..c_i, x]``; masked context slots get
softmax weight exactly 0. Hugging Face's eager attention computes its softmax in float32 whatever the model's dtype,
and a CPU softmax rounds a row by the length it is padded to and by the lanes its entries fall in; so a row's own
key sits at slot i (batch) or at a slot equal to i modulo 64 (sequence), as in a prefix's forward, and prefixes are
grouped by prompt-length class with a context pass of their own class (:func:`chunks`): the float32 softmax then
rounds as in each prefix's own forward.

Models the one pass cannot reproduce exactly are refused (:func:`check_module_support`), and the first and last
prefixes are checked against plain forwards of ``[c_1, x]`` and of the prompt, so that a model whose mask or
position logic ignores ``position_ids``/``attention_mask`` is refused instead of decomposed wrongly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor, nn
from tqdm.auto import tqdm

from implicit_updates.adapters.hf_cache import cache_kwarg, forward_hf
from implicit_updates.adapters.module_hooks import (
    Stop,
    close,
    first_tensor,
    raise_stop,
    substitute,
    unflatten,
    unwrap,
)
from implicit_updates.capture import BlockCapture
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.runtime.hooks import module_hooks

NAIVE = "use method='naive' (one decompose per prefix)"
SOFTMAX_LENGTHS = (16, 32, 64)  # row lengths where a CPU softmax kernel changes how it sums (see chunks)
SOFTMAX_LANES = 64  # a multiple of a CPU softmax's float32 lanes (query_sequence)


def check_module_support(adapter, n_tokens: int) -> None:
    """Raise :class:`UnsupportedArchitectureError` (one line, naming the part) unless the one pass is exact here."""
    name = type(adapter.hf).__name__
    if getattr(adapter, "remote", False) is not False:
        raise UnsupportedArchitectureError(
            f"the one-pass prefix dynamics runs the wrapped module locally; remote={adapter.remote!r} is not "
            f"supported: use remote=False or {NAIVE}")
    try:
        from transformers.cache_utils import Cache, DynamicLayer  # noqa: F401
    except ImportError as err:
        raise UnsupportedArchitectureError(
            f"the one-pass prefix dynamics needs transformers' per-layer cache API (transformers 5); {NAIVE}") from err
    whole = [b for b, p in enumerate(adapter.parts) if p.whole]
    if whole:
        raise UnsupportedArchitectureError(
            f"{name}: block {whole[0]}'s MLP is a mixture of experts read as a whole module, whose routed calls the "
            f"one pass does not split per prefix; {NAIVE}")
    cfg = adapter.config
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "use_bidirectional_attention", False) \
            or getattr(cfg, "is_causal", True) is False:
        raise UnsupportedArchitectureError(
            f"{name}: bidirectional attention changes the context's activations with every prefix, so no single "
            f"pass can reuse them; {NAIVE}")
    params = inspect.signature(adapter.hf.forward).parameters
    if cache_kwarg(adapter.hf) is None or "position_ids" not in params or "attention_mask" not in params:
        raise UnsupportedArchitectureError(
            f"{name}: its forward takes no KV cache, position_ids or attention_mask, which the one pass places each "
            f"prefix's query with; {NAIVE}")
    if getattr(cfg, "alibi", False) or getattr(cfg, "position_embedding_type", None) == "alibi":
        raise UnsupportedArchitectureError(f"{name}: ALiBi biases are built from the mask, not position_ids; {NAIVE}")
    window = getattr(cfg, "sliding_window", None)
    sliding = getattr(cfg, "use_sliding_window", True) is not False and (
        "sliding_attention" in (getattr(cfg, "layer_types", None) or ["sliding_attention"]))
    if window is not None and sliding and window < n_tokens:
        raise UnsupportedArchitectureError(
            f"{name}: sliding-window attention (window {window}) shorter than the prompt ({n_tokens} tokens): the "
            f"one pass places every query at the chunk's last cache slot, where the window would cut other context "
            f"than in the prefix's own forward; {NAIVE} or a prompt of at most {window} tokens")
    chunk = getattr(cfg, "attention_chunk_size", None)
    if chunk is not None and chunk < n_tokens:
        raise UnsupportedArchitectureError(
            f"{name}: chunked attention (chunks of {chunk}) shorter than the prompt ({n_tokens} tokens); {NAIVE}")
    limit = getattr(adapter, "n_ctx", None)
    if limit is not None and n_tokens > limit:
        raise UnsupportedArchitectureError(
            f"{name}: the prompt ({n_tokens} tokens) is longer than its {limit} absolute positions")


def _shared_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SharedContextLayer(DynamicLayer):
        """One layer's context keys/values ``[1, kv_heads, L, d_head]``, shared by a batch of one-token query rows:
        ``update`` returns them expanded over the rows (a view) and concatenated with the rows' own, storing
        nothing; the cache length is L, so the query's slot is L (its position comes from ``position_ids``)."""

        def __init__(self, keys: Tensor, values: Tensor, lengths: Tensor, is_sliding: bool):
            super().__init__()
            self.keys, self.values, self.is_initialized = keys, values, True
            self.lengths = lengths
            self.device = keys.device
            self.is_sliding = is_sliding

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            def rows(context: Tensor, own: Tensor) -> Tensor:
                # one copy: [context, own], then each row's own also written over its (masked) slot i
                full = torch.cat([context.expand(own.shape[0], -1, -1, -1), own], dim=-2)
                return full.scatter_(2, self.lengths[:, None, None, None].expand(*own.shape), own)

            return rows(self.keys, key_states), rows(self.values, value_states)

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[-2] + query_length, 0

    return SharedContextLayer


def _run(adapter, ids: Tensor, hooks: list, **kwargs) -> None:
    """The model's own forward on ``ids`` with ``hooks`` and extra forward arguments; a ``Stop`` ends it."""
    try:
        forward_hf(adapter, ids, hooks, **kwargs)
    except Stop:
        pass


def _ids(inputs: Tensor, rows: slice | None, hooks: list, first_layer: nn.Module, count: int | None = None) -> Tensor:
    """Token ids for ``inputs[:, rows]`` (or the query expanded to ``count`` rows of one token); continuous inputs
    become dummy ids with the residuals swapped in at layer 0 (as ``ModuleAdapter._run`` feeds them)."""
    query = inputs[:, -1:]
    part = inputs[:, rows] if count is None else query.expand(count, *query.shape[1:])
    if not inputs.is_floating_point():
        return part
    hooks.insert(0, (first_layer, "pre_kw", substitute(part)))
    return torch.zeros(part.shape[:2], dtype=torch.long, device=inputs.device)


def context_cache(adapter, inputs: Tensor, m: int, last: int, finals: dict[int, Tensor] | None = None
                  ) -> list[tuple[Tensor, Tensor]]:
    """The context ``inputs[:, :m]`` once through layers ``0..last`` with a ``DynamicCache``; per layer its keys and
    values ``[1, kv_heads, m, d_head]`` (keys after rotary, as the cache holds them).

    With ``finals`` (a dict to fill), the whole prompt runs instead (m = N; the query's keys are never read) and
    ``finals[l]`` is layer l's output at the query: the last prefix's row, by a plain forward, for the check."""
    from transformers import DynamicCache

    cache = DynamicCache()
    hooks: list = []
    ids = _ids(inputs, slice(0, m if finals is None else m + 1), hooks, adapter.parts[0].layer)
    if finals is not None:
        for b in range(last + 1):
            hooks.append((adapter.parts[b].layer, "fwd", _save_last(finals, b)))
    hooks.append((adapter.parts[last].layer, "fwd", raise_stop))
    _run(adapter, ids, hooks, use_cache=True, **{cache_kwarg(adapter.hf): cache})
    if len(cache.layers) <= last:
        raise UnsupportedArchitectureError(
            f"{type(adapter.hf).__name__}: its layers did not fill the KV cache ({len(cache.layers)} of {last + 1} "
            f"layers cached); {NAIVE}")
    return [(layer.keys[:, :, :m], layer.values[:, :, :m]) for layer in cache.layers[:last + 1]]


def _save_last(store: dict[int, Tensor], b: int) -> Callable:
    def hook(module, args, output):
        store[b] = first_tensor(output)[0, -1].detach().clone()

    return hook


def query_rows(adapter, inputs: Tensor, context: list[tuple[Tensor, Tensor]], lengths: Tensor, blocks: list[int],
               last: int) -> dict[str, Tensor]:
    """The query paths of prefixes ``lengths`` (``i_r``, increasing) as one batch of one-token sequences; the
    adapter's captures of ``blocks``, each ``[rows, 1, ...]``."""
    from transformers.cache_utils import Cache

    shared = _shared_layer_class()
    length, rows = int(lengths[-1]), lengths.shape[0]
    slots = torch.arange(length + 1, device=lengths.device)
    # row r's keys: context 0..i_r-1, then its own at slot i_r (masked slots after it), the slots a forward of
    # the prefix has: a float32 softmax (HF eager attention) then sums the same values in the same lanes
    sliding = getattr(adapter.config, "layer_types", None)
    cache = Cache(layers=[shared(k[:, :, :length], v[:, :, :length], lengths,
                                 bool(sliding) and sliding[b] == "sliding_attention")
                          for b, (k, v) in enumerate(context)])
    mask = (slots[None, :] <= lengths[:, None]).long()  # context j < i_r, and itself
    store: dict[str, Tensor] = {}
    hooks = adapter._capturing(blocks, store)
    ids = _ids(inputs, None, hooks, adapter.parts[0].layer, count=rows)
    hooks.append((adapter.parts[last].layer, "fwd", raise_stop))
    _run(adapter, ids, hooks, use_cache=True, attention_mask=mask, position_ids=lengths[:, None],
         **{cache_kwarg(adapter.hf): cache})
    unflatten(store, torch.Size((rows, 1)))
    return store


def _sequence_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SequenceContextLayer(DynamicLayer):
        """One layer's context keys/values ``[1, kv_heads, L', d_head]`` (padded), followed by the query rows' own
        as one sequence: ``update`` returns ``[context, rows]`` and stores nothing."""

        def __init__(self, keys: Tensor, values: Tensor, is_sliding: bool):
            super().__init__()
            self.keys, self.values, self.is_initialized = keys, values, True
            self.device = keys.device
            self.is_sliding = is_sliding

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[-2] + query_length, 0

    return SequenceContextLayer


def query_sequence(adapter, inputs: Tensor, context: list[tuple[Tensor, Tensor]], lengths: Tensor,
                   blocks: list[int], last: int) -> dict[str, Tensor]:
    """:func:`query_rows` as one sequence of the rows (batch 1), so every row's scores against the context come from
    one matrix product with the context's keys, never copied per row: keys ``[context (padded to L'), row_0 ..
    row_R-1]`` and a 4-D additive mask letting row r see context ``j < i_r`` and its own key at ``L' + r``. L' is
    the context length padded so that ``L' + r = i_r`` modulo 64: each row's own score lands in the softmax lane
    (and after the same elements of it) as at slot ``i_r`` of its prefix's forward, so a float32 softmax (HF eager
    attention) sums it in the same order; the padded slots are masked zeros. Captures ``[rows, 1, ...]``."""
    from transformers.cache_utils import Cache

    layer = _sequence_layer_class()
    length, rows, start = int(lengths[-1]), lengths.shape[0], int(lengths[0])
    padded = length + (start - length) % SOFTMAX_LANES
    dtype = context[0][0].dtype
    sliding = getattr(adapter.config, "layer_types", None)

    def pad(t: Tensor) -> Tensor:
        return torch.cat([t[:, :, :length], t.new_zeros(*t.shape[:2], padded - length, t.shape[3])], dim=-2)

    cache = Cache(layers=[layer(pad(k), pad(v), bool(sliding) and sliding[b] == "sliding_attention")
                          for b, (k, v) in enumerate(context)])
    slots = torch.arange(padded + rows, device=lengths.device)
    own = torch.arange(rows, device=lengths.device) + padded
    visible = (slots[None, :] < lengths[:, None]) | (slots[None, :] == own[:, None])
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)
    store: dict[str, Tensor] = {}
    hooks = adapter._capturing(blocks, store)
    ids = _ids(inputs, None, hooks, adapter.parts[0].layer, count=rows)  # [rows, 1] -> one sequence below
    if inputs.is_floating_point():
        row_inputs = inputs[:, -1:].expand(1, rows, inputs.shape[-1])
        hooks[0] = (adapter.parts[0].layer, "pre_kw", substitute(row_inputs))
    _run(adapter, rearrange(ids, "r 1 -> 1 r"), [*hooks, (adapter.parts[last].layer, "fwd", raise_stop)],
         use_cache=True, attention_mask=mask[None, None], position_ids=lengths[None, :],
         **{cache_kwarg(adapter.hf): cache})
    unflatten(store, torch.Size((1, rows)))
    return {k: rearrange(v, "1 r ... -> r 1 ...") if v.dim() >= 3 else v for k, v in store.items()}


def layer_arguments(adapter, blocks: list[int]) -> dict[int, tuple[tuple, dict]]:
    """What the model passes each layer in ``blocks`` for a one-token sequence (batch 1): rotary position 0's
    cos/sin, the one-token masks (per layer type), by a dummy forward that stops after the last of them."""
    saved: dict[int, tuple[tuple, dict]] = {}

    def save(b: int) -> Callable:
        def hook(module, args, kwargs):
            saved[b] = (args, kwargs)

        return hook

    hooks = [(adapter.parts[b].layer, "pre_kw", save(b)) for b in blocks]
    hooks.append((adapter.parts[max(blocks)].layer, "fwd", raise_stop))
    dummy = torch.zeros(1, 1, dtype=torch.long, device=adapter.device)
    _run(adapter, dummy, hooks, use_cache=False)
    return saved


def alone_rows(adapter, b: int, x: Tensor, arguments: tuple[tuple, dict]) -> dict[str, Tensor]:
    """Layer ``b`` itself on the rows ``x`` ``[rows, 1, d_model]`` as one-token sequences, with the model's one-token
    ``arguments``; it stops at the MLP once the attention output and the MLP's input are recorded."""
    p = adapter.parts[b]
    args, kwargs = arguments
    store: dict[str, Tensor] = {}

    def stop(module, inputs):
        if f"{b}.attn_out" in store and (p.parallel or p.mlp_norm is None or f"{b}.r" in store):
            raise Stop

    hooks = [*adapter._capturing([b], store), (p.mlp, "pre", stop)]  # after the capture's own pre-hook on the MLP
    try:
        with module_hooks(hooks), adapter.left_as_found():
            if args:
                p.layer(x, *args[1:], **kwargs)
            else:
                p.layer(**{**kwargs, "hidden_states": x})
    except Stop:
        pass
    unflatten(store, x.shape[:2])
    return store


def chunks(n: int, chunk_size: int, device: torch.device) -> list[tuple[int, list[Tensor]]]:
    """Prefix lengths ``1..n`` in classes of prompt length ``i + 1`` (below 16, 32, 64, the rest), each as
    ``(m, chunks)``: chunks of at most ``chunk_size`` lengths, and m the class's largest i.

    A CPU softmax sums rows shorter than its vector width another way than long ones, so a row's float32 softmax
    (Hugging Face eager attention computes it in float32 whatever the model's dtype) rounds by the length it is
    padded to. A prefix's own forward pads its context rows to ``i + 1`` and the query's row is ``i + 1`` long; the
    one pass keeps both in the same class: the class's context runs to ``m`` (:func:`context_cache`), and a chunk
    pads its rows to its largest ``i + 1``.
    """
    out, start = [], 1
    for stop in (*(b - 1 for b in SOFTMAX_LENGTHS if b - 1 <= n), n + 1):  # class: i + 1 < b
        stop = min(stop, n + 1)
        if stop > start:
            out.append((stop - 1, [torch.arange(first, min(first + chunk_size, stop), device=device)
                                   for first in range(start, stop, chunk_size)]))
        start = max(start, stop)
    return out


def _merge(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Chunk stores ``[rows, 1, ...]`` -> ``[1, N, ...]``."""
    return {key: rearrange(torch.cat([part[key] for part in parts]), "r 1 ... -> 1 r ...") for key in parts[0]}


def capture_prefixes(adapter, inputs: Tensor, blocks: list[int], chunk_size: int = 64,
                     progress: bool | None = None) -> list[BlockCapture]:
    """Per block in ``blocks``, a :class:`BlockCapture` whose N "positions" are the N prefixes ``[c_1..c_i, x]``.

    ``inputs``: one prompt ``[1, N+1]`` (token ids) or ``[1, N+1, d_model]`` (continuous, fed at layer 0).
    """
    n = inputs.shape[1] - 1  # (one prompt with a context: checked by prefix_decomposition)
    check_module_support(adapter, inputs.shape[1])
    last = max(blocks)
    parts: list[dict[str, Tensor]] = []
    finals: dict[int, Tensor] = {}  # the last prefix's layer outputs, by a plain forward of the prompt
    with tqdm(total=n, desc="prefixes", disable=not progress, leave=False) as bar:
        for m, lengths in chunks(n, chunk_size, inputs.device):
            context = context_cache(adapter, inputs, m, last, finals if m == n else None)
            run = query_sequence if m + 1 >= SOFTMAX_LENGTHS[-1] else query_rows  # short rows: the batch layout
            for rows in lengths:
                parts.append(run(adapter, inputs, context, rows, blocks, last))
                bar.update(rows.shape[0])
            del context
    ctx = _merge(parts)
    del parts
    _check_first_prefix(adapter, inputs, blocks, ctx)
    _check_rows(adapter, blocks, {b: ctx[f"{b}.resid_post"][0, -1] for b in blocks}, finals, "the whole prompt")
    adapter.flows = {}
    adapter.flat_mlps = set()  # the stores are unflattened; verify's fan-out does not apply to per-prefix queries
    for b in blocks:
        adapter.check_structure(ctx, b)
    arguments = layer_arguments(adapter, blocks)
    captures = []
    for b in blocks:
        rows = rearrange(ctx[f"{b}.resid_pre"], "1 r d -> r 1 d")
        alone = _merge([alone_rows(adapter, b, rows[s:s + max(chunk_size, 256)], arguments[b])
                        for s in range(0, n, max(chunk_size, 256))])
        captures.append(adapter.block_capture(b, ctx, alone, ctx[f"{b}.resid_pre"]))
    return captures


def _check_first_prefix(adapter, inputs: Tensor, blocks: list[int], ctx: dict[str, Tensor]) -> None:
    """Prefix 1's rows against a plain forward of ``[c_1, x]`` (and the last prefix's against the whole prompt's
    forward, :func:`context_cache`): a model whose masks or positions do not follow the ``attention_mask``/
    ``position_ids`` the one pass gives (its queries sit at other cache slots than their positions) differs here."""
    if inputs.shape[1] <= 2:
        return  # one prefix: the last one, checked against the whole prompt
    store: dict[str, Tensor] = {}
    adapter._run(torch.cat([inputs[:, :1], inputs[:, -1:]], dim=1), adapter._capturing(blocks, store),
                 stop_after=max(blocks))
    _check_rows(adapter, blocks, {b: ctx[f"{b}.resid_post"][0, 0] for b in blocks},
                {b: store[f"{b}.resid_post"][0, -1] for b in blocks}, "[c_1, x]")


def _check_rows(adapter, blocks: list[int], mine: dict[int, Tensor], plain: dict[int, Tensor], what: str) -> None:
    for b in blocks:
        if not close(mine[b][None], plain[b][None], plain[b][None].abs()):
            raise UnsupportedArchitectureError(
                f"{type(unwrap(adapter.parts[b].layer)).__name__}: block {b}'s query row does not reproduce a plain "
                f"forward of {what} (its masks or positions do not follow position_ids/attention_mask); {NAIVE}")

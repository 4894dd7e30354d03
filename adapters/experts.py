"""Mixtures of experts whose experts are stacked 3-D parameters (``transformers`` 5: ``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``), and any other MLP located as a whole module rather than map by map.

Fused experts run inside one module's forward as ``F.linear(x, W[e])`` (or ``x @ W[e]``) on slices of a stacked
parameter: no module per expert to hook, and router weights that are bare parameters. A torch function mode,
:class:`LinearCalls`, sees every linear call inside a block's MLP that reads one of its parameters (or an expert's
slice of one), with its input; the MLP's structure is then read from the data, not from names:

- the first-layer maps are the parameters whose calls read rows of the MLP input m: the router, every expert's
  gate/up maps, shared experts and their gate. Each gets the block's rank-one update (Dherin et al. 2025 Eq. 8),
  a stacked one on all its slices at once (they read the same m);
- an expert's hidden activation is the input of its call on a stacked parameter that does not read m (its down
  projection), matched to tokens through the same expert's first-layer call (whose rows are rows of m); with the
  routing weights the experts module is called with, these carry the output correction (Goldwaser et al. 2025's
  per-expert output updates, :func:`~implicit_updates.math.updates.expert_output_updates`). A dense MLP (no stacked
  parameter) carries it on its one output map, with routing weight 1.

For the factored verification the same mode adds ``(x . row) column`` to each patched call's output, one position
per forward (an expert's rows are the tokens routed to it, so several positions in one forward could not be told
apart). A router that reads a transformed m (a dtype cast, a scale) is not found as a first-layer map; ``verify()``
then fails and the zoo test names the architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_MATMULS = (torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm)


@dataclass(frozen=True)
class Param:
    """A parameter of a block's MLP: its ``named_parameters()`` key and where the forward reads it from."""

    name: str
    owner: nn.Module
    attr: str

    def current(self) -> Tensor:
        """What the forward reads now (an upcast copy while the model computes in a higher precision)."""
        return self.owner._parameters[self.attr]


@dataclass
class Call:
    """One linear call on a block's MLP parameter: which one, which expert's slice (None: the whole matrix), whether
    the weight is stored ``[d_out, d_in]`` (``F.linear``) and the input rows ``[n, d_in]``."""

    param: Param
    expert: int | None
    transposed: bool
    x: Tensor


@dataclass
class Patch:
    """``(x . row) column`` added to a call's output; ``experts``/``expert`` as in ``RankOneUpdate``."""

    row: Tensor  # [d_in]
    column: Tensor  # [d_out] or [E * d_out]
    experts: int = 0
    expert: int | None = None

    def column_for(self, expert: int | None) -> Tensor | None:
        if not self.experts or expert is None:
            return self.column
        if self.expert is None:
            return self.column.view(self.experts, -1)[expert]
        return self.column if self.expert == expert else None


@dataclass(eq=False)
class LinearCalls(TorchFunctionMode):
    """Records (and optionally patches) the linear calls on the parameters of the MLP of the block now running.

    ``params``: per block, its MLP's parameters. ``active``: the block whose MLP is running (set by hooks on the MLP
    module); calls elsewhere pass through untouched.
    """

    params: dict[int, list[Param]]
    active: int | None = None
    calls: dict[int, list[Call]] = field(default_factory=dict)
    patches: dict[str, list[Patch]] = field(default_factory=dict)
    routing: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        super().__init__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active is None or not (func is F.linear or func in _MATMULS):
            return out
        x = args[0]
        weight = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
        found = self._find(weight)
        if found is None:
            return out
        param, expert = found
        current = param.current()
        if expert is None and current.dim() == 3 and x.dim() == 3 and x.shape[0] == current.shape[0]:
            # every expert at once (Llama 4: a bmm of [E, tokens, d_in] inputs): one call per expert's slice
            outs = [self._seen(param, e, func is F.linear, x[e], out[e]) for e in range(x.shape[0])]
            return torch.stack(outs)
        return self._seen(param, expert, func is F.linear, x, out)

    def _seen(self, param: Param, expert: int | None, transposed: bool, x: Tensor, out: Tensor) -> Tensor:
        self.calls.setdefault(self.active, []).append(Call(param, expert, transposed, x.detach()))
        for patch in self.patches.get(param.name, ()):
            column = patch.column_for(expert)
            if column is not None:
                out = out + (x * patch.row).sum(-1, keepdim=True) * column
        return out

    def _find(self, weight) -> tuple[Param, int | None] | None:
        if not isinstance(weight, Tensor):
            return None
        for param in self.params.get(self.active, ()):
            current = param.current()
            if weight is current:
                return param, None
            if weight._base is current and current.dim() == 3 and weight.shape == current.shape[1:]:
                return param, (weight.storage_offset() - current.storage_offset()) // current.stride(0)
        return None

    # hooks on a block's MLP module (and its experts module) -----------------------------------------------------

    def enter(self, block: int) -> Callable:
        def hook(module, args):
            self.active = block

        return hook

    def leave(self, module, args, output) -> None:
        self.active = None

    def save_routing(self, block: int) -> Callable:
        """``pre_kw`` hook on a fused experts module: its routing arguments, ``(indices [T, k], weights [T, k])``."""

        def hook(module, args, kwargs):
            tensors = [t for t in (*args[1:], *kwargs.values()) if isinstance(t, Tensor)]
            indices = [t for t in tensors if not t.is_floating_point()]
            weights = [t for t in tensors if t.is_floating_point()]
            if indices and weights:  # else read_flow refuses: no routing it can read
                self.routing[block] = (indices[0].detach(), weights[0].detach())

        return hook


@contextmanager
def eager_experts(owners: set[nn.Module]) -> Iterator[None]:
    """transformers' fused experts modules run their own eager per-expert loop while their calls are watched
    (``config._experts_implementation = "eager"``: the batched and grouped-matmul kernels, the default on some
    setups, read every expert at once); each config's setting is put back on exit."""
    configs = {id(c): c for c in (getattr(o, "config", None) for o in owners)
               if c is not None and hasattr(c, "_experts_implementation_internal")}
    saved = {k: c._experts_implementation_internal for k, c in configs.items()}
    try:
        for c in configs.values():
            c._experts_implementation_internal = "eager"  # this config only (the property's setter recurses)
        yield
    finally:
        for k, c in configs.items():
            c._experts_implementation_internal = saved[k]


def mlp_params(mlp: nn.Module, names: dict[int, str]) -> list[Param]:
    """Every parameter under ``mlp`` (a Hugging Face module tree), with its model-level name."""
    out, seen = [], set()
    for module in mlp.modules():
        for attr, value in module._parameters.items():
            if value is not None and id(value) not in seen and id(value) in names:
                seen.add(id(value))
                out.append(Param(names[id(value)], module, attr))
    return out


def token_rows(x: Tensor, m: Tensor) -> Tensor | None:
    """For each row of ``x`` the index of a bit-identical row of ``m`` ``[T, d]``, or None if one has none; rows of
    ``m`` equal to each other all map to one of them (the same one for every ``x``).

    Rows are keyed by an exact integer hash of their bits (no floating-point rounding), then compared exactly."""
    if x.shape[-1] != m.shape[-1] or x.dtype != m.dtype:
        return None
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] == 0:
        return x.new_zeros(0, dtype=torch.long)
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[m.element_size()]
    mix = torch.randint(1, 2**31 - 1, (m.shape[-1],), generator=torch.Generator().manual_seed(0)).to(m.device)
    key_m = (m.contiguous().view(bits).long() * mix).sum(-1)
    key_x = (x.contiguous().view(bits).long() * mix).sum(-1)
    order = torch.argsort(key_m)
    pos = torch.searchsorted(key_m[order], key_x).clamp_max(len(order) - 1)
    index = order[pos]
    if not torch.equal(m[index], x):
        return None
    return index


def scaled_rows(x: Tensor, m: Tensor) -> bool:
    """``x`` ``[T, d]`` is ``m`` ``[T, d]`` with every row scaled by its own factor (0 included), up to rounding:
    an expert's input in Llama 4, ``m`` times the token's routing score for that expert."""
    if x.shape != m.shape or x.dtype != m.dtype:
        return False
    factor = (x * m).sum(-1, keepdim=True) / m.pow(2).sum(-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    rest = (x - factor * m).norm(dim=-1)
    return bool((rest <= 64 * torch.finfo(m.dtype).eps * x.norm(dim=-1)).all())


@dataclass
class MLPFlow:
    """What the with-context run showed about one block's MLP (see the module docstring)."""

    first: list[tuple[Param, int, bool]]  # (parameter, stacked experts or 0, stored [d_out, d_in])
    output: Param | None  # the map carrying the output correction
    output_experts: int
    output_transposed: bool
    hidden: dict[int | None, Tensor]  # expert (None: the dense map) -> hidden activation per token [T, d_hidden]
    routing_weights: Tensor  # [T, n_experts] (zero where not routed), [T, 1] ones for a dense map
    output_bias: str | None = None  # the mixture's own output bias (JetMoE), which takes the correction instead


def read_flow(calls: list[Call], params: list[Param], m: Tensor, routing: tuple[Tensor, Tensor] | None,
              block: int, output_bias: str | None = None) -> MLPFlow:
    """The first-layer maps and the output-correction carrier of one block's MLP, from its recorded calls.

    Refused: a matrix of the MLP that no recorded linear call read (read through a dtype cast, as the float32
    routers of GLM-4-MoE and ERNIE-4.5-MoE: an update of it could not be exact), experts fed anything but m, and
    experts modules whose routing this cannot read."""
    from implicit_updates.errors import UnsupportedArchitectureError

    matrices = {p.name for p in params if p.current().dim() >= 2 and not p.attr.endswith("bias")}  # stacked biases
    unseen = sorted(matrices - {c.param.name for c in calls})
    if unseen:
        raise UnsupportedArchitectureError(
            f"block {block}: the MLP reads {', '.join(unseen)} other than by a linear call on the parameter or one "
            "expert's slice of it (a copy cast to float32, as float32 routers compute, or a batched matmul over all "
            "experts), so no update of it is known to act exactly")
    m = m.reshape(-1, m.shape[-1])
    first: dict[str, tuple[Param, int, bool]] = {}
    last_tokens: dict[int | None, Tensor] = {}  # per expert slice: the tokens of its latest first-layer call
    outputs: dict[str, list[tuple[Call, Tensor]]] = {}
    scaled_inputs = False  # experts fed m scaled by their routing weight (Llama 4), not weighted at their output
    for call in calls:
        tokens = token_rows(call.x, m)
        stacked = call.param.current().dim() == 3
        if tokens is None and stacked and call.expert is not None and scaled_rows(call.x, m):
            tokens, scaled_inputs = torch.arange(m.shape[0], device=m.device), True
        if tokens is not None:
            first[call.param.name] = (call.param, call.param.current().shape[0] if stacked else 0, call.transposed)
            last_tokens[call.expert] = tokens
        elif call.expert in last_tokens:
            outputs.setdefault(call.param.name, []).append((call, last_tokens[call.expert]))
        else:
            raise UnsupportedArchitectureError(
                f"block {block}: {call.param.name} reads neither the MLP input m nor a hidden activation computed "
                "from m by a map of its own (experts fed a scaled or cast input, as Llama 4's), so no exact "
                "rank-one update is known")
    if not first:
        raise UnsupportedArchitectureError(f"block {block}: no map of the MLP reads its input m directly (a scaled "
                                           "or cast router/expert input?), so no rank-one first-layer update exists")
    if output_bias is not None:  # y = mixture + bias: the bias takes r_i - r_x (Dherin et al. 2025 Thm A.2)
        return MLPFlow(list(first.values()), None, 0, False, {}, m.new_ones(m.shape[0], 1), output_bias)
    stacked_out = [n for n, cs in outputs.items() if cs[0][0].param.current().dim() == 3]
    plain_out = [n for n in outputs if n not in stacked_out]
    if len(stacked_out) > 1 or (not stacked_out and len(plain_out) != 1):
        raise UnsupportedArchitectureError(
            f"block {block}: the MLP's output maps {sorted(outputs)} are not one (stacked or plain) output projection "
            "fed by maps of its input, so the output correction has no known carrier")
    name = (stacked_out or plain_out)[0]
    param = outputs[name][0][0].param
    n_tokens = m.shape[0]
    hidden: dict[int | None, Tensor] = {}
    for call, tokens in outputs[name]:
        x = call.x.reshape(-1, call.x.shape[-1])
        h = hidden.setdefault(call.expert, x.new_zeros(n_tokens, x.shape[-1]))
        h[tokens] = x
    # tokens are matched to one representative of bit-identical rows of m (the same token at the same position in
    # two sequences of a batch): every copy has that row's hidden activation, as it has its routing
    representative = token_rows(m, m)
    hidden = {e: h[representative] for e, h in hidden.items()}
    if not stacked_out:
        return MLPFlow(list(first.values()), param, 0, outputs[name][0][0].transposed, hidden,
                       m.new_ones(n_tokens, 1))
    experts = param.current().shape[0]
    if scaled_inputs:  # the routing weight scales each expert's input: its output enters the mixture with weight 1
        return MLPFlow(list(first.values()), param, experts, outputs[name][0][0].transposed, hidden,
                       m.new_ones(n_tokens, experts))
    if routing is None:
        raise UnsupportedArchitectureError(f"block {block}: the experts module was not called with routing tensors")
    indices, weights = routing
    dense = torch.zeros(n_tokens, experts, dtype=m.dtype, device=m.device)
    if weights.shape == indices.shape:
        dense.scatter_(1, indices.reshape(n_tokens, -1), weights.reshape(n_tokens, -1).to(m.dtype))
    else:
        dense = weights.reshape(n_tokens, experts).to(m.dtype)
    return MLPFlow(list(first.values()), param, experts, outputs[name][0][0].transposed, hidden, dense)


def stacked_view(weight: Tensor, experts: int, transposed: bool) -> Tensor:
    """A (stacked) parameter as the ``[d_in, d_out]`` map ``m @ view`` (experts side by side, expert-major)."""
    if not experts:
        return weight.T if transposed else weight
    if transposed:  # [E, d_out, d_in]
        return weight.reshape(-1, weight.shape[-1]).T
    return weight.permute(1, 0, 2).reshape(weight.shape[1], -1)  # [E, d_in, d_out]

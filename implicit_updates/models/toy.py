"""The seed papers' own small transformer, as a TransformerLens ``HookedRootModule`` (nanoGPT style, one sitting).

Tokens ``[x_i; y_i]`` in R^{d+1} enter the residual stream directly: no embedding, no positional encoding.
Each block is ``resid_mid = resid_pre + attn(ln1(resid_pre))`` and ``resid_post = resid_mid + mlp(ln2(resid_mid))``,
with the skip connections and the norms optional:

- Dherin et al. 2025, Sec. 4: one block WITHOUT the MLP skip (``mlp_skip=False``): ``resid_post = mlp(...)``.
- Innocenti & Achour 2025: 5 blocks with skips, no LayerNorm by default (``layer_norm=True``: Pre-LN), causal,
  bias-free attention (Equinox ``MultiheadAttention``), and an Equinox ``MLP(depth=2)``: three linear maps
  ``d -> d_mlp -> d_mlp -> d`` with GELU (tanh form, ``jax.nn.gelu``'s default) after the two hidden ones.

The theory touches only ``mlp.layers.0.weight`` (the first map, which reads the MLP input) and, with the MLP skip,
``mlp.layers.{depth}.bias`` (the last bias). Hook points carry HookedTransformer's names (``blocks.{l}.hook_resid_pre``,
``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_in``, ``mlp.hook_pre``, ``hook_mlp_out``, ``hook_resid_post``).
Parameter names follow Equinox (``attn.query_proj.weight``, ``mlp.layers.0.weight``, ...), so a model trained by the
reference JAX code (github.com/francesco-innocenti/generalising-icl, ``model.py``) loads with
:meth:`ToyTransformer.load_arrays`.

One documented difference from that reference: its ``analytical.py`` divides by ``||m_x||^2 + 1e-8``; we divide by
``||m_x||^2`` exactly (a zero ``m_x`` raises ``ZeroQueryNormError`` instead of being smoothed). With the 1e-8,
``(W + dW_i) m_x = W m_i - W (m_i - m_x) 1e-8 / (||m_x||^2 + 1e-8)``: the update falls short by
``1e-8 / (||m_x||^2 + 1e-8)`` of itself. Measured on one default block in float64 (``tests/test_toy.py``): the block
output is off by 2.5e-10 with it (ours 5e-16) at ``||m_x||^2 = 6.8``, and by 6.4e-6 with inputs scaled by 1e-4
(``||m_x||^2 = 6.8e-8``, the update 13% short; ours 3e-16).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint


@dataclass(frozen=True)
class ToyConfig:
    """Defaults: Innocenti & Achour's default run (d = 2, 5 blocks, 3 heads of size 1, MLP 3 -> 12 -> 12 -> 3)."""

    d_model: int = 3
    n_layers: int = 5
    n_heads: int = 3
    d_head: int | None = None  # default d_model // n_heads (Equinox's qk_size)
    d_mlp: int = 12
    mlp_depth: int = 2  # hidden layers (Equinox MLP depth): mlp_depth + 1 linear maps
    mlp_skip: bool = True
    attn_skip: bool = True
    layer_norm: bool = False
    causal: bool = True

    @property
    def head_size(self) -> int:
        return self.d_head or self.d_model // self.n_heads


class Attention(nn.Module):
    """Multi-head softmax attention without biases or positions (Equinox ``MultiheadAttention`` defaults)."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        inner = cfg.n_heads * cfg.head_size
        self.query_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.key_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.value_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.output_proj = nn.Linear(inner, cfg.d_model, bias=False)
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (rearrange(p(x), "b s (h e) -> b h s e", h=self.cfg.n_heads)
                   for p in (self.query_proj, self.key_proj, self.value_proj))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.cfg.head_size)
        if self.cfg.causal:
            n = x.shape[1]
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
        pattern = self.hook_pattern(scores.softmax(-1))
        return self.output_proj(rearrange(pattern @ v, "b h s e -> b s (h e)"))


class MLP(nn.Module):
    """``mlp_depth + 1`` linear maps with GELU between them; ``hook_pre`` sees the first map's output (W m + b)."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        sizes = [cfg.d_model] + [cfg.d_mlp] * cfg.mlp_depth + [cfg.d_model]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.hook_pre = HookPoint()

    def forward(self, m: Tensor) -> Tensor:
        h = self.hook_pre(self.layers[0](m))
        for layer in self.layers[1:]:
            h = layer(F.gelu(h, approximate="tanh"))
        return h


class Block(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.d_model) if cfg.layer_norm else nn.Identity()
        self.ln2 = nn.LayerNorm(cfg.d_model) if cfg.layer_norm else nn.Identity()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, resid_pre: Tensor) -> Tensor:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre)))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out if self.cfg.attn_skip else attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.hook_mlp_in(self.ln2(resid_mid))))
        return self.hook_resid_post(resid_mid + mlp_out if self.cfg.mlp_skip else mlp_out)


class ToyTransformer(HookedRootModule):
    """Blocks on continuous tokens ``[batch, pos, d_model]``; the prediction is the last coordinate of the last token.

    ``forward(x, start_at_layer=0, stop_at_layer=None)`` returns the residual after block ``stop_at_layer - 1`` (all
    blocks by default), so ``implicit_updates.experiments.icl.predict``/``loss``/``train`` work on it as on a
    HookedTransformer.
    """

    def __init__(self, cfg: ToyConfig | None = None, seed: int | None = None, **overrides):
        super().__init__()
        self.cfg = cfg = ToyConfig(**overrides) if cfg is None else cfg
        if cfg.head_size < 1 or cfg.mlp_depth < 1:
            raise ValueError("need d_head >= 1 (d_model >= n_heads or an explicit d_head) and mlp_depth >= 1")
        with torch.random.fork_rng():  # a seed gives the same weights without touching the global RNG
            if seed is not None:
                torch.manual_seed(seed)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.setup()

    def forward(self, x: Tensor, start_at_layer: int | None = 0, stop_at_layer: int | None = None) -> Tensor:
        for block in self.blocks[start_at_layer or 0 : stop_at_layer]:
            x = block(x)
        return x

    def predict(self, prompts: Tensor) -> Tensor:
        """``y_hat``: the last coordinate of the query (last) token after the last block."""
        return self(prompts)[:, -1, -1]

    # -- plain arrays in and out (e.g. a model trained by the reference JAX/Equinox code) --------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every parameter as a numpy array, keyed like ``named_parameters()`` (``nn.Linear`` layout: [out, in])."""
        return {name: p.detach().cpu().numpy().copy() for name, p in self.named_parameters()}

    def load_arrays(self, arrays: dict[str, np.ndarray | bool | int]) -> ToyTransformer:
        """Copy ``arrays`` into the parameters, in place; every parameter must be given, with its exact shape.

        Keys are ``named_parameters()`` names or Equinox tree paths (``jax.tree_util.keystr``) of the reference
        code's model: ``.blocks[0].attn.query_proj.weight``, ``.blocks[0].mlp.layers[2].bias`` (Equinox
        ``Linear.weight`` is ``[out, in]`` like ``nn.Linear``), its norms ``.ln_1``/``.ln_2`` (current) or
        ``.norm_attn``/``.norm_mlp`` (older) as our ``ln1``/``ln2``. The reference builds both norms even without
        LayerNorm; a model without them (``layer_norm=False``) accepts them if they are the identity (weight 1,
        bias 0; a trained norm is not, so it must have been used) and ignores them. The tree's switches
        (``use_layer_norm``, ``use_skips``, ``causal_attn``, ``n_blocks``) must agree with this model's config; its
        other leaves without a ``shape`` (dropout settings, activation functions) are ignored. Checked against the
        reference's own forward and updates in tests/test_toy.py.
        """
        params = dict(self.named_parameters())
        given: dict[str, np.ndarray] = {}
        for key, value in arrays.items():
            name = equinox_key(key)
            if name in given:
                raise KeyError(f"{key!r} names the parameter {name} a second time")
            given[name] = value
        self._check_flags({k: v for k, v in given.items() if k.rsplit(".", 1)[-1] in FLAGS})
        # the tree's other leaves that hold no array (dropout settings, activation functions) are not parameters
        given = {k: v for k, v in given.items() if k.rsplit(".", 1)[-1] not in FLAGS and hasattr(v, "shape")}
        if not self.cfg.layer_norm:
            given = {k: v for k, v in given.items() if not self._unused_norm(k, v)}
        missing, unexpected = params.keys() - given.keys(), given.keys() - params.keys()
        if missing or unexpected:
            raise KeyError(f"arrays do not match the parameters: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
        with torch.no_grad():
            for name, p in params.items():
                value = torch.as_tensor(np.asarray(given[name]), dtype=p.dtype, device=p.device)
                if value.shape != p.shape:
                    raise ValueError(f"{name}: array shape {tuple(value.shape)} != parameter shape {tuple(p.shape)}")
                p.copy_(value)
        return self

    def _unused_norm(self, name: str, value) -> bool:
        """``blocks.L.ln1/ln2.weight/bias`` that a model without LayerNorm can drop: the identity, right shape."""
        match = re.fullmatch(r"blocks\.(\d+)\.ln[12]\.(weight|bias)", name)
        if match is None or int(match[1]) >= self.cfg.n_layers:
            return False
        value = np.asarray(value)
        if value.shape != (self.cfg.d_model,):
            raise ValueError(f"{name}: array shape {value.shape} != ({self.cfg.d_model},), a norm of this model")
        if not np.all(value == (1.0 if match[2] == "weight" else 0.0)):
            raise ValueError(f"{name} is not the identity (weight 1, bias 0): these arrays come from a model with "
                             "LayerNorm; build ToyTransformer(layer_norm=True)")
        return True

    def _check_flags(self, flags: dict[str, object]) -> None:
        """The reference model's switches (tree leaves that are not arrays) against this model's config."""
        cfg = self.cfg
        ours = {"use_layer_norm": {"layer_norm": cfg.layer_norm}, "causal_attn": {"causal": cfg.causal},
                "use_skips": {"attn_skip": cfg.attn_skip, "mlp_skip": cfg.mlp_skip},
                "n_blocks": {"n_layers": cfg.n_layers}}
        for key, value in flags.items():
            for field, mine in ours[key.rsplit(".", 1)[-1]].items():
                if np.asarray(value).item() != mine:
                    raise ValueError(f"the arrays say {key}={np.asarray(value).item()!r} but this model has "
                                     f"{field}={mine!r}: build ToyTransformer({field}={np.asarray(value).item()!r})")


# The reference model's non-array leaves, checked against the config by ``load_arrays``.
FLAGS = ("use_layer_norm", "causal_attn", "use_skips", "n_blocks")
NORM_NAMES = {"ln_1": "ln1", "ln_2": "ln2", "norm_attn": "ln1", "norm_mlp": "ln2"}


def equinox_key(key: str) -> str:
    """``.blocks[0].ln_1.weight`` (or the older ``.norm_attn.weight``) -> ``blocks.0.ln1.weight``; our own names
    pass through unchanged."""
    key = re.sub(r"\[(\d+)\]", r".\1", key).lstrip(".")
    return re.sub(r"(?<=\.)(ln_1|ln_2|norm_attn|norm_mlp)(?=\.)", lambda m: NORM_NAMES[m[1]], key)

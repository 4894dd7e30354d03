"""The helpers of the hooks on models run by their own forward (``adapters/module_hooks.py``) on the inputs that the
layouts of ``test_hf.py`` do not give them: an MLP that flattens its input to ``[rows, d]`` (OPT), a post-MLP norm
computing ``weight * z`` (OLMo 2), a layer called with keyword hidden states, a layer returning a tuple, and the
data-flow check's tolerance at its boundary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from implicit_updates.adapters.module_hooks import (
    add,
    add_first,
    add_rank_one,
    close,
    like,
    normalized,
    save_hidden,
    substitute,
    unflatten,
)
from implicit_updates.runtime.hooks import module_hooks

F64 = torch.float64


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def test_edits_of_a_flattened_map_equal_its_unflattened_edits():
    """OPT's MLP flattens its ``[rows, 1, d]`` input to ``[rows, d]``: a rank-one edit's and an output-bias edit's
    per-row factors ``[rows, 1, d]`` act on the flattened rows as on the unflattened ones (and as the literal edit
    ``W + outer(column, row)``, ``b + delta``, row by row)."""
    torch.manual_seed(0)
    fc = nn.Linear(4, 3, dtype=F64)
    x = randn(3, 1, 4)  # three rows (a factored run's batch), one position each
    row, column, delta = randn(3, 1, 4, seed=1), randn(3, 1, 3, seed=2), randn(3, 1, 3, seed=3)
    flat = x.reshape(3, 4)
    for hook in (add_rank_one(row, column), add(delta)):
        edited = hook(fc, (x,), fc(x))
        edited_flat = hook(fc, (flat,), fc(flat))
        assert edited_flat.shape == (3, 3) and torch.equal(edited_flat, edited.reshape(3, 3))
    literal = torch.stack([nn.functional.linear(x[r], fc.weight + torch.outer(column[r, 0], row[r, 0]), fc.bias)
                           for r in range(3)])
    assert float((add_rank_one(row, column)(fc, (flat,), fc(flat)) - literal.reshape(3, 3)).abs().max()) <= 1e-14
    assert torch.equal(add(delta)(fc, (flat,), fc(flat)), (fc(x) + delta).reshape(3, 3))


def test_like_leaves_a_factor_of_the_module_s_shape_as_it_is():
    factor = randn(3, 1, 4)
    assert like(factor, randn(3, 5, 4)) is factor
    assert like(factor, randn(3, 4)).shape == (3, 4)


def test_unflatten_restores_the_rows_of_a_flattened_mlp():
    """What an MLP saw flattened to ``[batch * pos, d]`` goes back to ``[batch, pos, d]``; the rest is left alone."""
    hidden, resid = randn(6, 5), randn(2, 3, 4)
    store = {"0.m": hidden, "0.resid_pre": resid}
    unflatten(store, torch.Size((2, 3)))
    assert store["0.resid_pre"] is resid
    assert store["0.m"].shape == (2, 3, 5) and torch.equal(store["0.m"], hidden.reshape(2, 3, 5))
    assert torch.equal(store["0.m"][1, 2], hidden[5])  # row-major: batch 1, position 2 is flattened row 5


def _norms():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    return {"olmo2-rmsnorm": Olmo2RMSNorm(8), "layernorm": nn.LayerNorm(8), "gemma2-rmsnorm": Gemma2RMSNorm(8)}


@pytest.mark.parametrize("kind", ["olmo2-rmsnorm", "layernorm", "gemma2-rmsnorm"])
def test_normalized_is_what_a_scale_patch_multiplies(kind):
    """``normalized(norm, x)``: what a change ``delta`` of the norm's scale adds to its output (``delta * z``), for
    a norm computing ``weight * z`` (OLMo 2's post-MLP RMSNorm, a LayerNorm with a bias: the scale set to 1, the
    bias to 0) as for one computing ``(1 + weight) * z`` (Gemma's: the scale set to 0); the norm's own parameters
    are back afterwards."""
    norm = _norms()[kind].to(F64)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(0.5 + randn(*p.shape, seed=4))
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    x, delta = randn(2, 3, 8, seed=5), 1e-3 * randn(8, seed=6)
    z = normalized(norm, x)
    assert z.dtype == F64 and all(torch.equal(v, before[k]) for k, v in norm.state_dict().items())
    out = norm(x)
    with torch.no_grad():
        norm.weight.add_(delta)
    tol = 1e-6 if kind.startswith("gemma") else 1e-14  # Gemma's norm computes in float32 (1 + weight.float())
    assert float((norm(x) - out - delta * z).abs().max()) <= tol
    rms = (z.pow(2).mean(-1) if kind != "layernorm" else z.var(-1, unbiased=False)).sqrt()
    assert float((rms - 1).abs().max()) <= 1e-4  # z itself, the normalized input (not 0, not 2 z)


class _Layer(nn.Module):
    """A decoder layer's signature: hidden states (positional or keyword) and keyword-only extras."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4, dtype=F64)

    def forward(self, hidden_states, attention_mask=None):
        return self.proj(hidden_states) * (1 if attention_mask is None else attention_mask)


@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword"])
def test_substitute_and_save_hidden_on_keyword_hidden_states(keyword):
    """A layer called with ``hidden_states=`` (as some models call their layers): ``save_hidden`` reads it,
    ``substitute`` replaces it, the other arguments passing through untouched."""
    layer, h, x, mask = _Layer(), randn(1, 3, 4), randn(1, 3, 4, seed=7), torch.tensor(2.0, dtype=F64)
    store = {}
    with module_hooks([(layer, "pre_kw", save_hidden(store, "in"))]):
        plain = layer(hidden_states=h, attention_mask=mask) if keyword else layer(h, attention_mask=mask)
    assert torch.equal(store["in"], h) and torch.equal(plain, layer(h) * 2)
    hooks = [(layer, "pre_kw", substitute(x)), (layer, "pre_kw", save_hidden(store, "swapped"))]
    with module_hooks(hooks):
        out = layer(hidden_states=h, attention_mask=mask) if keyword else layer(h, attention_mask=mask)
    assert torch.equal(store["swapped"], x) and torch.equal(out, layer(x) * 2)


def test_add_first_adds_to_a_tensor_or_a_tuple_s_first_tensor():
    """A layer returning a tensor, or a tuple (hidden states first, then e.g. attention weights): ``delta`` added
    to the hidden states only, the rest of the tuple as it was."""
    h, extra, delta = randn(2, 3, 4), randn(2, 1, 3, 3, seed=8), randn(1, 1, 4, seed=9)
    hook = add_first(delta)
    assert torch.equal(hook(None, (), h), h + delta)
    out = hook(None, (), (h, extra, None))
    assert len(out) == 3 and torch.equal(out[0], h + delta) and out[1] is extra and out[2] is None


def test_close_is_per_position_up_to_1e4_eps_of_its_scale():
    """``close(a, b, size)``: per position, ``||a - b|| <= 1e4 eps ||size||`` (equality included); exact zeros are
    close; one position's large scale does not excuse another's difference."""
    eps = torch.finfo(F64).eps
    one = torch.ones(1, 1, dtype=F64)
    for scale in (1.0, 2.0, 1e6):
        size = scale * one
        assert close(1e4 * eps * size, 0 * one, size)  # at the boundary
        assert not close(1.0001e4 * eps * size, 0 * one, size)  # just past it
        assert close(0.6e4 * eps * size, 0 * one, size) and not close(1e-8 * size, 0 * one, size)
    zeros = torch.zeros(2, 3, dtype=F64)
    assert close(zeros, zeros, zeros)  # a position where everything is 0
    sizes = torch.tensor([[1e6, 0, 0], [1.0, 0, 0]], dtype=F64)
    a = torch.tensor([[1e-6, 0, 0], [0, 0, 0]], dtype=F64)  # position 0 within 1e4 eps of its 1e6 scale
    assert close(a, zeros, sizes)
    assert not close(torch.tensor([[0, 0, 0], [1e-6, 0, 0]], dtype=F64), zeros, sizes)  # position 1 is not

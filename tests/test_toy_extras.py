"""Attribution and the one-pass prefix dynamics on the toy model (``adapters/toy_extras.py``): completeness to float64
rounding and the decomposition it splits equal to ``iu.decompose``'s, the capture against a plain float64 forward,
corrupted captures that must show, one pass against one ``decompose`` per prefix (with and without LayerNorm and the
MLP skip) and against plain forwards of every prefix, and the refusal without the causal mask. A few seconds on one
thread."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_untouched, check_onepass, rel_err
from einops import einsum
from test_attribution import corrupted_errors

import implicit_updates as iu
from implicit_updates.analyses.decompose import prepared, untouched
from implicit_updates.analyses.dynamics import max_relative_difference, prefix_decomposition
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.experiments import icl
from implicit_updates.models.toy import ToyTransformer

F64 = torch.float64
TOL = 1e-12  # completeness, as tests/test_attribution.py
EXACT = 1e-10

VARIANTS = {
    "default": dict(n_layers=2),
    "layer-norm": dict(n_layers=2, layer_norm=True),
    "no-mlp-skip": dict(n_layers=2, mlp_skip=False),
    "layer-norm-no-mlp-skip": dict(n_layers=2, layer_norm=True, mlp_skip=False),
    "no-attn-skip": dict(n_layers=2, attn_skip=False),
    "one-wide-head": dict(n_layers=2, n_heads=1, d_head=4),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def toy(**overrides) -> ToyTransformer:
    model = ToyTransformer(seed=0, **overrides)
    with torch.no_grad():  # random LayerNorm affine parameters and biases, so no term is trivially zero
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def prompt(n: int = 7, seed: int = 0) -> torch.Tensor:
    return icl.sample_tasks(1, n, 2, torch.Generator().manual_seed(seed)).prompts  # [1, n + 1, 3]


# -- attribution ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["last", "self"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_attribution_is_complete_and_splits_the_decomposition(name, query):
    model, x = toy(**VARIANTS[name]), prompt()
    with assert_untouched(model):
        result = iu.attribute(model, x, query=query, dtype=F64)
        plain = iu.decompose(model, x, query=query, dtype=F64)
    assert result.completeness_error() <= TOL
    assert max_relative_difference(result.decomposition, plain) <= 1e-12
    for b in result.blocks:  # where the update is nonzero (not "self" at position 0), every position's shares sum to 1
        per_term, extras = b.scores()
        total = per_term.sum((-1, -2)) + sum(extras.values())
        live = sum(c.pow(2).sum(-1) for c in b.columns.values()) > 0
        assert int(live.sum()) >= live.numel() - 1
        assert torch.allclose(total[live], torch.ones_like(total[live]), atol=1e-12, rtol=0)


def test_attribution_capture_is_the_plain_forward():
    """Pattern, per-head values through W_O and the attention output against ``run_with_cache`` of a float64 copy:
    ``sum_h pattern^h P^h`` is the block's attention output."""
    model, x = toy(**VARIANTS["layer-norm"]), prompt()
    with prepared(model, x, None, F64) as (adapter, blocks, inputs), untouched(model):
        captures = adapter.capture_attention(inputs, blocks, "last")
    with torch.no_grad():
        _, cache = copy.deepcopy(model).to(F64).run_with_cache(x.to(F64))
    for cap in captures:
        p = f"blocks.{cap.block}"
        assert torch.equal(cap.pattern, cache[f"{p}.attn.hook_pattern"])
        rebuilt = einsum(cap.pattern, cap.values, "b h i j, b h j d -> b i d")
        assert rel_err(rebuilt, cache[f"{p}.hook_attn_out"]) <= 1e-14
        assert rel_err(cap.mlp_input, cache[f"{p}.hook_mlp_in"]) == 0.0


def test_layer_norm_paths_near_its_pole_need_nodes_and_completeness_says_so():
    """LayerNorm's Jacobian has its pole where the centred residual vanishes, not at the origin where
    ``path_nodes`` centres its change of variables: with d_model = 3 (a 2-d centred space) one block's path passes at
    0.06 of its start's centred norm and 64 nodes leave 1.7e-9; completeness reports it (a too-short quadrature
    shows), and more nodes are exact."""
    model, x = toy(n_layers=2, n_heads=1, d_head=4, layer_norm=True), prompt()
    assert iu.attribute(model, x, dtype=F64, nodes=2).completeness_error() > 1e-6
    assert iu.attribute(model, x, dtype=F64, nodes=128).completeness_error() <= TOL


def test_a_corrupted_pattern_shows_at_its_block_and_position():
    model, x = toy(**VARIANTS["layer-norm"]), prompt()

    def corrupt(cap):
        if cap.block == 1:
            cap.pattern = cap.pattern.clone()
            cap.pattern[0, 2, 5, 3] += 1e-6  # head 2's weight on source token 3, at position 5

    errors = corrupted_errors(model, corrupt, x)
    assert errors[1][5] > 1e-8
    assert errors[1][torch.arange(8) != 5].max() <= TOL
    assert float(errors[0].max()) <= TOL


def test_a_wrong_value_projection_shows():
    model, x = toy(**VARIANTS["default"]), prompt()

    def corrupt(cap):
        if cap.block == 0:
            cap.values = cap.values.clone()
            cap.values[0, 1, 4] *= 1.0 + 1e-6  # head 1's projected value of source token 4

    errors = corrupted_errors(model, corrupt, x)
    assert float(errors[0][4:].min()) > 1e-10  # every position attending to token 4
    assert float(errors[0][:4].max()) <= TOL
    assert float(errors[1].max()) <= TOL


# -- one-pass prefix dynamics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_onepass_equals_naive(name, chunk_size):
    check_onepass(toy(**VARIANTS[name]), prompt(), chunk_size=chunk_size)  # untouched, <= 1e-10, verify <= 1e-10


def test_onepass_block_subset():
    check_onepass(toy(n_layers=3, layer_norm=True), prompt(), blocks=[0, 2], chunk_size=2)


def test_onepass_against_plain_forwards_of_every_prefix():
    """Each prefix's query input and with-context output at every block, against ``run_with_cache`` of the prompt
    ``[c_1..c_i, x]`` on a float64 copy (no adapter code)."""
    model, x = toy(**VARIANTS["layer-norm-no-mlp-skip"]), prompt()
    with assert_untouched(model):
        one = prefix_decomposition(model, x, dtype=F64, chunk_size=3)
    ref = copy.deepcopy(model).to(F64)
    for i in range(1, x.shape[1]):
        with torch.no_grad():
            _, cache = ref.run_with_cache(torch.cat([x[:, :i], x[:, -1:]], 1).to(F64))
        for b in range(model.cfg.n_layers):
            update = one.block(b)
            assert rel_err(update.query_input[0, i - 1], cache[f"blocks.{b}.hook_resid_pre"][0, -1]) <= 1e-14
            assert rel_err(update.target_output[0, i - 1], cache[f"blocks.{b}.hook_resid_post"][0, -1]) <= 1e-14


def test_onepass_refuses_without_the_causal_mask():
    model, x = toy(n_layers=2, layer_norm=True, causal=False), prompt()
    with assert_untouched(model), pytest.raises(UnsupportedArchitectureError, match="causal=False") as info:
        prefix_decomposition(model, x, dtype=F64, method="onepass")
    assert "method='naive'" in str(info.value) and "\n" not in str(info.value)
    with assert_untouched(model):  # the naive method is the way there
        naive = prefix_decomposition(model, x, dtype=F64, method="naive")
    assert naive.verify().max_rel_err <= EXACT


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5])
def test_a_bad_chunk_size_is_refused_before_any_backend_runs(chunk_size):
    """The one pass's ``chunk_size`` is checked once, by ``prefix_decomposition``, for every backend."""
    model = toy(**VARIANTS["default"])
    with assert_untouched(model), pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        prefix_decomposition(model, prompt(), dtype=F64, method="onepass", chunk_size=chunk_size)

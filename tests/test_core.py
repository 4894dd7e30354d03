"""Property tests of the pure math in implicit_updates.core (float64, random shapes)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_updates import core

dims = st.integers(min_value=1, max_value=12)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=50, deadline=None)
@given(d_in=dims, d_out=dims, n=dims, seed=seeds)
def test_rank_one_update_maps_query_onto_every_position(d_in, d_out, n, seed):
    """Dherin Eq. 8: (W + dW_i) m_x = W m_i for every position i."""
    weight = randn(d_in, d_out, seed=seed)
    m = randn(1, n, d_in, seed=seed + 1)
    m_x = randn(1, 1, d_in, seed=seed + 2)
    row = core.implicit_row(m_x)
    column = core.implicit_column(m, m_x, weight)
    for i in range(n):
        patched = weight + core.rank_one_delta(row[0, 0], column[0, i])
        torch.testing.assert_close(m_x[0, 0] @ patched, m[0, i] @ weight, rtol=1e-10, atol=1e-10)


@settings(max_examples=50, deadline=None)
@given(d_in=dims, d_out=dims, n=dims, seed=seeds)
def test_factored_norms_and_rank_match_dense(d_in, d_out, n, seed):
    rows, columns = randn(n, d_in, seed=seed), randn(n, d_out, seed=seed + 1)
    dense = sum(core.rank_one_delta(r, c) for r, c in zip(rows, columns, strict=True))
    k = min(n, d_in, d_out)
    torch.testing.assert_close(core.summed_update_singular_values(rows, columns)[:k],
                               torch.linalg.svdvals(dense)[:k], rtol=1e-9, atol=1e-9)
    sv = core.summed_update_singular_values(rows, columns)
    assert core.numerical_rank(sv, max(d_in, d_out)) == torch.linalg.matrix_rank(dense).item()
    torch.testing.assert_close(core.factored_frobenius_norm(rows[0], columns[0]),
                               core.rank_one_delta(rows[0], columns[0]).norm())
    shared = rows[:1].expand(n, -1)  # query="last": one row for every position -> rank one
    scale = shared.norm() * columns.norm()  # rounding of the factored product, even where the columns cancel
    assert core.numerical_rank(core.summed_update_singular_values(shared, columns), max(d_in, d_out), scale) == 1


def test_factored_rank_tolerates_cancelling_updates():
    """Found by hypothesis: a shared row with cancelling columns leaves a 4.5e-16 singular value beside 0.76, above
    the max(sigma)-relative tolerance; the factors' scale keeps it rank one."""
    rows, columns = randn(2, 2, seed=665639), randn(2, 2, seed=665640)
    shared = rows[:1].expand(2, -1)
    sv = core.summed_update_singular_values(shared, columns)
    assert core.numerical_rank(sv, 2, shared.norm() * columns.norm()) == 1


@settings(max_examples=30, deadline=None)
@given(d=dims, seed=seeds)
def test_scale_correction_moves_query_onto_position(d, seed):
    """Goldwaser et al.: (w + dw) * z = w * z + (r_i - r_x)."""
    w, z, r, r_x = (randn(d, seed=seed + k) for k in range(4))
    dw = core.scale_correction(r, r_x, z)
    torch.testing.assert_close(r_x + (w + dw) * z, r + w * z, rtol=1e-10, atol=1e-10)


def rms_normalize(x, eps=1e-6):
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


@settings(max_examples=50, deadline=None)
@given(d=dims, seed=seeds, tiny=st.sampled_from([1.0, 1e-9]))
def test_flattened_post_norm_patch_is_exact_and_bounded(d, seed, tiny):
    """The flattened MLP output keeps the signs, with every entry the same size (the RMS, or 1); the scale patch then
    makes r_x + (w + dw) z' the block output, and stays as small as the block's output where z has tiny entries."""
    h, w, y, r_x = (randn(2, d, seed=seed + k) for k in range(4))
    h[:, 0] *= tiny
    flat = core.flattened_output(h)
    assert torch.all((flat < 0) == (h < 0))
    size = h.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1.0)
    torch.testing.assert_close(flat.abs(), size.expand_as(h), rtol=1e-14, atol=0)
    z_flat = rms_normalize(flat)
    dw = core.post_norm_scale(y, r_x, w * z_flat, z_flat)
    torch.testing.assert_close(r_x + (w + dw) * z_flat, y, rtol=1e-12, atol=1e-12)
    assert dw.abs().max() <= 1.01 * ((y - r_x).abs().max() + w.abs().max())
    if tiny < 1 and d > 1:  # Goldwaser's scale-only patch divides by z itself: ~1e9 here
        assert core.scale_correction(y - w * rms_normalize(h), r_x, rms_normalize(h)).abs().max() > 1e6


def test_flattened_output_of_zero_is_plus_one():
    """A zero MLP output still flattens (sign 0 -> +1, size 1), so the scale patch exists there too."""
    torch.testing.assert_close(core.flattened_output(torch.zeros(1, 2, 4, dtype=torch.float64)),
                               torch.ones(1, 2, 4, dtype=torch.float64))


def test_zero_norm_query_is_an_error():
    with pytest.raises(core.ZeroQueryNormError, match="zero norm"):
        core.implicit_row(torch.zeros(1, 1, 4, dtype=torch.float64))


def test_scale_correction_refuses_exact_zero():
    z = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="exact zero"):
        core.scale_correction(torch.ones(2), torch.zeros(2), z)


def test_reproduction_errors():
    target = torch.tensor([[[3.0, 4.0]]], dtype=torch.float64)
    errors = core.reproduction_errors(target + torch.tensor([0.0, 0.5], dtype=torch.float64), target)
    assert errors == {"msd": 0.125, "max_abs_err": 0.5, "max_rel_err": 0.1}

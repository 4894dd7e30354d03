"""Property tests of the pure math in implicit_updates.math.core (float64, random shapes)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicit_updates.math import core

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


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 64), top=st.floats(1e-3, 1e3), side=st.sampled_from(["below", "at", "above"]),
       scaled=st.booleans())
def test_numerical_rank_tolerance_at_its_boundary(size, top, side, scaled):
    """A singular value counts iff it exceeds ``max(max(sigma), scale) * size * eps`` (numpy's matrix_rank rule,
    with the factors' scale): exactly at the tolerance it does not, one ulp above it does, as numpy says for the
    diagonal matrix with these singular values."""
    eps = torch.finfo(torch.float64).eps
    sigma = torch.tensor([top], dtype=torch.float64)
    scale = 10 * top if scaled else None
    tol = (torch.tensor(scale, dtype=torch.float64) if scaled else sigma.max()) * size * eps
    second = {"below": torch.nextafter(tol, torch.zeros(())), "at": tol, "above": torch.nextafter(tol, 2 * tol)}[side]
    sv = torch.cat([sigma, second.reshape(1)])
    expected = 2 if side == "above" else 1
    assert core.numerical_rank(sv, size, scale) == expected
    if not scaled and size >= 2:  # numpy: S.max() * max(M, N) * eps, strict
        assert np.linalg.matrix_rank(np.diag(np.pad(sv.numpy(), (0, size - 2)))) == expected


@pytest.mark.parametrize("side", [0.9, 1.1])
@pytest.mark.parametrize("d_in,d_out", [(3, 5), (5, 3)])
def test_block_summed_rank_tolerance_uses_the_larger_dimension_and_the_factors_scale(side, d_in, d_out):
    """``BlockUpdate.summed_rank`` (verify()'s rank): ``a e1 f1^T + b e2 f2^T`` has singular values a and b exactly;
    b just below / above ``max(sigma_max, ||rows|| ||columns||) * max(d_in, d_out) * eps`` is dropped / counted."""
    from implicit_updates.math.updates import BlockUpdate, RankOneUpdate

    a = 2.0
    scale = 2**0.5 * a  # ||rows|| ||columns|| (b's share is far below float64 rounding)
    b = side * scale * max(d_in, d_out) * torch.finfo(torch.float64).eps
    rows = torch.zeros(1, 2, d_in, dtype=torch.float64)
    rows[0, 0, 0] = rows[0, 1, 1] = 1.0
    columns = torch.zeros(1, 2, d_out, dtype=torch.float64)
    columns[0, 0, 0], columns[0, 1, 1] = a, b
    zeros = rows.new_zeros(1, 2, d_in)
    update = BlockUpdate(0, rows, zeros, [RankOneUpdate("W_in", rows, columns)], rows[:, :1], zeros, "none")
    assert torch.equal(update.summed_singular_values(), torch.tensor([a, b], dtype=torch.float64))
    assert update.summed_rank() == (1 if side < 1 else 2)


def test_numerical_rank_edge_cases():
    assert core.numerical_rank(torch.zeros(3, dtype=torch.float64), 3) == 0  # nothing, not 0/0
    assert core.numerical_rank(torch.zeros(0, dtype=torch.float64), 3, scale=1.0) == 0
    assert core.numerical_rank(torch.tensor([1.0, 0.5], dtype=torch.float64), 2) == 2  # a largest value of one


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


def whole(message: str) -> str:
    """A ``match`` pattern for exactly this message: what a user reads is part of the contract."""
    return f"^{re.escape(message)}$"


def test_zero_norm_query_is_an_error():
    with pytest.raises(core.ZeroQueryNormError, match=whole(
            "the query's MLP input m(x) has zero norm, so no rank-one update W + (W dm) m(x)^T/||m(x)||^2 exists; "
            "check the block's pre-MLP norm weights (all zero?) or choose another query token")):
        core.implicit_row(torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]], dtype=torch.float64))  # one zero in a batch
    rows = core.implicit_row(torch.tensor([[[0.5, 0.0], [0.0, 2.0]]], dtype=torch.float64))  # each its own norm
    torch.testing.assert_close(rows, torch.tensor([[[2.0, 0.0], [0.0, 0.5]]], dtype=torch.float64), rtol=0, atol=0)


def test_scale_patches_refuse_an_exact_zero_and_divide_anything_else():
    """Both post-MLP norm scale patches divide by a normalized output: an exact zero anywhere is refused with its
    message; any other entry (one included) is divided by, exactly."""
    z = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    r, r_x, out = (torch.tensor(v, dtype=torch.float64) for v in ([3.0, 1.0, 2.0], [1.0, 5.0, 0.0], [0.5, 1.0, 1.0]))
    assert torch.equal(core.scale_correction(r, r_x, z), torch.tensor([2.0, 2.0, 4.0], dtype=torch.float64))
    assert torch.equal(core.post_norm_scale(r, r_x, out, z), torch.tensor([1.5, 2.5, 2.0], dtype=torch.float64))
    z[2] = 0.0
    with pytest.raises(ValueError, match=whole(
            "the normalized MLP output has an exact zero, so the post-MLP norm's scale cannot absorb the "
            "residual difference there; this block cannot be decomposed with a scale patch")):
        core.scale_correction(r, r_x, z)
    with pytest.raises(ValueError, match=whole(
            "the normalized flattened MLP output has an exact zero (is the norm's eps huge?)")):
        core.post_norm_scale(r, r_x, out, z)


def test_reproduction_errors():
    target = torch.tensor([[[3.0, 4.0]]], dtype=torch.float64)
    errors = core.reproduction_errors(target + torch.tensor([0.0, 0.5], dtype=torch.float64), target)
    assert errors == {"msd": 0.125, "max_abs_err": 0.5, "max_rel_err": 0.1}


def test_reproduction_errors_are_per_position_maxed_not_averaged():
    """Two batch elements x three positions, one of them off: the relative error is that position's own (its
    target's norm, not the batch's), the max over positions; the MSD is the mean over every entry."""
    target = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]], [[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]],
                          dtype=torch.float64)
    patched = target.clone()
    patched[1, 2] += torch.tensor([0.0, -0.5], dtype=torch.float64)  # relative error 0.25 there, 0 elsewhere
    errors = core.reproduction_errors(patched.float(), target.float())
    assert errors == {"msd": 0.25 / 12, "max_abs_err": 0.5, "max_rel_err": 0.25}
    assert core.reproduction_errors(target, target) == {"msd": 0.0, "max_abs_err": 0.0, "max_rel_err": 0.0}
    patched[0, 0] += 2.0  # a larger absolute error at a larger target: relative 2 sqrt(2) / 5
    errors = core.reproduction_errors(patched, target)
    assert errors["max_abs_err"] == 2.0 and errors["max_rel_err"] == pytest.approx(8**0.5 / 5, rel=1e-15)
    huge = torch.tensor([[[3e30, 4e30]]])  # float32: the norm of the difference overflows unless taken in float64
    assert core.reproduction_errors(1.5 * huge, huge)["max_rel_err"] == pytest.approx(0.5, rel=1e-6)


def test_shape_annotations_are_valid_jaxtyping():
    """Every public function of the pure math carries jaxtyping shape annotations that resolve (a malformed shape
    string raises here), in TransformerLens's style."""
    import inspect
    import typing

    from jaxtyping import AbstractArray

    from implicit_updates.analyses import attribution, decompose, dynamics
    from implicit_updates.math import analysis
    from implicit_updates.math import attribution as attribution_math

    annotated = 0
    for module in (core, analysis, attribution_math, attribution, decompose, dynamics):
        functions = [fn for _, fn in inspect.getmembers(module, inspect.isfunction)]
        functions += [fn for _, cls in inspect.getmembers(module, inspect.isclass) if cls.__module__ == module.__name__
                      for _, fn in inspect.getmembers(cls, inspect.isfunction)]
        for fn in functions:
            if fn.__module__ != module.__name__ or fn.__name__.startswith("_"):
                continue
            hints = typing.get_type_hints(fn)
            annotated += any(isinstance(h, type) and issubclass(h, AbstractArray) for h in hints.values())
    assert annotated >= 30, annotated


@settings(max_examples=20, deadline=None)
@given(vocab=st.integers(min_value=2, max_value=40), seed=seeds)
def test_kl_divergence_is_the_definition(vocab, seed):
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)``: two Bernoulli distributions' textbook value, torch's ``kl_div``
    on random ones, and exactly 0 for ``q = p``."""
    half, quarter = torch.tensor([0.5, 0.5], dtype=torch.float64).log(), torch.tensor([0.25, 0.75]).double().log()
    assert core.kl_divergence(quarter, half) == pytest.approx(0.25 * np.log(0.5) + 0.75 * np.log(1.5), rel=1e-12)
    log_p, log_q = (torch.log_softmax(randn(vocab, seed=seed + i), -1) for i in range(2))
    expected = torch.nn.functional.kl_div(log_q, log_p, reduction="sum", log_target=True)
    assert core.kl_divergence(log_p, log_q) == pytest.approx(float(expected), rel=1e-10)
    assert core.kl_divergence(log_p, log_p) == 0.0

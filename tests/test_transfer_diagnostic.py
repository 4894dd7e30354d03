"""The transfer diagnostic (``iu.transfer_diagnostic``): its pure math against hand-made matrices and a property,
the held-out = training case (coverage 1, residuals 0) on a Hugging Face and on HookedTransformers, one block's
measures recomputed with plain torch (lstsq, pinv) from the gathered rows and its update against the thought
patch's, held-out queries of two lengths, the model untouched, and the summary / dict / means."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ARCHITECTURES, assert_untouched, build
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hf import tiny_hf, tokens

import implicit_updates as iu
from implicit_updates.analyses.continuation import gathered_systems
from implicit_updates.analyses.transfer_diagnostic import TransferDiagnostic
from implicit_updates.math.lowrank import Fit, Solver
from implicit_updates.math.transfer import coverage, principal_cosines, relative_residual

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def e(*coords: float) -> torch.Tensor:
    return torch.tensor(coords, dtype=F64)


def least_squares(rows: torch.Tensor, rcond: float) -> Solver:
    return Solver(rows, Fit(rcond), "rows", refuse_dependent=False)


def test_math_on_hand_made_matrices():
    plane = torch.stack([e(1, 0, 0, 0), e(0, 1, 0, 0)])  # span(e1, e2)
    assert coverage(plane, e(1, 1, 0, 0)[None]) == pytest.approx(1, abs=1e-15)
    assert coverage(plane, e(0, 0, 3, 0)[None]) == pytest.approx(0, abs=1e-15)
    assert coverage(plane, torch.stack([e(1, 0, 1, 0), e(0, 2, 0, 0)])) == pytest.approx(0.75, abs=1e-15)
    assert torch.allclose(principal_cosines(plane, plane), e(1, 1))
    assert torch.allclose(principal_cosines(plane, e(0, 0, 0, 1)[None]), e(0))
    t = 0.3
    line = e(math.cos(t), 0, math.sin(t), 0)[None]
    assert torch.allclose(principal_cosines(plane, line), e(math.cos(t)))
    target = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert relative_residual([target], [target]) == 0
    assert relative_residual([torch.zeros_like(target)], [target]) == pytest.approx(1)
    assert relative_residual([target, target], [2 * target, target]) == pytest.approx((1 / 5) ** 0.5)
    # the floor drops the nearly dependent direction: one kept, spanning e1
    fit = least_squares(torch.stack([e(1, 0), e(1, 1e-12)]), rcond=1e-10)
    assert fit.basis.shape[0] == 1 and torch.allclose(fit.basis.abs(), e(1, 0)[None], atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), extra=st.integers(0, 6), d_out=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_fit_is_exact_on_its_own_independent_rows(n, extra, d_out, seed):
    """Independent rows ``X`` (n <= d): the fitted update reproduces every target on ``X`` itself, ``X`` covers
    itself fully, and its row space meets itself at angle 0; a row outside it is not fully covered."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n + extra, generator=gen, dtype=F64)
    targets = torch.randn(n, d_out, generator=gen, dtype=F64)
    fit = least_squares(x, 1e-10)
    assert fit.basis.shape[0] == n
    assert relative_residual([fit.predict(x, targets)], [targets]) <= 1e-8
    assert coverage(fit.basis, x) == pytest.approx(1, abs=1e-9)
    assert torch.allclose(principal_cosines(fit.basis, fit.basis), torch.ones(n, dtype=F64), atol=1e-9)
    if extra:
        outside = torch.randn(1, n + extra, generator=gen, dtype=F64)
        assert coverage(fit.basis, outside) < 1 - 1e-6


def queries(k: int, seeds) -> torch.Tensor:
    return torch.cat([tokens(k, seed=s) for s in seeds])


def assert_self_transfer(diag: TransferDiagnostic, with_output: bool):
    assert all(c == pytest.approx(1, abs=1e-9) for c in diag.coverage)
    assert all(abs(c - 1) <= 1e-9 for cosines in diag.principal_cosines for c in cosines)
    assert max(diag.first_layer_residual) <= 1e-9
    if with_output:
        assert max(diag.output_residual) <= 1e-9
        assert min(diag.vector_residual) > 1e-3  # one constant shift is not the exact update
    else:
        assert diag.output_residual == [None] * len(diag.blocks) == diag.vector_residual


@pytest.mark.parametrize("make, with_output", [(lambda: tiny_hf("llama"), True), (lambda: build(), True),
                                               (lambda: build(**ARCHITECTURES["post-norm-olmo2"]), False)],
                         ids=["hf-llama", "hooked", "hooked-post-norm"])
def test_held_out_equal_to_training_transfers_exactly(make, with_output):
    model = make()
    prefix, train = tokens(8, seed=0), queries(2, (1, 2, 3))
    with assert_untouched(model):
        diag = iu.transfer_diagnostic(model, prefix, train, train, dtype=F64)
    assert len(diag.blocks) == 3 and diag.n_train_rows == diag.n_held_rows == 6
    assert diag.train_rank == diag.held_rank == [6] * 3
    assert_self_transfer(diag, with_output)


def test_one_block_recomputed_with_plain_torch():
    """Block 1's measures from the gathered rows by lstsq / pinv, the fitted first-layer update equal to the exact
    thought patch's, and random held-out queries only partly covered."""
    model = tiny_hf("llama")
    prefix, train, held = tokens(8, seed=0), queries(2, (1, 2, 3)), queries(2, (4, 5, 7, 8))  # no first token shared
    with assert_untouched(model):
        diag = iu.transfer_diagnostic(model, prefix, train, held, dtype=F64)
    t, h = gathered_systems(model, prefix, train, F64)[1][1], gathered_systems(model, prefix, held, F64)[1][1]
    num = den = 0.0
    patch = iu.thought_patch(model, prefix, train, dtype=F64).patch()
    for w in t.maps:
        weight = w.weight.detach().double()
        delta = torch.linalg.lstsq(t.query_mlp_input, (t.mlp_input - t.query_mlp_input) @ weight,
                                   driver="gelsd").solution
        assert torch.allclose(delta.T if w.transposed else delta, patch[w.name], atol=1e-10)
        need = (h.mlp_input - h.query_mlp_input) @ weight
        num += float((h.query_mlp_input @ delta - need).pow(2).sum())
        den += float(need.pow(2).sum())
    assert diag.first_layer_residual[1] == pytest.approx((num / den) ** 0.5, rel=1e-8)
    projector = torch.linalg.pinv(t.query_mlp_input) @ t.query_mlp_input  # onto the training row space
    shares = (h.query_mlp_input @ projector).pow(2).sum(-1) / h.query_mlp_input.pow(2).sum(-1)
    assert diag.coverage[1] == pytest.approx(float(shares.mean()), rel=1e-8)
    out = h.hidden @ (torch.linalg.pinv(t.hidden) @ t.change)
    assert diag.output_residual[1] == pytest.approx(float((out - h.change).norm() / h.change.norm()), rel=1e-8)
    vector = float((h.change - t.change.mean(0)).norm() / h.change.norm())
    assert diag.vector_residual[1] == pytest.approx(vector, rel=1e-10)
    assert max(diag.coverage) < 0.9 and min(diag.first_layer_residual) > 0.1  # random queries: partial transfer
    assert all(max(c) < 1 - 1e-6 for c in diag.principal_cosines)
    # a held-out query starting with a training query's first token (53) has that row too: one angle of 0
    shared = iu.transfer_diagnostic(model, prefix, train, queries(2, (4, 6)), dtype=F64)
    assert all(c[0] == pytest.approx(1, abs=1e-9) and c[1] < 1 - 1e-6 for c in shared.principal_cosines)


def test_reuses_thought_systems():
    """Given the ThoughtSystems of the training queries, the diagnostic is the same (bit for bit) as gathering them
    again; systems gathered for another prefix, model or dtype are refused in one line."""
    model = tiny_hf("llama")
    prefix, train, held = tokens(8, seed=0), queries(2, (1, 2, 3)), queries(2, (4, 5))
    systems = iu.thought_systems(model, prefix, train, dtype=F64)
    with assert_untouched(model):
        reused = iu.transfer_diagnostic(model, prefix, systems, held).to_dict()
    assert reused == iu.transfer_diagnostic(model, prefix, train, held, dtype=F64).to_dict()
    with pytest.raises(ValueError, match="another prefix"):
        iu.transfer_diagnostic(model, tokens(8, seed=1), systems, held)
    with pytest.raises(ValueError, match="another model"):
        iu.transfer_diagnostic(tiny_hf("llama"), prefix, systems, held)
    with pytest.raises(ValueError, match="gathered in torch.float64"):
        iu.transfer_diagnostic(model, prefix, systems, held, dtype=torch.float32)


def test_held_out_of_two_lengths():
    """The training queries and a longer one as held-out rows: the training rows are covered fully, so the
    coverage is the row-weighted mean of 1 and the longer query's own coverage."""
    model = build()
    prefix, train, longer = tokens(8, seed=0), queries(2, (1, 2, 3)), tokens(3, seed=9)[0]
    with assert_untouched(model):
        mixed = iu.transfer_diagnostic(model, prefix, train, [*train, longer], dtype=F64)
    alone = iu.transfer_diagnostic(model, prefix, train, [longer], dtype=F64)
    assert mixed.n_held_rows == 9 and alone.n_held_rows == 3 and mixed.held_rank == [9] * 3
    for c_mixed, c_alone in zip(mixed.coverage, alone.coverage, strict=True):
        assert c_alone < 0.99
        assert c_mixed == pytest.approx((6 + 3 * c_alone) / 9, rel=1e-10)
    assert all(0 < r < a for r, a in zip(mixed.first_layer_residual, alone.first_layer_residual, strict=True))
    both = iu.transfer_diagnostic(model, prefix, [train[0], longer], [train[0], longer], dtype=F64)  # mixed lengths
    assert both.n_train_rows == 5 and both.train_rank == [5] * 3
    assert_self_transfer(both, with_output=True)


def test_report():
    diag = TransferDiagnostic([0, 1, 2], [1.0, 0.5, 0.0], [[1.0], [0.5], [0.0]], [1.0, 0.25, 0.0], [0.0, 0.5, 1.0],
                              [None, 0.4, None], [None, None, None], [2, 2, 2], [1, 1, 1], 2, 1, F64, 1e-10)
    assert diag.mean() == {"coverage": 0.5, "principal_mean_square": pytest.approx(1.25 / 3),
                           "first_layer_residual": 0.5, "output_residual": 0.4, "vector_residual": None}
    assert json.loads(json.dumps(diag.to_dict()))["output_residual"] == [None, 0.4, None]
    assert diag.to_dict()["dtype"] == "float64"
    lines = diag.summary().splitlines()
    assert len(lines) == 6 and lines[-2].split()[:2] == ["mean", "0.5"] and lines[2].split()[4] == "0.4"

"""Analysis helpers computed from the factors, checked against dense matrices on small sizes; the plots."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES, build
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit_updates as iu
from implicit_updates.math import analysis
from implicit_updates.views import plots

F64 = torch.float64


def factors(seed: int, n: int, d_out: int, d_in: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    columns = torch.randn(n, d_out, generator=gen, dtype=F64)
    rows = torch.randn(1 if shared else n, d_in, generator=gen, dtype=F64)
    return columns, rows


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), d_out=st.integers(1, 6), d_in=st.integers(1, 6),
       shared=st.booleans())
def test_alignment_matrix_is_normalized_frobenius_inner_product(seed, n, d_out, d_in, shared):
    columns, rows = factors(seed, n, d_out, d_in, shared)
    dense = torch.stack([torch.outer(columns[i], rows[i if not shared else 0]) for i in range(n)]).flatten(1)
    expected = (dense @ dense.T) / torch.outer(dense.norm(dim=1), dense.norm(dim=1))
    assert torch.allclose(analysis.alignment_matrix(columns, rows), expected, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), d_out=st.integers(1, 6), d_in=st.integers(1, 6), scale=st.sampled_from(
    [1.0, 1e-4, 1e-9]), shared=st.booleans())
def test_difference_norm_from_factors(seed, d_out, d_in, scale, shared):
    """||u1 v1^T - u2 v2^T||_F from factors equals the dense norm, also for nearly equal updates."""
    gen = torch.Generator().manual_seed(seed)
    u2, v2 = torch.randn(d_out, generator=gen, dtype=F64), torch.randn(d_in, generator=gen, dtype=F64)
    u1 = u2 + scale * torch.randn(d_out, generator=gen, dtype=F64)
    v1 = v2 if shared else v2 + scale * torch.randn(d_in, generator=gen, dtype=F64)
    got = analysis.difference_frobenius_norm(u1, v1, u2, v2)
    # the dense reference, built from the exact differences so that it is not itself cancellation-limited
    expected = (torch.outer(u1 - u2, v1) + torch.outer(u2, v1 - v2)).norm()
    assert abs(float(got) - float(expected)) <= 1e-10 * float(expected) + 1e-300
    if shared:
        assert float(got) == pytest.approx(float((u1 - u2).norm() * v2.norm()), rel=1e-14)


def dense_updates(result, block: int) -> torch.Tensor:
    """``[pos, d_in * sum d_out]``: every position's first-layer maps' dense deltas, stacked along d_out."""
    update = result.block(block)
    names = [u.name for u in update.first_layer]
    out = []
    for p in range(result.n_positions):
        patch = result.patch(block, p)
        out.append(torch.cat([patch[n] for n in names], dim=1).flatten())
    return torch.stack(out)


@pytest.fixture(scope="module")
def decomposition():
    model = build(**ARCHITECTURES["gated"])  # two maps reading the MLP input (W_gate, W_in)
    toks = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(0))
    return iu.decompose(model, toks, query="self", dtype=F64)  # one row per position: rank > 1 when summed


def test_position_and_block_alignment_vs_dense(decomposition):
    dense = dense_updates(decomposition, 1)
    expected = (dense @ dense.T) / torch.outer(dense.norm(dim=1), dense.norm(dim=1))
    got = analysis.position_alignment(decomposition, 1)
    assert torch.allclose(got[1:, 1:], expected[1:, 1:], atol=1e-10)  # position 0 has no context: zero update
    assert float(got[0].abs().max()) == 0.0
    blocks = torch.stack([dense_updates(decomposition, b)[4] for b in range(3)])
    expected = (blocks @ blocks.T) / torch.outer(blocks.norm(dim=1), blocks.norm(dim=1))
    assert torch.allclose(analysis.block_alignment(decomposition, position=4), expected, atol=1e-10)


def test_norms_and_effective_rank_vs_dense(decomposition):
    for block in range(3):
        dense = dense_updates(decomposition, block)
        assert torch.allclose(analysis.update_norms(decomposition, block), dense.norm(dim=1), rtol=1e-10)
        d_in = decomposition.block(block).row.shape[-1]
        summed = dense.sum(0).view(d_in, -1)
        sv = torch.linalg.svdvals(summed)
        norms = analysis.summed_norms(decomposition, block)
        assert norms["frobenius"] == pytest.approx(float(summed.norm()), rel=1e-10)
        assert norms["spectral"] == pytest.approx(float(sv[0]), rel=1e-10)
        assert norms["rank"] == int(torch.linalg.matrix_rank(summed)) > 1
        p = sv[sv > sv[0] * 1e-12] / sv[sv > sv[0] * 1e-12].sum()
        assert norms["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-8)
    assert analysis.effective_rank(torch.tensor([2.0, 0.0])) == pytest.approx(1.0)
    assert analysis.effective_rank(torch.ones(4)) == pytest.approx(4.0)
    assert analysis.effective_rank(torch.zeros(3)) == 0.0


@pytest.mark.parametrize("query", ["self", "last"])
def test_summed_update_over_chosen_positions_vs_dense(query):
    """``positions`` (a slice, indices or a mask) picks the updates summed: every result equals the dense sum over
    exactly those positions (query="self": one row per position, rank = number of positions summed)."""
    model = build(**ARCHITECTURES["gated"])
    toks = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(0))
    result = iu.decompose(model, toks, query=query, dtype=F64)
    mask = torch.tensor([False, True, False, True, True, False, False])
    for block in (0, 2):
        dense = dense_updates(result, block)
        d_in = result.block(block).row.shape[-1]
        for positions in (slice(2, 5), torch.tensor([0, 3, 6]), mask, None):
            chosen = dense if positions is None else dense[positions]
            summed = chosen.sum(0).view(d_in, -1)
            sv = torch.linalg.svdvals(summed)
            got = analysis.summed_singular_values(result, block, positions)
            k = min(len(got), len(sv))
            assert torch.allclose(got[:k], sv[:k], rtol=1e-10, atol=1e-12 * float(sv[0])), (block, positions)
            norms = analysis.summed_norms(result, block, positions)
            assert norms["frobenius"] == pytest.approx(float(summed.norm()), rel=1e-10)
            assert norms["spectral"] == pytest.approx(float(sv[0]), rel=1e-10)
            indices = torch.arange(7)[slice(None) if positions is None else positions]
            expected_rank = 1 if query == "last" else int((indices != 0).sum())  # position 0 has no context
            assert norms["rank"] == int(torch.linalg.matrix_rank(summed)) == expected_rank, (block, positions)


def test_delta_b_cosine(decomposition):
    direction = torch.randn(32, generator=torch.Generator().manual_seed(3), dtype=F64)
    cos = analysis.delta_b_cosine(decomposition, direction)
    assert cos.shape == (3, 7)
    for b in range(3):
        db = decomposition.block(b).delta_b[0, 5]
        assert float(cos[b, 5]) == pytest.approx(float(db @ direction / (db.norm() * direction.norm())), rel=1e-12)
    assert float(cos[:, 0].abs().max()) == 0.0  # no context at position 0: delta_b = 0, cosine defined as 0
    own = analysis.delta_b_cosine(decomposition, decomposition.block(2).delta_b[0, 3])
    assert float(own[2, 3]) == pytest.approx(1.0)


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    curves = {"block 0": np.abs(np.random.default_rng(0).normal(size=(4, 9))) + 0.1, "block 1": np.ones((1, 9))}
    mean, sem = plots.mean_and_standard_error(curves["block 0"])
    assert np.allclose(mean, curves["block 0"].mean(0))
    assert np.allclose(sem, curves["block 0"].std(0, ddof=1) / 2)
    assert np.all(plots.mean_and_standard_error(curves["block 1"])[1] == 0)
    ax = plots.decay_curves(curves, title="decay")
    assert len(ax.lines) == 2 and len(ax.collections) == 2  # one mean line and one band per label
    plots.save(ax, str(tmp_path / "decay.png"))
    ax = plots.alignment_heatmap(torch.eye(3), labels=["a", "b", "c"])
    plots.save(ax, str(tmp_path / "heat.png"))
    assert (tmp_path / "decay.png").stat().st_size > 1000 and (tmp_path / "heat.png").stat().st_size > 1000


def test_plots_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="pip install"):
        plots.decay_curves({"x": np.ones((1, 3))})


@pytest.mark.parametrize("query", ["last", "self"])
def test_block_summed_update_and_rank_per_batch_vs_dense(query):
    """``BlockUpdate.summed_singular_values``/``summed_rank`` (verify()'s rank) per batch element, against the dense
    sum of ``result.patch`` over positions: prompt 1 repeats its first token, so its first positions see only copies
    of themselves (no update) and its query="self" rank is lower than prompt 0's."""
    model = build(**ARCHITECTURES["gqa-rotary"])  # rotary: a context of copies of the query changes nothing
    toks = torch.tensor([[5, 17, 3, 40, 22, 9], [7, 7, 7, 31, 12, 50]])
    result = iu.decompose(model, toks, query=query, dtype=F64)
    report = result.verify()
    expected_ranks = [1, 1] if query == "last" else [5, 3]
    for block in range(3):
        update = result.block(block)
        names = [u.name for u in update.first_layer]
        for batch in (0, 1):
            dense = sum(torch.cat([result.patch(block, p, batch)[n] for n in names], dim=1) for p in range(6))
            sv = torch.linalg.svdvals(dense)
            got = update.summed_singular_values(batch)
            assert torch.allclose(got[:len(sv)], sv[:len(got)], rtol=1e-9, atol=1e-12 * float(sv[0])), (block, batch)
            assert update.summed_rank(batch) == int(torch.linalg.matrix_rank(dense)) == expected_ranks[batch]
        assert torch.equal(update.summed_singular_values(), update.summed_singular_values(0))
        assert update.summed_rank() == expected_ranks[0] and report.blocks[block].rank == max(expected_ranks)

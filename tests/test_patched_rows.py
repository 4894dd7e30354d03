"""The one row layout of the factored patched run (``adapters.assemble.PatchedRows``), against hand-made shapes: when
it fans the MLP out, which positions it takes, how it flattens (batch, position) pairs into one-token rows and
folds the block's output back, element by element."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from implicit_updates.adapters.assemble import PatchedRows
from implicit_updates.math.updates import AdditiveUpdate, BlockUpdate, RankOneUpdate


def update(batch: int, q: int, pos: int, d: int = 3) -> SimpleNamespace:
    """What PatchedRows reads of a BlockUpdate: the query input ``[batch, q, d]`` and the target ``[batch, pos, d]``."""
    return SimpleNamespace(query_input=torch.arange(batch * q * d, dtype=torch.float64).reshape(batch, q, d),
                           target_output=torch.zeros(batch, pos, d))


def test_one_query_fans_out_unless_the_backend_cannot():
    assert PatchedRows.of(update(2, 1, 4), slice(None)).fan_out is True
    assert PatchedRows.of(update(2, 1, 4), slice(None), can_fan_out=False).fan_out is False
    assert PatchedRows.of(update(2, 4, 4), slice(None)).fan_out is False  # a query per position


def test_fanned_out_rows_keep_their_shape_and_take_the_positions():
    rows = PatchedRows.of(update(2, 1, 4), slice(1, 3))
    factor = torch.arange(2 * 4 * 5).reshape(2, 4, 5)
    assert torch.equal(rows(factor), factor[:, 1:3])  # one factor per position, the chosen ones
    shared = factor[:, :1]
    assert torch.equal(rows(shared), shared)  # one for all positions: as it is
    assert torch.equal(rows.query, rows.update.query_input)
    out = torch.randn(2, 2, 3)
    assert rows.unfold(out) is out


def test_per_position_rows_are_flattened_and_folded_back():
    up = update(2, 4, 4)
    rows = PatchedRows.of(up, slice(1, 3))
    factor = torch.arange(2 * 4 * 5).reshape(2, 4, 5)
    flat = rows(factor)
    assert flat.shape == (4, 1, 5)  # (batch 2) x (positions 1, 2), one token each
    assert torch.equal(flat[:, 0], torch.stack([factor[0, 1], factor[0, 2], factor[1, 1], factor[1, 2]]))
    shared = factor[:, :1]  # one factor for every position: repeated per (batch, position) row
    assert torch.equal(rows(shared)[:, 0], torch.stack([shared[0, 0], shared[0, 0], shared[1, 0], shared[1, 0]]))
    assert torch.equal(rows.query[:, 0], torch.stack([up.query_input[0, 1], up.query_input[0, 2],
                                                      up.query_input[1, 1], up.query_input[1, 2]]))
    out = torch.arange(4 * 3, dtype=torch.float64).reshape(4, 1, 3)
    folded = rows.unfold(out)
    assert folded.shape == (2, 2, 3) and torch.equal(folded[1, 0], out[2, 0])


def test_one_position_of_a_one_token_query_without_fan_out():
    rows = PatchedRows.of(update(1, 1, 3), slice(2, 3), can_fan_out=False)
    factor = torch.arange(3 * 2).reshape(1, 3, 2)
    assert torch.equal(rows(factor), factor[:, 2:3].reshape(1, 1, 2))
    assert torch.equal(rows(factor[:, :1]), factor[:, :1])


def test_edits_are_the_updates_shaped_for_the_rows_and_say_how_they_act():
    """``BlockUpdate.edits``: every factor through the row layout, each edit keeping its name, expert slot and how
    it acts (a backend applies it from that alone, whatever correction produced it)."""
    up = update(2, 4, 4)
    rows = PatchedRows.of(up, slice(1, 3))
    row, column = torch.randn(2, 4, 3), torch.randn(2, 4, 5)
    block = BlockUpdate(0, row, torch.randn(2, 4, 3), [
        RankOneUpdate("w_in", row, column, transposed=True, experts=2, expert=1),
        AdditiveUpdate("bias", torch.randn(2, 4, 3)),
        AdditiveUpdate("norm", torch.randn(2, 4, 3), "norm_scale")], up.query_input, up.target_output, "scale")
    edits = block.edits(rows)
    assert [type(e) for e in edits] == [RankOneUpdate, AdditiveUpdate, AdditiveUpdate]
    assert (edits[0].name, edits[0].transposed, edits[0].experts, edits[0].expert) == ("w_in", True, 2, 1)
    assert torch.equal(edits[0].row, rows(row)) and torch.equal(edits[0].column, rows(column))
    assert [(e.name, e.acts_as) for e in edits[1:]] == [("bias", "bias"), ("norm", "norm_scale")]
    assert all(torch.equal(e.delta, rows(u.delta)) for e, u in zip(edits[1:], block.updates[1:], strict=True))
    assert block.updates[0].row is row  # the update itself is left as it was

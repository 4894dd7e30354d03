"""The literal weight edit reproduces the with-context block output, for every block variant, in float64 and float32."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_untouched, context_outputs, literal_edit_output, rel_err

import implicit_updates as iu

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_literal_weight_edit_reproduces_context(arch, dtype):
    name, model = arch
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 11), generator=torch.Generator().manual_seed(3))
    with assert_untouched(model):
        result = iu.decompose(model, tokens, dtype=dtype)
        report = result.verify()
    targets = context_outputs(model, tokens, dtype)
    for block in range(model.cfg.n_layers):
        for position in (0, 4, 10):
            out = literal_edit_output(model, result, block, position)
            assert rel_err(out, targets[block][0, position]) <= TOL[dtype], (name, block, position)
    assert report.max_rel_err <= TOL[dtype]
    assert [b.rank for b in report.blocks] == [1] * model.cfg.n_layers  # Innocenti & Achour: rank one


def test_query_self_literal_edit(arch):
    name, model = arch
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 9), generator=torch.Generator().manual_seed(4))
    result = iu.decompose(model, tokens, query="self", dtype=torch.float64)
    targets = context_outputs(model, tokens, torch.float64)
    for block in (0, model.cfg.n_layers - 1):
        for position in (1, 5, 8):
            x = result.query_input(block, position)
            # each position is its own query: the block input at that position, with context
            assert torch.equal(x[0, 0], result.block(block).query_input[0, position])
            out = literal_edit_output(model, result, block, position)
            assert rel_err(out, targets[block][0, position]) <= 1e-10, (name, block, position)
    assert result.verify().max_rel_err <= 1e-10


def test_context_changes_something(arch):
    """Guard against a vacuous pass: the with-context output differs from the unpatched query-only output."""
    _, model = arch
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 8), generator=torch.Generator().manual_seed(5))
    result = iu.decompose(model, tokens, dtype=torch.float64)
    update = result.block(1)
    assert update.delta_b[0, :-1].abs().max() > 1e-3
    assert max(u.column[0, :-1].abs().max() for u in update.first_layer) > 1e-3


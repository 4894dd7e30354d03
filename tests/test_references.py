"""Independent references: what a decomposition claims about the model, checked against plain forwards.

The query input and the with-context target of every block come from TransformerLens's own ``run_with_cache``;
a capture that reads the wrong position (say, the query one token early) yields a decomposition that verifies
against itself, so only these catch it. Also the mixture of experts that renormalises its top-k routing weights
(``norm_topk_prob``), which no other test configures. About 15 s.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, assert_untouched, build, literal_edit_output, rel_err

import implicit_updates as iu

F64 = torch.float64


def plain_cache(model, toks):
    with torch.no_grad():
        return copy.deepcopy(model).to(F64).run_with_cache(toks)


@pytest.mark.parametrize("query", ["last", "self"])
def test_query_inputs_and_targets_are_the_plain_forward(arch, query, one_thread):
    name, model = arch
    toks = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(7))
    result = iu.decompose(model, toks, query=query, dtype=F64)
    logits, cache = plain_cache(model, toks)
    for block in range(model.cfg.n_layers):
        for batch in range(2):
            for position in range(6):
                x = cache[f"blocks.{block}.hook_resid_pre"][batch, -1 if query == "last" else position]
                assert torch.equal(result.query_input(block, position, batch)[0, 0], x), (name, block, position)
                y = cache[f"blocks.{block}.hook_resid_post"][batch, position]
                assert torch.equal(result.target_output(block, position, batch), y), (name, block, position)


def moe(norm_topk_prob: bool):
    return build(**{**ARCHITECTURES["moe-mixtral"], "norm_topk_prob": norm_topk_prob, "experts_per_token": 3})


def test_moe_with_normalized_top_k_weights(one_thread):
    """Renormalised routing weights (Qwen-MoE/OLMoE-style ``norm_topk_prob``): the expert-output updates divide by
    the sum of the weights the model really uses, so every block and position is still exact."""
    model = moe(True)
    toks = torch.randint(0, model.cfg.d_vocab, (1, 9), generator=torch.Generator().manual_seed(1))
    with assert_untouched(model):
        result = iu.decompose(model, toks, dtype=F64)
        report = result.verify()
    assert report.max_rel_err <= 1e-10
    _, cache = plain_cache(model, toks)
    for block in range(model.cfg.n_layers):
        for position in (0, 4, 8):
            out = literal_edit_output(model, result, block, position, prompt=toks)
            assert rel_err(out, cache[f"blocks.{block}.hook_resid_post"][0, position]) <= 1e-10, (block, position)
    report = iu.compare_absorbed(model, toks, dtype=F64)
    assert report.max_abs_logit_diff <= 1e-9 < report.max_abs_logit_diff_control
    # not vacuous: the three top weights sum to well below one, so renormalising changes the model's output
    probs = cache["blocks.1.mlp.hook_expert_weights"].float()
    assert float(probs.topk(3, dim=-1).values.sum(-1).max()) < 0.95
    unnormalized = moe(False)
    unnormalized.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert float((unnormalized(toks) - model(toks)).abs().max()) > 1e-3


def test_progress_bars_only_when_asked(capsys):
    """``progress=True`` shows each stage's named bar on stderr and clears it when done; by default nothing."""
    model = build(**ARCHITECTURES["gated"])
    toks = torch.randint(0, model.cfg.d_vocab, (1, 5), generator=torch.Generator().manual_seed(2))
    iu.decompose(model, toks, dtype=F64).verify()
    assert capsys.readouterr().err == ""
    iu.decompose(model, toks, dtype=F64, progress=True).verify(progress=True)
    err = capsys.readouterr().err
    assert err.startswith("\rdecompose:") and "\rverify:" in err
    assert "\n" not in err  # transient bars: each is cleared when done, no line is left behind


def test_two_token_prompt_literal_edit_query_self(one_thread):
    """Two positions, each its own query: position 1's patch is built from its own row (position 0 has none)."""
    model = build(**ARCHITECTURES["gated"])
    toks = torch.tensor([[4, 29]])
    result = iu.decompose(model, toks, query="self", dtype=F64)
    _, cache = plain_cache(model, toks)
    for block in range(model.cfg.n_layers):
        out = literal_edit_output(model, result, block, 1, prompt=toks)
        assert rel_err(out, cache[f"blocks.{block}.hook_resid_post"][0, 1]) <= 1e-10

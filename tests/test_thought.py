"""Thought patches (``iu.thought_patch``): the least-squares solver against closed forms and optimality, the exact
stacked update as the special case (a literal weight edit of a float64 copy, run on each training query alone,
against plain forwards of ``prefix + query``), the thought vector's exact case, a corrupted fit caught, the model
untouched, the exports loading (peft, safetensors), and bad input refused."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_untouched, build
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hf import tiny_hf, tokens

import implicit_updates as iu
from implicit_updates.analyses.continuation import absorb_continuation
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.math.lowrank import Fit, Solver
from implicit_updates.runtime.precision import exact_formula

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def objective(x, t, delta, ridge):
    return float((x @ delta - t).pow(2).sum() + ridge * delta.pow(2).sum())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), d_in=st.integers(1, 10), d_out=st.integers(1, 9), ridge=st.sampled_from([0.0, 1e-3, 0.7,
       5.0]), rank=st.one_of(st.none(), st.integers(1, 6)), seed=st.integers(0, 10_000))
def test_solver_is_the_reduced_rank_ridge_optimum(n, d_in, d_out, ridge, rank, seed):
    """Against closed forms: ridge ``(X^T X + l I)^-1 X^T T`` with ``l = ridge ||X||_F^2 / N`` (the minimum-norm least
    squares at l = 0); with a rank
    cap, the reduced-rank ridge solution built from the explicit augmented data, no worse than any other update of
    that rank tried (truncations of the full solution, random ones), and of rank <= the cap."""
    gen = torch.Generator().manual_seed(seed)
    x, t = torch.randn(n, d_in, generator=gen, dtype=F64), torch.randn(n, d_out, generator=gen, dtype=F64)
    left, right = Solver(x, Fit(1e-10, ridge, rank, "both"), "rows").apply(t)
    delta = left @ right
    ridge = ridge * float(x.pow(2).sum()) / n  # the penalty: relative to the rows' mean squared norm
    full = torch.linalg.lstsq(x, t, driver="gelsd").solution if ridge == 0 else \
        torch.linalg.solve(x.T @ x + ridge * torch.eye(d_in, dtype=F64), x.T @ t)
    if rank is None or rank >= min(n, d_in, d_out):
        assert torch.allclose(delta, full, atol=1e-9, rtol=1e-9)
        return
    assert torch.linalg.matrix_rank(delta) <= rank
    aug_x = torch.cat([x, ridge ** 0.5 * torch.eye(d_in, dtype=F64)])
    vh = torch.linalg.svd(aug_x @ full)[2][:rank]
    assert torch.allclose(delta, full @ vh.T @ vh, atol=1e-9, rtol=1e-9)
    best = objective(x, t, delta, ridge)
    u, s, v = torch.linalg.svd(full)
    candidates = [u[:, :rank] * s[:rank] @ v[:rank]] + [torch.randn(d_in, rank, generator=gen, dtype=F64)
                                                         @ torch.randn(rank, d_out, generator=gen, dtype=F64) * 0.1
                                                         for _ in range(3)]
    assert all(best <= objective(x, t, c, ridge) + 1e-9 for c in candidates)


def literal_edit(model, patch: dict) -> torch.nn.Module:
    edited = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, delta in patch.items():
            edited.get_parameter(name).add_(delta)
    return edited


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), exact_formula(model, F64):
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_exact_stacked_update_is_the_special_case(kind):
    """ridge 0, no rank cap, kind 'matrix': exact on all n K training positions (a literal weight edit of a float64
    copy run on each query alone, against plain forwards of prefix + query), and the stacked continuation's patch."""
    model = tiny_hf(kind)
    prefix, queries = tokens(8, seed=0), torch.cat([tokens(2, seed=s) for s in (1, 2, 3)])
    with assert_untouched(model):
        patch = iu.thought_patch(model, prefix, queries, dtype=F64)
    edited, reference = literal_edit(model, patch.patch()), copy.deepcopy(model).double()
    full = hf_logits(reference, torch.cat([prefix.expand(3, -1), queries], 1))[:, -2:]
    assert float((hf_logits(edited, queries) - full).abs().max()) <= 1e-9
    assert float((hf_logits(reference, queries) - full).abs().max()) > 1e-3  # the prefix mattered
    stacked = absorb_continuation(model, prefix, queries, dtype=F64, output="matrix").patch()
    assert stacked.keys() == patch.patch().keys()
    assert all(float((stacked[n] - d).abs().max()) <= 1e-12 for n, d in patch.patch().items())
    assert float((patch.patched_logits() - full.reshape(-1, full.shape[-1])).abs().max()) <= 1e-9


def test_ridge_trades_training_fit_for_size():
    """Ridge > 0 is a fit, not an interpolant: the training error grows and the update shrinks with the ridge."""
    model = tiny_hf("llama")
    prefix, queries = tokens(8, seed=0), torch.cat([tokens(2, seed=s) for s in (1, 2, 3)])
    errors, sizes = [], []
    for ridge in (0.0, 0.1, 10.0):
        patch = iu.thought_patch(model, prefix, queries, ridge=ridge, dtype=F64)
        errors.append(patch.compare()["max_abs_logit_diff"])
        sizes.append(sum(float(d.norm()) for d in patch.patch().values()))
    assert errors[0] <= 1e-9 < errors[1] < errors[2]
    assert sizes[0] > sizes[1] > sizes[2] > 0


@pytest.mark.parametrize("kind", ["vector", "both"])
def test_one_token_query_is_exact_for_vectors(kind):
    """One training query of one token (N = 1): the least-squares output shift is the block's output difference
    itself, so the model with the thought vectors (steering hooks; no bias in a Llama) gives the full logits."""
    model = tiny_hf("llama")
    prefix, query = tokens(8, seed=0), tokens(1, seed=5)
    with assert_untouched(model):
        patch = iu.thought_patch(model, prefix, query, kind=kind, dtype=F64)
        got = patch.logits_on(query)
    full = hf_logits(copy.deepcopy(model).double(), torch.cat([prefix, query], 1))[0, -1:]
    assert sorted(patch.steering_vectors()) == [0, 1, 2]
    assert float((got - full).abs().max()) <= 1e-9
    with pytest.raises(ValueError, match="steering vector"):
        patch.patched()  # no output bias to hold the vector


def test_vector_goes_into_the_output_bias_where_there_is_one():
    model = tiny_hf("gpt2")
    prefix, query = tokens(8, seed=0), tokens(1, seed=5)
    patch = iu.thought_patch(model, prefix, query, kind="vector", dtype=F64)
    edited = patch.patched()  # a real bias edit: the model's own forward, no hooks
    full = hf_logits(copy.deepcopy(model).double(), torch.cat([prefix, query], 1))[0, -1]
    assert float((hf_logits(edited, query)[0, -1] - full).abs().max()) <= 1e-9


def test_a_corrupted_fit_is_caught():
    """The report can say no: the exact patch with one block's output update halved leaves the full logits."""
    model = tiny_hf("llama")
    prefix, queries = tokens(8, seed=0), torch.cat([tokens(2, seed=s) for s in (1, 2)])
    patch = iu.thought_patch(model, prefix, queries, dtype=F64)
    assert patch.compare()["max_abs_logit_diff"] <= 1e-9
    block = patch.blocks[1]
    out = block.updates[-1]
    patch.blocks[1] = type(block)(block.block, (*block.updates[:-1], type(out)(out.name, out.rows, out.columns / 2,
                                                                                 out.transposed)),
                                  block.cond_mlp_input, block.cond_hidden, block.rank)
    assert patch.compare()["max_abs_logit_diff"] > 1e-3


def test_held_out_comparison_and_hooked_transformer():
    """compare_on: held-out queries alone against prefix + query; the same on a HookedTransformer."""
    model = build(n_layers=2)
    prefix, train, held = tokens(8, seed=0), torch.cat([tokens(2, seed=s) for s in (1, 2, 3)]), tokens(2, seed=9)
    with assert_untouched(model):
        patch = iu.thought_patch(model, prefix, train, ridge=0.01, kind="both", dtype=F64)
        report = patch.compare_on(prefix, held)
    assert set(report) == {"agree", "kl", "max_abs_logit_diff"} and 0 <= report["agree"] <= 1 and report["kl"] >= 0
    exact = iu.thought_patch(model, prefix, train, dtype=F64)
    assert exact.compare_on(prefix, train)["max_abs_logit_diff"] <= 1e-9  # on its own training queries: exact


def test_exports_load(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    model = tiny_hf("llama")
    prefix, queries = tokens(8, seed=0), torch.cat([tokens(2, seed=s) for s in (1, 2, 3)])
    patch = iu.thought_patch(model, prefix, queries, ridge=0.1, rank=2, kind="both", dtype=F64)
    patch.save_lora(tmp_path / "lora")  # the matrix part; its vectors are the steering file below
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    matrix_only = iu.thought_patch(model, prefix, queries, ridge=0.1, rank=2, dtype=F64)
    matrix_only.save_lora(tmp_path / "lora2")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model).double(), str(tmp_path / "lora2"))
    with torch.no_grad():
        via_peft = loaded(input_ids=queries, use_cache=False).logits.reshape(-1, 61)
    assert float((via_peft - matrix_only.logits_on(queries)).abs().max()) <= 1e-9
    path = patch.save_steering(tmp_path / "steer.safetensors")
    vectors = load_file(str(path))
    assert sorted(vectors) == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(torch.equal(vectors[f"blocks.{b}"], v) for b, v in patch.steering_vectors().items())


def test_bad_input_and_refusals():
    model = tiny_hf("llama")
    prefix, queries = tokens(8, seed=0), tokens(2, seed=1)
    for kwargs, match in [(dict(kind="dense"), "kind must be"), (dict(ridge=-1.0), "ridge must be"),
                          (dict(rank=0), "rank must be")]:
        with assert_untouched(model), pytest.raises(ValueError, match=match):
            iu.thought_patch(model, prefix, queries, **kwargs)
    gemma = tiny_hf("gemma3")  # a norm after the MLP: "both"'s intercept would live before it
    with assert_untouched(gemma), pytest.raises(UnsupportedArchitectureError, match="block 0: .*norm after the MLP"):
        iu.thought_patch(gemma, prefix, queries, ridge=0.1, kind="both", dtype=F64)
    assert iu.thought_patch(gemma, prefix, queries, kind="vector", dtype=F64).steering_vectors()


def test_systems_fit_subsets_and_post_norm_sweeps():
    """One gathering, many fits: a subset's fit equals thought_patch on those queries alone; through Gemma's norm
    after the MLP a ridge / rank-capped matrix goes through the pre-norm targets, tending to the exact update as the
    ridge goes to 0 and equal to it with a rank cap no lower than the rows."""
    for kind in ("llama", "gemma3"):
        model = tiny_hf(kind)
        prefix, queries = tokens(8, seed=0), torch.cat([tokens(2, seed=s) for s in (1, 2, 3, 4)])
        with assert_untouched(model):
            systems = iu.thought_systems(model, prefix, queries, dtype=F64)
            sub = systems.fit(ridge=0.05, queries=[1, 3])
            alone = iu.thought_patch(model, prefix, queries[[1, 3]], ridge=0.05, dtype=F64)
        assert torch.equal(sub.continuation, queries[[1, 3]])
        assert all(float((sub.patch()[n] - d).abs().max()) <= 1e-10 for n, d in alone.patch().items())
        errors = [systems.fit(ridge=r).compare()["max_abs_logit_diff"] for r in (1e-1, 1e-4, 1e-8)]
        assert errors[0] > errors[1] > errors[2] and errors[0] > 1e-3
        assert systems.fit().compare()["max_abs_logit_diff"] <= 1e-9
        assert systems.fit(rank=8).compare()["max_abs_logit_diff"] <= 1e-9  # 8 rows: the cap does not bind
        assert systems.fit(rank=1).compare()["max_abs_logit_diff"] > 1e-3


def test_cli_thought(tmp_path, capsys):
    import json

    from implicit_updates.cli import main

    model_dir = tmp_path / "llama"
    tiny_hf("llama").save_pretrained(str(model_dir))
    out = tmp_path / "t.json"
    argv = ["thought", "--model", str(model_dir), "--backend", "hf", "--prompt", "1,2,3,4,5,6", "--query", "7,8",
            "--query", "9,10", "--held-out", "11,12", "--dtype", "float64", "--json", str(out)]
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    assert payload["training"]["max_abs_logit_diff"] <= 1e-9 and payload["kind"] == "matrix"  # exact by default
    assert payload["diagnostic"] is None
    assert main([*argv, "--diagnose", "--held-out", "7,8"]) == 0  # a training query among the held-out ones
    diagnostic = json.loads(out.read_text())["diagnostic"]
    assert len(diagnostic["coverage"]) == 3 and 0 < diagnostic["mean"]["coverage"] < 1
    assert "coverage" in capsys.readouterr().out
    assert len(payload["held_out"]) == 1 and 0 <= payload["held_out"][0]["agree"] <= 1
    assert main(argv[:-2] + ["--query", "1,2,3", "--json", str(out)]) == 0  # queries of several lengths
    mixed = json.loads(out.read_text())
    assert mixed["training"]["max_abs_logit_diff"] <= 1e-9 and "of 2/3 tokens" in capsys.readouterr().out


def test_exact_fit_keeps_a_repeated_position_once():
    """Queries sharing their first tokens give the same rows there (same prefix, same tokens): the exact fit keeps
    each once and stays exact on every position (a literal edit), where the stacked continuation refuses the
    dependent rows."""
    model = tiny_hf("llama")
    prefix = tokens(8, seed=0)
    queries = torch.cat([tokens(3, seed=s) for s in (1, 2, 3)])
    queries[:, :2] = queries[0, :2]  # every query starts with the same two tokens
    with pytest.raises(ValueError, match="numerically dependent"):
        absorb_continuation(model, prefix, queries, dtype=F64, output="matrix")
    patch = iu.thought_patch(model, prefix, queries, dtype=F64)
    edited, reference = literal_edit(model, patch.patch()), copy.deepcopy(model).double()
    full = hf_logits(reference, torch.cat([prefix.expand(3, -1), queries], 1))[:, -3:]
    assert float((hf_logits(edited, queries) - full).abs().max()) <= 1e-9


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_queries_of_several_lengths(kind):
    """Training queries of lengths 2, 3, 1 and 2, gathered one batch per length: the exact fit is exact on every
    position of each (a literal edit run on each query alone against prefix + query), the full logits come back in
    the queries' order, a subset of equal length fits as thought_patch on it alone, and a ridge fit does not depend
    on the order the queries are given in."""
    model = tiny_hf(kind)
    prefix = tokens(8, seed=0)
    queries = [tokens(n, seed=s)[0] for n, s in ((2, 1), (3, 2), (1, 3), (2, 4))]
    with assert_untouched(model):
        systems = iu.thought_systems(model, prefix, queries, dtype=F64)
        exact = systems.fit()
    edited, reference = literal_edit(model, exact.patch()), copy.deepcopy(model).double()
    for i, q in enumerate(queries):
        full = hf_logits(reference, torch.cat([prefix[0], q])[None])[0, -len(q):]
        start = sum(len(p) for p in queries[:i])
        assert torch.allclose(systems.full_logits[start: start + len(q)], full, atol=1e-10, rtol=0)
        assert float((hf_logits(edited, q[None])[0] - full).abs().max()) <= 1e-9, i
    assert exact.compare()["max_abs_logit_diff"] <= 1e-9 and isinstance(exact.continuation, tuple)
    assert exact.compare_on(prefix, queries)["max_abs_logit_diff"] <= 1e-9
    sub, alone = systems.fit(ridge=0.05, queries=[0, 3]), iu.thought_patch(model, prefix, torch.stack([queries[0],
                                                                                                       queries[3]]),
                                                                           ridge=0.05, dtype=F64)
    assert torch.equal(sub.continuation, torch.stack([queries[0], queries[3]]))
    assert all(float((sub.patch()[n] - d).abs().max()) <= 1e-10 for n, d in alone.patch().items())
    ridge, shuffled = systems.fit(ridge=0.1), iu.thought_patch(model, prefix, queries[::-1], ridge=0.1, dtype=F64)
    assert all(float((ridge.patch()[n] - d).abs().max()) <= 1e-10 for n, d in shuffled.patch().items())
    assert ridge.compare()["max_abs_logit_diff"] > 1e-3  # not exact: the check can fail

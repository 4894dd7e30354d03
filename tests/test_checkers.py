"""Negative tests: every checker, fed a decomposition corrupted in a known way, must report a large error at exactly
the corrupted block and position and a small one elsewhere (issue #19).

The checkers: ``Decomposition.verify()``, the tests' literal weight edit (``conftest.literal_edit_output``), the
absorbed model's comparison (``compare_absorbed``) and the one-pass-vs-naive dynamics check (``check_onepass``).
Corruptions (drawn by hypothesis): one block's first-layer column at one position, the output correction there
(a bias, a post-MLP norm's scale, one expert's share of a mixture), and with ``query="self"`` the query input or the
row. A correction shifted by ``e`` moves the block's output by exactly ``e`` (``e z'`` with ``z' = +-1`` behind a
post-MLP norm, ``w_e e`` for an expert routed with weight ``w_e``), so ``e`` is sized to make the relative error a
known number ``frac``: a checker that compares the wrong things, skips positions or averages them reports another.
References (targets, query inputs, routing weights) come from plain TransformerLens forwards, not from the result.
About 40 s on one thread.
"""

from __future__ import annotations

import copy
import importlib
from functools import cache

import pytest
import torch
from conftest import ARCHITECTURES, build, check_onepass, literal_edit_output, rel_err
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import implicit_updates as iu
from implicit_updates.adapters.assemble import run_patched_block
from implicit_updates.analyses.dynamics import max_relative_difference, prefix_decomposition
from implicit_updates.math.updates import AdditiveUpdate, RankOneUpdate

F64 = torch.float64
N = 7  # tokens per prompt
EXACT = 1e-10  # what an uncorrupted block or position must reproduce (float64)
LARGE = 1e-8  # what a corrupted one must exceed where its error is not known exactly (1e8 x float64 rounding)
CHECK = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# the output correction each architecture takes: a bias (plain MLP, gated, parallel), a post-MLP norm's scale
# (Gemma-style pre+post norms, OLMo 2's post-norm), one rank-one update per expert (a mixture without output bias)
CORRECTED = ["layernorm", "gated", "parallel-neox", "pre-post-norm-gemma", "post-norm-olmo2", "moe-mixtral"]
SMOOTH = ["layernorm", "gated", "gqa-rotary", "pre-post-norm-gemma", "moe-mixtral"]  # no ReLU: a column always acts
absorb_module = importlib.import_module("implicit_updates.analyses.absorb")  # the package exports the function absorb
DECOMPOSE_FOR_ABSORB = absorb_module.decompose_for_absorb


@cache
def case(name: str) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """A random float64 model (so that the adapter can run its blocks directly), a prompt, and a plain
    ``run_with_cache`` of a copy (the independent reference)."""
    model = build(**ARCHITECTURES[name]).to(F64)
    toks = torch.randint(0, model.cfg.d_vocab, (1, N), generator=torch.Generator().manual_seed(11))
    _, ref_cache = copy.deepcopy(model).run_with_cache(toks)
    return model, toks, ref_cache


def target(ref_cache, block: int, position: int) -> torch.Tensor:
    return ref_cache[f"blocks.{block}.hook_resid_post"][0, position]


def direction(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return v / v.norm()


def routing_weight(model, ref_cache, block: int, position: int, rank: int) -> tuple[int, float]:
    """The ``rank``-th routed expert at ``position`` and its routing weight, from TransformerLens's own hooks."""
    probs = ref_cache[f"blocks.{block}.mlp.hook_expert_weights"][position].float()  # softmax, [n_experts]
    experts = ref_cache[f"blocks.{block}.mlp.hook_expert_indices"][position]
    top = probs[experts]
    if model.cfg.norm_topk_prob:
        top = top / top.sum()
    return int(experts[rank]), float(top[rank])


def bump(obj, attr: str, position: int, shift: torch.Tensor) -> None:
    """``obj.attr[0, position] += shift`` on a copy: a block's query input may share storage with the block before's
    target (the same hook tensor), so an in-place edit would corrupt two blocks."""
    t = getattr(obj, attr).clone()
    t[0, position] += shift.to(t)
    setattr(obj, attr, t)


def corrupt(result, model, ref_cache, kind: str, block: int, position: int, frac: float, seed: int
            ) -> float | None:
    """Corrupt ``result`` at (block, position); return the exact relative error it must cause there, if known."""
    u = result.block(block)
    y = target(ref_cache, block, position)
    if kind == "column":  # a mixture's router (map 0) always acts; an expert's map only where it is routed
        first = u.first_layer
        update = first[0 if u.correction == "expert_out" else seed % len(first)]
        scale = update.column[0].norm(dim=-1).max() + 1
        bump(update, "column", position, frac * scale * direction(update.column.shape[-1], seed))
        return None
    if kind == "row":  # query="self": one row per position, shared by every first-layer map (kept one object)
        first = u.first_layer
        bump(u, "row", position, frac * u.row[0, position])  # (m_x . row) = 1 + frac: the update scaled
        for update in first:
            update.row = u.row
        return None
    if kind == "query_input":  # query="self": one query input per position
        bump(u, "query_input", position, frac * y.norm() * direction(y.shape[-1], seed))
        return None
    e = frac * y.norm() * direction(y.shape[-1], seed)
    if kind == "correction":
        if u.correction == "expert_out":  # one routed expert's share: the mixture moves by w_e * e
            expert, weight = routing_weight(model, ref_cache, block, position, seed % model.cfg.experts_per_token)
            update = next(p for p in u.updates if p.name.endswith(f"experts.{expert}.W_out.weight"))
            assert isinstance(update, RankOneUpdate) and update.row[0, position].abs().max() > 0  # routed there
            bump(update, "column", position, e / weight)
            return frac
        (update,) = [p for p in u.updates if isinstance(p, AdditiveUpdate)]
        bump(update, "delta", position, e)  # a bias moves the output by e; a post-norm scale by e * z', z' = +-1
        return frac
    raise ValueError(kind)


def per_position_errors(result, ref_cache, block: int) -> torch.Tensor:
    """``[pos]`` relative errors of the block run by the adapter with the factored updates, against plain targets."""
    with torch.no_grad():
        out = run_patched_block(result.adapter, result.block(block))[0]
    ref = ref_cache[f"blocks.{block}.hook_resid_post"][0]
    return (out - ref).norm(dim=-1) / ref.norm(dim=-1)


def assert_reports_exactly_there(result, ref_cache, block: int, position: int, expected: float | None,
                                 rel: float) -> None:
    """verify() and the per-position errors: ``expected`` (or large) at (block, position), tiny everywhere else."""
    errors = per_position_errors(result, ref_cache, block)
    others = torch.cat([errors[:position], errors[position + 1:]])
    assert float(others.max()) <= EXACT, errors
    report = result.verify()
    for b in report.blocks:
        if b.block != block:
            assert b.max_rel_err <= EXACT, (b, block, position)
    reported = report.blocks[block]
    assert reported.worst_position == position, reported
    if expected is None:
        assert float(errors[position]) > LARGE and reported.max_rel_err > LARGE, (errors, reported)
        assert reported.factored_max_rel_err > LARGE, reported  # the every-position check, not only the literal one
    else:  # a checker that compares the wrong tensors, misses the position or averages positions reports another
        assert float(errors[position]) == pytest.approx(expected, rel=rel)
        assert reported.max_rel_err == pytest.approx(expected, rel=rel), reported
        assert reported.factored_max_rel_err == pytest.approx(expected, rel=rel), reported


def tolerance(name: str) -> float:
    # behind a post-MLP norm the shift is e * z' with |z'| = k / sqrt(k^2 + eps) (k >= 1, eps = 1e-5): 1 - 5e-6
    return 1e-4 if name in ("pre-post-norm-gemma", "post-norm-olmo2") else 1e-6


blocks = st.integers(0, 2)
positions = st.integers(0, N - 1)
fracs = st.sampled_from([0.02, 0.3, 1.0, 4.0])
seeds = st.integers(0, 2**16)


@CHECK
@given(name=st.sampled_from(CORRECTED), block=blocks, position=positions, frac=fracs, seed=seeds)
@example(name="layernorm", block=1, position=2, frac=0.3, seed=0)  # not the last position, nor the last block
def test_verify_reports_a_corrupted_output_correction_exactly(name, block, position, frac, seed, one_thread):
    model, toks, ref_cache = case(name)
    result = iu.decompose(model, toks, dtype=F64)
    expected = corrupt(result, model, ref_cache, "correction", block, position, frac, seed)
    assert_reports_exactly_there(result, ref_cache, block, position, expected, tolerance(name))


@CHECK
@given(name=st.sampled_from(SMOOTH), block=blocks, position=positions, frac=fracs, seed=seeds)
@example(name="gated", block=0, position=3, frac=0.3, seed=1)
def test_verify_reports_a_corrupted_column(name, block, position, frac, seed, one_thread):
    model, toks, ref_cache = case(name)
    result = iu.decompose(model, toks, dtype=F64)
    corrupt(result, model, ref_cache, "column", block, position, frac, seed)
    assert_reports_exactly_there(result, ref_cache, block, position, None, 0)


@CHECK
@given(name=st.sampled_from(["layernorm", "gqa-rotary", "pre-post-norm-gemma"]), kind=st.sampled_from(
    ["query_input", "row", "column", "correction"]), block=blocks, position=st.integers(1, N - 1), frac=fracs,
    seed=seeds)
@example(name="layernorm", kind="query_input", block=2, position=4, frac=0.3, seed=2)
def test_verify_query_self_reports_the_corrupted_position(name, kind, block, position, frac, seed, one_thread):
    """``query="self"``: every position has its own query input and row, so each corrupts one position only."""
    model, toks, ref_cache = case(name)
    result = iu.decompose(model, toks, query="self", dtype=F64)
    expected = corrupt(result, model, ref_cache, kind, block, position, frac, seed)
    assert_reports_exactly_there(result, ref_cache, block, position, expected, tolerance(name))


def test_verify_passes_the_uncorrupted_decomposition():
    """The other side of every test above: the same models, uncorrupted, verify to float64 rounding."""
    for name in sorted(set(CORRECTED) | set(SMOOTH)):
        model, toks, ref_cache = case(name)
        result = iu.decompose(model, toks, dtype=F64)
        assert result.verify().max_rel_err <= EXACT, name
        for block in range(3):
            assert float(per_position_errors(result, ref_cache, block).max()) <= EXACT, (name, block)


def test_verify_report_table_and_json():
    """The report says what was measured: per-block rows with each number, the max over blocks, and JSON."""
    rows = (iu.BlockReport(0, msd=1.5e-30, max_abs_err=2.5e-15, max_rel_err=3.25e-15, rank=1,
                           literal_max_rel_err=2.5e-16),
            iu.BlockReport(3, msd=4.5e-31, max_abs_err=7.5e-15, max_rel_err=1.125e-15, rank=2,
                           literal_max_rel_err=1.125e-15))
    report = iu.VerifyReport(rows, n_positions=17, query="self", dtype="float64")
    assert report.max_rel_err == 3.25e-15 and report.max_abs_err == 7.5e-15
    payload = report.to_dict()
    assert payload["max_rel_err"] == 3.25e-15 and payload["n_positions"] == 17
    assert payload["dtype"] == "float64" and payload["query"] == "self"
    assert [b["block"] for b in payload["blocks"]] == [0, 3] and payload["blocks"][1]["max_abs_err"] == 7.5e-15
    assert payload["blocks"][0]["rank"] == 1 and payload["blocks"][1]["msd"] == 4.5e-31
    lines = str(report).splitlines()
    assert lines[0].split() == ["block", "MSD", "max", "|err|", "max", "rel", "err", "literal", "rank"]
    for line, b in zip(lines[1:3], rows, strict=True):
        assert line.split() == [str(b.block), f"{b.msd:.3e}", f"{b.max_abs_err:.3e}", f"{b.max_rel_err:.3e}",
                                f"{b.literal_max_rel_err:.2e}", str(b.rank)]
    assert lines[3] == "max relative error 3.250e-15 over 2 blocks x 17 positions (float64, query=self)"
    assert len(lines) == 4


# -- the tests' literal weight edit ----------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(name=st.sampled_from(["layernorm", "gated", "moe-mixtral"]), kind=st.sampled_from(["column", "correction"]),
       block=blocks, position=positions, frac=fracs, seed=seeds)
@example(name="layernorm", kind="correction", block=1, position=2, frac=0.3, seed=0)
def test_literal_edit_reports_the_corrupted_block_and_position(name, kind, block, position, frac, seed):
    model, toks, ref_cache = case(name)
    result = iu.decompose(model, toks, dtype=F64)
    expected = corrupt(result, model, ref_cache, kind, block, position, frac, seed)
    got = rel_err(literal_edit_output(model, result, block, position, prompt=toks), target(ref_cache, block, position))
    assert got > LARGE if expected is None else got == pytest.approx(expected, rel=1e-6)
    other = (position + 1 + seed % (N - 1)) % N
    assert rel_err(literal_edit_output(model, result, block, other, prompt=toks),
                   target(ref_cache, block, other)) <= EXACT
    other_block = (block + 1) % 3
    assert rel_err(literal_edit_output(model, result, other_block, position, prompt=toks),
                   target(ref_cache, other_block, position)) <= EXACT


def test_query_one_token_early_passes_verify_but_not_the_independent_references(monkeypatch):
    """A capture that takes the query one token early yields a self-consistent decomposition for the wrong query:
    verify() (which runs result.query_input) passes it, so the literal edit must take its query input from a plain
    forward, and the absorbed model (which starts from the real query token) must disagree with the full model."""
    import implicit_updates.adapters.hooked_transformer as hooked
    from implicit_updates.adapters.assemble import assemble

    def early(adapter, store, resid_pre, blocks_, query, query_inputs, progress):
        query_inputs = query_inputs or {b: store[resid_pre(b)][:, -2:-1] for b in blocks_}
        return assemble(adapter, store, resid_pre, blocks_, query, query_inputs, progress)

    model, toks, ref_cache = case("gqa-rotary")
    monkeypatch.setattr(hooked, "assemble", early)
    result = iu.decompose(model, toks, dtype=F64)
    assert result.verify().max_rel_err <= EXACT  # blind to it by construction
    for block in range(3):
        for position in (0, N - 2):
            got = literal_edit_output(model, result, block, position, prompt=toks)
            assert rel_err(got, target(ref_cache, block, position)) > 1e-3, (block, position)


# -- the absorbed model's comparison ---------------------------------------------------------------------------------


@settings(max_examples=4, deadline=None)
@given(name=st.sampled_from(["layernorm", "gqa-rotary", "moe-mixtral"]), block=blocks, frac=st.sampled_from([0.3, 2.0]),
       seed=seeds)
@example(name="layernorm", block=1, frac=0.3, seed=0)
def test_absorbed_chain_breaks_at_exactly_the_corrupted_block(name, block, frac, seed):
    """Each absorbed block reproduces the full model's last position until the corrupted one, which is off by
    exactly ``frac``; compare_absorbed, fed that decomposition, reports the logits off."""
    model, toks, ref_cache = case(name)
    result = DECOMPOSE_FOR_ABSORB(model, toks, F64)
    expected = corrupt(result, model, ref_cache, "correction", block, N - 1, frac, seed)
    _, absorbed_cache = absorb_module.absorbed_model(result).run_with_cache(toks[:, -1:])
    for b in range(block + 1):
        got = rel_err(absorbed_cache[f"blocks.{b}.hook_resid_post"][0, 0], target(ref_cache, b, N - 1))
        assert got <= EXACT if b < block else got == pytest.approx(expected, rel=1e-6), (b, got)

    def corrupted(model_, prompt, dtype=None, progress=None):
        out = DECOMPOSE_FOR_ABSORB(model_, prompt, dtype, progress)
        corrupt(out, model, ref_cache, "correction", block, N - 1, frac, seed)
        return out

    clean = iu.compare_absorbed(model, toks, dtype=F64)
    assert clean.max_abs_logit_diff <= 1e-9 and clean.kl_full_vs_absorbed <= 1e-12
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(absorb_module, "decompose_for_absorb", corrupted)
        report = iu.compare_absorbed(model, toks, dtype=F64)
    assert report.max_abs_logit_diff > 1e-4 and report.kl_full_vs_absorbed > 1e-9, report


# -- the one-pass vs naive dynamics check ----------------------------------------------------------------------------

FIELDS = ["column", "row", "delta", "delta_b", "query_input", "target_output"]


@cache
def prefixes(name: str):
    model, toks, _ = case(name)
    return model, toks, prefix_decomposition(model, toks, dtype=F64, method="naive")


@settings(max_examples=8, deadline=None)
@given(name=st.sampled_from(["layernorm", "gated"]), field=st.sampled_from(FIELDS), block=blocks,
       prefix=st.integers(0, N - 2), frac=st.sampled_from([1e-6, 0.01, 0.5]), seed=seeds)
@example(name="layernorm", field="column", block=1, prefix=2, frac=1e-6, seed=0)
def test_onepass_vs_naive_reports_the_corrupted_factor(name, field, block, prefix, frac, seed):
    """max_relative_difference is ``||x - y|| / ||y||`` per tensor: a corruption of one entry by ``frac ||y||``
    reports exactly ``frac`` for that block, ~1e-15 for every other block."""
    model, toks, naive = prefixes(name)
    one = prefix_decomposition(model, toks, dtype=F64)
    owner, reference = one.block(block), naive.block(block)
    if field in ("column", "row", "delta"):  # the first update that has this factor (a first-layer map or a bias)
        k = next(i for i, p in enumerate(reference.updates) if hasattr(p, field))
        owner, reference = owner.updates[k], reference.updates[k]
    reference = getattr(reference, field)
    bump(owner, field, prefix, frac * reference.norm() * direction(reference.shape[-1], seed))
    per_block = {b: max_relative_difference(*(type(one)(one.adapter, [d.block(b)], F64, one.inputs)
                                              for d in (one, naive))) for b in range(3)}
    assert per_block[block] == pytest.approx(frac, rel=1e-6)
    assert all(per_block[b] <= EXACT for b in range(3) if b != block), per_block
    assert max_relative_difference(one, naive) == pytest.approx(frac, rel=1e-6)


def test_check_onepass_fails_on_a_corrupted_onepass(monkeypatch):
    """conftest's check_onepass (one pass == naive, and verify) fails when the one pass is off at one prefix."""
    import implicit_updates.analyses.dynamics as dynamics

    model, toks, _ = case("gated")
    check_onepass(model, toks)
    real = dynamics.prefix_decomposition

    def one_column_entry_off(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("method", "onepass") == "onepass":
            out.block(1).first_layer[0].column[0, 3] *= 1 + 1e-6  # prefix 4 of block 1, relatively 1e-6
        return out

    monkeypatch.setattr(dynamics, "prefix_decomposition", one_column_entry_off)
    with pytest.raises(AssertionError):
        check_onepass(model, toks)

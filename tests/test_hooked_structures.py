"""Regression tests for each HookedTransformer structure the config fuzzer found broken (issue #11's classes), and
for the literal check that makes ``verify()`` unable to say yes where a real weight edit says no."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BASE, assert_untouched, build, check_onepass, rel_err
from fuzz_configs import check
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import implicit_updates as iu
from implicit_updates.adapters import hooked_transformer
from implicit_updates.analyses.dynamics import prefix_dynamics

POST_NORM = dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", original_architecture="Olmo2ForCausalLM",
                 positional_embedding_type="rotary", rotary_dim=8)
MOE = dict(num_experts=3, experts_per_token=2, gated_mlp=True, act_fn="silu")


def tokens(n: int, seed: int = 0, vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_verify_literal_check_catches_a_parameter_read_twice(monkeypatch):
    """Class 1: a parallel post-norm block reads ln2 before and after the MLP. Its factored check passes (the hooks
    patch only the output norm), but the literal check, which swaps the dense edit into the model, must not."""
    model = build(**POST_NORM, parallel_attn_mlp=True)
    with pytest.raises(iu.UnsupportedArchitectureError, match="reads ln2 both before and after"):
        iu.decompose(model, tokens(9))
    monkeypatch.setattr(hooked_transformer, "refuse_unexact_output_norm", lambda *args: None)
    with assert_untouched(model):
        report = iu.decompose(model, tokens(9), dtype=torch.float64).verify()
    for block in report.blocks:
        assert block.factored_max_rel_err <= 1e-12  # the hooks alone would have said yes
        assert block.literal_max_rel_err > 1e-2 and block.max_rel_err == block.literal_max_rel_err
        assert block.worst_position in block.literal_positions


def test_literal_positions_include_the_last_and_the_worst():
    model = build(normalization_type="RMS", gated_mlp=True, act_fn="silu")
    report = iu.decompose(model, tokens(12), dtype=torch.float64).verify(literal_positions=5)
    for block in report.blocks:
        assert 11 in block.literal_positions and len(block.literal_positions) == 5
        assert block.literal_max_rel_err <= 1e-12


def test_two_norms_after_the_mlp_are_refused():
    """Class 2: a post-norm block with use_normalization_before_and_after has ln2_post then ln2 after the MLP."""
    with pytest.raises(iu.UnsupportedArchitectureError, match="two norms after the MLP"):
        iu.decompose(build(**POST_NORM, use_normalization_before_and_after=True), tokens(6))


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_mixture_of_experts_before_a_post_norm(norm):
    """Class 3 (LayerNorm: KeyError before) and MoE + RMS post-norm (refused before): the routed experts' output
    matrices flatten the mixture's output together, then the norm's scale takes the correction."""
    cfg = {**BASE, **POST_NORM, **MOE, "normalization_type": norm, "seed": 3, "dtype": torch.float32}
    assert check(cfg, seq_len=9, onepass=True) == "ok"


def test_shortformer_with_attention_sinks_absorbs_exactly():
    """Class 4: a one-token sequence's attention reads position 0's embedding, which sinks make count."""
    model = build(positional_embedding_type="shortformer", use_attention_sinks=True)
    report = iu.compare_absorbed(model, tokens(12, seed=1), dtype=torch.float64)
    assert report.max_abs_logit_diff <= 1e-9 < report.max_abs_logit_diff_control


@pytest.mark.parametrize("n_heads", [3, 5, 6])
@pytest.mark.parametrize("sinks", [False, True])
def test_alibi_tables_are_fresh_and_exact(n_heads, sinks):
    """Class 5: TransformerLens's float32 ALiBi table, reused from a longer forward, shifts rows by a constant.

    The one pass must equal the naive dynamics even after the model ran a longer prompt, and the module's own
    cached table is left as it was."""
    model = build(positional_embedding_type="alibi", n_heads=n_heads, d_head=8, d_model=8 * n_heads,
                  use_attention_sinks=sinks)
    with torch.no_grad():
        model(tokens(40, seed=2))  # leaves a 40-position float32 table on every attention module
    before = [block.attn.alibi for block in model.blocks]
    check_onepass(model, tokens(13, seed=4), chunk_size=5)
    assert all(block.attn.alibi is table for block, table in zip(model.blocks, before, strict=True))


def test_alibi_logits_do_not_depend_on_what_ran_before():
    model = build(positional_embedding_type="alibi", n_heads=3, d_head=8, d_model=24, use_attention_sinks=True)
    prompt = tokens(10, seed=5)
    fresh = iu.compare_absorbed(model, prompt, dtype=torch.float64)
    with torch.no_grad():
        model(tokens(50, seed=6))
    again = iu.compare_absorbed(model, prompt, dtype=torch.float64)
    assert fresh.max_abs_logit_diff <= 1e-9 and again.max_abs_logit_diff <= 1e-9
    assert fresh.top_k == again.top_k


def test_rotary_prompt_longer_than_its_tables():
    """Class 6: TransformerLens's rotary sin/cos tables stop at n_ctx: a clear ValueError, not a RuntimeError."""
    model = build(positional_embedding_type="rotary", rotary_dim=8, n_ctx=16)
    with pytest.raises(ValueError, match="n_ctx=16"):
        iu.decompose(model, tokens(17))


def test_ungrouped_gqa_one_pass_is_refused_and_naive_works():
    """Class 7: TransformerLens's key-value cache cannot hold ungrouped keys (its own generation fails too)."""
    model = build(n_key_value_heads=2, ungroup_grouped_query_attention=True, positional_embedding_type="rotary",
                  rotary_dim=8)
    with pytest.raises(iu.UnsupportedArchitectureError, match="method='naive'"):
        prefix_dynamics(model, tokens(8))
    assert prefix_dynamics(model, tokens(8), method="naive", dtype=torch.float64).n_prefixes == 7


def test_relu_expert_with_a_zero_hidden_leaves_the_correction_to_another():
    """Class 8: a routed ReLU expert whose hidden is exactly zero cannot carry the correction; the other routed
    expert carries all of it (exact), and only a token whose every routed expert is dead is refused."""
    model = build(**{**MOE, "act_fn": "relu", "experts_per_token": 2})
    prompt = tokens(10, seed=7)
    with torch.no_grad():  # kill expert 0 for every token: its ReLU hidden is 0 wherever it is routed
        for block in model.blocks:
            block.mlp.experts[0].W_gate.weight.zero_()
            block.mlp.experts[0].W_gate.weight[:, 0] = -1.0
            block.mlp.experts[0].W_in.weight.zero_()
    result = iu.decompose(model, prompt, dtype=torch.float64)
    assert result.verify().max_rel_err <= 1e-10
    routed_to_dead = [u for u in result.block(0).updates if u.name.endswith("experts.0.W_out.weight")]
    assert routed_to_dead and float(routed_to_dead[0].row.abs().max()) == 0.0


def test_identity_output_norm_uses_the_mlp_bias():
    """A norm after the MLP that is Identity (no normalization) is no norm: the MLP's output bias takes it."""
    model = build(normalization_type=None, use_normalization_before_and_after=True, act_fn="relu")
    result = iu.decompose(model, tokens(9), dtype=torch.float64)
    assert "blocks.0.mlp.b_out" in result.patch(0, 3)
    assert result.verify().max_rel_err <= 1e-10


def test_dead_mlp_hidden_before_a_post_norm_uses_the_output_bias():
    """Where the with-context hidden is exactly zero, W_out cannot move the output: b_out flattens it instead."""
    model = build(normalization_type="RMS", use_normalization_before_and_after=True, act_fn="relu")
    with torch.no_grad():
        model.blocks[1].mlp.b_in.fill_(-100.0)  # every hidden unit of block 1 is dead
    result = iu.decompose(model, tokens(9), dtype=torch.float64)
    assert "blocks.1.mlp.b_out" in result.patch(1, 3) and "blocks.0.mlp.b_out" not in result.patch(0, 3)
    assert result.verify().max_rel_err <= 1e-10


SHORTFORMER_SINKS = dict(positional_embedding_type="shortformer", use_attention_sinks=True)


def _shortformer_sinks_model(seed: int):
    model = build(seed=seed, **SHORTFORMER_SINKS)
    with torch.no_grad():  # random sinks: a single key's score then counts, and so does what is added to it
        for block in model.blocks:
            block.attn.sinks.normal_(generator=torch.Generator().manual_seed(seed + 2))
    return model


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**10), n=st.integers(2, 9), position=st.integers(0, 8))
def test_query_alone_follows_the_models_own_convention_for_continuous_inputs(seed, n, position):
    """Continuous inputs (fed at block 0, ``start_at_layer=0``) get no positional embedding from TransformerLens, so
    the query-alone runs add no shortformer embedding either; the fuzzer's case (shortformer + attention sinks) had
    verify at 1e-16 while a literal edit run by TransformerLens itself was 0.04 off and the absorbed copy 0.09."""
    model, position = _shortformer_sinks_model(seed), position % n
    x = torch.randn(1, n, BASE["d_model"], generator=torch.Generator().manual_seed(seed + 1))
    with assert_untouched(model):
        result = iu.decompose(model, x, dtype=torch.float64)
        assert result.verify().max_rel_err <= 1e-10
        report = iu.compare_absorbed(model, x, dtype=torch.float64)
        absorbed = iu.absorb(model, x, dtype=torch.float64)
    assert report.max_abs_logit_diff <= 1e-9
    # independent of our adapter: TransformerLens runs a float64 copy, the dense patch added to its parameters, from
    # block l's query input alone (start_at_layer), against its own with-context forward
    ref = copy.deepcopy(model).to(torch.float64)
    ref.cfg.dtype = torch.float64
    with torch.no_grad():
        full, cache = ref.run_with_cache(x.double(), start_at_layer=0)
        for block in range(model.cfg.n_layers):
            edited = copy.deepcopy(ref)
            for name, delta in result.patch(block, position).items():
                edited.get_parameter(name).add_(delta)
            query = cache[f"blocks.{block}.hook_resid_pre"][:, -1:]
            out = edited(query, start_at_layer=block, stop_at_layer=block + 1)[0, 0]
            target = cache[f"blocks.{block}.hook_resid_post"][0, position]
            assert torch.allclose(result.target_output(block, position), target, rtol=0, atol=1e-12)
            assert rel_err(out, target) <= 1e-10, (block, position, rel_err(out, target))
        # the absorbed copy, run by TransformerLens on the last input alone, gives the full forward's last logits
        alone = absorbed(x[:, -1:].double(), start_at_layer=0)[0, -1]
    assert float((alone - full[0, -1]).abs().max()) <= 1e-9


def test_query_alone_keeps_position_0_for_token_inputs():
    """Token ids: a one-token prompt sits at position 0, so shortformer attention reads position 0's embedding, as
    the model's own forward on the last token alone (the other half of one convention)."""
    model, ids = _shortformer_sinks_model(3), tokens(8, seed=3)
    with assert_untouched(model):
        assert iu.decompose(model, ids, dtype=torch.float64).verify().max_rel_err <= 1e-10
        assert iu.compare_absorbed(model, ids, dtype=torch.float64).max_abs_logit_diff <= 1e-9
        # and continuous inputs to the same model (no position embedding there)
        assert iu.decompose(model, torch.randn(1, 8, BASE["d_model"]), dtype=torch.float64
                            ).verify().max_rel_err <= 1e-10


@pytest.mark.parametrize("method", ["onepass", "naive"])
def test_prefix_dynamics_of_continuous_inputs_follow_the_same_convention(method):
    """The naive prefix dynamics decomposes each prefix with its own adapter and verifies with the outer one, which
    never ran a with-context forward: it must still know its inputs are continuous (no shortformer embedding)."""
    from implicit_updates.analyses.dynamics import prefix_decomposition

    model = _shortformer_sinks_model(1)
    x = torch.randn(1, 7, BASE["d_model"], generator=torch.Generator().manual_seed(5))
    with assert_untouched(model):
        result = prefix_decomposition(model, x, dtype=torch.float64, method=method, chunk_size=3)
        assert result.verify().max_rel_err <= 1e-10
    ref = copy.deepcopy(model).to(torch.float64)
    ref.cfg.dtype = torch.float64
    with torch.no_grad():  # independent: prefix p is [x_0..x_p, x_last]; TransformerLens runs its edited block 0
        for p in range(result.n_positions):
            _, cache = ref.run_with_cache(torch.cat([x[:, :p + 1], x[:, -1:]], 1).double(), start_at_layer=0)
            edited = copy.deepcopy(ref)
            for name, delta in result.patch(0, p).items():
                edited.get_parameter(name).add_(delta)
            out = edited(x[:, -1:].double(), start_at_layer=0, stop_at_layer=1)[0, 0]
            assert rel_err(out, cache["blocks.0.hook_resid_post"][0, -1]) <= 1e-10, p

"""Exact absorption over a continuation (rank-K updates): the patched copy on S alone gives the full logits."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, assert_untouched, build

import implicit_updates as iu
from implicit_updates.analyses.continuation import absorb_continuation
from implicit_updates.models import random_model


def ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["llama", "neox", "gemma2", "olmo2", "mixtral"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_patched_copy_reproduces_every_continuation_position(preset, k):
    model = random_model(preset)
    prefix, continuation = ids(model.cfg.d_vocab, 10, 0), ids(model.cfg.d_vocab, k, 1)
    with assert_untouched(model):
        absorbed = absorb_continuation(model, prefix, continuation, dtype=torch.float64)
    report = absorbed.compare()
    assert report["max_abs_logit_diff"] <= 1e-9 and report["top1_agree"]
    assert report["rank"] == [k] * model.cfg.n_layers
    with torch.no_grad():  # the context mattered: the unpatched model on S alone is far off
        control = model(continuation)[0].double()
    assert float((control - absorbed.full_logits).abs().max()) > 1e-2


@pytest.mark.parametrize("name", ["layernorm", "alibi", "parallel-neox", "solu", "gated", "gqa-rotary",
                                  "pre-post-norm-gemma", "post-norm-olmo2", "moe-mixtral", "no-norm"])
def test_other_blocks(name):
    model = build(**ARCHITECTURES[name])
    report = absorb_continuation(model, ids(61, 9, 2), ids(61, 4, 3), dtype=torch.float64).compare()
    assert report["max_abs_logit_diff"] <= 1e-9


def test_generation_reproduced_for_the_tokens_it_was_built_on():
    """S is the full model's own greedy continuation: the patched copy, fed S, predicts the same next tokens."""
    model = random_model("llama")
    prefix = ids(model.cfg.d_vocab, 8, 4)
    tokens = prefix
    with torch.no_grad():
        for _ in range(4):
            tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
    continuation = tokens[:, 8:]
    absorbed = absorb_continuation(model, prefix, continuation, dtype=torch.float64)
    with torch.no_grad():
        predicted = absorbed.patched()(continuation)[0].argmax(-1)
        full = model(tokens)[0, 8:].argmax(-1)
    assert torch.equal(predicted[:-1], continuation[0, 1:]) and torch.equal(predicted, full)


def test_refusals():
    model = random_model("llama")
    with pytest.raises(ValueError, match="numerically dependent"):  # more rows than d_model cannot be independent
        absorb_continuation(model, ids(model.cfg.d_vocab, 4, 5), ids(model.cfg.d_vocab, model.cfg.d_model + 1, 6),
                            dtype=torch.float64)
    post_layernorm = build(original_architecture="Olmo2ForCausalLM")  # LayerNorm after the MLP
    with pytest.raises(iu.UnsupportedArchitectureError, match="RMSNorm with eps > 0 only"):
        absorb_continuation(post_layernorm, ids(61, 5, 7), ids(61, 2, 8))
    with pytest.raises(iu.UnsupportedArchitectureError, match="shortformer"):
        absorb_continuation(build(positional_embedding_type="shortformer"), ids(61, 5, 7), ids(61, 2, 8))


def test_positive_solution_finds_one_or_says_none():
    from implicit_updates.analyses.continuation import positive_solution

    gen = torch.Generator().manual_seed(9)
    a = torch.rand(4, 30, generator=gen, dtype=torch.float64)
    truth = torch.rand(30, generator=gen, dtype=torch.float64) + 0.1
    u = positive_solution(a, a @ truth)
    assert u is not None and bool((u > 0).all()) and float((a @ u - a @ truth).norm()) <= 1e-12
    assert positive_solution(a, -(a @ truth)) is None  # a non-negative a cannot reach negative values
    # two equal equations asking different values: the Newton system is singular; no solution, said as None
    twice = torch.cat([a[:1], a[:1]])
    assert positive_solution(twice, torch.tensor([1.0, 2.0], dtype=torch.float64)) is None

"""The transfer study (examples/transfer_study.py) on stories260K (the team's tiny Llama): its factored patches (each
low-rank update added at its linear map's output, what lets Qwen2.5-Coder-1.5B fit in memory) give what the literal
weight edits give, its streamed gradient cosine equals one computed from whole gradients, and the model is left as
it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_thought_study import STORIES, example

pytestmark = pytest.mark.usefixtures("one_thread")
# 4 shots, then queries: the first four of the most common length (5 tokens in stories' tokenizer) have distinct first
# tokens, as stacking needs (a 64-wide model: the study's own word lists repeat first tokens there); the rest are
# held out
PAIRS = [(w, w.upper()) for w in ["a", "b", "c", "d", "cat", "dog", "sun", "red", "hat", "run", "sit", "big", "tree",
                                  "house"]]


@pytest.fixture(scope="module")
def stories():
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found at {STORIES} (the team's ../shared next to the repository)")
    pytest.importorskip("peft")
    study = example("transfer_study")
    model, tokenizer = study.load_float64(str(STORIES))
    return study, model, tokenizer


def test_factored_patches_give_what_literal_weight_edits_give(stories):
    study, model, tokenizer = stories
    before = {n: p.clone() for n, p in model.state_dict().items()}
    grad_flags = [p.requires_grad for p in model.parameters()]
    results = {}
    for factored in (False, True):
        torch.manual_seed(0)  # the LoRA's initialisation
        results[factored] = study.run_task(model, tokenizer, "uppercase", PAIRS, 2, factored)
    literal, factored = results[False], results[True]
    assert set(literal["rows"]) == set(factored["rows"]) >= {"full", "one other", "mean of 4", "stacked 4",
                                                              "stacked 4, specials only", "LoRA (GD)"}
    for condition, row in literal["rows"].items():
        for key in ("agree", "correct"):
            assert factored["rows"][condition][key] == row[key], (condition, key)
        assert factored["rows"][condition]["kl"] == pytest.approx(row["kl"], abs=1e-9), condition
    # both are exact on their own training queries: the machinery's own check, in either form
    assert literal["max_abs_logit_diff_on_training_queries"] <= 1e-9
    assert factored["max_abs_logit_diff_on_training_queries"] <= 1e-9
    assert factored["cosine_update_vs_first_gradient_step"] == pytest.approx(
        literal["cosine_update_vs_first_gradient_step"], abs=1e-9)
    # the study changed nothing in the model and left no hook behind
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == grad_flags
    assert all(p.grad is None for p in model.parameters())


def test_streamed_gradient_cosine_equals_the_whole_gradients(stories):
    study, model, tokenizer = stories
    prefix = tokenizer("a -> A\nb -> B\n", return_tensors="pt").input_ids
    query = study.ids_of(tokenizer, "cat ->")[0]
    for factored in (False, True):
        patch = study.patch_of(study.absorb_continuation(model, prefix, query, dtype=torch.float64, output="matrix"),
                               factored)
        dense = {n: d.dense() if isinstance(d, study.LowRank) else d for n, d in patch.items()}
        with torch.no_grad():
            target = F.log_softmax(model(input_ids=torch.cat([prefix, query[None]], 1)).logits[0, -len(query):], -1)
        params = [model.get_parameter(n) for n in dense]
        loss = F.kl_div(F.log_softmax(model(input_ids=query[None]).logits[0], -1), target, log_target=True,
                        reduction="batchmean")
        g = torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)])
        d = torch.cat([x.flatten() for x in dense.values()])
        expected = float(-(g @ d) / (g.norm() * d.norm()))
        assert study.first_gradient_cosine(model, prefix, query, patch) == pytest.approx(expected, abs=1e-12)
        assert abs(expected) > 1e-6  # a cosine that says something, not a zero both sides agree on


def test_float32_copy_is_float32_and_keeps_ties_and_the_original(stories):
    study, model, _ = stories
    copy_ = study.float32_copy(model)
    assert all(p.dtype == torch.float32 for p in copy_.parameters())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for (name, p), (_, q) in zip(model.named_parameters(), copy_.named_parameters(), strict=True):
        assert torch.equal(p.float(), q) and p.data_ptr() != q.data_ptr(), name
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (copy_.get_output_embeddings().weight is copy_.get_input_embeddings().weight) == tied


def test_the_stacked_update_is_exact_in_the_float64_formula_either_way(stories):
    """The factored patch is as exact as the literal edit where no float32 detour rounds (stories' RMSNorm casts to
    float32 as written: its check there is only as good as that rounding)."""
    study, model, tokenizer = stories
    for factored in (False, True):
        checks = study.exactness(model, tokenizer, PAIRS, factored)
        assert set(checks) == {"as written", "float64 formula"}
        assert checks["float64 formula"] <= 1e-9, (factored, checks)

"""The absorbed-context model: real weights edited, the query token alone gives the full prompt's logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ARCHITECTURES, assert_untouched, build

import implicit_updates as iu
from implicit_updates.cli import main
from implicit_updates.models import PRESETS, random_model
from implicit_updates.models.loading import hooked_classes

SMALL_PRESETS = sorted(set(PRESETS) - {"gpt2-small"})


def tokens(model, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.cfg.d_vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", SMALL_PRESETS)
def test_absorbed_model_matches_full_logits_every_preset(preset):
    model = random_model(preset)
    toks = tokens(model, 20)
    with assert_untouched(model):
        patched = iu.absorb(model, toks, dtype=torch.float64)
    with torch.no_grad():
        full = _full_logits(model, toks)
        absorbed = patched(toks[:, -1:])[0, -1]
        control = _full_logits(model, toks[:, -1:])
    assert patched is not model and next(patched.parameters()).dtype == torch.float64
    assert float((absorbed - full).abs().max()) <= 1e-9
    assert float((control - full).abs().max()) > 1e-2  # the context mattered


@pytest.mark.parametrize("name", ["layernorm", "shortformer", "alibi", "parallel-neox", "solu"])
def test_absorbed_model_other_architectures(name):
    """Absolute and shortformer positions: the query alone sits at position 0; block 0's correction absorbs it."""
    model = build(**ARCHITECTURES[name])
    report = iu.compare_absorbed(model, tokens(model, 12, seed=1), dtype=torch.float64)
    assert report.max_abs_logit_diff <= 1e-9 and report.top1_agree
    assert report.kl_full_vs_absorbed <= 1e-12 < report.kl_full_vs_control


def test_absorb_float32():
    model = random_model("llama")
    report = iu.compare_absorbed(model, tokens(model, 16))
    assert report.max_abs_logit_diff <= 1e-4 and report.top1_agree


def test_absorb_errors():
    model = build()
    with pytest.raises(ValueError, match="n_ctx"):
        iu.absorb(model, tokens(model, model.cfg.n_ctx + 1))
    with pytest.raises(iu.UnsupportedArchitectureError, match="attn_only"):
        iu.absorb(build(attn_only=True), tokens(model, 5))
    with pytest.raises(ValueError, match="batch 1"):
        iu.absorb(model, torch.randint(0, 61, (2, 5)))


def test_absorb_cli_json(tmp_path):
    hooked_classes()  # random:PRESET is a HookedTransformer: the CLI exits 2 on TL 4.x; conftest skips on this
    out = tmp_path / "absorb.json"
    main(["absorb", "--model", "random:mixtral", "--seq-len", "16", "--dtype", "float64", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["max_abs_logit_diff"] <= 1e-9 and data["top1_agree"] is True
    assert data["kl_full_vs_absorbed"] <= 1e-12 < data["kl_full_vs_control"]


def _full_logits(model, toks):
    """Reference logits from a plain float64 copy (none of our code involved)."""
    return copy.deepcopy(model).to(torch.float64)(toks)[0, -1]


def _closure_mlp(model):
    """Block 0's MLP forward replaced by a closure over the *original* module's bound forward, as TransformerLens
    4.3's Falcon bridge does with its patched linears: a deep copy shares the closure, so it computes with the
    original's weights (a hand-made stand-in that needs no TransformerLens 4)."""
    mlp = model.blocks[0].mlp
    original = mlp.forward
    mlp.forward = lambda *args, **kwargs: original(*args, **kwargs)
    return model


def test_copy_check_refuses_a_copy_that_reads_the_original():
    from implicit_updates.analyses.decompose import check_copy_is_its_own

    model = build()
    twin = copy.deepcopy(model)
    check_copy_is_its_own(model, twin, lambda: twin(torch.tensor([[3]])))  # a faithful copy passes
    _closure_mlp(model)
    twin = copy.deepcopy(model)
    with assert_untouched(model), pytest.raises(iu.UnsupportedArchitectureError, match="original's weights"):
        check_copy_is_its_own(model, twin, lambda: twin(torch.tensor([[3]])))
    with torch.no_grad():  # the check is right: the copy ignores its own MLP weights
        before = twin(torch.tensor([[3, 4]]))
        twin.blocks[0].mlp.W_in.add_(1.0)
        assert torch.equal(twin(torch.tensor([[3, 4]])), before)


def test_every_copy_based_path_refuses_a_copy_that_reads_the_original():
    from implicit_updates.analyses.continuation import absorb_continuation
    from implicit_updates.analyses.dynamics import edited_block_output, suffix_removal

    model, ids = _closure_mlp(build()), torch.tensor([[3, 4, 5, 6, 7]])
    with assert_untouched(model):
        # the model itself decomposes exactly (no copy), and absorbed() patches it in place
        assert iu.decompose(model, ids, dtype=torch.float64).verify().max_rel_err <= 1e-10
        with iu.absorbed(model, ids, dtype=torch.float64), torch.no_grad():
            alone = model(ids[:, -1:])[0, -1]
        with torch.no_grad():
            assert float((alone.double() - model(ids)[0, -1].double()).abs().max()) <= 1e-4
        for copying in (lambda: iu.absorb(model, ids), lambda: iu.compare_absorbed(model, ids),
                        lambda: iu.absorb(model, ids, dtype=torch.float64),
                        lambda: absorb_continuation(model, ids[:, :3], ids[:, 3:]).patched(),
                        lambda: edited_block_output(suffix_removal(model, ids, 0), model, 1)):
            with pytest.raises(iu.UnsupportedArchitectureError, match="absorbed|in place"):
                copying()
        with pytest.raises(iu.UnsupportedArchitectureError, match="upcast='stream'"):
            iu.decompose(model, ids, dtype=torch.float64, upcast="copy")


def test_copy_based_paths_accept_faithful_copies():
    model, ids = build(), torch.tensor([[3, 4, 5, 6, 7]])
    with assert_untouched(model):
        assert iu.compare_absorbed(model, ids, dtype=torch.float64).max_abs_logit_diff <= 1e-9
        assert iu.decompose(model, ids, dtype=torch.float64, upcast="copy").verify().max_rel_err <= 1e-10


def test_compare_absorbed_upcast_patches_in_place(monkeypatch):
    """A model computed in another dtype than its own is compared without any copy of it (a 1.5B held in bfloat16 and
    computed in float64 would need 12 GB more): the weights are patched while each module runs, and the numbers are
    those of the patched copy that absorb() makes."""
    model = build(n_layers=2)  # float32, computed in float64
    prompt = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(4))
    copied = iu.absorb(model, prompt, dtype=torch.float64)
    with torch.no_grad():
        want = copied(prompt[:, -1:])[0, -1]
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: pytest.fail("compare_absorbed copied the model"))
    with assert_untouched(model):
        report = iu.compare_absorbed(model, prompt, dtype=torch.float64, k=3)
    assert report.max_abs_logit_diff <= 1e-9 and report.top1_agree and report.max_abs_logit_diff_control > 1e-3
    assert report.top_k["absorbed"][0][0] == int(want.argmax())

"""Absorbed generation (``iu.generate``): each step's absorbed model gives the full model's logits, checked against
independent references (plain float64 forwards of the whole history; literal weight edits of a copy made by
``absorb`` on the whole history), across architectures; the model untouched; bad input refused in one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, assert_untouched, build, hook_count
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hf import CONFIGS, tiny_hf, tokens
from test_toy_extras import prompt as toy_prompt
from test_toy_extras import toy

import implicit_updates as iu
from implicit_updates.analyses import generate as generate_module
from implicit_updates.errors import NonFiniteActivationError, UnsupportedArchitectureError
from implicit_updates.runtime.precision import exact_formula

F64 = torch.float64
STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K"
pytestmark = pytest.mark.usefixtures("one_thread")


def plain(model, ids: torch.Tensor) -> torch.Tensor:
    """The last position's logits of a plain forward (no cache, no hooks), in the model's dtype throughout (Gemma's
    norms cast to float32 inside; ``exact_formula`` keeps float64 there, as every decomposition computes)."""
    with torch.no_grad(), exact_formula(model, model.dtype):
        return model(input_ids=ids, use_cache=False).logits[0, -1]


@pytest.fixture(scope="module")
def stories():
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"stories260K not found at {STORIES} (the team's ../shared next to the repository)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    model.tokenizer = AutoTokenizer.from_pretrained(str(STORIES))
    return model


def test_each_step_is_the_literal_absorb_of_the_whole_history(stories):
    """The incremental path (a KV-cached step, the patches computed while the token runs alone) equals the
    non-incremental one: ``absorb`` decomposing the whole history into a literally edited copy, run on the token."""
    prompt = "Once upon a time, there was a little girl named Lily."
    with assert_untouched(stories):
        result = iu.generate(stories, prompt, 5, dtype=F64, keep_logits=True)
    reference = copy.deepcopy(stories).to(F64)
    history = stories.tokenizer(prompt, return_tensors="pt").input_ids
    for step, token in enumerate(result.tokens):
        full, absorbed, control = result.logits[step]
        patched = iu.absorb(stories, history, dtype=F64)  # decomposes the whole history, edits real weights
        assert float((absorbed - plain(patched, history[:, -1:])).abs().max()) <= 1e-12, step
        assert float((full - plain(reference, history)).abs().max()) <= 1e-12, step
        assert float((control - plain(reference, history[:, -1:])).abs().max()) <= 1e-12, step
        assert token == int(plain(reference, history).argmax()), step
        history = torch.cat([history, torch.tensor([[token]])], dim=1)
    assert result.agree == 5 and result.max_abs_logit_diff <= 1e-12 and result.max_rel_block_err <= 1e-12
    assert result.min_control_abs_logit_diff > 1.0  # the context changes the prediction: the check is not vacuous
    assert result.text == stories.tokenizer.decode(list(result.tokens))
    assert result.text.strip() == "She loved to play"  # the greedy continuation published with llama2.c


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(CONFIGS)), n=st.integers(1, 7), steps=st.integers(1, 3), seed=st.integers(0, 50))
def test_every_step_matches_plain_forwards_of_the_history(kind, n, steps, seed):
    """Drawn architectures (biases or none, post-MLP norms, parallel blocks, sliding windows), prompt lengths (one
    token included: the first step then has no context) and seeds: every step's full, absorbed and control logits
    equal plain float64 forwards of the history and of the token alone."""
    model = tiny_hf(kind, seed=seed % 3)
    with torch.no_grad():  # the pad token's embedding is zero (padding_idx): alone it has no update (ZeroQueryNorm)
        model.get_input_embeddings().weight[0].normal_(generator=torch.Generator().manual_seed(seed))
    reference = copy.deepcopy(model).to(F64)
    history = tokens(n, seed=seed)
    with assert_untouched(model):
        result = iu.generate(model, history, steps, dtype=F64, keep_logits=True)
    for step in range(steps):
        full = plain(reference, history)
        assert result.tokens[step] == int(full.argmax())
        for got in result.logits[step][:2]:  # the full model's cached step, and the absorbed model
            assert float((got - full).abs().max()) <= 1e-9, (kind, step)
        assert float((result.logits[step][2] - plain(reference, history[:, -1:])).abs().max()) <= 1e-9
        history = torch.cat([history, torch.tensor([[result.tokens[step]]])], dim=1)
    assert result.max_rel_block_err <= 1e-10


def test_a_wrong_update_is_seen_in_the_step_metrics(stories, monkeypatch):
    """The checks can say no. With block 2's first-layer columns halved, block 2's output leaves the with-context
    one; the logits do not show it (block 3's update, computed where it runs, maps the wrong input to its with-context
    output), so the block outputs are what each step checks."""
    right = generate_module._update

    def halved(capture):
        update = right(capture)
        if update.block == 2:
            for u in update.first_layer:
                u.column = u.column / 2
        return update

    monkeypatch.setattr(generate_module, "_update", halved)
    result = iu.generate(stories, "Once upon a time, there was a little girl named Lily.", 2, dtype=F64)
    assert result.max_rel_block_err > 1e-3
    assert [s.max_rel_block_err > 1e-3 for s in result.steps] == [True, True]


def test_result_views(stories, tmp_path):
    result = iu.generate(stories, "Lily had a red ball.", 3, dtype=F64, name="stories260K")
    payload = json.loads(json.dumps(result.to_dict()))
    assert {"model", "dtype", "agree", "n_steps", "max_abs_logit_diff", "steps"} <= set(payload)
    assert payload["model"] == "stories260K" and payload["n_steps"] == 3 and payload["agree"] == 3
    assert {"token", "agree", "max_abs_logit_diff", "kl", "control_max_abs_logit_diff"} <= set(payload["steps"][0])
    assert [s["token"] for s in payload["steps"]] == list(result.tokens)
    assert "3 of 3 steps agree" in result._repr_html_() and "agree=3/3" in repr(result)
    pytest.importorskip("matplotlib")
    result.plot(path=str(tmp_path / "steps.png"))
    assert (tmp_path / "steps.png").stat().st_size > 1000


def test_half_precision_computes_in_float32(stories):
    model = copy.deepcopy(stories).to(torch.bfloat16)
    model.tokenizer = stories.tokenizer
    with assert_untouched(model), pytest.warns(UserWarning, match="computing in float32"):
        result = iu.generate(model, "Lily had a red ball.", 2)
    assert result.dtype == "float32" and result.agree == 2


def test_bad_input_is_refused_in_one_line(stories):
    ids = torch.tensor([[1, 2, 3]])
    for call, match in [
        (lambda: iu.generate(stories, ids, 0), "max_new_tokens must be a positive integer"),
        (lambda: iu.generate(stories, torch.tensor([[1, 2, 3], [3, 2, 1]]), 2), "one prompt"),
        (lambda: iu.generate(stories, torch.randn(1, 3, 64), 2), "not continuous inputs"),
    ]:
        with assert_untouched(stories), pytest.raises(ValueError, match=match):
            call()
    gpt2 = tiny_hf("gpt2")  # 64 absolute positions
    with pytest.raises(ValueError, match="at most 3 tokens"):
        iu.generate(gpt2, tokens(62), 4)


def test_a_backend_without_generation_is_refused_by_capability():
    """The toy reads continuous inputs, so it declares no generation: refused by the capability, in one line."""
    model = toy(n_layers=2)
    with assert_untouched(model), pytest.raises(UnsupportedArchitectureError, match="capability 'generation'") as info:
        iu.generate(model, toy_prompt(4), 2)
    assert len(str(info.value).splitlines()) == 1


# -- HookedTransformer (TransformerLens 3.x): its own KV cache for the step, its hook points for the absorbing run ---


def hooked_plain(model, ids: torch.Tensor) -> torch.Tensor:
    """The last position's logits of a HookedTransformer's plain forward (no cache, no hooks)."""
    with torch.no_grad():
        return model(ids)[0, -1]


@settings(max_examples=20, deadline=None)
@given(arch=st.sampled_from(sorted(ARCHITECTURES)), n=st.integers(1, 7), steps=st.integers(1, 3),
       seed=st.integers(0, 50))
def test_hooked_every_step_matches_plain_forwards_of_the_history(arch, n, steps, seed):
    """Every HookedTransformer block variant of conftest (norms before/after, gated, SoLU, parallel, rotary GQA,
    shortformer, ALiBi, local windows, post-norm, mixture of experts), prompt lengths from one token (no context at
    the first step) and seeds: every step's full (TransformerLens's KV-cached step), absorbed and control logits equal
    plain float64 forwards of the whole history and of the token alone, and every absorbed block output its
    with-context one."""
    model = build(seed=seed % 3, **ARCHITECTURES[arch])
    reference = copy.deepcopy(model).to(F64)
    history = tokens(n, seed=seed)
    with assert_untouched(model):
        result = iu.generate(model, history, steps, dtype=F64, keep_logits=True)
    assert result.backend == "HookedTransformer"
    for step in range(steps):
        full = hooked_plain(reference, history)
        assert result.tokens[step] == int(full.argmax()), (arch, step)
        for got in result.logits[step][:2]:  # the full model's cached step, and the absorbed model
            assert float((got - full).abs().max()) <= 1e-9, (arch, step)
        assert float((result.logits[step][2] - hooked_plain(reference, history[:, -1:])).abs().max()) <= 1e-9
        history = torch.cat([history, torch.tensor([[result.tokens[step]]])], dim=1)
    assert result.max_rel_block_err <= 1e-10


@pytest.mark.parametrize("arch", ["layernorm", "gqa-rotary", "pre-post-norm-gemma", "shortformer"])
def test_hooked_each_step_is_the_literal_absorb_of_the_whole_history(arch):
    """The incremental path equals ``absorb`` of the whole history (a copy with its weights literally edited) run on
    the token alone: biases, rotary GQA, a post-MLP norm's scale correction, shortformer positions."""
    model = build(**ARCHITECTURES[arch])
    history, steps = tokens(6, seed=5), 4
    with assert_untouched(model):
        result = iu.generate(model, history, steps, dtype=F64, keep_logits=True)
    for step in range(steps):
        patched = iu.absorb(model, history, dtype=F64)  # decomposes the whole history, edits real weights
        absorbed = hooked_plain(patched, history[:, -1:])
        assert float((result.logits[step][1] - absorbed).abs().max()) <= 1e-12, (arch, step)
        assert float((result.logits[step][2] - absorbed).abs().max()) > 1e-3  # the edits did something
        history = torch.cat([history, torch.tensor([[result.tokens[step]]])], dim=1)
    assert result.agree == steps


@pytest.mark.parametrize("overrides,match", [
    (dict(attention_dir="bidirectional"), "attention_dir='bidirectional'"),
    (dict(ARCHITECTURES["gqa-rotary"], ungroup_grouped_query_attention=True), "ungroup_grouped_query_attention"),
])
def test_hooked_what_the_cache_cannot_carry_is_refused_in_one_line(overrides, match):
    model = build(**overrides)
    with assert_untouched(model), pytest.raises(UnsupportedArchitectureError, match=match) as info:
        iu.generate(model, tokens(4), 2, dtype=F64)
    assert len(str(info.value).splitlines()) == 1


def test_hooked_non_finite_activations_leave_no_hook():
    """An error raised inside the absorbing forward, after block 0's edit hooks were registered in it (block 1's
    update cannot be computed from a NaN), leaves no hook and the model as it was."""
    model = build(**ARCHITECTURES["gated"])
    with torch.no_grad():
        model.blocks[1].mlp.W_in[0, 0] = float("nan")
    with assert_untouched(model), pytest.raises(NonFiniteActivationError, match="block 1"):
        iu.generate(model, tokens(4), 2, dtype=F64)
    assert hook_count(model) == 0


def test_non_finite_activations_leave_no_hook(stories):
    """An error raised inside the absorbing run (a NaN the update cannot be computed from) leaves no hook."""
    model = copy.deepcopy(stories)
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="block 1"):
        iu.generate(model, torch.tensor([[1, 2, 3]]), 2, dtype=F64)
    assert hook_count(model) == 0


def test_cli_generate_writes_the_json_the_issue_names(tmp_path, capsys):
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    from implicit_updates.cli import main

    out = tmp_path / "gen.json"
    assert main(["generate", "--model", str(STORIES), "--prompt", "Lily had a red ball.", "--tokens", "3",
                 "--dtype", "float64", "--json", str(out), "--html", str(tmp_path / "gen.html")]) == 0
    payload = json.loads(out.read_text())
    assert payload["model"] == str(STORIES) and payload["dtype"] == "float64" and payload["n_steps"] == 3
    assert payload["agree"] == 3 and payload["max_abs_logit_diff"] <= 1e-12
    assert all(s["control_max_abs_logit_diff"] > 1.0 for s in payload["steps"])
    assert "3/3 steps agree" in capsys.readouterr().out
    assert "Content-Security-Policy" in (tmp_path / "gen.html").read_text()


def test_cli_generate_runs_a_hooked_transformer(tmp_path, capsys):
    """random:PRESET models are HookedTransformers: generated through TransformerLens's own cache."""
    from implicit_updates.cli import main

    out = tmp_path / "gen.json"
    try:
        code = main(["generate", "--model", "random:llama", "--prompt", "1,2,3,4", "--tokens", "3", "--dtype",
                     "float64", "--json", str(out)])
    except SystemExit as exit_:  # TransformerLens 4.x: no HookedTransformer to build random:PRESET with
        err = capsys.readouterr().err
        if "needs TransformerLens 3.x" in err:
            pytest.skip(err.strip())
        raise AssertionError(err) from exit_
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["backend"] == "HookedTransformer" and payload["n_steps"] == 3 and payload["agree"] == 3
    assert payload["max_abs_logit_diff"] <= 1e-9 and payload["summary"]["max_rel_block_err"] <= 1e-10


@pytest.mark.parametrize("argv,message", [
    (["--tokens", "0"], "must be at least 1"),
    (["--model", "random:llama", "--tokens", "600"], "at most 510 tokens"),  # 512 positions, 3 in the prompt
])
def test_cli_generate_refuses_in_one_line(argv, message, capsys):
    from implicit_updates.cli import main

    base = {"--model": str(STORIES), "--prompt": "1,2,3", "--tokens": "2"}
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    with pytest.raises(SystemExit) as info:
        main(["generate", *[x for kv in base.items() for x in kv]])
    assert info.value.code == 2
    err = capsys.readouterr().err
    if "needs TransformerLens 3.x" in err:  # TransformerLens 4.x: no HookedTransformer to build random:PRESET with
        pytest.skip(err.strip())
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_what_the_absorbing_run_cannot_patch_is_refused_in_one_line():
    """A mixture of experts read as a whole module (its routed calls are not patched while the token runs) is
    refused before anything runs, naming the block; so is a remote nnsight model, and a step of other than one
    sequence's token ids."""
    from test_zoo import tiny

    from implicit_updates.adapters import adapter_for
    from implicit_updates.adapters.module_generation import cached_step, check_support

    moe = tiny("mixtral")
    with assert_untouched(moe), pytest.raises(UnsupportedArchitectureError) as info:
        iu.generate(moe, tokens(4), 2, dtype=F64)
    assert str(info.value).startswith("MixtralForCausalLM: block 0's MLP is a mixture of experts read as a whole "
                                      "module") and len(str(info.value).splitlines()) == 1
    adapter = adapter_for(tiny_hf("llama"))
    for ids in (tokens(3).float(), torch.cat([tokens(3), tokens(3, seed=1)])):
        with pytest.raises(ValueError, match=r"token ids of one sequence, \[1, new tokens\]"):
            cached_step(adapter, ids, None)
    check_support(adapter)  # served as it is
    adapter.remote = "local"
    with pytest.raises(UnsupportedArchitectureError, match=r"remote='local' is not supported: use remote=False"):
        check_support(adapter)


def test_without_the_control_the_absorbed_steps_are_the_same(stories, tmp_path):
    """control=False runs the absorbed model alone (one row): the same tokens and absorbed logits, no control."""
    prompt = "Lily had a red ball."
    both = iu.generate(stories, prompt, 3, dtype=F64, keep_logits=True)
    alone = iu.generate(stories, prompt, 3, dtype=F64, keep_logits=True, control=False)
    assert alone.tokens == both.tokens and alone.agree == 3 and alone.max_rel_block_err <= 1e-12
    for with_control, without in zip(both.logits, alone.logits, strict=True):
        assert without.shape[0] == 2 and float((without[1] - with_control[1]).abs().max()) <= 1e-12
    assert alone.min_control_abs_logit_diff is None and alone.steps[0].control_kl is None
    assert "agree=3/3" in repr(alone) and "n/a" in alone._repr_html_()
    pytest.importorskip("matplotlib")
    alone.plot(path=str(tmp_path / "alone.png"))

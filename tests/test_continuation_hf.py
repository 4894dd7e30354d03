"""Continuation absorption (rank K) on Hugging Face models and TransformerBridges, its export as a PEFT LoRA, and the
``absorb --continuation`` CLI.

References are independent of the code under test: the full model's logits come from a plain forward of a float64
deep copy on ``prefix + S``, the patched model is a deep copy whose real parameters get ``absorption.patch()`` added
here, run by its own forward on S alone, and the LoRA is loaded by ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import assert_untouched, build
from test_hf import tiny_hf, tokens

import implicit_updates as iu
from implicit_updates.analyses.continuation import absorb_continuation
from implicit_updates.cli import main
from implicit_updates.runtime.precision import casts_parameters, exact_formula

STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K"
STORY = "Once upon a time, there was a little bird named Bob. Bob lived in a tree. One day,"


def plain_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0]


def full_and_edited(model, absorption, prefix: torch.Tensor, continuation: torch.Tensor) -> tuple:
    """The full model's logits at S's positions, and a literal weight edit's on S alone (float64 deep copies)."""
    full = plain_logits(copy.deepcopy(model).double(), torch.cat([prefix, continuation], 1))[-continuation.shape[1]:]
    edited = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, delta in absorption.patch().items():
            assert edited.get_parameter(name).shape == delta.shape, name
            edited.get_parameter(name).add_(delta)
    return full, plain_logits(edited, continuation), edited


@pytest.mark.parametrize("kind", ["llama", "gpt2", "neox-parallel", "llama-mlp-bias"])
@pytest.mark.parametrize("k", [1, 3])
def test_literal_edit_reproduces_every_continuation_position(kind, k):
    model = tiny_hf(kind)
    prefix, continuation = tokens(10, seed=0), tokens(k, seed=1)
    with assert_untouched(model):
        absorption = absorb_continuation(model, prefix, continuation, dtype=torch.float64)
    full, edited, _ = full_and_edited(model, absorption, prefix, continuation)
    assert float((edited - full).abs().max()) <= 1e-9
    assert float((absorption.full_logits - full).abs().max()) <= 1e-12  # what the report compares against
    assert [b.rank for b in absorption.blocks] == [k] * 3
    control = plain_logits(copy.deepcopy(model).double(), continuation)
    assert float((control - full).abs().max()) > 1e-3  # the context mattered (as test_hf asks)


def test_greedy_generation_from_the_patched_model():
    """S is the full model's own greedy continuation; from S's first token, ``generate`` on the patched copy (its
    key-value cache, not our code) produces the rest of S and the full model's next token."""
    model = tiny_hf("llama")
    prefix, k = tokens(8, seed=4), 4
    ref = copy.deepcopy(model).double()
    ids = prefix
    for _ in range(k + 1):
        ids = torch.cat([ids, plain_logits(ref, ids)[-1:].argmax(-1)[None]], 1)
    continuation = ids[:, 8:8 + k]
    patched = absorb_continuation(model, prefix, continuation, dtype=torch.float64).patched()
    with torch.no_grad():
        out = patched.generate(continuation[:, :1], max_new_tokens=k, do_sample=False,
                               attention_mask=torch.ones(1, 1, dtype=torch.long), pad_token_id=0)
    assert torch.equal(out[0, 1:], ids[0, 9:])


@pytest.mark.parametrize("kind,k", [("llama", 3), ("gpt2", 2), ("llama-mlp-bias", 1)])
def test_lora_loaded_by_peft_reproduces_the_logits(kind, k, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    model = tiny_hf(kind)
    prefix, continuation = tokens(10, seed=0), tokens(k, seed=1)
    with assert_untouched(model):
        absorption = absorb_continuation(model, prefix, continuation, dtype=torch.float64, output="matrix")
        absorption.save_lora(tmp_path)
    full, edited, _ = full_and_edited(model, absorption, prefix, continuation)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model).double(), str(tmp_path))
    lora = plain_logits(loaded, continuation)
    assert float((lora - full).abs().max()) <= 1e-9
    assert float((lora - plain_logits(copy.deepcopy(model).double(), continuation)).abs().max()) > 1e-3
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == k and config["fan_in_fan_out"] == (kind == "gpt2")
    assert len(config["target_modules"]) == 3 * (2 if kind == "gpt2" else 3)  # first-layer maps and the output


def test_lora_refusals(tmp_path):
    pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    model = tiny_hf("gpt2")  # K = 1 with an output bias: the bias takes the change, and a bias is no LoRA
    absorption = absorb_continuation(model, tokens(6), tokens(1, seed=2), dtype=torch.float64)
    with pytest.raises(iu.UnsupportedArchitectureError, match="output='matrix'"):
        absorption.save_lora(tmp_path)
    hooked = build()  # (skipped on TransformerLens 4, which has no HookedTransformer)
    absorption = absorb_continuation(hooked, tokens(6), tokens(2, seed=2), dtype=torch.float64)
    with pytest.raises(iu.UnsupportedArchitectureError, match="absorption.patched"):
        absorption.save_lora(tmp_path)


def test_refusals_hf():
    with pytest.raises(ValueError, match="numerically dependent"):  # more tokens than d_model (32)
        absorb_continuation(tiny_hf("llama"), tokens(4), tokens(33, seed=5), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_post_mlp_norm(kind, monkeypatch, tmp_path):
    """Gemma's RMSNorm after the MLP, ``(1 + w) z(h)``: one scale for K positions (the analytic centre).
    transformers computes it as ``(1 + w.float())`` in float32 whatever the model's dtype, so the model is absorbed in
    its float64 formula (``precision.exact_formula``): exact there, and within float32 rounding of the model as
    written. A norm rounding its activations in float32 (no parameter cast: nothing lifted) is absorbed to that
    precision, warned."""
    model = tiny_hf(kind)
    prefix, continuation = tokens(10), tokens(3, seed=1)
    assert casts_parameters(model, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        absorption = absorb_continuation(model, prefix, continuation, dtype=torch.float64)
    with exact_formula(model, torch.float64):
        full, edited, _ = full_and_edited(model, absorption, prefix, continuation)
    assert float((edited - full).abs().max()) <= 1e-9 and float((absorption.full_logits - full).abs().max()) <= 1e-12
    full, edited, _ = full_and_edited(model, absorption, prefix, continuation)  # the model as written
    assert 1e-12 < float((edited - full).abs().max()) <= 1e-6
    names = {u[0] for b in absorption.blocks for u in b.updates if not hasattr(u, "rows")}
    assert names == {f"model.layers.{b}.post_feedforward_layernorm.weight" for b in range(3)}
    with pytest.raises(iu.UnsupportedArchitectureError, match="modules_to_save"):
        absorption.save_lora(tmp_path)
    norm = getattr(transformers.models, kind).__dict__[f"modeling_{kind}"].__dict__[f"{kind.capitalize()}RMSNorm"]
    monkeypatch.setattr(norm, "forward", lambda self, x: self._norm(x.float()).type_as(x) * (1.0 + self.weight))
    model = tiny_hf(kind)
    assert not casts_parameters(model, torch.float64)
    with pytest.warns(UserWarning, match="lower precision"):
        absorption = absorb_continuation(model, prefix, continuation, dtype=torch.float64)
    full, edited, _ = full_and_edited(model, absorption, prefix, continuation)
    assert float((edited - full).abs().max()) <= 1e-6


needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason=f"stories260K not found at {STORIES}")


@needs_stories
@pytest.mark.parametrize("backend", ["hf", "bridge", "hooked"])
def test_stories260k_every_backend(backend, tmp_path):
    from implicit_updates.models.loading import load_local

    model = load_local(STORIES, backend)
    hf = load_local(STORIES, "hf")
    ids = hf.tokenizer(STORY, return_tensors="pt").input_ids
    prefix, continuation = ids[:, :-6], ids[:, -6:]
    with assert_untouched(model):
        absorption = absorb_continuation(model, prefix, continuation, dtype=torch.float64,
                                         output="matrix" if backend == "bridge" else "auto")
    report = absorption.compare()
    assert report["max_abs_logit_diff"] <= 1e-9 and report["top1_agree"] and report["rank"] == [6] * 5
    if backend == "hooked":
        return
    full = plain_logits(copy.deepcopy(hf).double(), ids)[-6:]
    assert float((absorption.full_logits - full).abs().max()) <= 1e-12
    if backend == "bridge":  # its LoRA names the HF model's modules, and loads onto it
        peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
        absorption.save_lora(tmp_path)
        lora = plain_logits(peft.PeftModel.from_pretrained(copy.deepcopy(hf).double(), str(tmp_path)),
                            continuation)
        assert float((lora - full).abs().max()) <= 1e-9


@needs_stories
def test_cli_continuation_json_and_lora(tmp_path, capsys):
    pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    out, lora = tmp_path / "a.json", tmp_path / "lora"
    assert main(["absorb", "--model", str(STORIES), "--backend", "hf", "--prompt", STORY, "--continuation",
                 " Bob saw a big", "--dtype", "float64", "--json", str(out), "--lora", str(lora)]) == 0
    payload = json.loads(out.read_text())
    k = len(payload["continuation_tokens"])
    assert k > 1 and payload["max_abs_logit_diff"] <= 1e-9 and payload["top1_agree"]
    assert payload["rank"] == [k] * 5 and len(payload["cond_mlp_input"]) == len(payload["cond_hidden"]) == 5
    assert all(c >= 1 for c in payload["cond_mlp_input"] + payload["cond_hidden"])
    assert payload["max_abs_logit_diff_control"] > 1  # the story mattered
    assert (lora / "adapter_model.safetensors").is_file() and "rank" in capsys.readouterr().out


def test_cli_continuation_errors(tmp_path, capsys):
    from implicit_updates.models.loading import hooked_classes

    hooked_classes()  # random:llama is a HookedTransformer (skipped on TransformerLens 4)

    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as exc:
            main(["absorb", "--model", "random:llama", "--prompt", "1,2,3", *argv])
        assert exc.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0]
        return lines[0]

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "--lora needs --continuation" in error("--lora", str(tmp_path / "x"))
    assert "is a file" in error("--continuation", "4,5", "--lora", str(blocker))
    assert "does not exist" in error("--continuation", "4,5", "--lora", str(tmp_path / "no" / "x"))
    assert "--continuation is empty" in error("--continuation", " ")
    assert "Hugging Face" in error("--continuation", "4,5", "--lora", str(tmp_path / "x"))  # a HookedTransformer
    assert not (tmp_path / "x").exists()
    # one token three times: dependent MLP inputs at block 0 (float32: condition number ~2e7, which the float32
    # floor refuses; under the float64 floor of 1e-10 it once passed with logits off by 0.4)
    assert "numerically dependent" in error("--continuation", "7,7,7")
    assert "numerically dependent" in error("--continuation", "7,7,7", "--dtype", "float64")


def few_shot_pretrained(name: str, dtype: torch.dtype) -> tuple:
    """A pretrained model as a Hugging Face model (skipped when its package is missing), the few-shot prompt's ids,
    and that prompt split into a prefix and its last 4 tokens."""
    from implicit_updates.models import pretrained

    why = pretrained.missing(name)
    if why:
        pytest.skip(why)
    model = pretrained.load_pretrained(name, "hf", dtype=dtype)
    ids = model.tokenizer("France: Paris\nJapan: Tokyo\nItaly: Rome\nSpain:", return_tensors="pt").input_ids
    return model, ids, ids[:, :-4], ids[:, -4:]


def test_smollm2_lora_loaded_by_peft_reproduces_the_logits(tmp_path):
    """A really pretrained model: SmolLM2-135M (Llama, 30 blocks) as a float64 Hugging Face model, a 4-token
    continuation after a few-shot prompt, the LoRA written and loaded by peft onto the same model."""
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    model, ids, prefix, continuation = few_shot_pretrained("smollm2-135m", torch.float64)
    full = plain_logits(model, ids)[-4:]
    with assert_untouched(model):
        absorption = absorb_continuation(model, prefix, continuation, output="matrix")
        absorption.save_lora(tmp_path)
    assert float((absorption.full_logits - full).abs().max()) <= 1e-12
    assert [b.rank for b in absorption.blocks] == [4] * 30
    control = plain_logits(model, continuation)
    loaded = peft.PeftModel.from_pretrained(model, str(tmp_path))  # (injects into this model: the test's own copy)
    lora = plain_logits(loaded, continuation)
    assert float((lora - full).abs().max()) <= 1e-9 and float((control - full).abs().max()) > 1


def test_gemma3_270m_continuation_hf():
    """The other pretrained model through Hugging Face: Gemma-3-270M (18 blocks, a post-MLP RMSNorm whose scale takes
    the correction, read by transformers through a float32 cast) as a float32 model computed in float64 one module at
    a time; a 4-token continuation after a few-shot prompt. The literal edit: the dense patched parameters swapped
    into the model, run by its own forward in its float64 formula (``computed_in``: ``exact_formula`` + upcast)."""
    from implicit_updates.runtime.hooks import swapped_parameters
    from implicit_updates.runtime.precision import computed_in

    model, ids, prefix, continuation = few_shot_pretrained("gemma-3-270m", torch.float32)
    with assert_untouched(model):
        absorption = absorb_continuation(model, prefix, continuation, dtype=torch.float64)
    assert [b.rank for b in absorption.blocks] == [4] * 18

    def logits(tokens: torch.Tensor, patch: dict | None = None) -> torch.Tensor:
        values = {n: model.get_parameter(n).detach().double() + d for n, d in (patch or {}).items()}
        with torch.no_grad(), computed_in(model, torch.float64), swapped_parameters(model, values):
            return model(input_ids=tokens, use_cache=False).logits[0, -4:]

    full = logits(ids)
    assert float((absorption.full_logits - full).abs().max()) <= 1e-12
    edited, control = logits(continuation, absorption.patch()), logits(continuation)
    assert float((edited - full).abs().max()) <= 1e-9 < 1 < float((control - full).abs().max())
    assert bool((edited.argmax(-1) == full.argmax(-1)).all())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "hooked"])
def test_stacked_continuations_one_update_exact_on_all(kind):
    """n queries, each run after the same prefix, stacked into one update of rank n K (#14): a literal weight edit
    reproduces the full model at every position of every query; the update built for one query alone does not."""
    model = build(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=61, n_ctx=32, act_fn="gelu",
                  normalization_type="LN", seed=0) if kind == "hooked" else tiny_hf(kind)
    prefix = tokens(10, seed=0)
    queries = torch.cat([tokens(2, seed=s) for s in (1, 2, 3)])  # [3, 2]
    with assert_untouched(model):
        stacked = absorb_continuation(model, prefix, queries, dtype=torch.float64)
        single = absorb_continuation(model, prefix, queries[:1], dtype=torch.float64)
    assert [b.rank for b in stacked.blocks] == [6] * 3
    assert stacked.full_logits.shape[0] == 6
    assert stacked.compare()["max_abs_logit_diff"] <= 1e-9  # the patched copy on the three queries alone
    if kind == "hooked":
        ref = copy.deepcopy(model).double()
        ref.cfg.dtype = torch.float64  # TransformerLens casts the attention pattern to cfg.dtype
        with torch.no_grad():
            full = torch.cat([ref(torch.cat([prefix, q[None]], 1))[0, -2:] for q in queries])
            one = single.patched()(queries).reshape(-1, full.shape[-1])
    else:
        full = torch.cat([plain_logits(copy.deepcopy(model).double(), torch.cat([prefix, q[None]], 1))[-2:]
                          for q in queries])
        edited = copy.deepcopy(model).double()
        with torch.no_grad():
            for name, delta in stacked.patch().items():
                edited.get_parameter(name).add_(delta)
        assert float((torch.cat([plain_logits(edited, q[None]) for q in queries]) - full).abs().max()) <= 1e-9
        one = torch.cat([plain_logits(single.patched(), q[None]) for q in queries])
    assert float((stacked.full_logits - full).abs().max()) <= 1e-12
    assert float((one[:2] - full[:2]).abs().max()) <= 1e-9  # exact on the query it was built for...
    assert float((one[2:] - full[2:]).abs().max()) > 1e-6  # ...not on the others

"""One-pass prefix dynamics on Hugging Face models and TransformerBridge (``adapters/module_prefixes.py``).

The one pass (context once with a shared KV cache, the N query rows as one batch at ``position_ids = i``, each
block's query alone by the layer itself) equals one ``decompose`` per prefix in float64 (<= 1e-10), verifies
(<= 1e-10), and leaves the model untouched (``check_onepass``): tiny random GPT-2 (absolute positions), Llama (GQA),
GPT-NeoX (parallel, partial rotary), Gemma 2 (pre+post norms, local layers within their window), stories260K as
HF model and as TransformerBridge, SmolLM2-135M where its package is installed. Models it cannot do exactly are
refused in one line (a sliding window shorter than the prompt).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path

import pytest
import torch
import transformers
from conftest import assert_untouched, check_onepass
from test_hf import tiny_hf, tokens

from implicit_updates.analyses.dynamics import max_relative_difference, prefix_decomposition
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.models import pretrained
from implicit_updates.models.loading import load_local

STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K"
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.mark.parametrize("kind", ["gpt2", "llama", "neox-parallel", "llama-mlp-bias"])
def test_onepass_equals_naive_hf(kind):
    """9 prefixes in chunks of 4 (the last one short): absolute positions via position_ids, GQA, partial rotary."""
    check_onepass(tiny_hf(kind), tokens(10), chunk_size=4)


def test_onepass_gemma2_within_its_window():
    """Local layers whose window (4) covers the whole prompt (4 tokens) are exact; post-MLP norms take the scale."""
    check_onepass(tiny_hf("gemma2"), tokens(4), chunk_size=2)


def test_onepass_continuous_inputs_and_some_blocks():
    model = tiny_hf("llama")
    prompt = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    check_onepass(model, prompt, blocks=[1, 2], chunk_size=4)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_onepass_equals_naive_bridge(kind, tmp_path):
    from test_bridge import boot

    check_onepass(boot(tiny_hf(kind), tmp_path), tokens(8), chunk_size=3)


@pytest.mark.skipif(not STORIES.is_dir(), reason=f"stories260K not found at {STORIES}")
@pytest.mark.parametrize("backend", ["hf", "bridge"])
def test_onepass_stories260k(backend):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with contextlib.redirect_stdout(io.StringIO()):
        model = load_local(STORIES, backend)
    ids = model.tokenizer("Once upon a time, there was a little bird named Bob. Bob lived",
                          return_tensors="pt").input_ids
    check_onepass(model, ids, chunk_size=8)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_onepass_long_prompt_one_sequence(kind):
    """Prefixes of 63 tokens and more run as one sequence with a 4-D mask (``query_sequence``), shorter ones as a
    batch: 70 prefixes in chunks of 16 cover both layouts and every prompt-length class."""
    if kind == "gpt2":  # 128 absolute positions
        model = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
            vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=128, n_inner=48, attn_implementation="eager"))
    else:
        model = tiny_hf(kind)
    check_onepass(model.eval(), tokens(71, seed=5), chunk_size=16)


@pytest.mark.skipif(not STORIES.is_dir(), reason=f"stories260K not found at {STORIES}")
def test_onepass_stories260k_long_prompt():
    """HF eager attention computes its softmax in float32: the one-sequence layout keeps each row's own score in the
    softmax lane its prefix's forward has, so even that rounding agrees (80 prefixes, chunks of 24)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = load_local(STORIES, "hf")
    check_onepass(model, torch.randint(0, 512, (1, 81), generator=torch.Generator().manual_seed(1)), chunk_size=24)


def test_onepass_smollm2_135m():
    """Real weights: SmolLM2-135M (Llama, GQA 9/3 heads) as an HF model, three blocks, a short few-shot prompt."""
    spec = pretrained.MODELS["smollm2-135m"]
    if importlib.util.find_spec(spec.module) is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"smollm2-135m: {spec.package} (and gguf) not installed in this venv; `make models` installs them")
    model = pretrained.load_pretrained("smollm2-135m", "hf")
    ids = model.tokenizer("France: Paris\nJapan: Tokyo\nItaly:", return_tensors="pt").input_ids
    check_onepass(model, ids, blocks=[0, 15, 29], chunk_size=4)


def test_sliding_window_shorter_than_the_prompt_is_refused():
    """Every query row sits at the chunk's last cache slot, so a window shorter than the prompt would cut other
    context than each prefix's own forward does: refused (naive still works), for Gemma 2 and Mistral alike."""
    gemma = tiny_hf("gemma2")  # window 4, 9 tokens
    with assert_untouched(gemma), pytest.raises(UnsupportedArchitectureError, match="sliding-window.*naive"):
        prefix_decomposition(gemma, tokens(9), dtype=F64)
    prefix_decomposition(gemma, tokens(9), dtype=F64, method="naive")
    cfg = transformers.MistralConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=48, sliding_window=3)
    cfg._attn_implementation = "eager"
    mistral = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(UnsupportedArchitectureError, match="window 3"):
        prefix_decomposition(mistral, tokens(5), dtype=F64)
    check_onepass(mistral, tokens(3))  # a prompt within the window


def test_position_logic_that_ignores_position_ids_is_caught(monkeypatch):
    """A model whose positions ignore ``position_ids`` (here: GPT-2 made to count from the cache length) would put
    every query at the chunk's last slot; the first-prefix check against a plain forward refuses it."""
    model = tiny_hf("gpt2")
    wpe = model.transformer.wpe
    original = wpe.forward

    def from_cache_length(position_ids):
        return original(torch.full_like(position_ids, int(position_ids.max())))

    monkeypatch.setattr(wpe, "forward", from_cache_length)
    with pytest.raises(UnsupportedArchitectureError, match="position_ids"):
        prefix_decomposition(model, tokens(8), dtype=F64, chunk_size=8)


def test_chunk_size_does_not_change_the_result():
    model, prompt = tiny_hf("llama"), tokens(12)
    one = prefix_decomposition(model, prompt, dtype=F64, chunk_size=64)
    assert max_relative_difference(prefix_decomposition(model, prompt, dtype=F64, chunk_size=1), one) <= 1e-12

"""Suffix removal (Dherin et al. 2025, Appendix B) on Hugging Face models, TransformerBridge and the toy model
(``adapters/module_suffix.py``, ``ToyAdapter.suffix_runs``).

Each check is independent of the adapter's runs: the block's with-context input sequence and output come from a
plain forward (torch hooks on a deep copy), and every step's weights (``result.patch(i)``) are written into a deep
copy's real parameters whose layer runs by the model's own forward on the shortened input sequence (dummy token ids
of its length, the layer's input swapped in, nothing of ours): it must give the full block output at the query
(<= 1e-10 in float64). GPT-2 (absolute positions, MLP biases: a bias step), Llama without MLP biases (a rank-one
``down_proj`` step through the with-context hidden activation), Llama with MLP biases, GPT-NeoX (parallel
attention + MLP), Gemma 2/3 (a post-MLP norm's scale step; sliding windows), stories260K as HF model and as
TransformerBridge, a local nnsight model (the same numbers as the HF model it wraps), the toy model.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_untouched, rel_err
from test_hf import layer_input, run_layer, tiny_hf, tokens

import implicit_updates as iu
from implicit_updates.adapters import adapter_for
from implicit_updates.analyses.dynamics import SuffixRemoval, edited_block_output, suffix_removal
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.models.loading import load_local
from implicit_updates.runtime.precision import exact_formula

STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K"
F64 = torch.float64
TOL = 1e-10


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def run_layer_with_grad_off(model, block: int, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return run_layer(model, block, x)


def edited_layer_output(model, sr: SuffixRemoval, i: int) -> torch.Tensor:
    """``T_{W_i}(c_{i+1..n}, x)`` at the query: the step-i weights written into a float64 deep copy's parameters,
    its layer run by the model's own forward on the shortened with-context input sequence."""
    edited = copy.deepcopy(model).to(F64)
    params = dict(edited.named_parameters())
    with torch.no_grad():
        for name, delta in sr.patch(i).items():
            assert params[name].shape == delta.shape, name
            params[name].add_(delta)
    return run_layer_with_grad_off(edited, sr.block, sr.inputs[:, i:])[0, -1]


def check_suffix_removal(model, ids: torch.Tensor, block: int) -> SuffixRemoval:
    """Every check of the module docstring; the references run in the model's float64 formula (Gemma's norms
    cast their scale to float32 in the model's own code: :func:`exact_formula` keeps float64 there, as the
    decomposition computes)."""
    with assert_untouched(model):
        sr = suffix_removal(model, ids, block, dtype=F64)
    with exact_formula(model, F64):
        return _check(model, ids, block, sr)


def _check(model, ids: torch.Tensor, block: int, sr: SuffixRemoval) -> SuffixRemoval:
    n = ids.shape[1] - 1
    assert sr.n == n
    reference = copy.deepcopy(model).to(F64)
    # the with-context input sequence and output of the block, from a plain forward (never the adapter's runs)
    assert rel_err(sr.inputs, layer_input(reference, ids, block)) <= TOL
    full = run_layer_with_grad_off(reference, block, layer_input(reference, ids, block))[0, -1]
    assert rel_err(sr.target_output, full) <= TOL
    for name, w0 in sr.maps.items():  # W_i a_i = W_0 A(C, x) at every step
        assert rel_err(w0 @ sr.product(n), sr.weights(n)[name]) <= TOL
        for i in range(n + 1):
            assert rel_err(sr.weights(i)[name] @ sr.a[i], w0 @ sr.a[0]) <= TOL
    # the residual steps telescope to decompose's delta_b at the query (Thm A.2)
    ref = iu.decompose(model, ids, blocks=block, dtype=F64).block(block)
    assert rel_err(sr.residuals[0] - sr.residuals[n], ref.delta_b[0, -1]) <= TOL
    for i in range(n + 1):  # literal weight edits, the layer on the shortened sequence by the model's forward
        assert rel_err(edited_layer_output(model, sr, i), full) <= TOL, i
    unedited = run_layer_with_grad_off(reference, block, sr.inputs[:, n:])[0, -1]
    assert rel_err(unedited, full) > 1e-4  # removing the context mattered (>> the 1e-10 checked)
    return sr


@pytest.mark.parametrize("kind,block", [("gpt2", 0), ("gpt2", 2), ("llama", 0), ("llama", 1),
                                        ("llama-mlp-bias", 1), ("neox-parallel", 1)])
def test_suffix_removal_hf(kind, block):
    model = tiny_hf(kind)
    sr = check_suffix_removal(model, tokens(7), block)
    out = adapter_for(model).parts[block]
    if out.out_bias is None:  # a rank-one output-matrix step through the with-context hidden activation
        assert sr.output_name == out.out_weight and sr.output_row is not None
        assert sr.output_delta(sr.n).shape == model.get_parameter(sr.output_name).shape
    else:
        assert sr.output_name == out.out_bias and sr.output_row is None


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_suffix_removal_post_mlp_norm(kind):
    """A norm after the MLP takes the residual steps as scale steps (r_{i-1} - r_i) / z; local layers' window (4)
    is shorter than the prompt, and truncating from the front keeps it."""
    sr = check_suffix_removal(tiny_hf(kind), tokens(7), 1)
    assert sr.output_name.endswith("post_feedforward_layernorm.weight") and sr.output_row is None


def test_suffix_removal_gpt2_block0_keeps_absolute_positions():
    """Block 0's with-context input already holds wpe of positions 0..n: the suffix carries positions i+1..n."""
    model = tiny_hf("gpt2")
    ids = tokens(6)
    sr = suffix_removal(model, ids, 0, dtype=F64)
    ref = copy.deepcopy(model).to(F64)
    with torch.no_grad():
        embedded = ref.transformer.wte(ids) + ref.transformer.wpe(torch.arange(6))[None]
    assert rel_err(sr.inputs, embedded) <= TOL
    with torch.no_grad():  # the last suffix is the query alone at its own position n, not at position 0
        alone = ref.transformer.wte(ids[:, -1:]) + ref.transformer.wpe(torch.tensor([0]))[None]
    assert rel_err(sr.inputs[:, -1:], alone) > 1e-3


def test_suffix_removal_continuous_inputs_hf():
    model = tiny_hf("llama")
    prompt = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0), dtype=F64)
    with assert_untouched(model):
        sr = suffix_removal(model, prompt, 1, dtype=F64)
    assert sr.n == 5
    for i in range(sr.n + 1):
        assert rel_err(edited_layer_output(model, sr, i), sr.target_output) <= TOL


@pytest.mark.parametrize("kind,block", [("gpt2", 0), ("llama", 1)])
def test_suffix_removal_bridge(kind, block, tmp_path):
    from test_bridge import boot

    bridge = boot(tiny_hf(kind), tmp_path)
    sr = check_suffix_removal(bridge, tokens(6), block)
    assert "_original_component" in sr.output_name


@pytest.mark.skipif(not STORIES.is_dir(), reason=f"stories260K not found at {STORIES}")
@pytest.mark.parametrize("backend", ["hf", "bridge"])
def test_suffix_removal_stories260k(backend):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with contextlib.redirect_stdout(io.StringIO()):
        model = load_local(STORIES, backend)
    ids = model.tokenizer("Once upon a time, there was a little bird", return_tensors="pt").input_ids
    for block in (0, adapter_for(model).n_blocks - 1):
        sr = check_suffix_removal(model, ids, block)
        assert sr.output_row is not None  # Llama: no MLP output bias, a rank-one down_proj step


@pytest.mark.parametrize("mlp_skip", [True, False])
def test_suffix_removal_toy(mlp_skip):
    from implicit_updates.models.toy import ToyTransformer

    model = ToyTransformer(d_model=4, n_layers=3, n_heads=2, mlp_skip=mlp_skip, seed=0)
    prompt = torch.randn(1, 7, 4, generator=torch.Generator().manual_seed(1))
    for block in (0, 1):  # (without the MLP skip, deeper blocks' inputs barely depend on the context)
        with assert_untouched(model):
            sr = suffix_removal(model, prompt, block, dtype=F64)
        assert (sr.output_name is not None) == mlp_skip
        with torch.no_grad():
            work = copy.deepcopy(model).to(F64)
            sequence = work(prompt.to(F64), stop_at_layer=block)
            full = work.blocks[block](sequence)[0, -1]
        assert rel_err(sr.inputs, sequence) <= TOL and rel_err(sr.target_output, full) <= TOL
        for name, w0 in sr.maps.items():
            for i in range(sr.n + 1):
                assert rel_err(sr.weights(i)[name] @ sr.a[i], w0 @ sr.a[0]) <= TOL
        for i in range(sr.n + 1):
            assert rel_err(edited_block_output(sr, model, i), full) <= TOL
        with torch.no_grad():
            assert rel_err(work.blocks[block](sequence[:, sr.n:])[0, -1], full) > 1e-3


def test_suffix_removal_refusals():
    model = tiny_hf("llama")
    with assert_untouched(model), pytest.raises(ValueError, match="at least one context token"):
        suffix_removal(model, tokens(1), 0)
    from test_zoo import tiny

    mixture = tiny("mixtral")  # routes on the MLP input, which every step changes
    with assert_untouched(mixture), pytest.raises(UnsupportedArchitectureError, match="mixture of experts routes"):
        suffix_removal(mixture, torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(0)), 0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_suffix_removal_nnsight(kind):
    """A local nnsight model: the wrapped model runs here by its own forward, with the HF adapter's numbers."""
    pytest.importorskip("nnsight")
    from test_nnsight import tiny_tokenizer, untouched_wrapped

    from implicit_updates.models.loading import wrap_nnsight

    lm, twin = wrap_nnsight(tiny_hf(kind), tiny_tokenizer()), tiny_hf(kind)
    with untouched_wrapped(lm):
        sr = suffix_removal(lm, tokens(6), 1, dtype=F64)
    reference = check_suffix_removal(twin, tokens(6), 1)
    for field in ("a", "residuals", "output_steps", "inputs", "target_output"):
        assert torch.equal(getattr(sr, field), getattr(reference, field)), field
    assert sr.output_name == reference.output_name

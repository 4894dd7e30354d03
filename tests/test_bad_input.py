"""Bad input gets a clear error (or a warning) and the user's model is never harmed, also when a call fails."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES, assert_untouched, build, context_outputs, literal_edit_output, rel_err

import implicit_updates as iu

STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K"


@pytest.fixture
def model():
    return build()


def tokens(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 61, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_empty_prompt(model):
    with assert_untouched(model), pytest.raises(ValueError, match="empty"):
        iu.decompose(model, torch.zeros(1, 0, dtype=torch.long))


def test_one_token_prompt_gives_exactly_zero_updates(model):
    with assert_untouched(model), pytest.warns(UserWarning, match="no context"):
        result = iu.decompose(model, tokens(1))
    for update in result.blocks:
        assert torch.count_nonzero(update.delta_b) == 0
        for u in update.first_layer:
            assert torch.count_nonzero(u.column) == 0
    assert result.verify().max_rel_err == 0.0


def test_zero_norm_query_mlp_input(model):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.blocks[1].ln2.w.zero_()
        broken.blocks[1].ln2.b.zero_()
    with assert_untouched(broken), pytest.raises(iu.ZeroQueryNormError, match="zero norm"):
        iu.decompose(broken, tokens(6))


def test_nan_in_activations(model):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.blocks[2].attn.b_O[0] = float("nan")
    with assert_untouched(broken), pytest.raises(iu.NonFiniteActivationError, match="block 2"):
        iu.decompose(broken, tokens(6))


def test_inf_in_continuous_inputs(model):
    x = torch.randn(1, 5, model.cfg.d_model)
    x[0, 2, 3] = float("inf")
    with assert_untouched(model), pytest.raises(ValueError, match="NaN or Inf"):
        iu.decompose(model, x)


@pytest.mark.parametrize("blocks", [3, -4, [0, 7]])
def test_block_index_out_of_range(model, blocks):
    with assert_untouched(model), pytest.raises(IndexError, match="out of range"):
        iu.decompose(model, tokens(5), blocks=blocks)


def test_block_subset_and_negative_index(model):
    result = iu.decompose(model, tokens(5), blocks=[-1, 0])
    assert [u.block for u in result.blocks] == [0, 2]
    with pytest.raises(IndexError, match="not decomposed"):
        result.patch(1)


def test_batch_is_supported(model):
    toks = tokens(7, batch=3, seed=2)
    result = iu.decompose(model, toks, dtype=torch.float64)
    targets = context_outputs(model, toks, torch.float64)
    for batch in range(3):
        out = literal_edit_output(model, result, 1, 2, batch=batch)
        assert rel_err(out, targets[1][batch, 2]) <= 1e-10
    assert result.verify().max_rel_err <= 1e-10


def test_text_needs_a_tokenizer(model):
    model.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        iu.decompose(model, "hello")


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_warns_and_computes_in_float32(half):
    model = build(**ARCHITECTURES["gated"]).to(half)
    with assert_untouched(model), pytest.warns(UserWarning, match="float32"):
        result = iu.decompose(model, tokens(6))
        report = result.verify()
    assert result.dtype == torch.float32 and report.dtype == "float32"
    assert report.max_rel_err <= 1e-4


def test_attn_only_model_is_refused():
    model = build(attn_only=True)
    with assert_untouched(model), pytest.raises(iu.UnsupportedArchitectureError, match="attn_only"):
        iu.decompose(model, tokens(5))


def test_prompt_on_another_device(model):
    with assert_untouched(model), pytest.raises(ValueError, match="model is on cpu"):
        iu.decompose(model, tokens(5).to("meta"))


def test_token_ids_out_of_vocabulary(model):
    with assert_untouched(model), pytest.raises(ValueError, match="token ids must lie"):
        iu.decompose(model, torch.tensor([[1, 2, 999]]))


def test_prompt_longer_than_context(model):
    with assert_untouched(model), pytest.raises(ValueError, match="n_ctx"):
        iu.decompose(model, tokens(model.cfg.n_ctx + 1))


def test_bad_query_and_dtype(model):
    with pytest.raises(ValueError, match="query"):
        iu.decompose(model, tokens(4), query="first")
    with pytest.raises(ValueError, match="dtype"):
        iu.decompose(model, tokens(4), dtype="float65")


def test_train_mode_is_kept_and_hooks_removed_on_failure(model):
    model.train()
    model.blocks[1].eval()  # a mixed mode must come back exactly as it was
    with assert_untouched(model), pytest.raises(IndexError):
        iu.decompose(model, tokens(5), blocks=[9])
    with assert_untouched(model):
        iu.decompose(model, tokens(5)).verify()
    assert model.training and not model.blocks[1].training


def test_failure_inside_a_forward_leaves_no_hooks(model, monkeypatch):
    """An exception raised while our hooks are attached still removes them."""

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model.blocks[1].mlp, "forward", boom)
    with assert_untouched(model), pytest.raises(RuntimeError, match="boom"):
        iu.decompose(model, tokens(5))


def test_no_warning_for_ordinary_calls(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iu.decompose(model, tokens(5)).verify()


def test_numpy_token_ids_are_a_prompt(model):
    ids = tokens(6)
    expected = iu.decompose(model, ids, dtype=torch.float64)
    for array in (ids.numpy(), ids.numpy().astype(np.int32)[0], ids.numpy().astype(np.uint8), ids.to(torch.uint8)):
        # uint8 ids must not index as a boolean mask
        with assert_untouched(model):
            result = iu.decompose(model, array, dtype=torch.float64)
        assert result.inputs.dtype == torch.long and torch.equal(result.inputs, ids)
        assert torch.equal(result.block(2).delta_b, expected.block(2).delta_b)
    with pytest.raises(ValueError, match="token ids must lie"):
        iu.decompose(model, np.array([1, 2, 99]))
    for bad in (np.array([[True, False]]), np.array(["a", "b"]), torch.tensor([[True, False]])):
        with pytest.raises(TypeError, match="token ids"):
            iu.decompose(model, bad)


def test_float64_inputs_into_a_float32_model_warn_where_the_user_called(model):
    """Continuous inputs rounded to the model's float32 are not silently other inputs: a warning at the caller's
    line; float32 inputs, or dtype=float64, run silently (and float64 then decomposes the float64 inputs as given)."""
    x = np.random.default_rng(0).standard_normal((1, 5, model.cfg.d_model))
    with pytest.warns(UserWarning, match="float64 but the computation runs in float32") as caught:
        result = iu.decompose(model, x)
    assert caught[0].filename == __file__
    assert result.inputs.dtype == torch.float32
    torch.testing.assert_close(result.inputs, torch.from_numpy(x).float(), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="float64 but"):
        iu.decompose(model, torch.from_numpy(x))  # a float64 tensor too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iu.decompose(model, x.astype(np.float32))
        exact = iu.decompose(model, x, dtype=torch.float64)
    assert torch.equal(exact.inputs, torch.from_numpy(x))


@pytest.mark.skipif(not STORIES.is_dir(), reason=f"stories260K not found at {STORIES}")
def test_text_of_special_tokens_only_is_an_empty_prompt():
    """stories260K's tokenizer adds BOS: '' used to run on BOS alone; '<s>' is [BOS, BOS]. Both are empty prompts."""
    from implicit_updates.models.loading import load_local

    stories = load_local(STORIES, "hf")
    for text in ("", "<s>", ["<s>"]):
        with assert_untouched(stories), pytest.raises(ValueError, match="empty"):
            iu.decompose(stories, text)
    assert iu.decompose(stories, "Once").n_positions == 2  # BOS + one token is a real (one-token-context) prompt


@pytest.mark.parametrize("device,message", [("cuda:99", "not available here"), ("gpu0", "not a torch device"),
                                            ("meta", "holds no weights")])
def test_load_model_checks_the_device_first(device, message):
    from implicit_updates.models import load_model

    with pytest.raises(ValueError, match=message):
        load_model("random:llama", device=device)


def tiny_xglm():
    """A tiny random XGLM: its own attention fills masked scores with float32's minimum, which a float64 forward
    cannot hold (transformers raises RuntimeError)."""
    from transformers import XGLMConfig, XGLMForCausalLM

    cfg = XGLMConfig(vocab_size=50, d_model=16, num_layers=2, attention_heads=4, ffn_dim=24,
                     max_position_embeddings=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return XGLMForCausalLM(cfg).eval()


def test_a_model_whose_own_forward_fails_in_the_dtype_is_refused_in_one_line():
    model = tiny_xglm()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with assert_untouched(model):
        with pytest.raises(iu.UnsupportedArchitectureError) as info:
            iu.decompose(model, ids, dtype=torch.float64)
        message = str(info.value)
        assert "\n" not in message
        assert "own forward fails in float64" in message and "value cannot be converted" in message
        assert "model's own dtype" in message
        assert isinstance(info.value.__cause__, RuntimeError)
        assert iu.decompose(model, ids).verify().max_rel_err <= 1e-5  # in its own dtype it decomposes


def test_an_error_of_ours_is_not_blamed_on_the_model(monkeypatch):
    """Only when the model's own plain forward fails too is a RuntimeError inside our run the model's."""
    from implicit_updates.adapters.hooked_transformer import HookedTransformerAdapter

    def broken(self, *args, **kwargs):
        raise RuntimeError("a slip of ours")

    monkeypatch.setattr(HookedTransformerAdapter, "capture", broken)
    model = build()
    with assert_untouched(model), pytest.raises(RuntimeError, match="a slip of ours"):
        iu.decompose(model, torch.tensor([[3, 4, 5]]), dtype=torch.float64)

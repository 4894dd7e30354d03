"""The float64 formula (``precision.KeepPrecision``, ``casts_parameters``, ``exact_formula``): a model that reads a
parameter through a float32 cast is decomposed with its casts kept in float64; nothing else changes.

The mode is checked op by op against plain torch; the probe against models whose source says what it casts (tiny
Gemma 2, GLM-4-MoE, Llama); and the probe leaves the model, its hooks and the RNG exactly as it found them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_untouched, hook_count
from test_hf import tiny_hf, tokens
from test_zoo import tiny

import implicit_updates as iu
from implicit_updates.runtime.precision import KeepPrecision, casts_parameters, exact_formula

F64, F32 = torch.float64, torch.float32


def test_keep_precision_op_by_op():
    x = torch.randn(3, 4, dtype=F64)
    x32, ints = x.float(), torch.arange(4)
    with KeepPrecision(F64):
        kept = [x.float(), x.half(), x.to(F32), x.to(torch.bfloat16), x.type(F32), x.type("torch.FloatTensor"),
                x.type_as(x32), x.to("cpu", F32), x.to(dtype=F32), F.softmax(x, -1, dtype=F32),
                x.to(x32)]
        left = [x32.to(torch.float16), x32.float(), ints.float(), ints.to(F32), torch.zeros(2, dtype=F32),
                torch.frombuffer(bytearray(8), dtype=F32)]
        product = x @ ints.float()  # float64 @ float32: computed in float64 (plain torch refuses mixed dtypes)
        upcast = x.double()
    assert all(t.dtype == F64 for t in kept), [t.dtype for t in kept]
    assert all(torch.equal(t, x) for t in kept[:-2] if t.shape == x.shape)  # the values are x's, not rounded
    assert [t.dtype for t in left] == [torch.float16, F32, F32, F32, F32, F32]
    assert product.dtype == F64 and torch.equal(product, x @ ints.double())
    assert upcast.dtype == F64
    with pytest.raises(RuntimeError):
        x @ ints.float()  # outside the mode, as torch has it


@pytest.mark.parametrize(("build", "casts"), [(lambda: tiny_hf("gemma2"), True), (lambda: tiny("glm4_moe"), True),
                                              (lambda: tiny_hf("llama"), False), (lambda: tiny_hf("gpt2"), False)],
                         ids=["gemma2-norm-scale", "glm4_moe-router", "llama", "gpt2"])
def test_probe_finds_parameter_casts_and_leaves_no_trace(build, casts):
    model = build()
    state = torch.random.get_rng_state()
    with assert_untouched(model):
        assert casts_parameters(model, F64) is casts
        assert casts_parameters(model, F32) is False  # nothing to lift below float64
    assert torch.equal(torch.random.get_rng_state(), state) and hook_count(model) == 0


def test_formula_is_what_makes_a_float32_router_exact(monkeypatch):
    """With the formula switched off, GLM-4-MoE's float32 router is refused (no update of a weight read through a
    cast acts exactly) and Gemma 2 verifies only to float32 rounding: the formula is what the exactness rests on."""
    import implicit_updates.runtime.precision as precision

    ids = tokens(9)
    gemma = tiny_hf("gemma2")
    exact = iu.decompose(gemma, ids, dtype=F64).verify().max_rel_err
    monkeypatch.setattr(precision, "casts_parameters", lambda model, dtype: False)
    with pytest.raises(iu.UnsupportedArchitectureError, match=r"mlp\.gate\.weight"):
        iu.decompose(tiny("glm4_moe"), ids, dtype=F64)
    rounded = iu.decompose(tiny_hf("gemma2"), ids, dtype=F64).verify().max_rel_err
    assert exact <= 1e-10 < 1e-9 < rounded <= 1e-6, (exact, rounded)


def test_exact_formula_is_the_plain_forward_for_other_models():
    model = tiny_hf("llama").double()
    ids = tokens(6)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with exact_formula(model, F64):
            formula = model(input_ids=ids).logits
    assert torch.equal(plain, formula)

"""The float64 formula (``precision.KeepPrecision``, ``casts_parameters``, ``exact_formula``): a model that reads a
parameter through a float32 cast is decomposed with its casts kept in float64; nothing else changes.

The mode is checked op by op against plain torch; the probe against models whose source says what it casts (tiny
Gemma 2, GLM-4-MoE, Llama); and the probe leaves the model, its hooks and the RNG exactly as it found them."""

from __future__ import annotations

import contextlib

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


def test_keep_precision_every_named_cast_and_what_it_leaves():
    """Every tensor-type name is a cast kept; a product of two float32 tensors, and an in-place operation on a float32
    tensor, are left as torch has them; a cast to another tensor keeps that tensor's device (here ``meta``)."""
    x = torch.randn(2, 3, dtype=F64)
    x32 = torch.randn(3, 2)
    with KeepPrecision(F64):
        named = [x.type(name) for name in ("torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor")]
        plain = x32 @ x32.T  # no float64 operand: float32, as torch computes it
        inplace = x32.clone()
        inplace.add_(x.T)  # into the float32 tensor itself, rounded to float32 there
        on_meta = torch.empty(2, dtype=F64, device="meta").to(torch.empty(1, device="meta"))
    assert all(t.dtype == F64 and torch.equal(t, x) for t in named)
    assert plain.dtype == F32 and torch.equal(plain, x32 @ x32.T)
    assert inplace.dtype == F32 and torch.allclose(inplace, (x32.double() + x.T).float())  # x32 + x, not x32
    assert on_meta.dtype == F64 and on_meta.device.type == "meta"


class Reads(torch.nn.Module):
    """A token model reading its one parameter as ``read`` says; like transformers on a first forward, it installs
    hooks (with keyword arguments, always called, pre-hooks) and marks itself, once."""

    def __init__(self, read):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.w = torch.nn.Parameter(torch.randn(3, 3))
        self.read = read

    def forward(self, ids):
        if not getattr(self, "_output_capturing_hooks_installed", False):
            self.embed.register_forward_hook(lambda m, a, k, o: o, with_kwargs=True, always_call=True)
            self.embed.register_forward_hook(lambda m, a, o: o)
            self.embed.register_forward_pre_hook(lambda m, a, k: (a, k), with_kwargs=True)
            self.embed.register_forward_pre_hook(lambda m, a: a)
            self._output_capturing_hooks_installed = True
        h = self.embed(ids)
        torch.zeros(size=(1,))  # an operation with keyword arguments only
        return h @ self.read(self.w, h)


READS = {  # how the forward reads w, and whether that is a cast of a parameter to a less precise dtype
    "as-is": (lambda w, h: w, False),
    "to-its-own-dtype": (lambda w, h: w.to(h.dtype), False),
    "times-a-float32-tensor": (lambda w, h: w * torch.ones(3, 3, dtype=F32, device=h.device), False),
    "float": (lambda w, h: w.float().to(h.dtype), True),
    "to-dtype-keyword": (lambda w, h: w.to(dtype=F32).to(h.dtype), True),
    "type_as": (lambda w, h: w.type_as(torch.ones(1, dtype=F32)).to(h.dtype), True),
    "half": (lambda w, h: w.half().to(h.dtype), True),
    "cannot-run": (lambda w, h: w.float().to(h.dtype)[99], False),  # the probe cannot run it: nothing to lift
}


def hook_tables(model):
    return [(len(m._forward_hooks), len(m._forward_hooks_with_kwargs), len(m._forward_hooks_always_called),
             len(m._forward_pre_hooks), len(m._forward_pre_hooks_with_kwargs),
             m.__dict__.get("_output_capturing_hooks_installed")) for m in model.modules()]


@pytest.mark.parametrize("read", sorted(READS))
@pytest.mark.parametrize("ran_before", [False, True], ids=["fresh", "ran-before"])
def test_probe_sees_each_kind_of_cast_and_restores_hooks_and_mark(read, ran_before):
    """The probe (of a model that is not Hugging Face's or TransformerLens's) reports exactly the reads that cast a
    parameter down, and leaves every hook table and transformers' mark as they were: absent on a fresh model, kept
    on one that ran before."""
    model = Reads(READS[read][0])
    if ran_before:
        with torch.no_grad(), contextlib.suppress(IndexError):  # (its hooks and mark are installed first)
            model(torch.zeros(1, 2, dtype=torch.long))
    before = hook_tables(model)
    assert casts_parameters(model, F64) is READS[read][1]
    assert casts_parameters(model, F32) is False  # nothing to lift below float64, even a cast to half precision
    assert hook_tables(model) == before
    assert next(model.parameters()).dtype == F32

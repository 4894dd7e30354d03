"""Mixtures of experts with stacked 3-D expert parameters (``transformers`` 5), through the plain ``hf`` backend.

The experts' maps are slices ``W[e]`` of one parameter, read inside one module's forward (``adapters/experts.py``
finds them from the module's linear calls). Checked against references that share none of that code: a literal
weight edit of a copy (``result.patch`` added to its real parameters, the layer run by the model's own forward on
the query alone) against the with-context layer outputs of a plain forward (``tests/test_hf.py`` helpers). And the
checker: a corrupted column or expert share must show up at exactly its block and position. ~20 s on one thread.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_untouched, hook_count, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hf import context_outputs, literal_edit_output
from test_zoo import tiny
from torch.overrides import TorchFunctionMode

import implicit_updates as iu
from implicit_updates.math.updates import RankOneUpdate
from implicit_updates.runtime.precision import casts_parameters, exact_formula

F64 = torch.float64
EXACT = 1e-10
IDS = torch.randint(3, 97, (1, 7), generator=torch.Generator().manual_seed(0))
# routed experts only (Mixtral); a shared expert behind a sigmoid gate (Qwen2-MoE); transposed, interleaved
# gate/up with biases and a clamped SwiGLU (gpt-oss); a post-MLP norm after the mixture (FlexOlmo); the mixture's own
# output bias (JetMoE)
KINDS = ["mixtral", "qwen2_moe", "gpt_oss", "flex_olmo", "jetmoe"]
_MODELS: dict[str, torch.nn.Module] = {}


def model_of(kind: str) -> torch.nn.Module:
    if kind not in _MODELS:
        _MODELS[kind] = tiny(kind)
    return _MODELS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_stacked_experts_exact_by_a_literal_edit(kind, one_thread):
    import importlib.metadata as metadata

    if kind == "flex_olmo" and int(metadata.version("transformer-lens").split(".")[0]) < 4:
        pytest.skip("TransformerLens 3.9 maps FlexOlmo's post-attention norm as its pre-MLP norm (refused by the "
                    "data-flow check); its post-norm-only blocks are described by TransformerLens 4 (make test-tl4)")
    model = model_of(kind)
    with assert_untouched(model):
        result = iu.decompose(model, IDS, dtype=F64)
        report = result.verify()
    assert hook_count(model) == 0
    assert report.max_rel_err <= EXACT, report
    targets = context_outputs(model, IDS, F64)
    for block in range(len(targets)):
        patch = result.patch(block, position=-1)
        for name, delta in patch.items():
            assert delta.shape == model.get_parameter(name).shape, name
        stacked = [n for n in patch if model.get_parameter(n).dim() == 3]
        assert stacked, f"block {block}: no stacked expert parameter was updated"
        for position in (1, IDS.shape[1] - 1):
            literal = literal_edit_output(model, result, block, position)
            assert rel_err(literal, targets[block][0, position]) <= EXACT, (kind, block, position)


def _corrupt(update, position: int, stacked_first: bool, size: float) -> None:
    """Shift, at one position, the stacked first-layer column (every expert's slice) or the output update of one
    routed expert (one whose row is nonzero there)."""
    for u in update.updates:
        if not isinstance(u, RankOneUpdate) or not u.experts:
            continue
        if stacked_first and u.expert is None:
            u.column[:, position] += size * u.column[:, position].norm()
            return
        if not stacked_first and u.expert is not None and u.row[0, position].norm() > 0:
            u.column[:, position] += size * update.delta_b[0, position].norm()
            return
    raise AssertionError("no update of that kind to corrupt")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(block=st.integers(0, 1), position=st.integers(0, IDS.shape[1] - 1), stacked_first=st.booleans())
def test_verify_finds_a_corrupted_expert_update_where_it_is(block, position, stacked_first, one_thread):
    model = model_of("mixtral")
    result = iu.decompose(model, IDS, dtype=F64)
    _corrupt(result.block(block), position, stacked_first, 0.5)
    report = result.verify()
    for b in report.blocks:
        if b.block == block:
            assert b.max_rel_err > 1e-6 and b.worst_position == position, (b, position)
        else:
            assert b.max_rel_err <= EXACT, b


def test_a_router_read_through_a_float32_cast_is_exact_in_float64(one_thread, monkeypatch):
    """GLM-4-MoE's router computes ``F.linear(m.float(), weight.float())``: the model is decomposed in its float64
    formula (``precision.exact_formula``: those casts keep float64), where its literal edit is exact; a router reading
    its weight other than by a linear call (here a copy) is refused by the parameter's name."""
    model = tiny("glm4_moe")
    assert casts_parameters(model, F64)
    with assert_untouched(model):
        result = iu.decompose(model, IDS, dtype=F64)
        assert result.verify().max_rel_err <= EXACT
    with exact_formula(model, F64):
        targets = context_outputs(model, IDS, F64)
        for block in range(2):
            assert rel_err(literal_edit_output(model, result, block, 6), targets[block][0, 6]) <= EXACT
    plain = context_outputs(model, IDS, F64)  # the model as written rounds its routers in float32
    assert 1e-12 < max(rel_err(p, t) for p, t in zip(plain, targets, strict=True)) <= 1e-6
    router = type(model.model.layers[1].mlp.gate)
    forward = router.forward
    monkeypatch.setattr(router, "forward", lambda self, h: _einsum_linear(self.weight, forward, self, h))
    model = tiny("glm4_moe")
    with assert_untouched(model), pytest.raises(iu.UnsupportedArchitectureError, match=r"mlp\.gate\.weight"):
        iu.decompose(model, IDS, dtype=F64)
    assert hook_count(model) == 0


class _EinsumLinear(TorchFunctionMode):
    """Inside a router's forward: its linear call on ``weight`` made an einsum (a read no update is known for)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and args[1] is self.weight:
            return torch.einsum("...d,ed->...e", args[0], args[1])
        return func(*args, **(kwargs or {}))


def _einsum_linear(weight, forward, module, h):
    with _EinsumLinear(weight):
        return forward(module, h)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_absorbed_mixture_gives_the_full_logits(kind, one_thread):
    """The absorbed copy (dense per-expert edits summed into the stacked parameters) and the hook-patched model itself,
    run on the last token alone, against the full model's last-position logits from a plain float64 forward."""
    model = model_of(kind)
    with torch.no_grad():
        full = copy.deepcopy(model).to(F64)(IDS).logits[0, -1]
        control = copy.deepcopy(model).to(F64)(IDS[:, -1:]).logits[0, -1]
    assert (control - full).abs().max() > 1e-3  # the context matters: the test can fail
    with assert_untouched(model), torch.no_grad():
        patched = iu.absorb(model, IDS, dtype=F64)
        copied = patched(IDS[:, -1:]).logits[0, -1]
        with iu.absorbed(model, IDS, dtype=F64):
            hooked = model(IDS[:, -1:]).logits[0, -1].to(F64)
    assert (copied - full).abs().max() <= 1e-9
    assert (hooked - full).abs().max() <= 1e-9


def test_grouped_mm_experts_run_their_eager_loop_while_watched(one_thread):
    """transformers' default fused-experts kernel (grouped_mm) reads all experts at once; the decomposition runs the
    experts' own eager loop instead and puts the user's setting back."""
    model = copy.deepcopy(model_of("mixtral"))
    model.config._experts_implementation = "grouped_mm"
    with assert_untouched(model):
        report = iu.decompose(model, IDS, dtype=F64).verify()
    assert report.max_rel_err <= EXACT
    assert model.config._experts_implementation == "grouped_mm"
    assert model.model.layers[0].mlp.experts.config._experts_implementation == "grouped_mm"


@pytest.mark.parametrize("kind", ["mixtral", "glm4_moe"])
def test_a_batch_whose_sequences_share_a_token(kind, one_thread):
    """Two sequences starting with the same token: bit-identical rows of m at every block's position 0, matched to one
    representative row; each copy must get its own hidden activation (once, the second got zeros: refused as a dead
    hidden). GLM-4-MoE's dense first block goes through the same matching."""
    model = model_of(kind)
    ids = torch.tensor([[5, 7, 9, 11, 13, 15], [5, 8, 10, 12, 14, 15]])
    with assert_untouched(model):
        result = iu.decompose(model, ids, query="self", dtype=F64)
        assert result.verify().max_rel_err <= EXACT
    with exact_formula(model, F64):  # and a literal edit of sequence 0's position 0 (the representative or not)
        target = context_outputs(model, ids, F64)
        for block in range(2):
            assert rel_err(literal_edit_output(model, result, block, 0), target[block][0, 0]) <= EXACT

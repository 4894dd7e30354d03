"""A really pretrained model, offline: stories260K (Llama: GQA, rotary, RMSNorm, SwiGLU, no biases, tied
embeddings) as a HookedTransformer, a TransformerBridge and a plain HF model: same logits, same decomposition,
verified at every block and position in float64, and the context absorbed into the weights on real stories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_untouched, rel_err
from conftest import context_outputs as hooked_context_outputs
from conftest import literal_edit_output as hooked_literal_edit_output
from test_hf import context_outputs, literal_edit_output

import implicit_updates as iu
from implicit_updates.adapters import adapter_for
from implicit_updates.cli import main
from implicit_updates.models.loading import HookedTransformerUnavailable, hooked_classes, load_local

MODEL = Path(__file__).resolve().parents[2] / "shared/models/stories260K"
if not MODEL.is_dir():
    pytest.skip(f"stories260K not found at {MODEL} (the team's ../shared next to the repository; a user's clone has "
                "none): the pretrained-model tests need it", allow_module_level=True)

STORY = "Once upon a time, there was a little bird named Bob. Bob lived in a tree. One day,"
# transformers runs LlamaRMSNorm's normalisation in float32 and builds its rotary tables in float32 whatever the
# model dtype; TransformerLens computes both in the model's dtype. So HF/bridge vs HookedTransformer agree to
# float32 rounding, while each backend's own decomposition is exact to float64 rounding.
CROSS_FRAMEWORK_TOL = 1e-5


@pytest.fixture(scope="module", params=["hooked", "bridge", "hf"])
def backend(request):
    return request.param, load_local(MODEL, request.param)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return load_local(MODEL, "hf").tokenizer(STORY, return_tensors="pt").input_ids


def test_decomposition_exact_every_block_and_position(backend, ids):
    name, model = backend
    with assert_untouched(model):
        result = iu.decompose(model, STORY, dtype=torch.float64)
        report = result.verify()
    assert torch.equal(result.inputs, ids)  # the three backends tokenize alike (BOS first)
    assert len(report.blocks) == 5 and report.n_positions == ids.shape[1]
    assert report.max_rel_err <= 1e-10 and [b.rank for b in report.blocks] == [1] * 5
    edit = hooked_literal_edit_output if name == "hooked" else literal_edit_output
    targets = (hooked_context_outputs if name == "hooked" else context_outputs)(model, ids, torch.float64)
    for block in range(5):
        for position in (0, 9, ids.shape[1] - 1):
            out = edit(model, result, block, position)
            assert rel_err(out, targets[block][0, position]) <= 1e-10, (name, block, position)


def test_absorbed_model_answers_from_the_query_alone(backend, ids):
    _, model = backend
    with assert_untouched(model):
        report = iu.compare_absorbed(model, ids, dtype=torch.float64)
    assert report.max_abs_logit_diff <= 1e-9 and report.top1_agree
    assert report.kl_full_vs_absorbed <= 1e-12
    assert report.kl_full_vs_control > 1.0  # the name comes from the context: alone, the query token cannot say it


@pytest.fixture(scope="module")
def float64_runs(ids) -> dict:
    """Per backend: (logits, decomposition) in float64; the HookedTransformer only where TransformerLens has it."""
    runs = {}
    for name in ("hf", "bridge", "hooked"):
        try:
            model = load_local(MODEL, name, dtype=torch.float64)
        except HookedTransformerUnavailable:
            continue
        with torch.no_grad():
            runs[name] = adapter_for(model).logits(ids)[0], iu.decompose(model, ids)
    return runs


def test_bridge_and_hf_same_logits_and_decomposition(float64_runs):
    (hf_logits, hf), (bridge_logits, bridge) = float64_runs["hf"], float64_runs["bridge"]
    assert torch.equal(bridge_logits, hf_logits)  # the bridge runs the HF model's own code
    for h, b in zip(hf.blocks, bridge.blocks, strict=True):
        assert torch.equal(b.row, h.row) and torch.equal(b.delta_b, h.delta_b)
        for name, delta in bridge.patch(h.block, 4).items():  # the same deltas, under the bridge's own names
            assert torch.equal(delta, hf.patch(h.block, 4)[name.replace("._original_component", "")])


def test_hooked_transformer_same_logits_and_decomposition(float64_runs):
    if "hooked" not in float64_runs:
        hooked_classes()  # raises the reason: TransformerLens 4.x has no HookedTransformer (reported as a skip)
    (hf_logits, hf), (hooked_logits, hooked) = float64_runs["hf"], float64_runs["hooked"]
    assert float((hooked_logits - hf_logits).abs().max()) <= CROSS_FRAMEWORK_TOL
    for h, t in zip(hf.blocks, hooked.blocks, strict=True):
        assert rel_err(t.row, h.row) <= CROSS_FRAMEWORK_TOL and rel_err(t.delta_b, h.delta_b) <= CROSS_FRAMEWORK_TOL
        hf_patch, hooked_patch = hf.patch(h.block, 4), hooked.patch(h.block, 4)
        # HookedTransformer stores W_gate/W_in as [d_model, d_mlp], HF gate_proj/up_proj as [d_mlp, d_model]
        for ours, theirs in (("W_gate", "gate_proj"), ("W_in", "up_proj")):
            a = hooked_patch[f"blocks.{h.block}.mlp.{ours}"].T
            assert rel_err(a, hf_patch[f"model.layers.{h.block}.mlp.{theirs}.weight"]) <= CROSS_FRAMEWORK_TOL


@pytest.mark.parametrize("backend_name", ["hooked", "bridge", "hf"])
def test_cli_verify_local_path(backend_name, tmp_path):
    if backend_name == "hooked":
        hooked_classes()  # the CLI exits 2 on TL 4.x; conftest reports this ImportError as a skip
    out = tmp_path / "out.json"
    main(["verify", "--model", str(MODEL), "--backend", backend_name, "--prompt", STORY, "--dtype", "float64",
          "--json", str(out)])
    data = json.loads(out.read_text())
    assert len(data["blocks"]) == 5 and all(b["max_rel_err"] <= 1e-10 for b in data["blocks"])


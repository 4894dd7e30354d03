"""TransformerBridge (TransformerLens 4.x's model, also in 3.x): literal weight edits keyed by the bridge's own
``named_parameters()``, the same decomposition as the plain HF model it wraps, and clear errors."""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json

import pytest
import torch
from conftest import assert_untouched
from test_hf import TOL, check_literal_edits, tiny_hf, tokens
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

import implicit_updates as iu
from implicit_updates.adapters import adapter_for
from implicit_updates.adapters.bridge import BridgeAdapter
from implicit_updates.cli import main

TransformerBridge = pytest.importorskip("transformer_lens.model_bridge").TransformerBridge


def boot(model, tmp_path) -> torch.nn.Module:
    """A bridge around ``model``'s weights, booted from a local directory as users boot one (offline)."""
    model.save_pretrained(tmp_path)
    # a one-word tokenizer: random configs have none, and boot_transformers wants one
    word = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>").save_pretrained(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        bridge = TransformerBridge.boot_transformers(str(tmp_path), device="cpu")
    return bridge.eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "neox-parallel"])
def test_bridge_literal_weight_edit(kind, dtype, tmp_path):
    bridge = boot(tiny_hf(kind), tmp_path)
    assert isinstance(adapter_for(bridge), BridgeAdapter)
    result = check_literal_edits(bridge, tokens(11), dtype, TOL[dtype])
    names = dict(bridge.named_parameters())
    assert all(name in names and "_original_component" in name for name in result.patch(1, 3))


def test_bridge_decomposition_equals_hf(tmp_path):
    """The bridge runs the HF model's own code: same logits, same factors (float64), keys aside."""
    hf = tiny_hf("llama")
    bridge = boot(hf, tmp_path)
    ids = tokens(10)
    with torch.no_grad():
        assert torch.equal(bridge(ids), hf(ids).logits)
    with assert_untouched(bridge):
        b = iu.decompose(bridge, ids, dtype=torch.float64)
    h = iu.decompose(hf, ids, dtype=torch.float64)
    for ub, uh in zip(b.blocks, h.blocks, strict=True):
        torch.testing.assert_close(ub.row, uh.row, rtol=0, atol=1e-12)
        torch.testing.assert_close(ub.delta_b, uh.delta_b, rtol=0, atol=1e-12)
        for pb, ph in zip(ub.updates, uh.updates, strict=True):
            assert pb.name.replace("._original_component", "") == ph.name
            torch.testing.assert_close(pb.dense(0, 4), ph.dense(0, 4), rtol=0, atol=1e-12)


def test_bridge_absorb(tmp_path):
    bridge = boot(tiny_hf("gpt2"), tmp_path)
    with assert_untouched(bridge):
        report = iu.compare_absorbed(bridge, tokens(12, seed=1), dtype=torch.float64)
    assert report.max_abs_logit_diff <= 1e-9 and report.top1_agree
    assert report.kl_full_vs_absorbed <= 1e-12 < report.kl_full_vs_control


def test_bridge_compatibility_mode_is_refused(tmp_path):
    bridge = boot(tiny_hf("gpt2"), tmp_path)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        bridge.enable_compatibility_mode()
    if not getattr(bridge, "compatibility_mode", False):
        pytest.skip("this TransformerLens could not enable compatibility mode on a random GPT-2")
    with pytest.raises(iu.UnsupportedArchitectureError, match="compatibility mode"):
        iu.decompose(bridge, tokens(5))


def test_bridge_absorbed_copy_runs_on_its_own(tmp_path):
    """The patched copy is a working bridge by itself, also after the decomposition's working copy is freed."""
    bridge = boot(tiny_hf("llama"), tmp_path)
    ids = tokens(9)
    with torch.no_grad():
        bridge(ids)  # a bridge that has run carries its own capture hooks into deep copies
    with assert_untouched(bridge):
        patched = iu.absorb(bridge, ids, dtype=torch.float64)
    gc.collect()
    with torch.no_grad():
        alone = patched(ids[:, -1:])[0, -1]
        full = copy.deepcopy(bridge).to(torch.float64)(ids)[0, -1]
    assert float((alone - full).abs().max()) <= 1e-9


@pytest.mark.parametrize("backend", ["bridge", "hf"])
def test_cli_local_directory(backend, tmp_path):
    boot(tiny_hf("neox-parallel"), tmp_path / "model")  # writes the model and a tokenizer to a local directory
    out = tmp_path / "out.json"
    main(["verify", "--model", str(tmp_path / "model"), "--backend", backend, "--seq-len", "10", "--dtype", "float64",
          "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["n_positions"] == 10 and len(data["blocks"]) == 3 and data["max_rel_err"] <= 1e-10
    main(["absorb", "--model", str(tmp_path / "model"), "--backend", backend, "--seq-len", "10", "--dtype", "float64",
          "--json", str(out)])
    assert json.loads(out.read_text())["max_abs_logit_diff"] <= 1e-9


def test_falcon_bridge_copy_reading_the_original_is_refused(tmp_path):
    """TransformerLens 4.3's Falcon bridge: a deep copy's patched linears keep reading the original's weights, so
    absorb()'s patched copy computed with unpatched weights (0.12 off in the logits). Copy-based paths now refuse it;
    absorbed() (in place) and decompose (streamed) stay exact. Where the installed TransformerLens copies Falcon
    faithfully, the copy-based paths must accept it instead."""
    from test_zoo import tiny

    try:
        bridge = boot(tiny("falcon"), tmp_path)
    except Exception as err:  # noqa: BLE001 - this TransformerLens cannot boot Falcon offline
        pytest.skip(f"TransformerLens cannot boot a tiny Falcon: {str(err).splitlines()[0][:120]}")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():  # independently: does the copy's output follow the original's weights?
        twin = copy.deepcopy(bridge)
        before = twin(ids).clone()
        weight = next(p for n, p in bridge.named_parameters() if "dense_h_to_4h" in n)
        weight.add_(1.0)
        reads_original = not torch.equal(twin(ids), before)
        weight.sub_(1.0)
        full = bridge(ids)[0, -1].double()
    del twin
    with assert_untouched(bridge):
        assert iu.decompose(bridge, ids, dtype=torch.float64).verify().max_rel_err <= 1e-10
        if reads_original:
            for copying in (lambda: iu.absorb(bridge, ids), lambda: iu.compare_absorbed(bridge, ids)):
                with pytest.raises(iu.UnsupportedArchitectureError, match="still computes with the original's"):
                    copying()
            with pytest.raises(iu.UnsupportedArchitectureError, match="upcast='stream'"):
                iu.decompose(bridge, ids, dtype=torch.float64, upcast="copy")
        else:
            assert iu.compare_absorbed(bridge, ids, dtype=torch.float64).max_abs_logit_diff <= 1e-9
        with iu.absorbed(bridge, ids, dtype=torch.float64), torch.no_grad():
            alone = bridge(ids[:, -1:])[0, -1]
    assert float((alone.double() - full).abs().max()) <= 1e-5

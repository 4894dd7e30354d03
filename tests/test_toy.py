"""The seed papers' own model (``ToyTransformer``) and its adapter: literal weight edits, hooks, array loading."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from conftest import assert_untouched, literal_edit_output, rel_err

import implicit_updates as iu
from implicit_updates import icl
from implicit_updates.adapters import adapter_for
from implicit_updates.adapters.toy import ToyAdapter
from implicit_updates.toy import ToyConfig, ToyTransformer, equinox_key

VARIANTS = {
    "innocenti-default": dict(),
    "no-mlp-skip-dherin": dict(n_layers=1, mlp_skip=False, n_heads=1, d_head=4, d_mlp=16, mlp_depth=1),
    "no-skips-at-all": dict(n_layers=2, mlp_skip=False, attn_skip=False),
    "deep-mlp": dict(n_layers=2, mlp_depth=3),
    "pre-ln-noncausal": dict(layer_norm=True, causal=False),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def prompts(batch: int = 3, n: int = 12, d: int = 2, seed: int = 0) -> torch.Tensor:
    return icl.sample_tasks(batch, n, d, torch.Generator().manual_seed(seed)).prompts


def toy(seed: int = 0, **overrides) -> ToyTransformer:
    model = ToyTransformer(seed=seed, **overrides)
    with torch.no_grad():  # random LayerNorm affine parameters, so those paths are exercised
        for name, p in model.named_parameters():
            if ".ln" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return model.eval()


def test_hook_points_carry_hooked_transformer_names():
    model = toy(n_layers=2)
    for b in range(2):
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "mlp.hook_pre",
                     "hook_mlp_out", "hook_resid_post", "attn.hook_pattern"):
            assert f"blocks.{b}.{name}" in model.hook_dict
    _, cache = model.run_with_cache(prompts())
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"], model(prompts()))
    assert isinstance(adapter_for(model), ToyAdapter)


def test_equinox_mlp_depth_and_shapes():
    model = toy(mlp_depth=2)
    sizes = [tuple(layer.weight.shape) for layer in model.blocks[0].mlp.layers]
    assert sizes == [(12, 3), (12, 12), (3, 12)]  # Equinox MLP(depth=2): 3 -> 12 -> 12 -> 3
    assert all(p.bias is None for p in (model.blocks[0].attn.query_proj, model.blocks[0].attn.output_proj))
    assert not any("ln" in n for n, _ in model.named_parameters())  # no LayerNorm by default


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_literal_weight_edit_reproduces_context_output(variant, dtype, tol):
    model = toy(**VARIANTS[variant])
    x = prompts()
    with assert_untouched(model):
        result = iu.decompose(model, x, dtype=dtype)
    reference = copy.deepcopy(model).to(dtype)
    _, cache = reference.run_with_cache(x.to(dtype))
    for block in range(model.cfg.n_layers):
        for batch, position in ((0, -1), (2, 4), (1, 0)):
            patch = result.patch(block, position, batch)
            expected = {f"blocks.{block}.mlp.layers.0.weight"}
            if model.cfg.mlp_skip:
                expected.add(f"blocks.{block}.mlp.layers.{model.cfg.mlp_depth}.bias")
            assert set(patch) == expected
            out = literal_edit_output(model, result, block, position, batch)
            target = cache[f"blocks.{block}.hook_resid_post"][batch, position]
            assert rel_err(out, target) <= tol, (block, position)


def test_no_mlp_skip_needs_no_correction_and_the_unpatched_query_differs():
    model = toy(**VARIANTS["no-mlp-skip-dherin"])
    x = prompts(n=30)
    result = iu.decompose(model, x, dtype=torch.float64)
    assert result.block(0).correction == "none"
    report = result.verify()
    assert report.max_rel_err <= 1e-12 and report.blocks[0].rank == 1
    with torch.no_grad():
        alone = copy.deepcopy(model).double().blocks[0](result.query_input(0, -1))[0, 0]
    assert rel_err(alone, result.target_output(0, -1)) > 1e-3  # the context matters; the update carries it


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_verify_every_position_both_query_modes(variant):
    model = toy(**VARIANTS[variant])
    for query in ("last", "self"):
        report = iu.decompose(model, prompts(), query=query, dtype=torch.float64).verify()
        assert report.max_rel_err <= 1e-12, (query, report)
    assert all(b.rank == 1 for b in iu.decompose(model, prompts(), dtype=torch.float64).verify().blocks)


def test_model_untouched_in_train_mode_and_float32():
    model = toy(layer_norm=True).train()
    with assert_untouched(model):
        iu.decompose(model, prompts(), dtype=torch.float64).verify()
        iu.decompose(model, prompts(), query="self").verify()
    assert model.training


def test_numpy_round_trip_and_equinox_names():
    model, other = toy(seed=1, layer_norm=True), toy(seed=2, layer_norm=True)
    arrays = model.to_arrays()
    assert set(arrays) == {n for n, _ in model.named_parameters()}
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    other.load_arrays(arrays)
    torch.testing.assert_close(other(prompts()), model(prompts()), rtol=0, atol=0)
    equinox = {"." + re.sub(r"(blocks|layers)\.(\d+)", r"\1[\2]", k).replace("ln1", "norm_attn")
               .replace("ln2", "norm_mlp"): v for k, v in arrays.items()}  # as jax.tree_util.keystr names them
    assert ".blocks[0].mlp.layers[2].bias" in equinox and ".blocks[1].norm_mlp.weight" in equinox
    assert equinox_key(".blocks[1].norm_mlp.weight") == "blocks.1.ln2.weight"
    third = toy(seed=3, layer_norm=True).load_arrays(equinox)
    torch.testing.assert_close(third(prompts()), model(prompts()), rtol=0, atol=0)
    with pytest.raises(KeyError, match="missing"):
        other.load_arrays({k: v for k, v in arrays.items() if "ln1" not in k})
    bad = dict(arrays, **{"blocks.0.mlp.layers.0.weight": np.zeros((3, 12), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        other.load_arrays(bad)


def test_seed_reproducible_without_touching_global_rng():
    state = torch.random.get_rng_state()
    a, b = ToyTransformer(seed=5), ToyTransformer(seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert ToyConfig().head_size == 1 and ToyConfig(d_model=9, n_heads=3).head_size == 3


def test_icl_helpers_work_on_the_toy_model():
    model = toy()
    x = prompts()
    torch.testing.assert_close(icl.predict(model, x), model.predict(x))
    losses = icl.train(model, steps=3, batch=8, n_context=10, progress=False)
    assert len(losses) == 3 and not model.training


def test_token_ids_and_bad_shapes_are_refused():
    model = toy()
    with pytest.raises(ValueError, match="continuous"):
        iu.decompose(model, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="d_model"):
        iu.decompose(model, torch.randn(1, 5, 4))
    with pytest.raises(ValueError):
        ToyTransformer(d_model=2, n_heads=3)


def test_absorbed_toy_model_on_the_query_alone():
    model = toy()
    x = prompts(batch=1)
    with assert_untouched(model):
        patched = iu.absorb(model, x, dtype=torch.float64)
    out = patched(x[:, -1:].double())[0, -1]
    torch.testing.assert_close(out, model.double()(x.double())[0, -1], rtol=1e-10, atol=1e-12)

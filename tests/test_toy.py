"""The seed papers' own model (``ToyTransformer``) and its adapter: literal weight edits, hooks, array loading."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from conftest import assert_untouched, literal_edit_output, rel_err

import implicit_updates as iu
from implicit_updates.adapters import adapter_for
from implicit_updates.adapters.toy import ToyAdapter
from implicit_updates.experiments import icl
from implicit_updates.models.toy import ToyConfig, ToyTransformer, equinox_key

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


def reference_keys(arrays: dict[str, np.ndarray], norms: tuple[str, str] = ("ln_1", "ln_2")) -> dict[str, np.ndarray]:
    """Our names as ``jax.tree_util.keystr`` names the reference model's leaves (``.blocks[0].ln_1.weight``)."""
    return {"." + re.sub(r"(blocks|layers)\.(\d+)", r"\1[\2]", k).replace("ln1", norms[0]).replace("ln2", norms[1]):
            v for k, v in arrays.items()}


def identity_norms(model: ToyTransformer, norms: tuple[str, str] = ("ln_1", "ln_2")) -> dict[str, np.ndarray]:
    """The LayerNorms the reference builds in every block, unused (identity) without use_layer_norm."""
    d = model.cfg.d_model
    return {f".blocks[{b}].{n}.{p}": (np.ones if p == "weight" else np.zeros)(d, np.float32)
            for b in range(model.cfg.n_layers) for n in norms for p in ("weight", "bias")}


@pytest.mark.parametrize("norms", [("ln_1", "ln_2"), ("norm_attn", "norm_mlp")])
def test_reference_names_current_and_older(norms):
    """The reference's current tree (``ln_1``/``ln_2``, its model.py) and the older one (``norm_attn``/``norm_mlp``)."""
    source, target = toy(seed=1, layer_norm=True), toy(seed=2, layer_norm=True)
    arrays = reference_keys(source.to_arrays(), norms)
    assert f".blocks[0].{norms[0]}.weight" in arrays and ".blocks[4].attn.query_proj.weight" in arrays
    assert ".blocks[4].mlp.layers[2].bias" in arrays
    assert equinox_key(f".blocks[3].{norms[1]}.bias") == "blocks.3.ln2.bias"
    target.load_arrays(arrays)
    torch.testing.assert_close(target(prompts()), source(prompts()), rtol=0, atol=0)
    with pytest.raises(KeyError, match="a second time"):  # both spellings of one norm
        target.load_arrays({**arrays, ".blocks[0].ln_1.weight": arrays[f".blocks[0].{norms[0]}.weight"],
                            ".blocks[0].norm_attn.weight": arrays[f".blocks[0].{norms[0]}.weight"]})


def test_reference_model_without_layer_norm_carries_identity_norms():
    """use_layer_norm=False: the reference still holds ln_1/ln_2 (weight 1, bias 0, never used); they load into a
    model without norms. A trained norm (not the identity) must have been used, so it is refused, as are switches
    (the tree's non-array leaves) that disagree with the config."""
    source, target = toy(seed=1), toy(seed=2)
    flags = {".blocks[0].use_layer_norm": False, ".blocks[0].use_skips": True, ".blocks[0].causal_attn": True,
             ".n_blocks": 5}
    arrays = {**reference_keys(source.to_arrays()), **identity_norms(source), **flags}
    target.load_arrays(arrays)
    torch.testing.assert_close(target(prompts()), source(prompts()), rtol=0, atol=0)
    older = identity_norms(source, ("norm_attn", "norm_mlp"))
    toy(seed=3).load_arrays({**reference_keys(source.to_arrays()), **older})
    trained = dict(arrays, **{".blocks[2].ln_2.bias": np.full(3, 0.1, np.float32)})
    with pytest.raises(ValueError, match=r"blocks.2.ln2.bias is not the identity.*layer_norm=True"):
        target.load_arrays(trained)
    with pytest.raises(ValueError, match="shape"):
        target.load_arrays(dict(arrays, **{".blocks[0].ln_1.weight": np.ones(4, np.float32)}))
    mismatches = ((".blocks[0].use_layer_norm", True, "layer_norm"), (".n_blocks", 4, "n_layers"),
                  (".blocks[1].use_skips", False, "attn_skip"), (".blocks[0].causal_attn", False, "causal"))
    for key, value, field in mismatches:
        with pytest.raises(ValueError, match=f"build ToyTransformer\\({field}="):
            target.load_arrays(dict(arrays, **{key: value}))
    with pytest.raises(KeyError, match="unexpected"):  # with LayerNorm the norms are parameters, not extras
        toy(layer_norm=True).load_arrays({**reference_keys(source.to_arrays()), **identity_norms(source),
                                          ".blocks[0].ln_1.extra": np.ones(3, np.float32)})


@pytest.mark.parametrize("scale,reference_at_least", [(1.0, 1e-11), (1e-4, 1e-6)])
def test_reference_denominator_is_a_documented_difference(scale, reference_at_least):
    """The reference divides by ||m_x||^2 + 1e-8, we by ||m_x||^2 (toy.py's docstring gives these numbers): ours
    reproduces the block to float64 rounding at any scale of m_x; theirs falls short by 1e-8/(||m_x||^2 + 1e-8) of
    the update, 2.5e-10 of the block output at ||m_x||^2 = 6.8 and 6.4e-6 at 6.8e-8 (inputs scaled by 1e-4)."""
    model = toy(n_layers=1)
    result = iu.decompose(model, prompts(batch=1) * scale, dtype=torch.float64)
    norm2 = float(1 / result.block(0).row.square().sum())  # the row is m_x / ||m_x||^2

    def worst(shrink: float) -> float:
        errors = []
        for position in range(result.n_positions):
            edited = copy.deepcopy(model).double()
            params = dict(edited.named_parameters())
            with torch.no_grad():
                for name, delta in result.patch(0, position).items():
                    params[name].add_(delta * (shrink if name.endswith("layers.0.weight") else 1.0))
                out = edited.blocks[0](result.query_input(0, position))[0, 0]
            errors.append(rel_err(out, result.target_output(0, position)))
        return max(errors)

    assert worst(1.0) <= 1e-14
    assert worst(norm2 / (norm2 + 1e-8)) >= reference_at_least


def test_reference_code_model_loads_and_matches_its_forward_and_updates():
    """Golden values from Innocenti & Achour's reference code itself (github.com/francesco-innocenti/generalising-icl
    at cc82e7b, ``model.py`` and ``analytical.py``; jax 0.6.2, equinox 0.13.1, ``jax_enable_x64``):
    ``Transformer(n_embed=3, n_heads=3, n_blocks=1, key=jr.PRNGKey(0), use_layer_norm=True, hidden_multiplier=1)``
    with ``ln_1.weight * 1.3`` and ``ln_2.bias + 0.2`` (a trained-looking norm), every leaf of
    ``jax.tree_util.tree_flatten_with_path(model)`` but the two activation functions, named by ``keystr``;
    ``x = jr.normal(jr.PRNGKey(1), (1, 4, 3))``, the model's block output, and ``compute_implicit_icl_updates(model,
    x, x[:, -1:], use_layer_norm=True)`` at the last position. Our forward matches theirs to float64 rounding, the
    bias update is the same, and the weight update differs by exactly their ``+ 1e-8`` (the documented difference)."""
    model = ToyTransformer(n_layers=1, d_mlp=3, layer_norm=True).double()
    arrays = {k: np.asarray(v) if isinstance(v, list) else v for k, v in REFERENCE.items()}
    model.load_arrays({**arrays, ".blocks[0].mlp.activation": np.tanh})  # a function leaf: not a parameter
    x = torch.tensor(REFERENCE_X, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.tensor(REFERENCE_OUT, dtype=torch.float64), rtol=0, atol=1e-14)
    result = iu.decompose(model, x, dtype=torch.float64)
    patch = result.patch(0, -1)
    db = torch.tensor(REFERENCE_DB_LAST, dtype=torch.float64)
    torch.testing.assert_close(patch["blocks.0.mlp.layers.2.bias"], db, rtol=0, atol=1e-14)
    ours, theirs = patch["blocks.0.mlp.layers.0.weight"], torch.tensor(REFERENCE_DW_LAST, dtype=torch.float64)
    norm2 = float(1 / result.block(0).row.square().sum())  # ||m_x||^2
    shortfall = float(((ours - theirs) / ours).abs().max())
    assert shortfall == pytest.approx(1e-8 / (norm2 + 1e-8), rel=1e-4)  # their 1e-8, nothing else
    assert result.verify().max_rel_err <= 1e-14


# Innocenti & Achour's reference model, as jax.tree_util.keystr names its leaves (see the test above).
REFERENCE = {
    '.blocks[0].attn.query_proj.weight': [
        [0.48538774368127263, 0.5719127746176998, 0.041647954674657574],
        [-0.4590419239099075, -0.1328489370039908, -0.28876221965433274],
        [0.05272680566183757, 0.37681930125789764, 0.5213287925568262],
    ],
    '.blocks[0].attn.key_proj.weight': [
        [-0.21398702445682127, -0.3197786816238385, 0.5561036109531965],
        [-0.2878748541919344, 0.35182599199520886, 0.43004459321680133],
        [-0.026622426290208934, 0.43914997757436297, -0.1521142336064572],
    ],
    '.blocks[0].attn.value_proj.weight': [
        [-0.3627024652592981, -0.20295408313404736, 0.0454353940170407],
        [-0.29319874220198827, 0.3541410545215675, -0.03352796551614098],
        [0.17816400030152618, -0.4936020898320133, -0.5020036319280428],
    ],
    '.blocks[0].attn.output_proj.weight': [
        [0.27660307438773957, -0.33516932287883916, -0.1711858675636101],
        [0.3296160655504622, -0.43785251350071963, 0.014775126019661832],
        [0.25513325214787014, 0.5403614116123411, 0.33905840018774297],
    ],
    '.blocks[0].attn.dropout.p': 0.0,
    '.blocks[0].attn.dropout.inference': False,
    '.blocks[0].mlp.layers[0].weight': [
        [-0.5265495742656154, 0.22246048602237983, -0.11897854758231957],
        [0.4467823065325392, -0.2839442521064386, 0.02551282993901195],
        [0.27336195770171257, -0.18893286571544884, 0.5550756492853752],
    ],
    '.blocks[0].mlp.layers[0].bias': [0.08670575222273272, 0.5271737540066626, -0.13106522376921972],
    '.blocks[0].mlp.layers[1].weight': [
        [0.36232240310252634, 0.4191370767706223, 0.16149382095523035],
        [0.12850506977808193, -0.28098554412642635, -0.3271541838983162],
        [0.18029053543203055, -0.20449679583151403, 0.20969102405038437],
    ],
    '.blocks[0].mlp.layers[1].bias': [-0.32324673441176316, 0.26462459222026213, 0.05880466962016563],
    '.blocks[0].mlp.layers[2].weight': [
        [-0.15571717566782492, -0.030293424924345898, -0.3707000412798401],
        [0.038443236183563115, 0.5631618820070472, -0.32023276702613024],
        [0.4081894449575571, -0.3275433135322663, 0.015318146052209484],
    ],
    '.blocks[0].mlp.layers[2].bias': [-0.4687914341670482, -0.13576760788911266, -0.41732870104523356],
    '.blocks[0].use_skips': True,
    '.blocks[0].causal_attn': True,
    '.blocks[0].ln_1.weight': [1.3, 1.3, 1.3],
    '.blocks[0].ln_1.bias': [0.0, 0.0, 0.0],
    '.blocks[0].ln_2.weight': [1.0, 1.0, 1.0],
    '.blocks[0].ln_2.bias': [0.2, 0.2, 0.2],
    '.blocks[0].use_layer_norm': True,
    '.n_blocks': 1,
}
REFERENCE_X = [
    [
        [-1.184284421837855, -0.11617040844628398, 0.17269028009903425],
        [0.9573071790540392, -0.8329541450744178, 0.6908051716286406],
        [0.07545020754047457, -0.7645270989348372, -0.05064538917471914],
        [-1.3524742133019472, -0.9859173415451911, -1.1198478915637922],
    ],
]
REFERENCE_OUT = [
    [
        [-1.5427257173000537, -0.3158739262633967, -0.21503490542275921],
        [0.7597168091669526, -0.6863574663581489, 0.13080132155220608],
        [-0.12037644662561464, -0.5305763634839351, -0.6738855608054455],
        [-1.8074604396430827, -1.0844014708827652, -1.6077654824730403],
    ],
]
REFERENCE_DW_LAST = [
    [-0.14260384269023477, -0.0774484812505259, 0.351606189674893],
    [0.13530906765529294, 0.07348667182896826, -0.33362008210454575],
    [0.17402056281161896, 0.09451097559409985, -0.42906772959957307],
]
REFERENCE_DB_LAST = [0.09452963234652417, 0.2643384377930631, -0.19661830872401992]


@pytest.mark.parametrize("progress", [True, False])
def test_decompose_shows_a_progress_bar_only_when_asked_and_clears_it(progress, capsys):
    """The capture's per-block bar (``adapters/assemble.py``) is named "decompose", shown with ``progress=True``
    (also where stderr is not a terminal), not shown with ``progress=False``, and cleared when done (no line left)."""
    model = toy(n_layers=3)
    capsys.readouterr()
    iu.decompose(model, prompts(batch=1, n=4), progress=progress)
    err = capsys.readouterr().err
    if not progress:
        assert "decompose" not in err
        return
    assert re.search(r"decompose: +\d+%", err), err
    assert "/3 [" in err  # one step per block
    assert "\n" not in err  # leave=False: the finished bar is erased, not left as a line

"""Models dispatched by accelerate (``device_map`` with CPU and disk offload, ``cpu_offload``): decompose, verify,
absorbed (hooks, no copy), compare_absorbed and the naive prefix dynamics equal the undispatched model's in float64,
offloaded parameters (on ``meta`` outside the forward) are read through accelerate's own hooks, and the user's
dispatched model is untouched: meta stays meta, accelerate's hooks stay (the same objects), ours go.

stories260K (5 layers); SmolLM2-135M and Gemma-3-270M where their packages are installed (skips with the reason
otherwise). No GPU here: every execution device is the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import rel_err

import implicit_updates as iu
from implicit_updates.analyses.dynamics import max_relative_difference, prefix_decomposition
from implicit_updates.models import pretrained
from implicit_updates.runtime.precision import computed_in

accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
transformers = pytest.importorskip("transformers")

STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K"
STORY = "Once upon a time, there was a little bird named Bob. Bob lived in a tree. One day,"
TOL = 1e-12
# the absorbed model's logits against the full prompt's, HF models in float64 (transformers keeps parts of HF Gemma
# in float32, so it matches to ~1e-8 either way, dispatched or not)
ABSORBED_TOL = {"smollm2-135m": 1e-10, "gemma-3-270m": 1e-6}


def layer_map(n_layers: int, kinds: list[str]) -> dict[str, str]:
    """Embedding and head on disk, the final norm on the CPU, layer i on ``kinds[i % len(kinds)]``."""
    return {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk",
            **{f"model.layers.{i}": kinds[i % len(kinds)] for i in range(n_layers)}}


def load(path: Path, how: str, offload_dir: Path):
    """The model undispatched (``"plain"``), dispatched by ``device_map`` over CPU and disk (``"disk"``), or with
    every module offloaded to CPU memory by ``accelerate.cpu_offload`` (``"cpu_offload"``)."""
    kwargs = dict(attn_implementation="eager")
    if how == "disk":
        n_layers = transformers.AutoConfig.from_pretrained(path).num_hidden_layers
        kwargs |= dict(device_map=layer_map(n_layers, ["cpu", "disk", "disk"]), offload_folder=str(offload_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()
    if how == "cpu_offload":
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    model.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    return model


def snapshot(model: torch.nn.Module) -> dict:
    """What must not change: every tensor's device and dtype, the values of those not on meta, each module's
    accelerate hook object and forward, and the torch hooks (none)."""
    tensors = {name: (t.device, t.dtype, None if t.is_meta else t.detach().clone())
               for name, t in [*model.named_parameters(), *model.named_buffers()]}
    hooks = {name: (m.__dict__.get("_hf_hook"), m.__dict__.get("forward"), len(m._forward_hooks),
                    len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    return {"tensors": tensors, "hooks": hooks, "training": model.training}


def assert_same(before: dict, model: torch.nn.Module) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["hooks"].keys() == before["hooks"].keys()
    for name, (hook, forward, n_fwd, n_pre) in before["hooks"].items():
        now = after["hooks"][name]
        assert now[0] is hook and now[1] is forward and now[2:] == (n_fwd, n_pre), name
    for name, (device, dtype, value) in before["tensors"].items():
        now = after["tensors"][name]
        assert now[:2] == (device, dtype), name
        assert (value is None) == (now[2] is None) and (value is None or torch.equal(value, now[2])), name


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found at {STORIES} (the team's ../shared next to the repository)")
    offload = tmp_path_factory.mktemp("offload")
    return {how: load(STORIES, how, offload / how) for how in ("plain", "disk", "cpu_offload")}


def test_dispatch_really_offloads(stories):
    """The fixture's models are what the tests claim: some layers on meta (disk / CPU offload), some on the CPU."""
    disk = stories["disk"]
    on_meta = {n.split(".")[2] for n, p in disk.named_parameters() if n.startswith("model.layers.") and p.is_meta}
    assert on_meta == {"1", "2", "4"} and disk.model.layers[0].mlp.up_proj.weight.device.type == "cpu"
    assert disk.hf_device_map["model.layers.1"] == "disk"
    assert all(p.is_meta for p in stories["cpu_offload"].parameters())


@pytest.mark.parametrize("how", ["disk", "cpu_offload"])
def test_decompose_and_verify_equal_the_undispatched_model(stories, how, one_thread):
    plain, model = stories["plain"], stories[how]
    before = snapshot(model)
    ref = iu.decompose(plain, STORY, dtype=torch.float64)
    result = iu.decompose(model, STORY, dtype=torch.float64)
    report = result.verify()
    assert_same(before, model)
    assert torch.equal(result.inputs, ref.inputs) and result.dtype == torch.float64
    for a, b in zip(ref.blocks, result.blocks, strict=True):
        for pa, pb in zip(a.updates, b.updates, strict=True):
            assert pa.name == pb.name
            for field in ("row", "column", "delta"):
                if hasattr(pa, field):
                    assert rel_err(getattr(pb, field), getattr(pa, field)) <= TOL, (b.block, pa.name, field)
    # the literal check swaps param + delta into offloaded modules inside accelerate's hook: a swap outside it is
    # overwritten by the load, and the check would then see the unpatched block (errors ~1)
    assert report.max_rel_err <= 1e-13 and max(b.literal_max_rel_err for b in report.blocks) <= 1e-13
    assert abs(report.max_rel_err - ref.verify().max_rel_err) <= 1e-14


@pytest.mark.parametrize("how", ["disk", "cpu_offload"])
def test_absorbed_by_hooks_on_offloaded_layers(stories, how, one_thread):
    plain, model = stories["plain"], stories[how]
    ids = plain.tokenizer(STORY, return_tensors="pt").input_ids
    with torch.no_grad(), computed_in(plain, torch.float64):
        full = plain(ids).logits[0, -1]
        control = plain(ids[:, -1:]).logits[0, -1]
    before = snapshot(model)
    with torch.no_grad(), iu.absorbed(model, ids, dtype=torch.float64):
        alone = model(ids[:, -1:]).logits[0, -1]
    assert_same(before, model)
    assert alone.dtype == torch.float64 and rel_err(alone, full) <= 1e-12
    assert rel_err(control, full) > 0.1  # the context matters: without the patch the query alone is far off
    report = iu.compare_absorbed(model, ids, dtype=torch.float64)
    assert report.max_abs_logit_diff <= 1e-10 and report.top1_agree
    assert_same(before, model)


def test_naive_prefix_dynamics_equals_the_undispatched(stories, one_thread):
    ids = stories["plain"].tokenizer(STORY, return_tensors="pt").input_ids[:, :8]
    ref = prefix_decomposition(stories["plain"], ids, dtype=torch.float64, method="naive")
    got = prefix_decomposition(stories["disk"], ids, dtype=torch.float64, method="naive")
    assert max_relative_difference(got, ref) <= TOL


def test_copies_of_a_dispatched_model_are_refused(stories):
    model, ids = stories["disk"], torch.tensor([[1, 400, 50, 60]])
    before = snapshot(model)
    with pytest.raises(ValueError, match="dispatched by accelerate.*upcast='stream'"):
        iu.decompose(model, ids, dtype=torch.float64, upcast="copy")
    with pytest.raises(ValueError, match="dispatched by accelerate.*absorbed"):
        iu.absorb(model, ids, dtype=torch.float64)
    assert_same(before, model)


def test_a_forward_that_raises_inside_an_offloaded_module_leaves_it_offloaded(stories, monkeypatch):
    """Our upcast runs between accelerate's load and offload; a forward that raises there is cleaned up by our
    code (parameters put back) and then by accelerate's own post_forward (back on meta)."""
    model = stories["disk"]
    target = model.model.layers[1].mlp.up_proj
    before = snapshot(model)

    def boom(*args, **kwargs):
        assert target.weight.dtype == torch.float64 and not target.weight.is_meta  # loaded, then upcast
        raise RuntimeError("boom")

    monkeypatch.setattr(target, "_old_forward", boom)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), computed_in(model, torch.float64):
        model(torch.tensor([[1, 400, 50]]))
    monkeypatch.undo()
    assert target.weight.is_meta and target.weight.dtype == torch.float32
    assert_same(before, model)


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma-3-270m"])
def real_model(request, tmp_path_factory):
    """(name, undispatched, dispatched over CPU and disk) HF models; one pair alive at a time."""
    name = request.param
    if pretrained.missing(name) is not None and not pretrained.is_cached(name):
        pytest.skip(f"{name}: not installed ({pretrained.missing(name)})")
    path = pretrained.prepare(name, verbose=False)
    offload = tmp_path_factory.mktemp(f"offload-{name}")
    yield name, load(path, "plain", offload), load(path, "disk", offload)


def test_pretrained_dispatched_over_cpu_and_disk(real_model, one_thread):
    """SmolLM2-135M (Llama) and Gemma-3-270M (scaled embedding, post-MLP norms whose scale takes the correction):
    the first and last blocks (CPU, disk, disk, ..., disk) equal the undispatched model's; the absorbed model too.
    (HF Gemma verifies to ~6e-8 on either: transformers keeps parts of it in float32; equal is what is asserted.)"""
    name, plain, model = real_model
    ids = plain.tokenizer("France: Paris\nJapan: Tokyo\nItaly:", return_tensors="pt").input_ids
    assert any(p.is_meta for p in model.parameters()) and any(not p.is_meta for p in model.parameters())
    before = snapshot(model)
    n = plain.config.num_hidden_layers
    blocks = [0, 1, 2, n - 2, n - 1]
    ref = iu.decompose(plain, ids, blocks=blocks, dtype=torch.float64)
    result = iu.decompose(model, ids, blocks=blocks, dtype=torch.float64)
    for a, b in zip(ref.blocks, result.blocks, strict=True):
        for pa, pb in zip(a.updates, b.updates, strict=True):
            for field in ("row", "column", "delta"):
                if hasattr(pa, field):
                    assert rel_err(getattr(pb, field), getattr(pa, field)) <= TOL, (b.block, pa.name, field)
    got, want = result.verify(), ref.verify()
    assert abs(got.max_rel_err - want.max_rel_err) <= 1e-14 and got.max_rel_err <= 1e-6
    with torch.no_grad(), iu.absorbed(model, ids, dtype=torch.float64):
        alone = model(ids[:, -1:]).logits[0, -1]
    with torch.no_grad(), computed_in(plain, torch.float64):
        full = plain(ids).logits[0, -1]
        control = plain(ids[:, -1:]).logits[0, -1]
    assert rel_err(alone, full) <= ABSORBED_TOL[name] and rel_err(control, full) > 0.1
    assert_same(before, model)

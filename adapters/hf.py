"""Plain Hugging Face causal LMs (``transformers``): torch hooks on the model's own modules.

Every block is located by one :class:`~implicit_updates.adapters.structure.BlockStructure`, chosen by the model's
class: TransformerLens 4's architecture adapter for that class where TransformerLens provides one (its
``component_mapping``: which norm feeds the MLP, post-MLP norms, dense / gated / fused gate-up MLPs, parallel and
scaled-residual blocks), else the built-in table (GPT-2, Llama, Mistral, Qwen 2/3, Gemma 1/2/3, GPT-NeoX). Capture
checks the data flow the structure claims before decomposing (``ModuleAdapter.check_structure``).

Anything else raises :class:`UnsupportedArchitectureError` naming the class and the part.
"""

from __future__ import annotations

from torch import Tensor, nn

from implicit_updates.adapters.experts import LinearCalls, mlp_params
from implicit_updates.adapters.module_hooks import unwrap
from implicit_updates.adapters.modules import BlockParts, ModuleAdapter
from implicit_updates.adapters.structure import BlockStructure, structure_of_hf
from implicit_updates.errors import UnsupportedArchitectureError


def part(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.c``, returning the module the parent actually calls: a bridge component's own child (canonical
    TransformerLens names, and the wrappers around HF modules, which may reimplement the HF forward) where it has
    one, else the attribute of the HF module inside any bridge wrapper."""
    module = root
    for attr in path.split("."):
        module = module._modules[attr] if attr in module._modules else getattr(unwrap(module), attr)
    return module


def block_parts(model: nn.Module, structure: BlockStructure, names: dict[int, str]) -> list[BlockParts]:
    """One :class:`BlockParts` per layer; ``names`` maps ``id(parameter)`` to its ``named_parameters()`` key."""
    layers = part(model, structure.layers)  # a ModuleList: its layers stay wrapped, so bridge hooks fire too
    out = []
    for i, layer in enumerate(layers):
        if structure.kind == "whole":  # located as a whole module; its maps are read from its calls (experts.py)
            mlp = part(layer, structure.mlp)
            bias = unwrap(mlp)._parameters.get("bias")  # the mixture's own output bias (JetMoE)
            out.append(BlockParts(
                layer=layer, mlp=mlp, first=(), out=mlp, out_weight="",
                out_bias=names[id(bias)] if bias is not None and bias.dim() == 1 else None,
                attention=part(layer, structure.attention),
                mlp_norm=part(layer, structure.mlp_norm) if structure.mlp_norm else None,
                post_norm=(names[id(unwrap(part(layer, structure.post_norm)).weight)],
                           part(layer, structure.post_norm)) if structure.post_norm else None,
                parallel=structure.parallel, residual_scale=structure.residual_scale, whole=True))
            continue
        try:
            mlp = part(layer, structure.mlp) if structure.mlp else layer
            first = tuple((names[id(unwrap(part(mlp, f)).weight)], part(mlp, f)) for f in structure.first)
            proj = part(mlp, structure.out)
            raw = unwrap(proj)
            post = part(layer, structure.post_norm) if structure.post_norm else None
            out.append(BlockParts(
                layer=layer, mlp=mlp if structure.mlp else first[0][1], first=first, out=proj,
                out_weight=names[id(raw.weight)],
                out_bias=names[id(raw.bias)] if getattr(raw, "bias", None) is not None else None,
                attention=part(layer, structure.attention),
                mlp_norm=part(layer, structure.mlp_norm) if structure.mlp_norm else None,
                post_norm=(names[id(unwrap(post).weight)], post) if post is not None else None,
                parallel=structure.parallel, residual_scale=structure.residual_scale))
        except (AttributeError, KeyError, TypeError) as err:
            raise UnsupportedArchitectureError(
                f"layer {i} ({type(unwrap(layer)).__name__}) does not have the block structure {structure.describe()} "
                f"({type(err).__name__}: {err}); is it a custom, quantized or mixture-of-experts layer?") from err
        for name, module in out[-1].first + ((out[-1].out_weight, proj),):
            if unwrap(module).weight.dim() != 2:
                raise UnsupportedArchitectureError(f"{name}: a {unwrap(module).weight.dim()}-D weight (fused experts "
                                                   "or a quantized layout), not a linear map's matrix")
    return out


class HFAdapter(ModuleAdapter):
    """Adapter for a ``transformers`` causal LM (``PreTrainedModel`` with a known block layout)."""

    backend = "Hugging Face"
    capabilities = frozenset({"decompose", "copy", "absorbed", "attribution", "continuation", "lora",
                              "prefix_onepass", "suffix_removal", "generation"})
    limits: dict[str, str] = {}

    def __init__(self, model: nn.Module, hf_model: nn.Module | None = None):
        self.model = model
        self.hf = hf_model if hf_model is not None else model
        # the text stack's config (Gemma 3 multimodal nests it as text_config; the config itself elsewhere)
        self.config = self.hf.config.get_text_config() if hasattr(self.hf.config, "get_text_config") \
            else self.hf.config
        self.structure = self._structure()
        names = {id(p): n for n, p in model.named_parameters()}
        self.parts = block_parts(self._root(), self.structure, names)
        self.n_blocks = len(self.parts)
        whole = {b: mlp_params(unwrap(p.mlp), names) for b, p in enumerate(self.parts) if p.whole}
        self.linear_calls = LinearCalls(whole) if whole else None

    def _structure(self) -> BlockStructure:
        return structure_of_hf(self.hf)

    def _root(self) -> nn.Module:
        """The module the structure's paths start from."""
        return self.hf

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

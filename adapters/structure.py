"""One structural description of a decoder block, the single thing every Hugging Face-based backend reads.

Where TransformerLens 4 is installed, the description is TransformerLens's own: the architecture adapter for the
model's *class* (``SUPPORTED_ARCHITECTURES``, the table ``TransformerBridge.boot_transformers`` dispatches on),
read from its ``component_mapping`` without booting a bridge: the block class (``ParallelBlockBridge``,
``ScaledResidualBlockBridge`` and its ``residual_contribution_scale``), the norms ``ln2`` (feeds the MLP) and
``ln2_post`` (after the MLP, before the residual add) and the MLP bridge (``MLPBridge`` in/out, ``GatedMLPBridge``
gate/in/out, ``JointGateUpMLPBridge``'s fused projection; a ``MoEBridge`` is located as a whole module, whose maps
:mod:`~implicit_updates.adapters.experts` reads from its linear calls). A booted bridge is read from the adapter
it was booted with, in TransformerLens's canonical names (``blocks.L.ln2``, ``blocks.L.mlp.gate``...), which are the
modules the bridge's forward actually calls. Without TransformerLens a small built-in table, keyed by class, is the
fallback. Names only locate modules: capture then checks the data flow the description claims
(``modules.check_structure``) and ``verify()``'s literal check catches anything left.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Literal

from torch import nn

from implicit_updates.errors import UnsupportedArchitectureError

MixerKind = Literal["dense", "gated", "fused gate-up", "whole"]

# Block parts TransformerLens declares beside attention and the MLP that carry no attention context (state-space,
# recurrent, convolution and linear-attention mixers, hyper-connections): their blocks are refused by name.
NON_ATTENTION_PARTS = ("mamba", "mixer", "conv", "linear_attn", "time_mix", "channel_mix", "attn_hc", "mlp_hc")
KNOWN_PARTS = {"ln1", "ln2", "ln1_post", "ln2_post", "attn", "mlp"}


@dataclass(frozen=True)
class BlockStructure:
    """How every decoder layer computes ``y = r + residual_scale * post_norm(mlp(m))``, as module paths.

    ``layers``: the decoder layers' ``ModuleList`` (from the model root). In each layer: ``attention``; ``mlp``, the
    MLP module (None when its maps sit on the layer itself, as in OPT); ``first``, the maps reading the MLP input m
    (relative to ``mlp``, or the layer); ``out``, the MLP output projection; ``mlp_norm``, the norm whose output is
    m (None: the MLP reads the residual itself, as in OLMo 2's post-norm-only blocks); ``post_norm``, the norm on the
    MLP output before the residual add; ``parallel``: attention and MLP both read the layer input, so
    ``r = input + attention output``; else r is ``mlp_norm``'s input (or m itself without one).
    """

    layers: str
    attention: str
    mlp: str | None
    first: tuple[str, ...]
    out: str
    mlp_norm: str | None
    post_norm: str | None
    parallel: bool
    residual_scale: float = 1.0
    kind: MixerKind = "dense"
    source: str = ""

    def describe(self) -> str:
        norm = f"{self.mlp_norm} -> " if self.mlp_norm else ""
        post = f" -> {self.post_norm}" if self.post_norm else ""
        scale = f" x {self.residual_scale:g}" if self.residual_scale != 1 else ""
        join = "input + attention + MLP (parallel)" if self.parallel else "residual + MLP"
        return f"{norm}{self.kind} MLP {self.first} -> {self.out}{post}{scale}; {join} [{self.source}]"


# The fallback without TransformerLens 4, keyed by the model's class (dispatch by class, never by model_type).
_GATED = BlockStructure("model.layers", "self_attn", "mlp", ("gate_proj", "up_proj"), "down_proj",
                        "post_attention_layernorm", None, False, kind="gated", source="built-in table")
_GEMMA2 = dataclasses.replace(_GATED, mlp_norm="pre_feedforward_layernorm", post_norm="post_feedforward_layernorm")
FALLBACK: dict[str, BlockStructure] = {
    "GPT2LMHeadModel": BlockStructure("transformer.h", "attn", "mlp", ("c_fc",), "c_proj", "ln_2", None, False,
                                      source="built-in table"),
    "LlamaForCausalLM": _GATED, "MistralForCausalLM": _GATED, "Qwen2ForCausalLM": _GATED,
    "Qwen3ForCausalLM": _GATED, "GemmaForCausalLM": _GATED,
    "GPTNeoXForCausalLM": BlockStructure("gpt_neox.layers", "attention", "mlp", ("dense_h_to_4h",), "dense_4h_to_h",
                                         "post_attention_layernorm", None, True, source="built-in table"),
    "Gemma2ForCausalLM": _GEMMA2, "Gemma3ForCausalLM": _GEMMA2,
}


def structure_of_hf(model: nn.Module) -> BlockStructure:
    """The block structure of a plain ``transformers`` causal LM, by its class: TransformerLens 4's adapter for that
    class when TransformerLens provides one, else the built-in table; anything else is refused by name."""
    arch = type(model).__name__
    adapter = _tl_adapter(model)
    if adapter is not None:
        return from_component_mapping(adapter.component_mapping, f"TransformerLens {type(adapter).__name__}")
    if arch in FALLBACK:
        structure = FALLBACK[arch]
        if arch == "GPTNeoXForCausalLM" and not model.config.use_parallel_residual:
            structure = dataclasses.replace(structure, parallel=False)
        return structure
    raise UnsupportedArchitectureError(
        f"no known block layout for {arch} (model_type {getattr(model.config, 'model_type', None)!r}): neither "
        f"TransformerLens 4's architecture adapters (pip install 'transformer-lens>=4') nor the built-in table "
        f"({', '.join(sorted(FALLBACK))}) describe it")


def structure_of_bridge(bridge: nn.Module) -> BlockStructure:
    """The block structure of a booted ``TransformerBridge``, in TransformerLens's canonical component names."""
    adapter = getattr(bridge, "adapter", None)
    if adapter is None or not hasattr(adapter, "component_mapping"):
        raise UnsupportedArchitectureError("this TransformerBridge has no architecture adapter with a "
                                           "component_mapping, so its block structure is unknown")
    return from_component_mapping(adapter.component_mapping, f"TransformerLens {type(adapter).__name__}",
                                  canonical=True)


def from_component_mapping(mapping: dict, source: str, canonical: bool = False) -> BlockStructure:
    """Read a TransformerLens ``component_mapping`` into a :class:`BlockStructure`.

    ``canonical``: module paths in TransformerLens's names (``blocks``, ``ln2``, ``mlp.gate``: a booted bridge's
    own components) instead of the Hugging Face names the components wrap.
    """
    blocks = mapping.get("blocks")
    if blocks is None:
        raise UnsupportedArchitectureError(f"{source} declares no decoder blocks")
    subs = dict(blocks.submodules)
    block_class = type(blocks).__name__
    mixers = [k for k in subs if k in NON_ATTENTION_PARTS]
    mixers = mixers or ([block_class] if "SSM" in block_class or "Opaque" in block_class else [])
    if mixers:
        raise UnsupportedArchitectureError(
            f"{source}: its blocks hold {', '.join(mixers)} (state-space, recurrent, convolution or linear-attention "
            "layers, or hyper-connections), which have no attention context to decompose into MLP updates")
    unknown = sorted(set(subs) - KNOWN_PARTS)
    if unknown or "attn" not in subs or "mlp" not in subs:
        raise UnsupportedArchitectureError(
            f"{source}: a block with parts {sorted(subs)} is not the attention + MLP residual block this "
            f"decomposition knows (unexpected: {unknown or 'attn/mlp missing'})")
    mlp = subs["mlp"]
    mlp_kind = type(mlp).__name__
    names = {k: c.name for k, c in mlp.submodules.items()}
    if "MoE" in mlp_kind or "experts" in names or "router" in names:
        # a mixture of experts: located as a whole module, its maps read from its calls (adapters/experts.py)
        first, kind, names = (), "whole", {"out": ""}
    elif mlp_kind == "JointGateUpMLPBridge":
        first, kind = (("gate", "in") if canonical else (mlp.fused_attr,)), "fused gate-up"
    elif "gate" in names and "in" in names:
        first, kind = (("gate", "in") if canonical else (names["gate"], names["in"])), "gated"
    elif "in" in names:
        first, kind = ("in",) if canonical else (names["in"],), "dense"
    else:
        raise UnsupportedArchitectureError(f"{source}: the MLP {mlp_kind} has no input map ('in') declared")
    if "out" not in names:
        raise UnsupportedArchitectureError(f"{source}: the MLP {mlp_kind} has no output projection ('out') declared")
    parallel = "Parallel" in block_class
    scale = float(getattr(blocks, "residual_contribution_scale", 1.0))

    def name(key: str) -> str | None:
        if key not in subs:
            return None
        return key if canonical else subs[key].name

    out = "out" if canonical else names["out"]
    if kind == "whole":
        if not mlp.name:
            raise UnsupportedArchitectureError(f"{source}: a mixture of experts with no module of its own")
        out = ""
    elif canonical and not mlp.name:  # the MLP's maps sit on the layer itself (OPT): the bridge's mlp is never called
        first, out = tuple(f"mlp.{f}" for f in first), f"mlp.{out}"
    return BlockStructure(
        layers="blocks" if canonical else blocks.name, attention=name("attn"),
        mlp=("mlp" if canonical else mlp.name) if mlp.name else None, first=first, out=out,
        mlp_norm=name("ln2"), post_norm=name("ln2_post"), parallel=parallel, residual_scale=scale, kind=kind,
        source=f"{source}, {block_class}")


def _tl_adapter(model: nn.Module):
    """TransformerLens 4's architecture adapter for ``model``'s class, built from its config (no bridge is booted,
    nothing is loaded or installed); None where TransformerLens has none."""
    try:
        from transformer_lens.factories.architecture_adapter_factory import (
            SUPPORTED_ARCHITECTURES,
            ArchitectureAdapterFactory,
        )
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf
    except ImportError:  # no TransformerLens 4 (e.g. 3.x): the built-in table
        return None
    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        return None
    dtype = next(model.parameters()).dtype
    try:
        cfg = build_bridge_config_from_hf(copy.deepcopy(model.config), arch, model.config.name_or_path or arch, dtype)
        return ArchitectureAdapterFactory.select_architecture_adapter(cfg)
    except Exception as err:  # an adapter that cannot describe this config: say which, do not guess a layout
        raise UnsupportedArchitectureError(
            f"TransformerLens's adapter for {arch} could not be built from this config ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})") from err

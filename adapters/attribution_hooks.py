"""What attribution needs from a framework: per block the attention pattern, the values mapped through each head's
``W_O``, the same on the query alone, and the functions the straight-path integrals differentiate (the norm after
attention, the pre-MLP norm), read through the framework's own hooks and modules.

TransformerLens ``HookedTransformer``: hook points ``blocks.L.attn.hook_pattern`` / ``hook_v`` and the MLP's input
(a forward pre-hook, as the adapter does), ``W_O`` from the attention module. Hugging Face models and
TransformerBridge: the modules of the adapter's ``BlockParts`` with eager attention (:mod:`.attribution_hf`). The
adapters expose both as ``attention_readable()`` / ``capture_attention()`` (capability ``attribution``).
"""

from __future__ import annotations

import copy
from contextlib import ExitStack

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from implicit_updates.adapters.tl_common import POST_NORM_ARCHITECTURES, exact_alibi
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.math.attribution import AttentionCapture
from implicit_updates.runtime.hooks import module_hooks


def check_hooked(adapter) -> None:
    """Refuse, in one line, what attribution cannot read on a HookedTransformer."""
    if getattr(adapter.model.cfg, "load_in_4bit", False):
        raise UnsupportedArchitectureError("4-bit attention (load_in_4bit) has no W_O matrix to attribute through")


class HookedAttention:
    def __init__(self, adapter):
        self.adapter = adapter
        self.model = adapter.model
        cfg = self.model.cfg
        self.post_norm = cfg.original_architecture in POST_NORM_ARCHITECTURES

    def _output_map(self, b: int, dtype: torch.dtype):
        """T: the norm between attention and the residual (Gemma's ``ln1_post``, OLMo 2's post-norm ``ln1``)."""
        block = self.model.blocks[b]
        if self.model.cfg.use_normalization_before_and_after:
            return own_copy(block.ln1_post, dtype)
        return own_copy(block.ln1, dtype) if self.post_norm else None

    def _mlp_norm(self, b: int, dtype: torch.dtype):
        """N: the norm whose output the MLP reads (none in post-norm blocks; ``Identity`` counts as none)."""
        ln2 = self.model.blocks[b].ln2
        return None if self.post_norm or isinstance(ln2, nn.Identity) else own_copy(ln2, dtype)

    def _hooks(self, blocks: list[int], store: dict[str, Tensor]) -> ExitStack:
        def save(act: Tensor, hook) -> None:
            store[hook.name] = act.detach()

        def save_torch(key: str, output: bool):
            def hook(module, args, out=None):
                store[key] = (out if output else args[0]).detach()
            return hook

        names = []
        for b in blocks:
            p = f"blocks.{b}"
            names += [f"{p}.hook_resid_pre", f"{p}.attn.hook_pattern", f"{p}.attn.hook_v"]
            if not self.model.cfg.parallel_attn_mlp:
                names.append(f"{p}.hook_resid_mid")
        torch_hooks = []
        for b in blocks:
            block = self.model.blocks[b]
            torch_hooks += [(block.attn, "fwd", save_torch(f"{b}.attn", True)),
                            (block.mlp, "pre", save_torch(f"{b}.m", False))]
        stack = ExitStack()
        stack.enter_context(exact_alibi(self.model))
        stack.enter_context(self.model.hooks(fwd_hooks=[(n, save) for n in names]))
        stack.enter_context(module_hooks(torch_hooks))
        return stack

    def _projected(self, b: int, v: Tensor) -> Tensor:
        """``P^h_j = v^h_j W_O^h``, ``[batch, head, pos, d_model]`` (grouped KV heads repeated as the model does)."""
        attn = self.model.blocks[b].attn
        repeat = attn.W_O.shape[0] // v.shape[2]
        v = torch.repeat_interleave(v, dim=2, repeats=repeat) if repeat > 1 else v
        return einsum(v, attn.W_O.detach().to(v.dtype), "b j h e, h e d -> b h j d")

    def _mlp_residual(self, store: dict[str, Tensor], b: int) -> Tensor:
        if self.model.cfg.parallel_attn_mlp:
            return store[f"blocks.{b}.hook_resid_pre"]
        return store[f"blocks.{b}.hook_resid_mid"]

    def capture(self, inputs: Tensor, blocks: list[int], query: str) -> list[AttentionCapture]:
        ctx: dict[str, Tensor] = {}
        with self._hooks(blocks, ctx):
            self.adapter._forward_to(inputs, max(blocks) + 1)
        out = []
        for b in blocks:
            x = ctx[f"blocks.{b}.hook_resid_pre"]
            query_input = x[:, -1:] if query == "last" else x
            batch = x.shape[0]
            alone: dict[str, Tensor] = {}
            with self._hooks([b], alone):
                self.adapter._run_alone(b, rearrange(query_input, "b q d -> (b q) 1 d"))
            alone = {k: rearrange(v, "(b q) ... -> b q ...", b=batch) for k, v in alone.items()}
            # alone[...] is [batch, q, <the one-token run's own shape>]
            qv = self._projected(b, alone[f"blocks.{b}.attn.hook_v"][:, :, 0])  # [b, head, q, d]
            qw = alone[f"blocks.{b}.attn.hook_pattern"][:, :, :, 0, 0].transpose(1, 2)  # [b, head, q]
            mlp_res = self._mlp_residual(alone, b)[:, :, 0]
            out.append(AttentionCapture(
                block=b, block_input=x, query_input=query_input,
                pattern=ctx[f"blocks.{b}.attn.hook_pattern"], values=self._projected(b, ctx[f"blocks.{b}.attn.hook_v"]),
                query_values=qv, query_weight=qw, attention=ctx[f"{b}.attn"],
                query_attention=alone[f"{b}.attn"][:, :, 0], mlp_residual=self._mlp_residual(ctx, b),
                query_mlp_residual=mlp_res, mlp_input=ctx[f"{b}.m"], query_mlp_input=alone[f"{b}.m"][:, :, 0],
                output_map=self._output_map(b, x.dtype), mlp_norm=self._mlp_norm(b, x.dtype),
                parallel=bool(self.model.cfg.parallel_attn_mlp)))
        return out


def own_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A private copy of a (small) norm module computing in ``dtype``, without any hook: the path integrals call it
    many times, also after the model's guards are gone, and must never run the user's module or its hooks."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        m._forward_pre_hooks_with_kwargs.clear() if hasattr(m, "_forward_pre_hooks_with_kwargs") else None
        for attr in ("fwd_hooks", "bwd_hooks"):  # TransformerLens HookPoint handles
            if isinstance(getattr(m, attr, None), list):
                setattr(m, attr, [])
    return twin.to(dtype).requires_grad_(False).eval()

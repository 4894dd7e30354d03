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
from contextlib import AbstractContextManager, ExitStack

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
    """The one attention capture for models with TransformerLens hook points (``HookedTransformer``, and the toy
    through :class:`~.toy_extras.ToyAttention`): the with-context forward and each block on its query alone, both read
    through the same hooks. What differs between such models is only where each quantity is read (the ``_``-methods
    a subclass overrides): the values and their output map, the attention output, the MLP's residual and input, and
    the norms T (after attention) and N (before the MLP)."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.model = adapter.model

    @property
    def post_norm(self) -> bool:
        return self.model.cfg.original_architecture in POST_NORM_ARCHITECTURES

    @property
    def parallel(self) -> bool:
        return bool(self.model.cfg.parallel_attn_mlp)

    # -- where each quantity is read ---------------------------------------------------------------------------------

    def _hook_names(self, b: int) -> list[str]:
        p = f"blocks.{b}"
        return [f"{p}.hook_resid_pre", f"{p}.attn.hook_pattern", f"{p}.attn.hook_v",
                *([] if self.parallel else [f"{p}.hook_resid_mid"])]

    def _module_reads(self, b: int) -> list[tuple[nn.Module, str, str]]:
        """``(module, "output" | "input", key)``: what torch hooks save (the attention output, the MLP input)."""
        block = self.model.blocks[b]
        return [(block.attn, "output", f"{b}.attn"), (block.mlp, "input", f"{b}.m")]

    def _exact(self) -> AbstractContextManager:
        return exact_alibi(self.model)

    def _values(self, store: dict[str, Tensor], b: int) -> Tensor:
        return store[f"blocks.{b}.attn.hook_v"]

    def _projected(self, b: int, v: Tensor) -> Tensor:
        """``P^h_j = v^h_j W_O^h``, ``[batch, head, pos, d_model]`` (grouped KV heads repeated as the model does)."""
        attn = self.model.blocks[b].attn
        repeat = attn.W_O.shape[0] // v.shape[2]
        v = torch.repeat_interleave(v, dim=2, repeats=repeat) if repeat > 1 else v
        return einsum(v, attn.W_O.detach().to(v.dtype), "b j h e, h e d -> b h j d")

    def _attention(self, store: dict[str, Tensor], b: int) -> Tensor:
        return store[f"{b}.attn"]

    def _mlp_residual(self, store: dict[str, Tensor], b: int) -> Tensor:
        return store[f"blocks.{b}.hook_resid_pre" if self.parallel else f"blocks.{b}.hook_resid_mid"]

    def _mlp_input(self, store: dict[str, Tensor], b: int) -> Tensor:
        return store[f"{b}.m"]

    def _block_input(self, x: Tensor) -> Tensor:
        """The block input as the residual term sees it (the toy without its attention skip: zeros)."""
        return x

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

    # -- the capture ---------------------------------------------------------------------------------------------

    def _hooks(self, blocks: list[int], store: dict[str, Tensor]) -> ExitStack:
        def save(act: Tensor, hook) -> None:
            store[hook.name] = act.detach()

        def save_torch(key: str, output: bool):
            def hook(module, args, out=None):
                store[key] = (out if output else args[0]).detach()
            return hook

        names = [name for b in blocks for name in self._hook_names(b)]
        torch_hooks = [(module, "fwd" if read == "output" else "pre", save_torch(key, read == "output"))
                       for b in blocks for module, read, key in self._module_reads(b)]
        stack = ExitStack()
        stack.enter_context(self._exact())
        stack.enter_context(self.model.hooks(fwd_hooks=[(n, save) for n in names]))
        stack.enter_context(module_hooks(torch_hooks))
        return stack

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
            # [batch, q, <the one-token run's own shape>]; [:, :, 0] takes the run's one position
            alone = {k: rearrange(v, "(b q) ... -> b q ...", b=batch) for k, v in alone.items()}
            out.append(AttentionCapture(
                block=b, block_input=self._block_input(x), query_input=self._block_input(query_input),
                pattern=ctx[f"blocks.{b}.attn.hook_pattern"], values=self._projected(b, self._values(ctx, b)),
                query_values=self._projected(b, self._values(alone, b)[:, :, 0]),  # [b, head, q, d]
                query_weight=alone[f"blocks.{b}.attn.hook_pattern"][:, :, :, 0, 0].transpose(1, 2),  # [b, head, q]
                attention=self._attention(ctx, b), query_attention=self._attention(alone, b)[:, :, 0],
                mlp_residual=self._mlp_residual(ctx, b), query_mlp_residual=self._mlp_residual(alone, b)[:, :, 0],
                mlp_input=self._mlp_input(ctx, b), query_mlp_input=self._mlp_input(alone, b)[:, :, 0],
                output_map=self._output_map(b, x.dtype), mlp_norm=self._mlp_norm(b, x.dtype), parallel=self.parallel))
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

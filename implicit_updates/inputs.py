"""Turn what a user passes as a prompt into checked model inputs, with errors that say what to do."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def as_model_inputs(adapter, prompt: str | Sequence[str] | Tensor, dtype: torch.dtype) -> Tensor:
    """Token ids ``[batch, pos]`` or residual inputs ``[batch, pos, d_model]`` (cast to ``dtype``), validated."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        rows = [adapter.tokenize(p) for p in prompt]
        if len({len(r) for r in rows}) > 1:
            raise ValueError(
                f"prompts tokenize to different lengths {[len(r) for r in rows]}; padding would change the context, "
                "so decompose them one at a time or pass equal-length token ids")
        prompt = torch.stack(rows)
    if not isinstance(prompt, Tensor):
        raise TypeError(f"prompt must be text, a list of texts, or a tensor, not {type(prompt).__name__}")
    inputs = prompt
    if inputs.device != adapter.device:
        raise ValueError(
            f"the prompt is on {inputs.device} but the model is on {adapter.device}; move it with "
            f"prompt.to({str(adapter.device)!r})")
    if inputs.is_floating_point():
        inputs = inputs[None] if inputs.dim() == 2 else inputs
        if inputs.dim() != 3 or inputs.shape[-1] != adapter.d_model:
            raise ValueError(f"continuous inputs must be [batch, pos, d_model={adapter.d_model}], got "
                             f"{tuple(prompt.shape)}")
        if not torch.isfinite(inputs).all():
            raise ValueError("the continuous inputs contain NaN or Inf")
        inputs = inputs.to(dtype)
    else:
        inputs = inputs[None] if inputs.dim() == 1 else inputs
        if inputs.dim() != 2:
            raise ValueError(f"token ids must be [pos] or [batch, pos], got shape {tuple(prompt.shape)}")
        if inputs.numel() and not (0 <= int(inputs.min()) and int(inputs.max()) < adapter.d_vocab):
            raise ValueError(f"token ids must lie in [0, {adapter.d_vocab}); got {int(inputs.min())}.."
                             f"{int(inputs.max())}")
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (and at least two for any context)")
    if adapter.n_ctx is not None and inputs.shape[1] > adapter.n_ctx:
        raise ValueError(f"the prompt has {inputs.shape[1]} tokens but the model's positions stop at "
                         f"n_ctx={adapter.n_ctx}; shorten it")
    return inputs

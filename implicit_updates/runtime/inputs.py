"""Turn what a user passes as a prompt into checked model inputs, with errors that say what to do."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)  # implicit_updates/, every layer of it


def as_model_inputs(adapter, prompt: str | Sequence[str] | Tensor | np.ndarray, dtype: torch.dtype) -> Tensor:
    """Token ids ``[batch, pos]`` (int64) or residual inputs ``[batch, pos, d_model]`` (cast to ``dtype``), validated.

    A numpy array is taken as a tensor on the model's device; float inputs cast to a less precise ``dtype`` (float64
    into a float32 model) warn, since the decomposition then describes other inputs than the ones given.
    """
    if isinstance(prompt, np.ndarray):
        prompt = _from_numpy(prompt, adapter.device)
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        rows = [_tokenize(adapter, p) for p in prompt]
        if len({len(r) for r in rows}) > 1:
            raise ValueError(
                f"prompts tokenize to different lengths {[len(r) for r in rows]}; padding would change the context, "
                "so decompose them one at a time or pass equal-length token ids")
        prompt = torch.stack(rows)
    if not isinstance(prompt, Tensor):
        raise TypeError(f"prompt must be text, a list of texts, a tensor or a numpy array, not {type(prompt).__name__}")
    inputs = prompt
    if inputs.device != adapter.device:
        raise ValueError(
            f"the prompt is on {inputs.device} but the model is on {adapter.device}; move it with "
            f"prompt.to({str(adapter.device)!r})")
    if inputs.dtype == torch.bool or inputs.is_complex():
        raise TypeError(f"a {inputs.dtype} prompt is neither token ids (integers) nor continuous inputs (floats)")
    if inputs.is_floating_point():
        inputs = inputs[None] if inputs.dim() == 2 else inputs
        if inputs.dim() != 3 or inputs.shape[-1] != adapter.d_model:
            raise ValueError(f"continuous inputs must be [batch, pos, d_model={adapter.d_model}], got "
                             f"{tuple(prompt.shape)}")
        if not torch.isfinite(inputs).all():
            raise ValueError("the continuous inputs contain NaN or Inf")
        if torch.finfo(inputs.dtype).eps < torch.finfo(dtype).eps:
            warn_outside(f"the prompt is {_name(inputs.dtype)} but the computation runs in {_name(dtype)}: it is "
                         f"rounded to {_name(dtype)}; pass dtype=torch.{_name(inputs.dtype)} to keep its precision, "
                         f"or a {_name(dtype)} prompt to silence this")
        inputs = inputs.to(dtype)
    else:
        inputs = inputs[None] if inputs.dim() == 1 else inputs
        if inputs.dim() != 2:
            raise ValueError(f"token ids must be [pos] or [batch, pos], got shape {tuple(prompt.shape)}")
        if inputs.numel() and not (0 <= int(inputs.min()) and int(inputs.max()) < adapter.d_vocab):
            raise ValueError(f"token ids must lie in [0, {adapter.d_vocab}); got {int(inputs.min())}.."
                             f"{int(inputs.max())}")
        inputs = inputs.long()  # uint8 would index as a boolean mask; int32 is not every embedding's index type
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (and at least two for any context)")
    if adapter.n_ctx is not None and inputs.shape[1] > adapter.n_ctx:
        raise ValueError(f"the prompt has {inputs.shape[1]} tokens but the model's positions stop at "
                         f"n_ctx={adapter.n_ctx}; shorten it")
    return inputs


def _from_numpy(array: np.ndarray, device: torch.device) -> Tensor:
    """Integer arrays are token ids (int64), float arrays continuous inputs (their dtype kept until the cast)."""
    if array.dtype.kind in "iu":
        return torch.from_numpy(array.astype(np.int64)).to(device)
    if array.dtype.kind == "f":
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)
    raise TypeError(f"a numpy prompt must hold token ids (integers) or continuous inputs (floats), not {array.dtype}")


def _tokenize(adapter, text: str) -> Tensor:
    """Token ids of ``text``; text that is empty or tokenizes to special tokens only (BOS alone) has no prompt."""
    if not text:
        raise ValueError("the prompt is empty: give some text (at least two tokens for any context)")
    ids = adapter.tokenize(text)
    tokenizer = getattr(getattr(adapter, "model", None), "tokenizer", None)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    if special and all(int(i) in special for i in ids):
        raise ValueError(f"the prompt {text!r} is empty: it tokenizes to special tokens only ({ids.tolist()}, "
                         "e.g. BOS); give some text")
    return ids


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def warn_outside(message: str) -> None:
    """A UserWarning attributed to the first caller outside this package (and contextlib), i.e. the user's call."""
    frame, level = sys._getframe(1), 2
    while frame is not None and (frame.f_code.co_filename.startswith(PACKAGE_DIR)
                                 or Path(frame.f_code.co_filename).name == "contextlib.py"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)

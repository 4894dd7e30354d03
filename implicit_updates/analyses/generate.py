"""``generate(model, prompt, max_new_tokens)``: greedy generation by the full model, with the whole context so far
absorbed into the weights at every step, and the absorbed model run on the last token alone.

This is the protocol of Goldwaser, Munn, Gonzalvo & Dherin 2025 (the patches recomputed for every generated
token), made incremental: a step's decomposition needs only the new token's with-context activations, which one
KV-cached step of the full model gives (the context's keys and values are reused, never recomputed), and each
block's run on the query alone, which one forward of the token alone gives, the absorbed model's own forward
(``adapter.run_absorbing``). The updates are the multi-block ones of ``absorb`` (Innocenti & Achour 2025): block
0 starts from the token's own embedding at position 0 and block l reads what the patched blocks before it output.
The unpatched model on the token alone (the control) runs in the same batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from implicit_updates.adapters.base import require
from implicit_updates.analyses.decompose import decompose_captures, prepared, untouched
from implicit_updates.capture import BlockCapture
from implicit_updates.math import core
from implicit_updates.math.core import ZeroQueryNormError, kl_divergence
from implicit_updates.math.updates import BlockUpdate


@dataclass(frozen=True)
class GenerationStep:
    """One step: the full model's greedy token at ``position`` (the query's position in the history) against the
    absorbed model's and the unpatched control's logits on the query token alone."""

    position: int
    token: int
    absorbed_token: int
    agree: bool
    max_abs_logit_diff: float
    kl: float  # KL(full || absorbed)
    control_max_abs_logit_diff: float | None  # None: generated with control=False
    control_kl: float | None  # KL(full || control)
    max_rel_block_err: float  # the worst block output of the absorbed model vs with context (relative)
    seconds: float


@dataclass(frozen=True)
class Generation:
    """Greedy generation with the context absorbed at every step; ``to_dict()`` is the CLI's JSON."""

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]  # the full model's greedy tokens, one per step
    steps: tuple[GenerationStep, ...]
    dtype: str
    backend: str
    text: str | None  # the generated tokens decoded (None without a tokenizer)
    model: str | None = None
    logits: tuple[Tensor, ...] | None = None  # per step [3 or 2, d_vocab]: full, absorbed, control (``keep_logits``)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def agree(self) -> int:
        """Steps whose absorbed top-1 token is the full model's."""
        return sum(s.agree for s in self.steps)

    @property
    def max_abs_logit_diff(self) -> float:
        return max(s.max_abs_logit_diff for s in self.steps)

    @property
    def max_rel_block_err(self) -> float:
        return max(s.max_rel_block_err for s in self.steps)

    @property
    def min_control_abs_logit_diff(self) -> float | None:
        values = [s.control_max_abs_logit_diff for s in self.steps if s.control_max_abs_logit_diff is not None]
        return min(values) if values else None

    def summary(self) -> dict:
        """The summary row: agreement, the largest absorbed error and the smallest control distance, time."""
        return {"model": self.model, "dtype": self.dtype, "backend": self.backend, "agree": self.agree,
                "n_steps": self.n_steps, "max_abs_logit_diff": self.max_abs_logit_diff,
                "max_kl": max(s.kl for s in self.steps), "max_rel_block_err": self.max_rel_block_err,
                "min_control_max_abs_logit_diff": self.min_control_abs_logit_diff,
                "seconds": sum(s.seconds for s in self.steps)}

    def to_dict(self) -> dict:
        steps = [asdict(s) for s in self.steps]
        return {"model": self.model, "dtype": self.dtype, "backend": self.backend, "agree": self.agree,
                "n_steps": self.n_steps, "max_abs_logit_diff": self.max_abs_logit_diff,
                "prompt": list(self.prompt), "tokens": list(self.tokens), "text": self.text,
                "summary": self.summary(), "steps": steps}

    def plot(self, ax=None, path: str | None = None):
        """Per step: the absorbed model's and the control's max |logit diff| from the full model (log scale)."""
        from implicit_updates.views.plots import generation_steps

        return generation_steps(self.to_dict(), ax=ax, path=path)

    def __repr__(self) -> str:
        from implicit_updates.views.html import generation_repr

        return generation_repr(self.to_dict())

    def _repr_html_(self) -> str:
        from implicit_updates.views.html import generation_html

        return generation_html(self.to_dict())


def generate(model: nn.Module, prompt: str | Sequence[int] | Tensor, max_new_tokens: int = 20,
             dtype: torch.dtype | str | None = None, progress: bool | None = None,
             name: str | None = None, keep_logits: bool = False, control: bool = True) -> Generation:
    """Greedy generation by ``model``; at each step the whole context so far is absorbed into its weights (the
    updates of ``absorb``) and the absorbed model runs the last token alone, compared with the full model.

    Each step costs one KV-cached step of the full model and one forward of the token alone (absorbed and control
    rows in one batch), computed in ``dtype`` (the model's by default; half precision computes in float32). The
    user's model is left bit-identical, without hooks, in its mode. ``name`` labels the result (the CLI's model);
    ``keep_logits`` keeps each step's logit vectors (``Generation.logits``). ``control=False`` leaves out the
    unpatched model on the token (its distances are then None): a step is then one cached step and one forward of
    the token alone.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
    with prepared(model, prompt, None, dtype) as (adapter, _, inputs):
        require(adapter, "generation")
        if inputs.is_floating_point() or inputs.shape[0] != 1:
            raise ValueError("generate takes one prompt of token ids or text (batch 1), not continuous inputs or a "
                             "batch: call it once per prompt")
        limit = getattr(adapter, "n_ctx", None)
        if limit is not None and inputs.shape[1] + max_new_tokens - 1 > limit:
            raise ValueError(f"the prompt ({inputs.shape[1]} tokens) and {max_new_tokens} new tokens exceed the "
                             f"model's {limit} positions: ask for at most {limit - inputs.shape[1] + 1} tokens")
        steps, tokens, logits = [], [], []
        history = inputs
        targets: dict[int, Tensor] = {}  # each block's with-context output, from the capture its update came from

        def update_for(capture: BlockCapture) -> BlockUpdate:
            targets[capture.block] = capture.output[0, -1]
            return _update(capture)

        with untouched(adapter.model):
            start = time.perf_counter()
            context, full, cache = adapter.cached_step(inputs, None)
            for step in tqdm(range(max_new_tokens), desc="generate", disable=not progress, leave=False):
                targets.clear()
                try:
                    both, outputs = adapter.run_absorbing(history[:, -1:], context, update_for, control)
                except ZeroQueryNormError as err:
                    raise ZeroQueryNormError(f"step {step} (token {int(history[0, -1])} at position "
                                             f"{history.shape[1] - 1}): {err}") from err
                token = int(full[0].argmax())
                target = torch.stack([targets[b] for b in range(adapter.n_blocks)])
                steps.append(_step(history.shape[1] - 1, token, full[0], both[0], both[1] if control else None,
                                   float(core.relative_errors(outputs, target).max()), time.perf_counter() - start))
                tokens.append(token)
                if keep_logits:
                    logits.append(torch.stack([full[0], *both]))
                history = torch.cat([history, history.new_tensor([[token]])], dim=1)
                start = time.perf_counter()
                if step + 1 < max_new_tokens:
                    context, full, cache = adapter.cached_step(history[:, -1:], cache)
    decode = getattr(getattr(adapter.user_model, "tokenizer", None), "decode", None)
    return Generation(tuple(inputs[0].tolist()), tuple(tokens), tuple(steps),
                      str(adapter.compute_dtype).removeprefix("torch."), adapter.backend,
                      decode(tokens) if decode else None, name, tuple(logits) if keep_logits else None)


def _update(capture: BlockCapture) -> BlockUpdate:
    return decompose_captures([capture])[0]


def _step(position: int, token: int, full: Tensor, absorbed: Tensor, control: Tensor | None, block_err: float,
          seconds: float) -> GenerationStep:
    logp = {name: torch.log_softmax(t.double(), -1) for name, t in
            (("full", full), ("absorbed", absorbed), ("control", control)) if t is not None}
    return GenerationStep(
        position=position, token=token, absorbed_token=int(absorbed.argmax()),
        agree=bool(int(absorbed.argmax()) == token),
        max_abs_logit_diff=float((absorbed - full).abs().max()), kl=kl_divergence(logp["full"], logp["absorbed"]),
        control_max_abs_logit_diff=None if control is None else float((control - full).abs().max()),
        control_kl=None if control is None else kl_divergence(logp["full"], logp["control"]),
        max_rel_block_err=block_err, seconds=seconds)

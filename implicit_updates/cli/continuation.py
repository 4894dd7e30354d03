"""``implicit-updates absorb --continuation TEXT [--lora DIR]``: the prompt absorbed into a rank-K update per block,
exact on the K continuation tokens (:func:`implicit_updates.analyses.continuation.absorb_continuation`), optionally
written as a PEFT LoRA adapter. Without ``--continuation`` the ``absorb`` command is the one-token absorption
(``cli/commands.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
from pathlib import Path

import torch

from implicit_updates.cli.common import UsageError, load, parse_prompt, token_ids, token_labels, write_json


def check_lora_dir(path: str | None) -> None:
    """Before any work: ``--lora`` is a directory we can write (created if absent, in an existing folder), and peft
    is installed."""
    if path is None:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"--lora {path} is a file: give a directory (it is created if absent)")
    folder = target if target.is_dir() else target.parent
    if not folder.is_dir():
        raise UsageError(f"--lora {path}: the folder {folder} does not exist; create it or choose another")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write --lora {path}: {folder} is not writable")
    if importlib.util.find_spec("peft") is None:
        from implicit_updates.analyses.lora import PEFT_INSTALL

        raise UsageError(f"--lora writes a PEFT adapter and needs peft: {PEFT_INSTALL}")


def parse_continuation(model, text: str) -> torch.Tensor:
    """``[1, K]`` token ids: comma-separated integers, or text tokenized without special tokens (no BOS)."""
    device = next(model.parameters()).device
    ids = token_ids(text, device)
    if ids is not None:
        return ids
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UsageError(f"this model has no tokenizer and {text!r} is not a list of token ids: give --continuation "
                         "as comma-separated integers")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise UsageError(f"--continuation {text!r} has no tokens")
    return ids


def _finite(values: list[float]) -> list[float | None]:
    """JSON has no infinity: a condition number that does not exist (K = 1 through a bias) is null."""
    return [v if math.isfinite(v) else None for v in values]


def cmd_absorb_continuation(args: argparse.Namespace) -> int:
    from implicit_updates.adapters import adapter_for
    from implicit_updates.analyses.continuation import absorb_continuation
    from implicit_updates.analyses.decompose import untouched
    from implicit_updates.analyses.lora import hf_model_of
    from implicit_updates.runtime.precision import computed_in

    if args.continuation is None:
        raise UsageError("--lora needs --continuation: the LoRA holds the update built for those tokens")
    if not args.continuation.strip():
        raise UsageError("--continuation is empty: give text or comma-separated token ids")
    check_lora_dir(args.lora)
    model = load(args)
    if args.lora:
        hf_model_of(model)  # a HookedTransformer has no Hugging Face modules to attach a LoRA to: say so now
    prompt = parse_prompt(model, args.prompt, args.seq_len, args.seed)
    adapter = adapter_for(model)
    prefix = adapter.tokenize(prompt)[None] if isinstance(prompt, str) else prompt
    continuation = parse_continuation(model, args.continuation)
    start = time.perf_counter()
    absorbed = absorb_continuation(model, prefix, continuation, dtype=args.dtype,
                                   output="matrix" if args.lora else "auto")
    full, patched = absorbed.full_logits, absorbed.patched_logits()
    report = absorbed.report(patched)
    with untouched(model), computed_in(model, absorbed.dtype):
        control = adapter.logits(absorbed.continuation)[0].to(absorbed.dtype)
    seconds = time.perf_counter() - start
    k = continuation.shape[1]
    tokens = token_labels(model, absorbed.continuation[0])
    print(f"{args.model}: prompt of {prefix.shape[1]} tokens absorbed; continuation of {k} tokens run alone")
    print(f"{'pos':>4}  {'token':>14}  {'full top-1':>14}  {'absorbed top-1':>14}  {'control top-1':>14}  "
          f"{'|logit diff|':>12}")
    for i in range(k):
        top = token_labels(model, torch.stack([full[i].argmax(), patched[i].argmax(), control[i].argmax()]))
        print(f"{i:>4}  {tokens[i]:>14}  {top[0]:>14}  {top[1]:>14}  {top[2]:>14}  "
              f"{float((patched[i] - full[i]).abs().max()):>12.3e}")
    print(f"{'block':>5}  {'rank':>4}  {'cond MLP inputs':>15}  {'cond hidden':>11}")
    for b, block in enumerate(absorbed.blocks):
        print(f"{b:>5}  {block.rank:>4}  {block.cond_mlp_input:>15.3g}  {block.cond_hidden:>11.3g}")
    control_diff = float((control - full).abs().max())
    print(f"absorbed: max |logit diff| {report['max_abs_logit_diff']:.3e} over {k} positions, top-1 agrees at all: "
          f"{report['top1_agree']}; control (unpatched, continuation alone): max |logit diff| {control_diff:.3e} "
          f"({seconds:.2f} s)")
    if args.lora:
        absorbed.save_lora(args.lora)
        print(f"wrote the LoRA adapter to {args.lora} (peft.PeftModel.from_pretrained(base_model, {args.lora!r}))")
    write_json(args.json, {
        "model": args.model, "dtype": str(absorbed.dtype).removeprefix("torch."),
        "prompt_tokens": prefix[0].tolist(), "continuation_tokens": continuation[0].tolist(),
        "max_abs_logit_diff": report["max_abs_logit_diff"], "top1_agree": report["top1_agree"],
        "top1_agree_control": bool((control.argmax(-1) == full.argmax(-1)).all()),
        "max_abs_logit_diff_control": control_diff, "rank": report["rank"],
        "cond_mlp_input": _finite(report["cond_mlp_input"]), "cond_hidden": _finite(report["cond_hidden"]),
        "lora": args.lora, "seconds": seconds})
    return 0

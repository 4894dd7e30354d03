"""What every command shares: refusing a bad command line before any work, parsing prompts and token ids,
loading the model, writing JSON."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch


class UsageError(Exception):
    """A command line the CLI refuses before computing anything; the message says what to do."""


def check_writable(path: str | None, option: str) -> None:
    """Fail before minutes of work, not after: ``path`` must be a file we can write in an existing folder."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{option} {path} is a directory: give a file name")
    if not target.parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {target.parent} does not exist; create it or choose another")
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as err:
        raise UsageError(f"cannot write {option} {path}: {err.strerror or err}") from err
    if not existed:
        target.unlink()  # a failed run leaves no empty file behind


def parse_prompt(model, prompt: str | None, seq_len: int, seed: int) -> str | torch.Tensor:
    """Text, a comma list of token ids (``"1,2,3"``), or ``seq_len`` random token ids when no prompt is given."""
    from implicit_updates.adapters import adapter_for

    device = next(model.parameters()).device
    if prompt is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, adapter_for(model).d_vocab, (1, seq_len), generator=gen).to(device)
    if not prompt.strip():
        raise UsageError("--prompt is empty: give text or comma-separated token ids (two or more for a context)")
    ids = token_ids(prompt, device)  # range-checked by decompose against the vocabulary
    if ids is not None:
        return ids
    if getattr(model, "tokenizer", None) is None:
        raise UsageError(f"this model has no tokenizer and {prompt!r} is not a list of token ids: give --prompt as "
                         f"comma-separated integers in [0, {adapter_for(model).d_vocab}), or use --seq-len")
    return prompt


def token_ids(text: str, device) -> torch.Tensor | None:
    """``[1, n]`` ids when ``text`` is a comma list of integers (``"1,2,3"``), else None (text to tokenize)."""
    parts = [p.strip() for p in text.split(",")]
    if all(re.fullmatch(r"[+-]?\d+", p) for p in parts):
        return torch.tensor([[int(p) for p in parts]], device=device)
    return None


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def load(args: argparse.Namespace):
    """Check the output paths and the device, then load the model: bad options fail before any loading."""
    from implicit_updates.models import check_device, load_model

    check_writable(args.json, "--json")
    check_writable(getattr(args, "plot", None), "--plot")
    try:
        check_device(args.device)
    except ValueError as err:
        raise UsageError(f"--device {args.device}: {err}") from err
    return load_model(args.model, device=args.device, seed=args.seed, backend=args.backend,
                      dtype=getattr(args, "load_dtype", "float32"))


def token_labels(model, ids: torch.Tensor) -> list[str]:
    """Each token id as its text where the model has a tokenizer (``repr``-quoted), else the id itself."""
    decode = getattr(getattr(model, "tokenizer", None), "decode", None)
    return [repr(decode([i])) if decode else str(i) for i in ids.tolist()]

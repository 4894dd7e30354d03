"""Absorbed generation on real models: the anchors' protocol (every step absorbed, greedy), and its cost against
plain KV-cached greedy generation of the same model in the same dtype.

    python benchmarks/generation.py [--model smollm2-135m --model gemma-3-270m ...] [--dtype float64]
        [--load-dtype bfloat16] [--steps 20] [--prompts 5] [--backend hf|bridge] [--json PATH]

For each model (``stories260k``, the team's ../shared copy; a ``implicit_updates.models.pretrained`` name; or a local
Hugging Face directory), loaded in ``--load-dtype`` (default: ``--dtype``; a model held in another dtype computes in
``--dtype`` module by module, both runs alike), ``implicit_updates.generate`` runs ``--steps`` greedy steps on each
of the first ``--prompts`` of :data:`PROMPTS`:

- ``agree`` / ``n_steps``: steps whose absorbed top-1 token is the full model's; ``max_abs_logit_diff`` (absorbed vs
  full, over every step), ``max_rel_block_err`` (the worst block output of the absorbed model vs with context),
  ``min_control_abs_logit_diff`` (the unpatched control's smallest distance), ``wall_s`` (all the generations).
- ``cached_step_s``: the median over the first prompt's steps, measured before and after the generations, of the
  model's own KV-cached forward on the new token (``model(input_ids=token, cache=..., use_cache=True)``, no hooks),
  after the prompt's forward;
- ``absorbed_step_s``: the median step of ``generate(..., control=False)`` on the same prompt: its KV-cached step
  recording every block's with-context quantities, every block's update, and the absorbed model's forward of the
  token alone; ``ratio_absorbed_step_vs_cached_step``: its ratio to ``cached_step_s`` (target: at most 3);
- ``absorbed_step_with_control_s`` and ``ratio_with_control``: the same with the unpatched control as a second row of
  that forward (the steps of the table's generations). A control is one more forward of the token, so with it a step
  costs about three one-token forwards; in float64 on CPU a two-row product costs about twice a one-row one;
- ``same_tokens``: whether ``generate``'s greedy tokens are the plain generation's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch

import implicit_updates as iu
from implicit_updates.adapters.hf_cache import cache_kwarg
from implicit_updates.cli.common import write_json
from implicit_updates.models import pretrained
from implicit_updates.models.loading import load_local
from implicit_updates.runtime.precision import computed_in

STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K"
PROMPTS = (
    "Once upon a time, there was a little girl named Lily. She",
    "def fibonacci(n):\n    ",
    "The capital of France is Paris. The capital of Italy is",
    "Question: What is 12 plus 7?\nAnswer:",
    "The quick brown fox jumps over the lazy dog. The quick brown",
)
TARGET = "target: an absorbed step at most 3x a KV-cached step"


def load(name: str, backend: str, dtype: torch.dtype):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name == "stories260k":
        return load_local(STORIES, backend, dtype=dtype)
    if name in pretrained.MODELS:
        return pretrained.load_pretrained(name, backend=backend, dtype=dtype)
    return load_local(Path(name), backend, dtype=dtype)


def cached_steps(model, ids: torch.Tensor, steps: int, dtype: torch.dtype) -> tuple[list[int], list[float]]:
    """Plain greedy generation with the model's own KV cache: the tokens and each step's seconds (the prompt's
    forward not counted)."""
    hf = getattr(model, "original_model", model)  # a TransformerBridge runs the model it wraps
    tokens, times = [], []
    with torch.no_grad(), computed_in(hf, dtype) if next(hf.parameters()).dtype != dtype else contextlib.nullcontext():
        out = hf(input_ids=ids, use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            start = time.perf_counter()
            out = hf(input_ids=token, use_cache=True, **{cache_kwarg(hf): out.past_key_values})
            times.append(time.perf_counter() - start)
    return tokens, times


def row(name: str, backend: str, dtype: torch.dtype, load_dtype: torch.dtype, steps: int, prompts: list[str]
        ) -> dict:
    model = load(name, backend, load_dtype)
    ids = [model.tokenizer(p, return_tensors="pt").input_ids for p in prompts]
    iu.generate(model, ids[0], 2, dtype=dtype)  # warm-up
    _, before = cached_steps(model, ids[0], steps, dtype)
    start = time.perf_counter()
    gens = [iu.generate(model, i, steps, dtype=dtype, name=name) for i in ids]
    wall = time.perf_counter() - start
    alone = iu.generate(model, ids[0], steps, dtype=dtype, control=False)
    tokens, after = cached_steps(model, ids[0], steps, dtype)
    absorbed = statistics.median(s.seconds for s in alone.steps[1:])  # step 0 includes the prompt's forward
    with_control = statistics.median(s.seconds for s in gens[0].steps[1:])
    cached = statistics.median(before + after)
    return {"model": name, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
            "load_dtype": str(load_dtype).removeprefix("torch."), "prompts": len(prompts),
            "n_steps": sum(g.n_steps for g in gens), "agree": sum(g.agree for g in gens),
            "max_abs_logit_diff": max(g.max_abs_logit_diff for g in gens),
            "max_rel_block_err": max(g.max_rel_block_err for g in gens),
            "min_control_abs_logit_diff": min(g.min_control_abs_logit_diff for g in gens), "wall_s": wall,
            "same_tokens": list(gens[0].tokens) == tokens, "cached_step_s": cached, "absorbed_step_s": absorbed,
            "ratio_absorbed_step_vs_cached_step": absorbed / cached, "absorbed_step_with_control_s": with_control,
            "ratio_with_control": with_control / cached, "texts": [g.text for g in gens]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="stories260k, a pretrained name or a local directory "
                        "(repeatable; default: smollm2-135m and gemma-3-270m)")
    parser.add_argument("--backend", default="hf", choices=("hf", "bridge"))
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    parser.add_argument("--load-dtype", default=None, choices=("float32", "float64", "bfloat16", "float16"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=5, choices=range(1, len(PROMPTS) + 1),
                        help=f"how many of the {len(PROMPTS)} prompts (default all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    load_dtype = getattr(torch, args.load_dtype or args.dtype)
    rows = []
    for name in args.model or ["smollm2-135m", "gemma-3-270m"]:
        r = row(name, args.backend, dtype, load_dtype, args.steps, list(PROMPTS[:args.prompts]))
        rows.append(r)
        print(f"{r['model']:>20} {r['dtype']:>8}: {r['agree']}/{r['n_steps']} agree, max |logit diff| "
              f"{r['max_abs_logit_diff']:.2e}, block {r['max_rel_block_err']:.1e} (control >= "
              f"{r['min_control_abs_logit_diff']:.2f}), {r['wall_s']:.0f} s; same tokens {r['same_tokens']}; step "
              f"{r['absorbed_step_s'] * 1e3:.1f} ms absorbed vs "
              f"{r['cached_step_s'] * 1e3:.1f} ms cached = {r['ratio_absorbed_step_vs_cached_step']:.2f}x "
              f"({r['ratio_with_control']:.2f}x with the control)")
    print(TARGET)
    payload = {"rows": rows, "threads": torch.get_num_threads(), "target": TARGET}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()

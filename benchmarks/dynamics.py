"""Prefix dynamics in one pass vs one forward and vs the naive way (one decompose per prefix).

    python benchmarks/dynamics.py [--n 64 --n 128 ...] [--naive-budget-s 240] [--chunk-size 64] [--json PATH]
        [--backend hooked|hf|bridge] [--model random:gpt2-small|stories260k|smollm2-135m|PATH] [--dtype float64]

For each N (default 64, 128, 256, 512) on the model (default ``random_model("gpt2-small")``, random init, float32,
CPU, as a HookedTransformer; ``--backend hf|bridge`` with ``--model stories260k`` (the team's ../shared copy), a
``implicit_updates.models.pretrained`` name or a local directory: loaded in ``--dtype``, so nothing is upcast per call)
with N + 1 seeded random tokens (N context tokens and the query):

- ``forward_s``: one plain forward on the N + 1 tokens, ``model(tokens)`` (logits; best of 2 after a warm-up; an
  HF model without its KV cache).
- ``onepass_s``: ``prefix_decomposition(model, tokens, dtype)``, every block's update for all N prefixes (best of
  2).
- ``naive_s``: ``prefix_decomposition(model, tokens, method="naive")``, one ``decompose`` per prefix (one run).
  It runs only while the budget lasts: an N is skipped (null) when the last measured naive time scaled by
  ``(N / N_last)^2`` exceeds what is left of ``--naive-budget-s``. Nothing is extrapolated into the table.
- ``max_rel_diff_vs_naive``: the largest relative difference between the two results over every factor, output
  correction, query input and target (in ``--dtype`` both; null where naive was skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time
import warnings
from pathlib import Path

import torch

from implicit_updates.analyses.dynamics import max_relative_difference, prefix_decomposition
from implicit_updates.cli.common import write_json
from implicit_updates.models import pretrained, random_model
from implicit_updates.models.loading import load_local

STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K"
BACKENDS = ("hooked", "hf", "bridge")
SIZES = (64, 128, 256, 512)
TARGET = "target: onepass <= 3x one forward at N = 512"


def best_of(fn, repeats: int = 2) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def load(name: str, backend: str, dtype: torch.dtype, seed: int):
    """The benchmarked model: ``random:<preset>`` (HookedTransformer only), ``stories260k``, a pretrained name or a
    local directory, as ``backend`` in ``dtype``."""
    if name.startswith("random:"):
        if backend != "hooked":
            raise SystemExit("random models are HookedTransformers: use --backend hooked or a --model to load")
        return random_model(name.removeprefix("random:"), seed=seed).to(dtype)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with contextlib.redirect_stdout(io.StringIO()):
        if name in pretrained.MODELS:
            return pretrained.load_pretrained(name, backend, dtype=dtype)
        return load_local(STORIES if name == "stories260k" else name, backend, dtype=dtype)


def forward(model, backend: str):
    """One plain forward (logits), as the model's own framework runs it."""
    if backend == "hf":
        return lambda t: model(input_ids=t, use_cache=False)
    return lambda t: model(t)


def run(sizes, naive_budget_s: float, chunk_size: int, seed: int = 0, model_name: str = "random:gpt2-small",
        backend: str = "hooked", dtype: torch.dtype = torch.float32) -> list[dict]:
    model = load(model_name, backend, dtype, seed)
    plain = forward(model, backend)
    vocab = model.cfg.d_vocab if hasattr(model, "cfg") else model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        plain(torch.randint(0, vocab, (1, 8), generator=gen))  # warm-up
    rows, spent, last = [], 0.0, None
    for n in sizes:
        tokens = torch.randint(0, vocab, (1, n + 1), generator=gen)
        with torch.no_grad():
            forward_s, _ = best_of(lambda t=tokens: plain(t))
        onepass_s, one = best_of(lambda t=tokens: prefix_decomposition(model, t, dtype=dtype, chunk_size=chunk_size))
        naive_s = diff = None
        predicted = 0.0 if last is None else last[1] * (n / last[0]) ** 2
        if naive_budget_s > 0 and spent + predicted <= naive_budget_s:
            start = time.perf_counter()
            naive = prefix_decomposition(model, tokens, dtype=dtype, method="naive")
            naive_s = time.perf_counter() - start
            spent += naive_s
            last = (n, naive_s)
            diff = max_relative_difference(one, naive)
        row = {"n": n, "forward_s": forward_s, "onepass_s": onepass_s, "naive_s": naive_s,
               "ratio_onepass_forward": onepass_s / forward_s,
               "ratio_naive_onepass": None if naive_s is None else naive_s / onepass_s,
               "max_rel_diff_vs_naive": diff}
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    def f(x, spec):
        return f"{'null':>{spec.split('.')[0]}}" if x is None else format(x, spec)

    return (f"{r['n']:>5}  {r['forward_s']:9.3f}  {r['onepass_s']:9.3f}  {f(r['naive_s'], '9.2f')}  "
            f"{r['ratio_onepass_forward']:16.2f}  {f(r['ratio_naive_onepass'], '14.1f')}  "
            f"{f(r['max_rel_diff_vs_naive'], '12.2e')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, action="append", help="context length N (repeatable); default 64..512")
    parser.add_argument("--naive-budget-s", type=float, default=240.0)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--backend", choices=BACKENDS, default="hooked")
    parser.add_argument("--model", default="random:gpt2-small",
                        help="random:<preset> (hooked), stories260k, a pretrained name or a local directory")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
    print(f"{args.model} ({args.backend}), {args.dtype}, {torch.get_num_threads()} threads; {TARGET}")
    print(f"{'n':>5}  {'forward_s':>9}  {'onepass_s':>9}  {'naive_s':>9}  {'onepass/forward':>16}  "
          f"{'naive/onepass':>14}  {'max rel diff':>12}")
    rows = run(sorted(args.n or SIZES), args.naive_budget_s, args.chunk_size, args.seed, args.model, args.backend,
               dtype)
    write_json(args.json, {"model": args.model, "backend": args.backend, "dtype": args.dtype,
                           "threads": torch.get_num_threads(), "chunk_size": args.chunk_size, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

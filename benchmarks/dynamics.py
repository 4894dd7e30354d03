"""Prefix dynamics in one pass vs one forward and vs the naive way (one decompose per prefix), on GPT-2 small's shapes.

    python benchmarks/dynamics.py [--n 64 --n 128 ...] [--naive-budget-s 240] [--chunk-size 64] [--json PATH]

For each N (default 64, 128, 256, 512) on ``random_model("gpt2-small")`` (random init, float32, CPU) with N + 1
seeded random tokens (N context tokens and the query):

- ``forward_s``: one plain forward on the N + 1 tokens, ``model(tokens)`` (logits; best of 2 after a warm-up).
- ``onepass_s``: ``prefix_decomposition(model, tokens)``, every block's update for all N prefixes (best of 2).
- ``naive_s``: ``prefix_decomposition(model, tokens, method="naive")``, one ``decompose`` per prefix (one run).
  It runs only while the budget lasts: an N is skipped (null) when the last measured naive time scaled by
  ``(N / N_last)^2`` exceeds what is left of ``--naive-budget-s``. Nothing is extrapolated into the table.
- ``max_rel_diff_vs_naive``: the largest relative difference between the two results over every factor, output
  correction, query input and target (float32 both; null where naive was skipped).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from implicit_updates.analyses.dynamics import max_relative_difference, prefix_decomposition
from implicit_updates.cli.common import write_json
from implicit_updates.models import random_model

SIZES = (64, 128, 256, 512)
TARGET = "target: onepass <= 3x one forward at N = 512"


def best_of(fn, repeats: int = 2) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run(sizes, naive_budget_s: float, chunk_size: int, seed: int = 0) -> list[dict]:
    model = random_model("gpt2-small", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(torch.randint(0, model.cfg.d_vocab, (1, 8), generator=gen))  # warm-up
    rows, spent, last = [], 0.0, None
    for n in sizes:
        tokens = torch.randint(0, model.cfg.d_vocab, (1, n + 1), generator=gen)
        with torch.no_grad():
            forward_s, _ = best_of(lambda t=tokens: model(t))
        onepass_s, one = best_of(lambda t=tokens: prefix_decomposition(model, t, chunk_size=chunk_size))
        naive_s = diff = None
        predicted = 0.0 if last is None else last[1] * (n / last[0]) ** 2
        if naive_budget_s > 0 and spent + predicted <= naive_budget_s:
            start = time.perf_counter()
            naive = prefix_decomposition(model, tokens, method="naive")
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
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
    print(f"random gpt2-small, float32, {torch.get_num_threads()} threads; {TARGET}")
    print(f"{'n':>5}  {'forward_s':>9}  {'onepass_s':>9}  {'naive_s':>9}  {'onepass/forward':>16}  "
          f"{'naive/onepass':>14}  {'max rel diff':>12}")
    rows = run(sorted(args.n or SIZES), args.naive_budget_s, args.chunk_size, args.seed)
    write_json(args.json, {"model": "random:gpt2-small", "dtype": "float32", "threads": torch.get_num_threads(),
                           "chunk_size": args.chunk_size, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

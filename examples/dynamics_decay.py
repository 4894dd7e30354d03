"""Step norms of the implicit update as the context grows, on the in-context regression transformer (offline).

    python examples/dynamics_decay.py [--steps 600] [--lr 0.01] [--prompts 16] [--n-context 40]

Trains ``icl.regression_transformer()`` (5 Pre-LN blocks on R^3 tokens ``[x_i; y_i]``) briefly on in-context linear
regression, then for ``--prompts`` test prompts ``[c_1..c_N, x]`` computes, in one pass per prompt (float64),
every block's update for every prefix ``[c_1..c_i, x]`` and the step norms ``||dW_{i+1} - dW_i||_F`` (Dherin et al.
2025 Prop. 3.1). Plots mean ± standard error over prompts per block (``examples/figures/dynamics_decay.png``) and
writes the curves to ``examples/figures/dynamics_decay.json``. One prompt is also computed the naive way (one
``decompose`` per prefix) as a check. The same plot for GPT-2, online:

    implicit-updates dynamics --model gpt2 --dtype float64 --plot gpt2_decay.png \\
        --prompt "France: Paris. Japan: Tokyo. Italy: Rome. Spain: Madrid. Germany: Berlin. Egypt: Cairo. Peru:"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from implicit_updates.analyses.dynamics import prefix_decomposition, prefix_dynamics
from implicit_updates.experiments import icl
from implicit_updates.views import plots

FIGURES = Path(__file__).parent / "figures"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n-context", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(FIGURES / "dynamics_decay"))
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = icl.regression_transformer(seed=args.seed)
    losses = icl.train(model, steps=args.steps, n_context=50, lr=args.lr, seed=args.seed, progress=False)
    tasks = icl.sample_tasks(args.prompts, args.n_context, 2, torch.Generator().manual_seed(args.seed + 10_000))
    with torch.no_grad():
        test_loss = float(icl.loss(model, tasks))
    print(f"trained {args.steps} steps: train loss {np.mean(losses[-10:]):.4f} (last 10), test loss {test_loss:.4f} "
          "(predicting 0 gives 1.0)")

    steps = {b: [] for b in range(model.cfg.n_layers)}
    rates = {b: [] for b in range(model.cfg.n_layers)}
    for p in range(args.prompts):
        dyn = prefix_dynamics(model, tasks.prompts[p : p + 1], dtype=torch.float64)
        for b, d in dyn.blocks.items():
            steps[b].append(d.step_norms.numpy())
            rates[b].append(d.implicit_lr.numpy())
    check = _max_rel_diff(prefix_decomposition(model, tasks.prompts[:1], dtype=torch.float64),
                          prefix_decomposition(model, tasks.prompts[:1], dtype=torch.float64, method="naive"))
    print(f"one pass vs one decompose per prefix (prompt 0, float64): max relative difference {check:.2e}")

    curves = {f"block {b}": np.stack(v) for b, v in steps.items()}
    ax = plots.decay_curves(curves, x=np.arange(1, args.n_context),
                            title=f"in-context regression, {args.prompts} prompts (mean ± SE)")
    plots.save(ax, f"{args.out}.png", dpi=90)
    summary = {}
    for name, c in curves.items():
        mean, sem = plots.mean_and_standard_error(c)
        summary[name] = {"mean": mean.tolist(), "sem": sem.tolist()}
        print(f"{name}: mean step norm i=1 {mean[0]:.3e}, i={len(mean) // 2} {mean[len(mean) // 2 - 1]:.3e}, "
              f"i={len(mean)} {mean[-1]:.3e} (ratio last/first {mean[-1] / mean[0]:.3f})")
    payload = {"command": " ".join(["python examples/dynamics_decay.py", *(argv or [])]), "steps": args.steps,
               "lr": args.lr, "prompts": args.prompts, "n_context": args.n_context, "test_loss": test_loss,
               "max_rel_diff_onepass_vs_naive": check, "step_norms": summary,
               "implicit_lr_mean": {f"block {b}": np.stack(v).mean(0).tolist() for b, v in rates.items()}}
    Path(f"{args.out}.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out}.png and {args.out}.json")
    return 0


def _max_rel_diff(one, naive) -> float:
    worst = 0.0
    for a, b in zip(one.blocks, naive.blocks, strict=True):
        for x, y in zip(a.updates, b.updates, strict=True):
            for f in ("row", "column", "delta"):
                if hasattr(x, f):
                    worst = max(worst, float((getattr(x, f) - getattr(y, f)).norm() / getattr(y, f).norm()))
    return worst


if __name__ == "__main__":
    raise SystemExit(main())

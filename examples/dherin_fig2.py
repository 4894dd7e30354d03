"""Dherin et al. Fig. 2: ``||dW_{i+1} - dW_i||_F`` against context length i, mean and standard error over 100
prompts, for the trained block of ``dherin_fig1.py``; ``dW_i = dW(C_i, x)`` (Eq. 8) is the first MLP weight's update
for the first i context examples and the query. It decays towards zero as the context grows (float64).

    python examples/dherin_fig2.py [--json PATH] [--out-dir examples/figures]
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import trange  # noqa: E402

from implicit_updates.experiments import icl, seeds  # noqa: E402

N_PROMPTS = 100


def main() -> None:
    args = seeds.example_args(__file__, __doc__)
    model = seeds.trained_dherin_block(args.seed)
    n = seeds.DHERIN_TRAIN["n_context"]
    tasks = icl.sample_tasks(N_PROMPTS, n, 2, torch.Generator().manual_seed(args.seed + 30_000), torch.float64)
    deltas = torch.stack([seeds.prefix_update(model, tasks, i)[0] for i in trange(1, n + 1, desc="context")])
    steps = seeds.frobenius_steps(deltas)  # [n - 1, prompts]: i = 1 .. n - 1
    mean, sem = steps.mean(1), steps.std(1) / N_PROMPTS ** 0.5
    i = torch.arange(1, n)
    out = {"config": {**seeds.DHERIN, **seeds.DHERIN_TRAIN, "seed": args.seed, "n_prompts": N_PROMPTS},
           "context_length": i.tolist(), "mean": mean.tolist(), "sem": sem.tolist(),
           "first": float(mean[0]), "last": float(mean[-1]), "ratio_last_first": float(mean[-1] / mean[0])}
    print(f"||dW_(i+1) - dW_i||: {out['first']:.3e} at i=1 -> {out['last']:.3e} at i={n - 1} "
          f"(x{out['ratio_last_first']:.3f}); mean over {N_PROMPTS} prompts")

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(i, mean, lw=1.5)
    ax.fill_between(i, mean - sem, mean + sem, alpha=0.3)
    ax.set(xlabel="context length i", ylabel=r"$\|\Delta W_{i+1} - \Delta W_i\|_F$", yscale="log",
           title=f"mean $\\pm$ s.e. over {N_PROMPTS} prompts")
    fig.tight_layout()
    seeds.save_outputs(args, fig, out)


if __name__ == "__main__":
    main()

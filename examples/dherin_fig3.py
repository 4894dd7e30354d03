"""Dherin et al. Fig. 3: explicit fine-tuning vs implicit weight transfer, test loss against context length i,
averaged over 100 trials (prompts), for the trained block of ``dherin_fig1.py`` (float64).

- fine-tuning: SGD (lr 0.01, batch 1) on the first MLP weight only, over the context examples in order, each fed
  alone as a query token ``[x_k; 0]`` with target ``y_k``; after i steps, the query alone is evaluated;
- transfer: the query alone through the block with ``W + dW(C_i, x)`` (Eq. 8), which equals ``T_W(C_i, x)``.

    python examples/dherin_fig3.py [--json PATH] [--out-dir examples/figures]
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import trange  # noqa: E402

from implicit_updates.experiments import icl, seeds  # noqa: E402

N_TRIALS, LR = 100, 0.01


def main() -> None:
    args = seeds.example_args(__file__, __doc__)
    model = seeds.trained_dherin_block(args.seed)
    n = seeds.DHERIN_TRAIN["n_context"]
    tasks = icl.sample_tasks(N_TRIALS, n, 2, torch.Generator().manual_seed(args.seed + 40_000), torch.float64)
    finetuned = seeds.finetune_first_weight(model, tasks, n, lr=LR)  # [n + 1, trials]
    transfer, with_context, gap = [finetuned[0]], [finetuned[0]], 0.0
    with torch.no_grad():
        for i in trange(1, n + 1, desc="context"):
            transfer.append(seeds.prefix_update(model, tasks, i)[1])
            with_context.append(model.predict(seeds.prefix_prompts(tasks, i)))
            gap = max(gap, float((transfer[-1] - with_context[-1]).abs().max()))
    loss = {name: (0.5 * (torch.stack(p) - tasks.targets).pow(2)).mean(1)
            for name, p in (("finetune", list(finetuned)), ("transfer", transfer))}
    out = {"config": {**seeds.DHERIN, **seeds.DHERIN_TRAIN, "seed": args.seed, "n_trials": N_TRIALS, "sgd_lr": LR},
           "context_length": list(range(n + 1)), "finetune_loss": loss["finetune"].tolist(),
           "transfer_loss": loss["transfer"].tolist(), "max_abs_transfer_vs_context": gap}
    print(f"test loss without context {float(loss['transfer'][0]):.3f}; after {n} examples: fine-tuning "
          f"{float(loss['finetune'][-1]):.3f}, dW transfer {float(loss['transfer'][-1]):.3f}; "
          f"max |T_(W+dW)(x) - T_W(C_i,x)| = {gap:.1e}")

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(loss["finetune"], lw=1.5, label=f"fine-tuning W (SGD lr {LR}, batch 1)")
    ax.plot(loss["transfer"], lw=1.5, label=r"transfer $W + \Delta W(C_i)$")
    ax.set(xlabel="context length i (examples seen)", ylabel="test loss", yscale="log",
           title=f"mean over {N_TRIALS} trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    seeds.save_outputs(args, fig, out)


if __name__ == "__main__":
    main()

"""Innocenti & Achour Figs. A.1/A.2: alignment (normalised Frobenius inner product) between the first-layer updates
of all token positions within each block, and between blocks for the last token; rank of each block's summed update.

Same model and training as ``innocenti_fig1.py`` (5 blocks, default run); measured at initialisation and after the
100 training steps, on a fresh test batch of 128 tasks (heatmaps: task 0).

    python examples/innocenti_alignment.py [--json PATH] [--out-dir examples/figures]
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from implicit_updates import decompose  # noqa: E402
from implicit_updates.experiments import icl, seeds
from implicit_updates.models.toy import ToyTransformer  # noqa: E402


def measure(model: ToyTransformer, tasks: icl.RegressionTasks) -> dict:
    result = decompose(model, tasks.prompts)
    align = [seeds.alignments(result, batch=b) for b in range(tasks.prompts.shape[0])]
    within = torch.stack([a["within_blocks"] for a in align])  # [tasks, blocks, pos, pos]
    off = ~torch.eye(within.shape[-1], dtype=torch.bool)
    ranks = seeds.summed_update_ranks(result)
    return {
        "within_task0": align[0]["within_blocks"].tolist(),
        "between_task0": align[0]["between_blocks"].tolist(),
        "within_mean_abs_offdiag": within[..., off].abs().mean((0, 2)).tolist(),  # per block, over tasks
        "within_min_offdiag": within[..., off].amin((0, 2)).tolist(),
        "between_mean_abs": torch.stack([a["between_blocks"] for a in align]).abs().mean(0).tolist(),
        "rank_min": [min(r) for r in ranks], "rank_max": [max(r) for r in ranks],
    }


def main() -> None:
    args = seeds.example_args(__file__, __doc__)
    model = ToyTransformer(seed=args.seed, **seeds.INNOCENTI)
    tasks = icl.sample_tasks(128, seeds.INNOCENTI_TRAIN["n_context"], 2, torch.Generator().manual_seed(20_000))
    out = {"config": {**seeds.INNOCENTI, **seeds.INNOCENTI_TRAIN, "seed": args.seed}, "init": measure(model, tasks)}
    seeds.train_tracked(model, seed=args.seed, **seeds.INNOCENTI_TRAIN)
    out["trained"] = measure(model, tasks)

    n = model.cfg.n_layers
    cmap = plt.get_cmap("RdBu_r", 16)  # a few levels keep the PNG small
    fig, axes = plt.subplots(2, n + 1, figsize=(1.45 * (n + 1), 3.3))
    for row, stage in enumerate(("init", "trained")):
        for b in range(n):
            im = axes[row, b].imshow(out[stage]["within_task0"][b], vmin=-1, vmax=1, cmap=cmap)
            axes[row, b].set_title(f"block {b + 1}", fontsize=8)
        axes[row, n].imshow(out[stage]["between_task0"], vmin=-1, vmax=1, cmap=cmap)
        axes[row, n].set_title("between blocks", fontsize=8)
        axes[row, 0].set_ylabel(stage)
        for ax in axes[row]:
            ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes, shrink=0.6, label="normalised Frobenius")
    for stage in ("init", "trained"):  # the [blocks, pos, pos] heatmaps are in the figure; the JSON keeps summaries
        out[stage].pop("within_task0")
    seeds.save_outputs(args, fig, out)
    for stage in ("init", "trained"):
        s = out[stage]
        print(f"{stage}: mean |alignment| between positions per block "
              + " ".join(f"{v:.3f}" for v in s["within_mean_abs_offdiag"])
              + f"; min {min(s['within_min_offdiag']):.3f}; ranks {sorted(set(s['rank_min'] + s['rank_max']))}")
        print("  mean |alignment| between blocks (last token):\n" + "\n".join(
            "  " + " ".join(f"{v:6.3f}" for v in r) for r in s["between_mean_abs"]))


if __name__ == "__main__":
    main()

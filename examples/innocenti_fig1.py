"""Innocenti & Achour Fig. 1: empirical vs theory test loss along training, and the per-block MSD between theory
(query alone, patched weights) and empirical (with context) block outputs, in float32 (as trained) and float64.

Their default run: 5 blocks with skips, no LayerNorm, 3 heads of size 1, causal, MLP 3 -> 12 -> 12 -> 3, d = 2,
N = 50, 128 tasks per step, 100 Adam steps at lr 5e-2; metrics on a fresh test batch before every step.

    python examples/innocenti_fig1.py [--json PATH] [--out-dir examples/figures]
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from implicit_updates.experiments import seeds  # noqa: E402
from implicit_updates.models.toy import ToyTransformer  # noqa: E402


def main() -> None:
    args = seeds.example_args(__file__, __doc__)
    model = ToyTransformer(seed=args.seed, **seeds.INNOCENTI)

    def evaluate(step, tasks):
        return {"float32": seeds.theory_vs_empirical(model, tasks),
                "float64": seeds.theory_vs_empirical(model, tasks, torch.float64)}

    log = seeds.train_tracked(model, seed=args.seed, evaluate=evaluate, **seeds.INNOCENTI_TRAIN)
    ev = log["eval"]
    out = {"config": {**seeds.INNOCENTI, **seeds.INNOCENTI_TRAIN, "seed": args.seed}, "train_loss": log["train_loss"]}
    for dt in ("float32", "float64"):
        msd = np.array([e[dt]["msd"] for e in ev])  # [steps, blocks]
        emp, theory = np.array([e[dt]["test_loss"] for e in ev]), np.array([e[dt]["theory_test_loss"] for e in ev])
        out[dt] = {
            "test_loss": emp.tolist(), "theory_test_loss": theory.tolist(), "msd_per_step": msd.tolist(),
            "max_msd_per_block": msd.max(0).tolist(), "max_msd": float(msd.max()),
            "max_rel_err": float(max(max(e[dt]["max_rel_err"]) for e in ev)),
            "max_loss_gap": float(np.abs(emp - theory).max()),
            "ranks": sorted({r for e in ev for r in e[dt]["rank_min"] + e[dt]["rank_max"]}),
        }
    f32, f64 = out["float32"], out["float64"]
    print(f"test loss {f32['test_loss'][0]:.3f} -> {f32['test_loss'][-1]:.3f} (theory {f32['theory_test_loss'][0]:.3f}"
          f" -> {f32['theory_test_loss'][-1]:.3f}); largest theory-empirical test-loss gap {f32['max_loss_gap']:.2e} "
          f"(float32), {f64['max_loss_gap']:.2e} (float64)")
    for b in range(model.cfg.n_layers):
        print(f"block {b}: max MSD over training {f32['max_msd_per_block'][b]:.2e} (float32), "
              f"{f64['max_msd_per_block'][b]:.2e} (float64)")
    print(f"ranks of the summed updates (every block, step and task): {f32['ranks']}")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = np.arange(len(ev))
    ax1.plot(steps, log["train_loss"], color="0.7", lw=1, label="train")
    ax1.plot(steps, f32["test_loss"], lw=2.5, label="test, empirical $T_W(C,x)$")
    ax1.plot(steps, f32["theory_test_loss"], "--", color="k", lw=1.2, label=r"test, theory $T_{W+\Delta W}(x)$")
    ax1.set(xlabel="training step", ylabel="loss", yscale="log", title="test loss (float32)")
    ax1.legend(fontsize=8)
    for b in range(model.cfg.n_layers):
        line, = ax2.plot(steps, np.array(f32["msd_per_step"])[:, b], lw=1, label=f"block {b + 1}")
        ax2.plot(steps, np.array(f64["msd_per_step"])[:, b], ":", color=line.get_color(), lw=1)
    ax2.set(xlabel="training step", ylabel="MSD theory vs empirical", yscale="log",
            title="per block: float32 (solid), float64 (dotted)")
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    seeds.save_outputs(args, fig, out)


if __name__ == "__main__":
    main()

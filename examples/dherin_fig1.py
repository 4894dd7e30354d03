"""Dherin et al. Fig. 1: train and validation loss along training of one transformer block without the MLP skip
connection; validation computed as ``T_W(C, x)`` (the block on the whole prompt) and as ``T_{W + dW(C)}(x)`` (the query
alone through the block whose first MLP weight is patched by Eq. 8). The two validation curves coincide.

d = 2, N = 50 context examples, Adam; validation on 256 fresh prompts every 10 steps (float32 as trained, and
float64).

    python examples/dherin_fig1.py [--json PATH] [--out-dir examples/figures]
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from implicit_updates.experiments import seeds  # noqa: E402
from implicit_updates.models.toy import ToyTransformer  # noqa: E402

EVERY = 10


def main() -> None:
    args = seeds.example_args(__file__, __doc__)
    model = ToyTransformer(seed=args.seed, **seeds.DHERIN)

    def evaluate(step, tasks):
        if step % EVERY:
            return None
        return {"float32": seeds.theory_vs_empirical(model, tasks),
                "float64": seeds.theory_vs_empirical(model, tasks, torch.float64)}

    log = seeds.train_tracked(model, seed=args.seed, evaluate=evaluate, n_test=256, **seeds.DHERIN_TRAIN)
    evals = [(s, e) for s, e in enumerate(log["eval"]) if e is not None]
    steps = [s for s, _ in evals]
    out = {"config": {**seeds.DHERIN, **seeds.DHERIN_TRAIN, "seed": args.seed}, "train_loss": log["train_loss"],
           "eval_steps": steps}
    for dt in ("float32", "float64"):
        emp = np.array([e[dt]["test_loss"] for _, e in evals])
        theory = np.array([e[dt]["theory_test_loss"] for _, e in evals])
        out[dt] = {"val_loss": emp.tolist(), "val_loss_patched": theory.tolist(),
                   "max_gap": float(np.abs(emp - theory).max()),
                   "max_msd": float(max(e[dt]["msd"][0] for _, e in evals)),
                   "max_rel_err": float(max(e[dt]["max_rel_err"][0] for _, e in evals))}
    f32 = out["float32"]
    print(f"train loss {log['train_loss'][0]:.3f} -> {log['train_loss'][-1]:.3f}; validation {f32['val_loss'][0]:.3f} "
          f"-> {f32['val_loss'][-1]:.3f}; largest gap between T_W(C,x) and T_(W+dW)(x) validation curves "
          f"{f32['max_gap']:.2e} (float32), {out['float64']['max_gap']:.2e} (float64)")

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(log["train_loss"], color="0.7", lw=1, label="train")
    ax.plot(steps, f32["val_loss"], lw=2.5, label="validation $T_W(C,x)$")
    ax.plot(steps, f32["val_loss_patched"], "--", color="k", lw=1.2, label=r"validation $T_{W+\Delta W}(x)$")
    ax.set(xlabel="training step", ylabel="loss", yscale="log",
           title=f"1 block, no MLP skip (max gap {f32['max_gap']:.1e})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    seeds.save_outputs(args, fig, out)


if __name__ == "__main__":
    main()

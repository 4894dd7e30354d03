"""Innocenti & Achour's sweep axes, one at a time around their default run: number of tasks per step, sequence
length, input dimension, number of heads, LayerNorm (Pre-LN) on/off, causal/non-causal attention.

Each run trains 100 Adam steps (lr 5e-2); every 10 steps a fresh test batch measures the per-block MSD between theory
and empirical block outputs (float32), the gap between theory and empirical test losses, and the rank of every summed
update; the final model is also decomposed in float64. A summary table is printed.

    python examples/innocenti_sweep.py [--json PATH] [--out-dir examples/figures]
"""

import matplotlib

matplotlib.use("Agg")
import time  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from implicit_updates.experiments import icl, seeds  # noqa: E402
from implicit_updates.models.toy import ToyTransformer  # noqa: E402

EVERY = 10
BASE = {"n_tasks": 128, "seq_len": 50, "input_dim": 2, "n_heads": 3, "layer_norm": False, "causal": True}
AXES = {"n_tasks": [16, 512], "seq_len": [10, 100], "input_dim": [8], "n_heads": [1], "layer_norm": [True],
        "causal": [False]}


def run(settings: dict, seed: int) -> dict:
    d_model = settings["input_dim"] + 1
    model = ToyTransformer(seed=seed, **{**seeds.INNOCENTI, "d_model": d_model, "d_mlp": 4 * d_model,
                                         "n_heads": settings["n_heads"], "layer_norm": settings["layer_norm"],
                                         "causal": settings["causal"]})
    train = {**seeds.INNOCENTI_TRAIN, "batch": settings["n_tasks"], "n_context": settings["seq_len"]}
    start = time.perf_counter()
    log = seeds.train_tracked(model, seed=seed, progress=False, n_test=128,
                              evaluate=lambda step, tasks: None if step % EVERY else seeds.theory_vs_empirical(
                                  model, tasks), **train)
    evals = [e for e in log["eval"] if e is not None]
    test = icl.sample_tasks(128, settings["seq_len"], settings["input_dim"], torch.Generator().manual_seed(seed + 1))
    final = seeds.theory_vs_empirical(model, test)
    final64 = seeds.theory_vs_empirical(model, test, torch.float64)
    evals.append(final)
    return {
        **settings,
        "test_loss_first": evals[0]["test_loss"], "test_loss_last": final["test_loss"],
        "max_msd_f32": max(max(e["msd"]) for e in evals), "max_msd_f64": max(final64["msd"]),
        "max_loss_gap_f32": max(abs(e["test_loss"] - e["theory_test_loss"]) for e in evals),
        "max_rel_err_f64": max(final64["max_rel_err"]),
        "ranks": sorted({r for e in evals + [final64] for r in e["rank_min"] + e["rank_max"]}),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    args = seeds.example_args(__file__, __doc__)
    configs = [("default", BASE)] + [(axis, {**BASE, axis: v}) for axis, values in AXES.items() for v in values]
    rows = [{"axis": axis, **run(settings, args.seed)} for axis, settings in tqdm(configs, desc="sweep")]
    header = (f"{'axis':>10} {'value':>6} {'test loss':>15} {'max MSD f32':>11} {'MSD f64':>9} {'loss gap f32':>12} "
              f"{'rel err f64':>11} {'rank':>5} {'s':>5}")
    print(header)
    for r in rows:
        value = r[r["axis"]] if r["axis"] != "default" else "-"
        print(f"{r['axis']:>10} {str(value):>6} {r['test_loss_first']:6.3f} -> {r['test_loss_last']:5.3f} "
              f"{r['max_msd_f32']:11.1e} {r['max_msd_f64']:9.1e} {r['max_loss_gap_f32']:12.1e} "
              f"{r['max_rel_err_f64']:11.1e} {str(r['ranks']):>5} {r['seconds']:5.1f}")

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    labels = [f"{r['axis']}={r[r['axis']]}" if r["axis"] != "default" else "default" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["max_msd_f32"] for r in rows], 0.4, label="max MSD, float32")
    ax.bar([i + 0.2 for i in x], [r["max_loss_gap_f32"] for r in rows], 0.4, label="max test-loss gap, float32")
    ax.set_xticks(list(x), labels, rotation=35, ha="right", fontsize=7)
    ax.set(yscale="log", title="theory vs empirical across the sweep")
    ax.legend(fontsize=7)
    fig.tight_layout()
    seeds.save_outputs(args, fig, {"base": BASE, "every": EVERY, "rows": rows})


if __name__ == "__main__":
    main()

"""The offline main job: fast versions of the seed papers' experiments on in-context linear regression.

- Innocenti & Achour Fig. 1 (experiment 4): train their default 5-block model; along training, the test loss of the
  model (empirical) and of the query alone through the patched blocks (theory), and the per-block MSD between them.
- Innocenti & Achour Figs. A.1/A.2 (experiment 5): rank of every summed update, alignment between token positions.
- Dherin et al. Fig. 1 (experiment 1): one block without the MLP skip; validation loss as ``T_W(C,x)`` and as
  ``T_{W+dW}(x)``.

Then the per-block verification tables of the trained 5-block model (float32 as computed, and float64).
"""

from __future__ import annotations

import time

import torch

from implicit_updates import decompose
from implicit_updates.experiments import icl, seeds
from implicit_updates.models.toy import ToyTransformer


def run_demo(steps: int = 100, seed: int = 0, n_test: int = 16) -> dict:
    """Train, decompose and verify; print the headline numbers; return them as a JSON-able dict."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster than two
    try:
        return _run(steps, seed, n_test)
    finally:
        torch.set_num_threads(threads)


def _run(steps: int, seed: int, n_test: int) -> dict:
    start = time.perf_counter()
    model = ToyTransformer(seed=seed, **seeds.INNOCENTI)
    every = max(1, steps // 20)
    train = {**seeds.INNOCENTI_TRAIN, "steps": steps}
    log = seeds.train_tracked(model, seed=seed, **train, evaluate=lambda step, tasks: None if step % every else {
        "float32": seeds.theory_vs_empirical(model, tasks), "float64": seeds.theory_vs_empirical(model, tasks,
                                                                                                  torch.float64)})
    final = icl.sample_tasks(train["batch"], train["n_context"], 2, torch.Generator().manual_seed(seed + 20_000))
    evals = [e for e in log["eval"] if e is not None] + [
        {"float32": seeds.theory_vs_empirical(model, final), "float64": seeds.theory_vs_empirical(model, final,
                                                                                                  torch.float64)}]
    test = icl.sample_tasks(n_test, train["n_context"], 2, torch.Generator().manual_seed(seed + 10_000))
    test_loss = evals[-1]["float32"]["test_loss"]
    innocenti = {dt: {"max_msd": max(max(e[dt]["msd"]) for e in evals),
                      "max_loss_gap": max(abs(e[dt]["test_loss"] - e[dt]["theory_test_loss"]) for e in evals),
                      "ranks": sorted({r for e in evals for r in e[dt]["rank_min"] + e[dt]["rank_max"]})}
                 for dt in ("float32", "float64")}
    align = seeds.alignments(decompose(model, test.prompts))["within_blocks"]
    off = ~torch.eye(align.shape[-1], dtype=torch.bool)
    innocenti["mean_abs_alignment_between_positions"] = align[:, off].abs().mean(-1).tolist()
    print(f"[Innocenti & Achour Fig. 1] 5 blocks, {steps} Adam steps: test loss {evals[0]['float32']['test_loss']:.3f}"
          f" -> {test_loss:.3f}; theory vs empirical test loss, largest gap {innocenti['float32']['max_loss_gap']:.1e}"
          f" (float32), {innocenti['float64']['max_loss_gap']:.1e} (float64); per-block MSD <= "
          f"{innocenti['float32']['max_msd']:.1e} (float32), {innocenti['float64']['max_msd']:.1e} (float64)")
    print(f"[Innocenti & Achour Figs. A.1/A.2] rank of every summed update: {innocenti['float32']['ranks']}; mean "
          "|alignment| between positions per block: "
          + " ".join(f"{v:.2f}" for v in innocenti["mean_abs_alignment_between_positions"]))

    dherin_model = ToyTransformer(seed=seed, **seeds.DHERIN)
    dherin_steps = max(2, steps * 2)
    dherin_log = seeds.train_tracked(dherin_model, seed=seed, **{**seeds.DHERIN_TRAIN, "steps": dherin_steps},
                                     n_test=128, evaluate=lambda step, tasks: None if step % max(1, dherin_steps // 10)
                                     else seeds.theory_vs_empirical(dherin_model, tasks))
    dherin_evals = [e for e in dherin_log["eval"] if e is not None]
    dherin = {"val_loss_first": dherin_evals[0]["test_loss"], "val_loss_last": dherin_evals[-1]["test_loss"],
              "max_gap": max(abs(e["test_loss"] - e["theory_test_loss"]) for e in dherin_evals)}
    print(f"[Dherin et al. Fig. 1] 1 block without MLP skip, {dherin_steps} steps: validation loss "
          f"{dherin['val_loss_first']:.3f} -> {dherin['val_loss_last']:.3f}; T_W(C,x) vs T_(W+dW)(x) largest gap "
          f"{dherin['max_gap']:.1e} (float32)")

    payload = {"train_loss_first": log["train_loss"][0], "train_loss_last": log["train_loss"][-1],
               "test_loss": test_loss, "innocenti": innocenti, "dherin": dherin, "runs": []}
    for dtype in (torch.float32, torch.float64):
        for query in ("last", "self"):
            report = decompose(model, test.prompts, query=query, dtype=dtype).verify()
            print(f"\n{n_test} test prompts x {test.prompts.shape[1]} positions, {report.dtype}, query={query}")
            print(report)
            payload["runs"].append(report.to_dict())
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return payload

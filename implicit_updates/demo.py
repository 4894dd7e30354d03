"""The offline main job: train a Pre-LN transformer on in-context linear regression, then decompose and verify it
at every block and position (float32 as computed, and float64)."""

from __future__ import annotations

import time

import torch

from implicit_updates import decompose, icl


def run_demo(steps: int = 100, seed: int = 0, n_context: int = 50, d: int = 2, n_test: int = 16) -> dict:
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = icl.regression_transformer(d=d, seed=seed)
    losses = icl.train(model, steps=steps, n_context=n_context, seed=seed)
    test = icl.sample_tasks(n_test, n_context, d, torch.Generator().manual_seed(seed + 10_000))
    with torch.no_grad():
        test_loss = float(icl.loss(model, test))
    print(f"trained a {model.cfg.n_layers}-block Pre-LN transformer (d_model {model.cfg.d_model}) on in-context "
          f"linear regression: train loss {losses[0]:.3f} -> {losses[-1]:.3f}, test loss {test_loss:.3f} "
          f"({time.perf_counter() - start:.1f} s)")
    payload = {"train_loss_first": losses[0], "train_loss_last": losses[-1], "test_loss": test_loss, "runs": []}
    for dtype in (torch.float32, torch.float64):
        for query in ("last", "self"):
            report = decompose(model, test.prompts, query=query, dtype=dtype).verify()
            print(f"\n{n_test} test prompts x {test.prompts.shape[1]} positions, {report.dtype}, query={query}")
            print(report)
            payload["runs"].append(report.to_dict())
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return payload

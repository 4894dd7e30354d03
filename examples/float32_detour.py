"""Exact stacked updates of a thought-study run, checked in the model as written and in its float64 formula.

Llama-family Hugging Face models (SmolLM2, Qwen2) normalise in float32 even in a float64 model: their RMSNorm casts
the residual to float32 first. Every block's decomposition stays exact (the MLP input is captured after the
norm), but a whole patched model on its own training queries is then compared through float32 roundings: it agrees
to the bit where both residuals round alike, and where one rounds the other way the difference is float32-sized,
amplified by later blocks' updates. The same rounding makes near-dependent rows look independent enough to solve.
This script gathers one run's rows (``examples/thought_study.py``'s split of a task for a seed) twice, as written
and under ``precision.KeepPrecision(float64)`` (every float32 detour kept in float64), and prints each exact fit's
max |logit diff| on its own training queries, or its refusal, and how far the full model's own logits move
between the two formulas (the float32 detour itself):

    python examples/float32_detour.py --model smollm2-135m --task addition --seed 0
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from thought_study import exact_error, split, stacked
from thought_tasks import TASKS
from transfer_study import load_float64

import implicit_updates as iu
from implicit_updates.runtime.precision import KeepPrecision


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a pretrained name, or a local Hugging Face directory")
    parser.add_argument("--task", default="addition", choices=list(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, tokenizer = load_float64(args.model)
    text, train_items, _ = split(tokenizer, TASKS[args.task], args.seed)
    prefix = tokenizer(text, return_tensors="pt").input_ids
    train = stacked([q for q, *_ in train_items])
    out, full = [], []
    for formula, mode in (("as written", contextlib.nullcontext()),
                          ("float64 formula", KeepPrecision(torch.float64))):
        with mode:
            systems = iu.thought_systems(model, prefix, train, dtype=torch.float64)
            full.append(systems.full_logits)
            for n in (4, len(train)):
                try:
                    row = {"formula": formula, "exact": n, "max_abs_logit_diff": exact_error(systems, train, n)}
                    said = f"max |logit diff| on its training queries {row['max_abs_logit_diff']:.2e}"
                except ValueError as refusal:
                    row = {"formula": formula, "exact": n, "refused": str(refusal)}
                    said = "refused: " + str(refusal).split(")")[0] + (")" if "(" in str(refusal) else "")
                out.append(row)
                print(f"{args.model} {args.task} seed {args.seed}, {formula}, exact {n}: {said}", flush=True)
    detour = float((full[0] - full[1]).abs().max())  # the full model itself, as written against its float64 formula
    print(f"the full model on the training queries, as written against the float64 formula: max |logit diff| "
          f"{detour:.2e}")
    return {"rows": out, "full_model_detour": detour}


if __name__ == "__main__":
    main()

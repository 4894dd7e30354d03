"""Implicit dynamics on a real few-shot prompt: step norms ||dW_{i+1} - dW_i||_F of the implicit update as the
context grows token by token (Dherin et al. 2025, Sec. 3), for Gemma-3-270M and SmolLM2-135M-Instruct, float64.

    python examples/pretrained_dynamics.py [--plot examples/figures/pretrained_dynamics.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import torch

from implicit_updates.analyses.dynamics import prefix_dynamics
from implicit_updates.cli.common import write_json
from implicit_updates.models.loading import load_tokenizer
from implicit_updates.models.pretrained import MODELS, load_pretrained, prepare
from implicit_updates.views import plots

PROMPT = ("France: Paris\nJapan: Tokyo\nItaly: Rome\nSpain: Madrid\nEgypt: Cairo\nChina: Beijing\nKenya: Nairobi\n"
          "Germany:")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=list(MODELS), help="repeatable; default: both")
    parser.add_argument("--plot", metavar="PATH")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    out, fig_axes = {}, None
    names = args.model or list(MODELS)
    if args.plot:
        plt = plots._pyplot()
        fig, fig_axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.4), squeeze=False)
    for k, name in enumerate(names):
        start = time.perf_counter()
        model = load_pretrained(name, "hooked", dtype=torch.float64)
        ids = load_tokenizer(prepare(name))(PROMPT, return_tensors="pt").input_ids
        last = model.cfg.n_layers - 1
        dyn = prefix_dynamics(model, ids, blocks=[0, last // 2, last])
        seconds = time.perf_counter() - start
        print(f"\n{name}: {dyn.n_prefixes} prefixes, float64 ({seconds:.0f} s)\n{dyn}")
        out[name] = {**dyn.to_dict(), "prompt": PROMPT, "seconds": seconds}
        if fig_axes is not None:
            curves = {f"block {b}": d.step_norms[None] for b, d in dyn.blocks.items()}
            plots.decay_curves(curves, ax=fig_axes[0, k], title=f"{name}: step norms, few-shot prompt")
        del model
    if args.plot:
        plots.save(fig_axes[0, 0], args.plot, dpi=80)
        print(f"wrote {args.plot}")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

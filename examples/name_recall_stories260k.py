"""Real in-context learning on a pretrained model, absorbed into its weights: stories260K recalls a name.

For each story prompt the full model reads the whole prompt; the absorbed model (every block's update for the last
position written into a copy's weights, float64) reads only the last token; the control is the unpatched model on
that same token. The table gives the probability of the continuation that needs the context (a character's name
introduced earlier, a repeated phrase), and the KL divergences from the full model's next-token distribution.

    python examples/name_recall_stories260k.py [--model ../shared/models/stories260K] [--backend hf] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import implicit_updates as iu
from implicit_updates.adapters import adapter_for
from implicit_updates.cli.common import write_json
from implicit_updates.models.loading import load_local, load_tokenizer

DEFAULT = Path(__file__).resolve().parents[2] / "shared/models/stories260K"
CASES = [  # (what the context teaches, prompt, continuation)
    ("name", "Once upon a time, there was a little bird named Bob. Bob lived in a tree. One day,", " Bob"),
    ("name", "Once upon a time, there was a boy named Tim. Tim loved to play with his toys. One day,", " Tim"),
    ("name", "Once upon a time, there was a girl named Lily. Lily had a big red ball. She played with the ball "
             "every day. One day,", " Lily"),
    ("name", "Once upon a time, there was a girl named Sue. Sue had a cat named Tom. Every day, Sue and", " Tom"),
    ("phrase", "The little dog ran to the big tree. The little dog ran to the big", " tree"),
    ("phrase", "The cat sat on the red mat. The cat sat on the red", " mat"),
]


def kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    return float((logp.exp() * (logp - logq)).sum().clamp_min(0))


def run_case(model, tokenizer, prompt: str, continuation: str) -> dict:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    answer = int(tokenizer(prompt + continuation, return_tensors="pt").input_ids[0, ids.shape[1]])
    absorbed = iu.absorb(model, ids, dtype=torch.float64)  # the user's model stays as it is
    reference = copy.deepcopy(model).to(torch.float64)  # the full model and the control, in the same dtype
    with torch.no_grad():
        full = adapter_for(reference).logits(ids)[0, -1]
        control = adapter_for(reference).logits(ids[:, -1:])[0, -1]
        alone = adapter_for(absorbed).logits(ids[:, -1:])[0, -1]
    logp = {k: torch.log_softmax(v, -1) for k, v in (("full", full), ("absorbed", alone), ("control", control))}
    return {
        "prompt": prompt, "continuation": continuation.strip(), "token": tokenizer.decode([answer]),
        "query_token": tokenizer.decode(ids[0, -1:]),
        "p_full": float(logp["full"][answer].exp()), "p_absorbed": float(logp["absorbed"][answer].exp()),
        "p_control": float(logp["control"][answer].exp()),
        "kl_full_absorbed": kl(logp["full"], logp["absorbed"]), "kl_full_control": kl(logp["full"], logp["control"]),
        "max_abs_logit_diff": float((alone - full).abs().max()),
        "max_abs_logit_diff_control": float((control - full).abs().max()),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT), help="a local stories260K directory")
    parser.add_argument("--backend", choices=["hooked", "bridge", "hf"], default="hf")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    model, tokenizer = load_local(args.model, args.backend), load_tokenizer(args.model)
    rows = [{"kind": kind, **run_case(model, tokenizer, prompt, cont)} for kind, prompt, cont in CASES]
    print(f"stories260K ({args.backend}), float64: the full model reads the prompt; absorbed and control read only "
          "its last token")
    print(f"{'kind':<7} {'answer':>7} {'query':>7} {'token':>7} {'p_full':>8} {'p_absorbed':>10} {'p_control':>9} "
          f"{'KL(full||abs)':>13} {'KL(full||ctrl)':>14} {'max|dlogit|':>11}")
    for r in rows:
        print(f"{r['kind']:<7} {r['continuation']:>7} {r['query_token']!r:>7} {r['token']!r:>7} {r['p_full']:8.4f} "
              f"{r['p_absorbed']:10.4f} "
              f"{r['p_control']:9.4f} {r['kl_full_absorbed']:13.2e} {r['kl_full_control']:14.3f} "
              f"{r['max_abs_logit_diff']:11.2e}")
    write_json(args.json, {"backend": args.backend, "dtype": "float64", "rows": rows})
    return rows


if __name__ == "__main__":
    main()

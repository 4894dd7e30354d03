"""Real in-context learning in two pretrained models (Gemma-3-270M, SmolLM2-135M-Instruct), absorbed into weights.

For each few-shot prompt the full model reads the whole prompt; the absorbed model (every block's update for the
last position written into a float64 copy's weights) reads only the last token; the control is the unpatched model
on that same token. ``p_*`` is the probability of the answer's first token, which only the context can supply.

    python examples/pretrained_icl.py [--model gemma-3-270m --model smollm2-135m] [--backend hooked] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import torch

import implicit_updates as iu
from implicit_updates.adapters import adapter_for
from implicit_updates.cli.common import write_json
from implicit_updates.models import _default_backend
from implicit_updates.models.loading import load_tokenizer
from implicit_updates.models.pretrained import MODELS, load_pretrained, prepare

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # SmolLM2-Instruct's chat template
CASES = [  # (kind, prompt, answer, models it applies to)
    ("capital", "France: Paris\nJapan: Tokyo\nItaly: Rome\nGermany:", " Berlin", MODELS),
    ("capital", "Spain -> Madrid\nEgypt -> Cairo\nRussia -> Moscow\nCanada ->", " Ottawa", MODELS),
    ("antonym", "hot -> cold\nbig -> small\nup -> down\nfast ->", " slow", MODELS),
    ("antonym", "happy: sad\nopen: closed\nlight: dark\nyoung:", " old", MODELS),
    ("made-up word", "A wug is a small blue bird. I saw a wug. A dax is a tiny red fish. I caught a", " dax", MODELS),
    ("name", "My new neighbour is called Zorblat Quenn. Every morning I wave to Zorblat", " Quenn", MODELS),
    ("instruction", CHAT.format("Repeat the word 'banana' and nothing else."), "banana", ("smollm2-135m",)),
    ("instruction", CHAT.format("What is the opposite of 'up'? Answer with one word."), "Down", ("smollm2-135m",)),
]


def kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    return float((logp.exp() * (logp - logq)).sum().clamp_min(0))


def run_case(model, tokenizer, prompt: str, answer: str) -> dict:
    # the Hugging Face tokenizer for every backend, so all three read the same ids (Gemma: BOS first; SmolLM2: none)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    token = int(tokenizer(prompt + answer, return_tensors="pt").input_ids[0, ids.shape[1]])
    absorbed = iu.absorb(model, ids)  # model is float64 already: a patched deep copy, the model stays as it is
    with torch.no_grad():
        full = adapter_for(model).logits(ids)[0, -1]
        control = adapter_for(model).logits(ids[:, -1:])[0, -1]
        alone = adapter_for(absorbed).logits(ids[:, -1:])[0, -1]
    logp = {k: torch.log_softmax(v.double(), -1) for k, v in (("full", full), ("absorbed", alone),
                                                               ("control", control))}
    return {
        "prompt": prompt, "answer": answer.strip(), "token": tokenizer.decode([token]),
        "query_token": tokenizer.decode(ids[0, -1:]), "n_tokens": ids.shape[1],
        "p_full": float(logp["full"][token].exp()), "p_absorbed": float(logp["absorbed"][token].exp()),
        "p_control": float(logp["control"][token].exp()),
        "top1_full": tokenizer.decode([int(full.argmax())]), "top1_absorbed": tokenizer.decode([int(alone.argmax())]),
        "kl_full_absorbed": kl(logp["full"], logp["absorbed"]), "kl_full_control": kl(logp["full"], logp["control"]),
        "max_abs_logit_diff": float((alone - full).abs().max()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=list(MODELS), help="repeatable; default: both")
    parser.add_argument("--backend", choices=["hooked", "bridge", "hf"], default=None,
                        help="default: hooked on TransformerLens 3.x, bridge on 4.x")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    backend = args.backend or _default_backend()
    out = {"backend": backend, "dtype": "float64", "models": {}}
    for name in args.model or list(MODELS):
        start = time.perf_counter()
        model = load_pretrained(name, backend, dtype=torch.float64)
        tokenizer = load_tokenizer(prepare(name))
        rows = [{"kind": kind, **run_case(model, tokenizer, prompt, answer)}
                for kind, prompt, answer, names in CASES if name in names]
        seconds = time.perf_counter() - start
        out["models"][name] = {"rows": rows, "seconds": seconds}
        del model
        print(f"\n{name} ({backend}, float64): the full model reads the prompt; absorbed and control read only "
              f"its last token ({seconds:.0f} s)")
        print(f"{'kind':<12} {'answer':>7} {'query':>8} {'token':>8} {'p_full':>8} {'p_absorbed':>10} "
              f"{'p_control':>9} {'KL(full||abs)':>13} {'KL(full||ctrl)':>14} {'max|dlogit|':>11}")
        for r in rows:
            print(f"{r['kind']:<12} {r['answer']:>7} {r['query_token']!r:>8} {r['token']!r:>8} {r['p_full']:8.4f} "
                  f"{r['p_absorbed']:10.4f} {r['p_control']:9.4f} {r['kl_full_absorbed']:13.2e} "
                  f"{r['kl_full_control']:14.3f} {r['max_abs_logit_diff']:11.2e}")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

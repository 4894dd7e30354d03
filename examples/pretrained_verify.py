"""Every block and every position of two pretrained models (Gemma-3-270M, SmolLM2-135M-Instruct), float64.

Per block: max relative error and MSD of the patched query alone against the with-context output, for
``query="last"`` and ``query="self"``, the rank of the summed update, and the seconds that block's decompose +
verify took. With the HookedTransformer backend a last column follows the **absorbed chain**: every block patched
with its last-position update, run on the query token alone, compared with the full model at block l (the
per-block check feeds each block its exact query input; the chain feeds it the previous patched block's output,
so it shows how rounding errors grow through the model).

    python examples/pretrained_verify.py [--model gemma-3-270m] [--backend hooked] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import torch

import implicit_updates as iu
from implicit_updates.analyses.absorb import absorbed_model, decompose_for_absorb
from implicit_updates.cli.common import write_json
from implicit_updates.models import _default_backend
from implicit_updates.models.loading import load_tokenizer
from implicit_updates.models.pretrained import MODELS, load_pretrained, prepare

PROMPT = "France: Paris\nJapan: Tokyo\nItaly: Rome\nGermany:"  # few-shot; 16 tokens with Gemma's BOS, 15 SmolLM2


def chain_errors(model, ids: torch.Tensor) -> list[float]:
    """Relative error of the absorbed model's block-l output on the query alone vs the full model's (hooked only)."""
    patched = absorbed_model(decompose_for_absorb(model, ids))
    with torch.no_grad():
        _, full = model.run_with_cache(ids)
        _, alone = patched.run_with_cache(ids[:, -1:])
    out = []
    for b in range(model.cfg.n_layers):
        f, a = full[f"blocks.{b}.hook_resid_post"][0, -1], alone[f"blocks.{b}.hook_resid_post"][0, 0]
        out.append(float((a - f).norm() / f.norm()))
    return out


def verify_model(name: str, backend: str, prompt: str) -> dict:
    start = time.perf_counter()
    model = load_pretrained(name, backend, dtype=torch.float64)  # float64 weights: no upcast copy per call
    load_s = time.perf_counter() - start
    ids = load_tokenizer(prepare(name))(prompt, return_tensors="pt").input_ids
    rows = []
    totals = {}
    for query in ("last", "self"):
        t = time.perf_counter()
        totals[query] = iu.decompose(model, ids, query=query).verify()
        totals[f"{query}_s"] = time.perf_counter() - t
    chain = chain_errors(model, ids) if backend == "hooked" else [None] * len(totals["last"].blocks)
    for last, self_, c in zip(totals["last"].blocks, totals["self"].blocks, chain, strict=True):
        t = time.perf_counter()
        iu.decompose(model, ids, blocks=last.block).verify()  # timed alone: that block's decompose + verify
        rows.append({"block": last.block, "max_rel_err_last": last.max_rel_err, "msd_last": last.msd,
                     "max_rel_err_self": self_.max_rel_err, "msd_self": self_.msd, "rank": last.rank,
                     "seconds": time.perf_counter() - t, "chain_rel_err": c})
    return {"model": name, "backend": backend, "dtype": "float64", "prompt": prompt, "n_positions": ids.shape[1],
            "blocks": rows, "max_rel_err": max(totals[q].max_rel_err for q in ("last", "self")),
            "load_seconds": load_s, "seconds_all_blocks": {q: totals[f"{q}_s"] for q in ("last", "self")},
            "seconds_total": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=list(MODELS), help="repeatable; default: both")
    parser.add_argument("--backend", choices=["hooked", "bridge", "hf"], default=None,
                        help="default: hooked on TransformerLens 3.x, bridge on 4.x")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    backend = args.backend or _default_backend()
    out = {}
    for name in args.model or list(MODELS):
        r = out[name] = verify_model(name, backend, args.prompt)
        print(f"\n{name} ({backend}), {r['n_positions']} positions, float64 (load {r['load_seconds']:.0f} s; all "
              f"blocks: last {r['seconds_all_blocks']['last']:.1f} s, self {r['seconds_all_blocks']['self']:.1f} s)")
        print(f"{'block':>5} {'rel err last':>12} {'MSD last':>10} {'rel err self':>12} {'MSD self':>10} "
              f"{'rank':>4} {'seconds':>7} {'chain rel err':>13}")
        for b in r["blocks"]:
            chain = "-" if b["chain_rel_err"] is None else f"{b['chain_rel_err']:.2e}"
            print(f"{b['block']:>5} {b['max_rel_err_last']:12.2e} {b['msd_last']:10.2e} {b['max_rel_err_self']:12.2e} "
                  f"{b['msd_self']:10.2e} {b['rank']:>4} {b['seconds']:7.2f} {chain:>13}")
        print(f"max relative error {r['max_rel_err']:.2e} (query=last and self); total {r['seconds_total']:.0f} s")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

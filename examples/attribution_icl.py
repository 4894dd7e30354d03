"""Which context tokens carry the implicit update? Exact attribution on real in-context learning, and its faithfulness.

For each prompt (stories260K name recall; Gemma-3-270M / SmolLM2-135M few-shot capitals, antonyms, a made-up word)
``implicit_updates.attribute`` splits every block's update of the last position exactly over (head, source token)
terms (float64; completeness reported). Faithfulness, at a first / middle / last block: remove one source token's
attention value term at that block in the forward (its pattern entry in the last row set to 0, every head) and
measure (a) the share of the update it removed, ``<u - u', u>/||u||^2``, and (b) the drop of the answer's logit.
Spearman rank correlations over source tokens against the attribution's scores, and against the attention pattern
alone (mean over heads) as a baseline.

    python examples/attribution_icl.py --json examples/figures/attribution_icl.json \\
        --plot examples/figures/attribution_{model}.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import implicit_updates as iu
from implicit_updates.cli.common import write_json
from implicit_updates.views import plots

STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K"
CASES = {
    "stories260k": [
        ("name", "Once upon a time, there was a little bird named Bob. Bob lived in a tree. One day,", " Bob"),
        ("name", "Once upon a time, there was a boy named Tim. Tim loved to play with his toys. One day,", " Tim"),
    ],
    "gemma-3-270m": [
        ("capital", "France: Paris\nJapan: Tokyo\nItaly: Rome\nGermany:", " Berlin"),
        ("antonym", "hot -> cold\nbig -> small\nup -> down\nfast ->", " slow"),
        ("made-up word", "A wug is a small blue bird. I saw a wug. A dax is a tiny red fish. I caught a", " dax"),
    ],
}
CASES["smollm2-135m"] = CASES["gemma-3-270m"]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (scipy's where installed, else Pearson on ranks; no ties expected)."""
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(a.numpy(), b.numpy()).statistic)
    except ImportError:
        ra, rb = (t.argsort().argsort().double() for t in (a, b))
        ra, rb = ra - ra.mean(), rb - rb.mean()
        return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def ablated(model, ids: torch.Tensor, block: int, source: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLP input of ``block`` at the last position, last logits) with source ``source``'s attention value term
    removed from the last row at ``block`` (its pattern entry zeroed in every head)."""
    seen = {}

    def cut(pattern, hook):
        pattern = pattern.clone()
        pattern[:, :, -1, source] = 0
        return pattern

    def save(module, args):
        seen["m"] = args[0][0, -1].detach()

    handle = model.blocks[block].mlp.register_forward_pre_hook(save)
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{block}.attn.hook_pattern", cut)]):
            logits = model(ids)[0, -1]
    finally:
        handle.remove()
    return seen["m"], logits


def run_case(model, tokenizer, kind: str, prompt: str, answer: str, blocks: list[int]) -> tuple[dict, torch.Tensor]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    token = int(tokenizer(prompt + answer, return_tensors="pt").input_ids[0, ids.shape[1]])
    result = iu.attribute(model, ids)
    scores = result.token_scores(-1)  # [block, source]
    with torch.no_grad():
        base = model(ids)[0, -1, token]
    sources = list(range(ids.shape[1] - 1))  # every context token (the query's own term is its value's change)
    checks = []
    for b in blocks:
        ba = result.block(b)
        u = {n: c[0, -1] for n, c in ba.columns.items()}
        squared = sum(v.pow(2).sum() for v in u.values())
        m = ba.capture.mlp_input[0, -1]
        removed, drops = [], []
        for j in sources:
            m_cut, logits = ablated(model, ids, b, j)
            removed.append(float(sum((m - m_cut) @ ba.maps[n] @ u[n] for n in u) / squared))
            drops.append(float(base - logits[token]))
        removed, drops = torch.tensor(removed), torch.tensor(drops)
        predicted = scores[b, sources].cpu()
        pattern = ba.capture.pattern[0, :, -1, sources].mean(0).cpu()
        checks.append({"block": b, "rho_removed_vs_attribution": spearman(removed, predicted),
                       "rho_removed_vs_pattern": spearman(removed, pattern),
                       "rho_logit_vs_attribution": spearman(drops, predicted),
                       "rho_logit_vs_pattern": spearman(drops, pattern),
                       "max_abs_removed_minus_score": float((removed - predicted).abs().max())})
    labels = [repr(tokenizer.decode([i])) for i in ids[0].tolist()]
    top = {b: [(labels[j], float(scores[b, j])) for j in scores[b].abs().argsort(descending=True)[:3].tolist()]
           for b in range(scores.shape[0])}
    return {"kind": kind, "prompt": prompt, "answer": answer.strip(), "tokens": labels,
            "max_completeness_err": result.completeness_error(), "scores": scores.tolist(), "top3": top,
            "faithfulness": checks}, scores


def load(name: str):
    from implicit_updates.models.loading import load_local, load_tokenizer

    if name == "stories260k":
        model = load_local(STORIES, "hooked", dtype=torch.float64)
        return model, load_tokenizer(STORIES)
    from implicit_updates.models.pretrained import load_pretrained, prepare

    return load_pretrained(name, "hooked", dtype=torch.float64), load_tokenizer(prepare(name))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=list(CASES), help="repeatable; default: all three")
    parser.add_argument("--kind", action="append", help="repeatable: only these prompts (e.g. 'made-up word')")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", metavar="PATTERN", help="heatmap per model of its first prompt ({model} filled in)")
    args = parser.parse_args(argv)
    out = {"dtype": "float64", "backend": "hooked", "models": {}}
    for name in args.model or list(CASES):
        start = time.perf_counter()
        model, tokenizer = load(name)
        n = model.cfg.n_layers
        blocks = sorted({0, n // 2, n - 1})
        rows = []
        for i, (kind, prompt, answer) in enumerate(c for c in CASES[name] if not args.kind or c[0] in args.kind):
            row, scores = run_case(model, tokenizer, kind, prompt, answer, blocks)
            rows.append(row)
            print(f"{name} {kind} ({row['answer']}): completeness {row['max_completeness_err']:.1e}")
            for b, top in row["top3"].items():
                print(f"  block {b:>2}: " + ", ".join(f"{t} {s:+.2f}" for t, s in top))
            for c in row["faithfulness"]:
                print(f"  faithfulness block {c['block']:>2}: rho(removed share, attribution) "
                      f"{c['rho_removed_vs_attribution']:+.2f} vs pattern {c['rho_removed_vs_pattern']:+.2f}; "
                      f"rho(logit drop, attribution) {c['rho_logit_vs_attribution']:+.2f} vs pattern "
                      f"{c['rho_logit_vs_pattern']:+.2f}")
            if args.plot and i == 0:
                path = args.plot.format(model=name)
                plots.save(plots.attribution_heatmap(scores, row["tokens"], title=f"{name}: {kind}"), path)
                print(f"wrote {path}")
        out["models"][name] = {"cases": rows, "blocks_checked": blocks, "seconds": time.perf_counter() - start}
        del model
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

"""Thought patches against exact updates and gradient descent: what transfers to held-out queries, and why.

For each task (``examples/thought_tasks.py``) and seed (which 4 examples are the shots, which 16 queries train),
on a pretrained model in float64: the few-shot prefix P (the tokenizer's special tokens first), 16 training queries
``"{x} ->"`` of one token length K (of several where fewer than 16 share one), and 20+ held-out queries of any
length. Conditions, each run on a held-out query
alone (its answer's tokens after it, teacher-forced):

- ``full``: P + query (in-context learning); ``zero-shot`` (and ``zero-shot + specials`` where the tokenizer prepends
  special tokens): the query alone;
- ``exact 4`` / ``exact 16``: the exact stacked update over 4 / 16 training queries (``iu.thought_systems(...).fit()``:
  exact on all their n K positions); ``mean of 16 exact``: the mean of the 16 per-query exact updates;
- ``matrix ridge R``: thought matrices fitted by ridge least squares over all 16 K positions (``R`` relative to each
  block's rows' mean squared norm); ``matrix rank r``: reduced-rank least squares (ridge 0; ``matrix rank 4, ridge
  0.01``: both); ``vector``: one
  additive change of each block's output; ``both``: matrices with the vector as intercept (ridge 1e-2);
- ``LoRA GD rank 4``: gradient descent (context distillation, Adam, ``--steps`` steps, lr 1e-3, float32) on a LoRA of
  rank 4 on every gate/up/down projection, on the same 16 training queries: equal rank to ``matrix rank 4``;
- ``exact 16, specials only`` (where there are special tokens): the exact stacked update absorbed from the special
  tokens alone, without the examples (what the examples add).

Per condition, over the held-out queries: top-1 agreement with the full model and KL(full || condition) at the first
answer position, first-token accuracy, and whole-answer accuracy (every answer token the greedy choice). Spreads are
over seeds. Also greedy continuations of two held-out queries per task (seed 0), and the per-block transfer
diagnostic (``iu.transfer_diagnostic``) of the 16 training queries against the held-out ones.

    python examples/thought_study.py --model smollm2-135m --json examples/figures/thought_smollm2.json \\
        --plot examples/figures/thought_smollm2.png

Numbers are whatever they turn out to be; docs/results.md reports them with these commands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from thought_tasks import TASKS
from transfer_study import float32_copy, ids_of, kl, load_float64

import implicit_updates as iu
from implicit_updates.cli.common import write_json
from implicit_updates.runtime.hooks import swapped_parameters
from implicit_updates.runtime.precision import exact_formula

N_SHOT, N_TRAIN, N_HELD = 4, 16, 24
RIDGES = (1e-3, 1e-2, 1e-1, 1.0)
RANKS = (1, 4, 16)
LORA_RANK = 4
SETTINGS = ("model", "dtype", "n_shot", "n_train", "ridges", "ranks", "lora_rank", "steps")
SHOWN = ("full", "zero-shot", "exact 16", "matrix ridge 0.01", "vector", "LoRA GD rank 4")


def split(tokenizer, pairs: list, seed: int) -> tuple[str, list, list]:
    """Shots, 16 training queries, and the held-out (query, answer ids) pairs, shuffled by seed. The training queries
    have one token length K (the commonest) where 16 do; otherwise they are the first 16 of any lengths (a task
    whose queries tokenize to many lengths: each length is gathered as its own batch)."""
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    shots, rest = pairs[:N_SHOT], pairs[N_SHOT:]
    items = [(ids_of(tokenizer, f"{x} ->")[0], ids_of(tokenizer, f" {y}")[0], x, y) for x, y in rest]
    lengths = [len(q) for q, *_ in items]
    k = max(sorted(set(lengths)), key=lengths.count)
    train = [it for it in items if len(it[0]) == k][:N_TRAIN]
    if len(train) < N_TRAIN:
        train = items[:N_TRAIN]
    held = [it for it in items if not any(it is t for t in train)][:N_HELD]
    return "".join(f"{x} -> {y}\n" for x, y in shots), train, held


def stacked(queries: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """``[n, K]`` for queries of one length, else the list (the library takes either)."""
    return torch.stack(queries) if len({len(q) for q in queries}) == 1 else queries


def by_length(queries: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """The queries as batches ``[n_K, K]``, one per length, in order of first appearance (query-major within)."""
    if isinstance(queries, torch.Tensor):
        return [queries]
    groups: dict[int, list[torch.Tensor]] = {}
    for q in queries:
        groups.setdefault(len(q), []).append(q)
    return [torch.stack(g) for g in groups.values()]


def grouped(held: list) -> dict[tuple[int, int], list[int]]:
    """Held-out indices by (query length, answer length): each group runs as one batch."""
    groups = defaultdict(list)
    for i, (q, a, *_) in enumerate(held):
        groups[(len(q), len(a))].append(i)
    return groups


def answer_logits(model, held: list, before: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per held-out query, the logits at its answer positions ``[len(a), vocab]`` (query + answer[:-1] after
    ``before``), batched by length."""
    out: list[torch.Tensor] = [None] * len(held)  # type: ignore[list-item]
    for (_, la), idx in grouped(held).items():
        rows = torch.stack([torch.cat([held[i][0], held[i][1][:-1]]) for i in idx])
        if before is not None:
            rows = torch.cat([before.expand(len(idx), -1), rows], 1)
        with torch.no_grad():
            logits = model(input_ids=rows, use_cache=False).logits[:, -la:]
        for j, i in enumerate(idx):
            out[i] = logits[j].double()
    return out


@contextlib.contextmanager
def with_deltas(model, deltas: dict):
    values = {n: model.get_parameter(n) + d for n, d in deltas.items()}
    with swapped_parameters(model, values), exact_formula(model, torch.float64):
        yield model


@contextlib.contextmanager
def plain(model):
    with exact_formula(model, torch.float64):
        yield model


def scores(held: list, full: list, got: list) -> dict:
    n = len(held)
    return {"agree": sum(float(g[0].argmax() == f[0].argmax()) for g, f in zip(got, full, strict=True)) / n,
            "correct": sum(float(g[0].argmax() == h[1][0]) for g, h in zip(got, held, strict=True)) / n,
            "answer": sum(float(bool((g.argmax(-1) == h[1]).all())) for g, h in zip(got, held, strict=True)) / n,
            "kl": sum(kl(f[0], g[0]) for g, f in zip(got, full, strict=True)) / n}


def lora_gd(model, prefix: torch.Tensor, train: torch.Tensor | list[torch.Tensor], steps: int) -> dict:
    """Dense deltas of a rank-4 PEFT LoRA on every gate/up/down projection, trained by context distillation on the
    training queries' K positions (float32, Adam)."""
    import peft

    batches = by_length(train)
    targets = []
    with torch.no_grad(), plain(model):
        for batch in batches:
            targets.append(F.log_softmax(model(input_ids=torch.cat([prefix.expand(len(batch), -1), batch], 1),
                                               use_cache=False).logits[:, -batch.shape[1]:].float(), -1))
    student = peft.get_peft_model(float32_copy(model), peft.LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.0))
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    positions = sum(b.numel() for b in batches)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = 0.0
        for batch, target in zip(batches, targets, strict=True):  # one batch: F.kl_div's "batchmean", as before
            logp = F.log_softmax(student(input_ids=batch, use_cache=False).logits, -1)
            loss = loss + F.kl_div(logp.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="sum")
        (loss / positions).backward()
        optimizer.step()
    deltas = {}
    for name, module in student.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            deltas[name.removeprefix("base_model.model.") + ".weight"] = (b @ a * module.scaling["default"]).detach() \
                .double()
    del student
    return deltas


def mean_of_exact(systems, n: int) -> dict:
    total: dict = {}
    for i in range(n):
        for name, d in systems.fit(queries=[i]).patch().items():
            total[name] = total.get(name, 0) + d / n
    return total


def greedy(model, ids: torch.Tensor, tokenizer, n: int = 6) -> str:
    ids = ids[None]
    for _ in range(n):
        with torch.no_grad():
            nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return tokenizer.decode(ids[0, -n:]).split("\n")[0]


def exact_error(systems, train, n: int) -> float:
    """The exact fit on the first ``n`` training queries, in the forward every condition runs, on those queries
    alone: its max |logit diff| from the full model (``ValueError`` where the fit is refused)."""
    with systems.fit(queries=range(n)).applied() as patched, torch.no_grad():
        own = torch.cat([patched(input_ids=batch, use_cache=False).logits.flatten(0, 1)  # query-major
                         for batch in ([train[:n]] if isinstance(train, torch.Tensor) else
                                       [q[None] for q in train[:n]])])
    return float((own - systems.full_logits[: len(own)]).abs().max())


def run(model, tokenizer, task: str, pairs: list, seed: int, steps: int, show: bool) -> dict:
    text, train_items, held = split(tokenizer, pairs, seed)
    if len(train_items) < N_TRAIN or len(held) < 20:
        raise SystemExit(f"task {task!r}: {len(train_items)} training queries of one token length and {len(held)} "
                         f"held-out ones; the study needs {N_TRAIN} and 20: give more pairs")
    prefix = tokenizer(text, return_tensors="pt").input_ids
    specials = prefix[0, : prefix.shape[1] - ids_of(tokenizer, text).shape[1]]
    train = stacked([q for q, *_ in train_items])
    with plain(model):
        full = answer_logits(model, held, prefix)
    rows: dict[str, dict] = {"full": scores(held, full, full)}
    conditions: dict[str, object] = {"zero-shot": lambda: plain(model)}
    systems = iu.thought_systems(model, prefix, train, dtype=torch.float64)
    conditions["exact 4"] = lambda: systems.fit(queries=range(4)).applied()
    conditions["exact 16"] = lambda: systems.fit().applied()
    conditions["mean of 16 exact"] = lambda: with_deltas(model, mean_of_exact(systems, len(train)))
    for r in RIDGES:
        conditions[f"matrix ridge {r:g}"] = lambda r=r: systems.fit(ridge=r).applied()
    for r in RANKS:
        conditions[f"matrix rank {r}"] = lambda r=r: systems.fit(rank=r).applied()
    conditions["matrix rank 4, ridge 0.01"] = lambda: systems.fit(ridge=1e-2, rank=4).applied()
    conditions["vector"] = lambda: systems.fit(kind="vector").applied()
    conditions["both"] = lambda: systems.fit(ridge=1e-2, kind="both").applied()
    lora_seconds = [0.0]

    def lora():
        start = time.perf_counter()
        deltas = lora_gd(model, prefix, train, steps)
        lora_seconds[0] = time.perf_counter() - start
        return with_deltas(model, deltas)

    conditions[f"LoRA GD rank {LORA_RANK}"] = lora
    if len(specials):
        control = iu.thought_systems(model, specials[None], train, dtype=torch.float64)
        conditions["exact 16, specials only"] = lambda: control.fit().applied()
    shown: dict[str, list[str]] = {}
    for name, enter in conditions.items():
        try:
            with enter() as patched:
                rows[name] = scores(held, full, answer_logits(patched, held))
                if show and name in SHOWN:
                    shown[name] = [greedy(patched, h[0], tokenizer) for h in held[:2]]
        except (iu.UnsupportedArchitectureError, ValueError, torch.linalg.LinAlgError) as e:  # reported, not hidden
            rows[name] = {"error": str(e).splitlines()[0]}
    if len(specials):
        with plain(model):
            rows["zero-shot + specials"] = scores(held, full, answer_logits(model, held, specials[None]))
    if show:
        with plain(model):
            shown["full"] = [greedy(model, torch.cat([prefix[0], h[0]]), tokenizer) for h in held[:2]]
    training_error = {}
    for n in (4, len(train)):
        with contextlib.suppress(ValueError):
            training_error[f"exact {n}"] = exact_error(systems, train, n)
    lengths = sorted({len(q) for q in train})
    result = {"task": task, "seed": seed, "k": lengths[0] if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}",
              "n_train": len(train), "n_held_out": len(held),
              "multi_token_answers": sum(len(h[1]) > 1 for h in held), "rows": rows,
              "max_abs_logit_diff_on_training": training_error,
              "lora": {"rank": LORA_RANK, "steps": steps, "lr": 1e-3, "seconds": lora_seconds[0]}}
    if show:
        result["continuations"] = {"queries": [h[2] + " ->" for h in held[:2]], "answers": [h[3] for h in held[:2]],
                                   "greedy": shown}
    diagnostic = iu.transfer_diagnostic(model, prefix, systems, [h[0] for h in held]).to_dict()  # rows reused
    diagnostic.pop("principal_cosines")  # every angle of every block: kept as their mean square only
    result["diagnostic"] = diagnostic
    return result


def spread(values: list[float]) -> dict:
    """The mean and the population standard deviation (0 for one value)."""
    return {"mean": statistics.fmean(values), "sd": statistics.pstdev(values)}


def summarise(results: list[dict]) -> dict:
    """Per task and condition: the mean and the spread (standard deviation over seeds) of every measure; and the
    same averaged over tasks."""
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        for cond, row in r["rows"].items():
            for key, value in row.items():
                if key != "error":
                    table[r["task"]][cond][key].append(value)
    out: dict = {}
    for task, conds in table.items():
        out[task] = {c: {k: spread(v) for k, v in m.items()} for c, m in conds.items()}
    seeds = sorted({r["seed"] for r in results})
    overall: dict = {}
    for cond in dict.fromkeys(c for r in results for c in r["rows"]):
        # the tasks where the condition ran on every seed (a refusal is not a zero): one task set for all seeds
        tasks = [t for t in dict.fromkeys(r["task"] for r in results)
                 if all("agree" in r["rows"].get(cond, {}) for r in results if r["task"] == t)]
        if not tasks:
            continue
        per_seed = defaultdict(list)
        for seed in seeds:
            ran = [r["rows"][cond] for r in results if r["seed"] == seed and r["task"] in tasks]
            for key in ("agree", "correct", "answer", "kl"):
                per_seed[key].append(statistics.fmean(row[key] for row in ran))
        overall[cond] = {**{k: spread(v) for k, v in per_seed.items()}, "n_tasks": len(tasks)}
    out["all tasks"] = overall
    return out


def merge(paths: list[str]) -> dict:
    """One study from several runs of the same model and settings (e.g. tasks run separately): the runs in order, the
    summary recomputed from them; refused if the settings differ or a (task, seed) appears twice."""
    studies = [json.load(open(p)) for p in paths]
    complete = [s for s in studies if not s.get("partial")]
    if not complete:
        raise SystemExit("--merge needs one complete study (the others may be the partial JSON of a stopped run)")
    for path, study in zip(paths, studies, strict=True):  # a partial file records the model only
        differ = [k for k in SETTINGS if k in study and study[k] != complete[0][k]]
        if differ:
            raise SystemExit(f"{path}: {', '.join(differ)} differ from the others: merge runs of one setting")
    runs = [r for study in studies for r in study["runs"]]
    seen = [(r["task"], r["seed"]) for r in runs]
    if len(set(seen)) != len(seen):
        raise SystemExit(f"a (task, seed) appears twice in {', '.join(paths)}: merge disjoint runs")
    sources = [name for path, study in zip(paths, studies, strict=True)  # a merged study names its own sources
               for name in study.get("merged_from", [Path(path).name])]
    return {**{k: complete[0][k] for k in SETTINGS}, "seeds": len({r["seed"] for r in runs}),
            "seconds": sum(r["seconds"] for r in runs), "merged_from": sources, "summary": summarise(runs),
            "runs": runs}


def plot(summary: dict, model: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    rows = summary["all tasks"]
    for ax, (label, names, xs) in zip(axes, [
            ("ridge (relative)", [f"matrix ridge {r:g}" for r in RIDGES], RIDGES),
            ("rank", [f"matrix rank {r}" for r in RANKS], RANKS)], strict=True):
        for key, colour in (("agree", "C0"), ("correct", "C1")):
            means = [rows[n][key]["mean"] for n in names]
            sds = [rows[n][key]["sd"] for n in names]
            ax.errorbar(xs, means, yerr=sds, marker="o", color=colour, capsize=3, label=f"thought matrix: {key}")
            for ref, style in (("exact 16", "--"), ("LoRA GD rank 4", ":"), ("zero-shot", "-.")):
                if ref in rows:
                    ax.axhline(rows[ref][key]["mean"], color=colour, ls=style, lw=1,
                               label=f"{ref}: {key}" if key == "agree" else None)
        ax.set_xscale("log")
        ax.set_xlabel(label)
    axes[0].set_ylabel("held-out share\n(mean over tasks; bars: sd over seeds)")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{model}: thought matrices on held-out queries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a pretrained name, or a local Hugging Face directory")
    parser.add_argument("--task", action="append", help=f"repeatable; default: all of {', '.join(TASKS)}")
    parser.add_argument("--tasks-json", metavar="PATH",
                        help='other tasks instead: a JSON file {"name": [["x", "y"], ...]} (44+ pairs each)')
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="LoRA gradient steps (the GD budget)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="instead of running: merge these studies' runs (one model, disjoint tasks) into --json")
    args = parser.parse_args(argv)
    if args.merge:
        if not args.json:
            parser.error("--merge writes --json PATH: give it")
        out = merge(args.merge)
        write_json(args.json, out)
        return out
    tasks = json.loads(open(args.tasks_json).read()) if args.tasks_json else TASKS
    unknown = set(args.task or []) - set(tasks)
    if unknown:
        parser.error(f"unknown task(s) {sorted(unknown)}: choose from {', '.join(tasks)}")
    torch.manual_seed(0)
    model, tokenizer = load_float64(args.model)
    settings = {"model": args.model, "dtype": "float64", "n_shot": N_SHOT, "n_train": N_TRAIN,
                "ridges": list(RIDGES), "ranks": list(RANKS), "lora_rank": LORA_RANK, "steps": args.steps}
    results, start = [], time.perf_counter()
    for task in args.task or list(tasks):
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            r = run(model, tokenizer, task, [tuple(p) for p in tasks[task]], seed, args.steps, show=seed == 0)
            r["seconds"] = time.perf_counter() - t0
            results.append(r)
            write_json(args.json, {**settings, "partial": True, "runs": results})  # a crash keeps the runs
            best = {c: v for c, v in r["rows"].items() if "kl" in v}
            print(f"{task} seed {seed} (K={r['k']}, {r['n_held_out']} held-out, {r['seconds']:.0f} s; exact on their "
                  f"training queries: {r['max_abs_logit_diff_on_training']}): "
                  + ", ".join(f"{c} {v['agree']:.2f}/{v['kl']:.2f}" for c, v in best.items()), flush=True)
    summary = summarise(results)
    out = {**settings, "seeds": args.seeds, "seconds": time.perf_counter() - start, "summary": summary,
           "runs": results}
    for cond, row in summary["all tasks"].items():
        print(f"  {cond:>26}: agree {row['agree']['mean']:.2f}±{row['agree']['sd']:.2f}  correct "
              f"{row['correct']['mean']:.2f}  answer {row['answer']['mean']:.2f}  KL {row['kl']['mean']:.2f}"
              f"±{row['kl']['sd']:.2f}")
    write_json(args.json, out)
    if args.plot:
        plot(summary, args.model, args.plot)
    return out


if __name__ == "__main__":
    main()

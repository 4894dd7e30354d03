"""The thought-patch study's tables and figure, from the JSON files ``examples/thought_study.py`` wrote.

    python examples/thought_tables.py examples/figures/thought_smollm2.json examples/figures/thought_gemma.json \\
        examples/figures/thought_qwen05.json --plot examples/figures/thought_transfer.png

Prints markdown: one table over all tasks (mean and spread over seeds, per model), one per model and task, and the
transfer diagnostic against measured transfer (Spearman rank correlations over every task and seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

MAIN = ("zero-shot", "zero-shot + specials", "exact 4", "exact 16", "mean of 16 exact", "matrix ridge 0.001",
        "matrix ridge 0.01", "matrix ridge 0.1", "matrix ridge 1", "matrix rank 1", "matrix rank 4", "matrix rank 16",
        "matrix rank 4, ridge 0.01", "vector", "both", "LoRA GD rank 4", "exact 16, specials only")
PER_TASK = ("zero-shot", "exact 4", "exact 16", "mean of 16 exact", "matrix ridge 0.01", "matrix rank 4", "vector",
            "LoRA GD rank 4")
NAMES = {"smollm2-135m": "SmolLM2-135M", "gemma-3-270m": "Gemma-3-270M", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B",
         "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B"}


def cell(row: dict | None, key: str, digits: int = 2) -> str:
    if row is None or key not in row:
        return "n/a"
    m, s = row[key]["mean"], row[key]["sd"]
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def label(study: dict) -> str:
    tasks = study.get("n_tasks") or len({r["task"] for r in study["runs"]})
    return f"{NAMES.get(study['model'], study['model'])} ({tasks} tasks)"


def fewer(row: dict, study: dict) -> str:
    """`` (n of N tasks)`` where the condition ran on fewer tasks than the study has (refused on the others)."""
    total = study.get("n_tasks") or len({r["task"] for r in study["runs"]})
    n = row.get("n_tasks", total)
    return f" ({n} of {total} tasks)" if n < total else ""


def dropped(study: dict, tasks: list[str]) -> dict:
    """``study`` without ``tasks``: its runs filtered and its summary recomputed (by the study's own
    ``summarise``)."""
    if not tasks:
        return study
    from thought_study import summarise  # examples/: the study that wrote the JSON

    runs = [r for r in study["runs"] if r["task"] not in tasks]
    return {**study, "runs": runs, "summary": summarise(runs), "n_tasks": len({r["task"] for r in runs})}


def overall_table(studies: list[dict], keys: tuple = ("agree", "kl")) -> str:
    names = {"agree": "agree", "kl": "KL", "correct": "first-token accuracy", "answer": "whole-answer accuracy"}
    head = "| condition | " + " | ".join(f"{label(s)}: {', '.join(names[k] for k in keys)}" for s in studies) + " |"
    lines = [head, "|---|" + "---|" * len(studies)]
    for cond in MAIN if "full" not in studies[0]["summary"]["all tasks"] or keys == ("agree", "kl") else \
            ("full", *MAIN):
        rows = [s["summary"]["all tasks"].get(cond) for s in studies]
        if all(r is None for r in rows):
            continue
        lines.append(f"| {cond} | " + " | ".join("n/a" if r is None else ", ".join(cell(r, k) for k in keys)
                                                 + fewer(r, s) for r, s in zip(rows, studies, strict=True)) + " |")
    return "\n".join(lines)


def task_table(study: dict) -> str:
    conds = [c for c in PER_TASK if any(c in study["summary"][t] for t in study["summary"] if t != "all tasks")]
    if any("zero-shot + specials" in study["summary"][t] for t in study["summary"]):
        conds.insert(1, "zero-shot + specials")
    lines = ["| task (K; multi-token answers) | full: correct, answer | " + " | ".join(conds) + " |",
             "|---|---|" + "---|" * len(conds)]
    for task, rows in study["summary"].items():
        if task == "all tasks":
            continue
        runs = [r for r in study["runs"] if r["task"] == task]
        k = sorted({str(r["k"]) for r in runs})
        multi = statistics.fmean(r["multi_token_answers"] / r["n_held_out"] for r in runs)
        full = rows["full"]
        lines.append(f"| {task} ({'/'.join(map(str, k))}; {multi:.0%}) | {full['correct']['mean']:.2f}, "
                     f"{full['answer']['mean']:.2f} | " + " | ".join(
                         "n/a" if c not in rows else f"{rows[c]['agree']['mean']:.2f} / {rows[c]['kl']['mean']:.2f}"
                         for c in conds) + " |")
    return "\n".join(lines)


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            out[order[t]] = (i + j) / 2
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    return statistics.correlation(ranks(x), ranks(y)) if len(x) > 2 else float("nan")


def diagnostic_rows(studies: list[dict], skip: tuple = ()) -> list[dict]:
    """One row per (model, task, seed): the diagnostic's medians over blocks and the measured transfer."""
    out = []
    for s in studies:
        for r in s["runs"]:
            if "diagnostic" not in r or r["task"] in skip:
                continue
            base = r["rows"].get("zero-shot + specials", r["rows"]["zero-shot"])
            diagnostic = r["diagnostic"]  # the median over blocks: one ill-conditioned block does not decide it
            median = {m: statistics.median(v) if (v := [x for x in diagnostic[m] if x is not None]) else None
                      for m in ("coverage", "principal_mean_square", "first_layer_residual", "output_residual",
                                "vector_residual")}
            out.append({"model": s["model"], "task": r["task"], "seed": r["seed"], **median,
                        **{f"{c}: agree": r["rows"][c]["agree"] for c in ("exact 16", "matrix ridge 0.01")
                           if "agree" in r["rows"].get(c, {})},
                        **{f"{c}: KL recovered": 1 - r["rows"][c]["kl"] / max(base["kl"], 1e-12)
                           for c in ("exact 16", "matrix ridge 0.01") if "kl" in r["rows"].get(c, {})}})
    return out


def paired_control(studies: list[dict], control: str = "exact 16, specials only", against: str = "exact 16") -> str:
    """The special-tokens-only control against the update from the examples, on the same runs (task and seed) only:
    where the control's fit was refused on some runs, the overall means would compare different task sets."""
    conds = (against, control, "zero-shot + specials")
    lines = ["| model | runs with both | " + " | ".join(f"{c}: agree, KL" for c in conds) + " |",
             "|---|---|---|---|---|"]
    for s in studies:
        runs = [r for r in s["runs"] if all("agree" in r["rows"].get(c, {}) for c in (control, against))]
        if not runs:
            continue
        cells = []
        for cond in conds:
            rows = [r["rows"][cond] for r in runs if "agree" in r["rows"].get(cond, {})]
            mean = {k: statistics.fmean(r[k] for r in rows) for k in ("agree", "kl")} if rows else None
            cells.append(f"{mean['agree']:.2f}, {mean['kl']:.2f}" if mean else "n/a")
        lines.append(f"| {NAMES.get(s['model'], s['model'])} | {len(runs)} of {len(s['runs'])} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def diagnostic_table(studies: list[dict], skip: tuple = ()) -> str:
    rows = diagnostic_rows(studies, skip)
    measures = ("coverage", "principal_mean_square", "first_layer_residual", "output_residual", "vector_residual")
    targets = [t for t in ("exact 16: agree", "exact 16: KL recovered", "matrix ridge 0.01: agree",
                           "matrix ridge 0.01: KL recovered") if any(t in r for r in rows)]
    lines = ["| diagnostic (median over blocks) | " + " | ".join(f"model means: {NAMES.get(s['model'], s['model'])}"
                                                            for s in studies)
             + " | " + " | ".join(f"Spearman vs {t}" for t in targets) + " |",
             "|---|" + "---|" * (len(studies) + len(targets))]
    for m in measures:
        means = []
        for s in studies:
            vals = [r[m] for r in rows if r["model"] == s["model"] and r.get(m) is not None]
            means.append(f"{statistics.fmean(vals):.3f}" if vals else "n/a")
        cors = []
        for t in targets:
            pairs = [(r[m], r[t]) for r in rows if r.get(m) is not None and t in r]
            cors.append(f"{spearman([a for a, _ in pairs], [b for _, b in pairs]):+.2f} (n={len(pairs)})")
        lines.append(f"| {m} | " + " | ".join(means) + " | " + " | ".join(cors) + " |")
    return "\n".join(lines)


def within_model(studies: list[dict], skip: tuple = ()) -> str:
    """Spearman of the first-layer residual against exact-16 agreement within each model (tasks and seeds)."""
    rows = diagnostic_rows(studies, skip)
    parts = []
    for s in studies:
        pairs = [(r["first_layer_residual"], r["exact 16: agree"]) for r in rows
                 if r["model"] == s["model"] and "exact 16: agree" in r]
        parts.append(f"{NAMES.get(s['model'], s['model'])} {spearman(*map(list, zip(*pairs, strict=True))):+.2f}"
                     if len(pairs) > 2 else f"{s['model']} n/a")
    return "Within each model, Spearman(first-layer residual, exact 16 agreement): " + "; ".join(parts) + "."


def plot(studies: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    for i, s in enumerate(studies):
        rows, colour = s["summary"]["all tasks"], f"C{i}"
        name = label(s)
        for ax, names, xs in ((axes[0], [f"matrix ridge {r:g}" for r in s["ridges"]], s["ridges"]),
                              (axes[1], [f"matrix rank {r}" for r in s["ranks"]], s["ranks"])):
            ax.errorbar(xs, [rows[n]["agree"]["mean"] for n in names], yerr=[rows[n]["agree"]["sd"] for n in names],
                        marker="o", color=colour, capsize=3, label=f"{name}: thought matrix")
            for ref, style in (("exact 16", "--"), ("LoRA GD rank 4", ":")):
                if ref not in rows:  # refused on every run (e.g. dependent rows): nothing to draw
                    continue
                ax.axhline(rows[ref]["agree"]["mean"], color=colour, ls=style, lw=1,
                           label=f"{name}: {ref}" if ax is axes[1] else None)
    for ax, xlabel in zip(axes, ("ridge (relative to the rows' mean squared norm)", "rank cap (ridge 0)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("held-out top-1 agreement with the full model\n(mean over tasks; bars: sd over 3 seeds)")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.suptitle("Thought matrices fitted over 16 training queries, on held-out queries")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse_log(path: str) -> tuple[dict, dict]:
    """A study's printed lines (``{task} seed {s} (...): {condition} {agree}/{kl}, ...``) as ``{task: {condition:
    [(agree, kl) per seed]}}`` and ``{condition: {seed: [(agree, kl) per task]}}``."""
    import re

    table: dict = defaultdict(lambda: defaultdict(list))
    seeds: dict = defaultdict(lambda: defaultdict(list))
    for line in open(path):
        m = re.match(r"(.+) seed (\d+) \(K=.*?\): (.*)$", line.strip())
        if m:
            for cond, agree, kl in re.findall(r"([^,]+?) ([0-9.]+)/([0-9.]+)(?:,|$)", m.group(3)):
                # the condition with a comma in its name arrives without its first part
                cond = "exact 16, specials only" if cond.strip() == "specials only" else cond.strip()
                table[m.group(1)][cond].append((float(agree), float(kl)))
                seeds[cond][m.group(2)].append((float(agree), float(kl)))
    return table, seeds


def study_from_log(model: str, path: str) -> dict:
    """A study's summary over all tasks (agree and KL, mean and sd over seeds) from its printed lines: enough for the
    overall table and the figure."""
    table, seeds = parse_log(path)
    summary = {}
    for cond, per_seed in seeds.items():
        agree = [statistics.fmean(a for a, _ in v) for v in per_seed.values()]
        kls = [statistics.fmean(k for _, k in v) for v in per_seed.values()]
        summary[cond] = {"agree": {"mean": statistics.fmean(agree), "sd": statistics.pstdev(agree)},
                         "kl": {"mean": statistics.fmean(kls), "sd": statistics.pstdev(kls)}}
    return {"model": model, "ridges": [1e-3, 1e-2, 1e-1, 1.0], "ranks": [1, 4, 16], "seeds": len(agree),
            "n_tasks": len(table),
            "summary": {"all tasks": summary}, "runs": [], "from_log": path}


def from_log(path: str) -> str:
    """Top-1 agreement and KL per task and condition (mean ± sd over seeds) from a study's printed lines (``{task}
    seed {s} (...): {condition} {agree}/{kl}, ...``), for a run whose JSON was not written."""
    table, seeds = parse_log(path)
    overall = ["| condition (mean over tasks; ± sd over seeds) | agree | KL |", "|---|---|---|"]
    for cond in MAIN:
        if cond in seeds:
            agree = [statistics.fmean(a for a, _ in v) for v in seeds[cond].values()]
            kls = [statistics.fmean(k for _, k in v) for v in seeds[cond].values()]
            tasks = sorted({len(v) for v in seeds[cond].values()})
            overall.append(f"| {cond}{'' if tasks == [len(table)] else f' ({tasks} tasks)'} | "
                           f"{statistics.fmean(agree):.2f} ± {statistics.pstdev(agree):.2f} | "
                           f"{statistics.fmean(kls):.2f} ± {statistics.pstdev(kls):.2f} |")
    conds = [c for c in PER_TASK + ("zero-shot + specials", "matrix ridge 0.1", "exact 16, specials only")
             if any(c in t for t in table.values())]
    lines = ["| task (seeds) | " + " | ".join(conds) + " |", "|---|" + "---|" * len(conds)]
    def fmt(pairs: list | None) -> str:
        if not pairs:
            return "n/a"
        agree, kls = zip(*pairs, strict=True)
        return f"{statistics.fmean(agree):.2f} / {statistics.fmean(kls):.2f} ± {statistics.pstdev(kls):.2f}"

    for task, rows in table.items():
        lines.append(f"| {task} ({len(rows['full'])}) | " + " | ".join(fmt(rows.get(c)) for c in conds) + " |")
    return "\n".join(overall) + "\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="*")
    parser.add_argument("--from-log", metavar="PATH", help="the agreement / KL table from a study's printed lines")
    parser.add_argument("--plot", metavar="PATH")
    parser.add_argument("--skip", action="append", default=[], metavar="TASK",
                        help="also the overall tables and the diagnostic's correlations without this task, and the "
                             "figure without it (repeatable)")
    parser.add_argument("--log-study", action="append", default=[], metavar="MODEL=PATH",
                        help="a study known from its printed lines only (overall table and figure)")
    args = parser.parse_args(argv)
    if args.from_log:
        print(from_log(args.from_log))
        return
    studies = [json.load(open(p)) for p in args.json]
    logged = [study_from_log(*spec.split("=", 1)) for spec in args.log_study]
    print(overall_table(logged + studies), end="\n\n")
    if studies:
        print(overall_table(studies, ("correct", "answer")), end="\n\n")
    for s in studies:
        print(f"{NAMES.get(s['model'], s['model'])} (agree / KL, means over {s['seeds']} seeds):\n")
        print(task_table(s), end="\n\n")
    control = paired_control(studies)
    if control:
        print("The special-tokens-only control, paired (means over the runs where both fits ran):\n")
        print(control, end="\n\n")
    print(diagnostic_table(studies), end="\n\n")
    print(within_model(studies), end="\n\n")
    if args.skip:
        print(f"Without {', '.join(args.skip)}:\n")
        without = [d for d in (dropped(s, args.skip) for s in studies) if d["runs"]]
        if without:
            print(overall_table(without), end="\n\n")
            print(overall_table(without, ("correct", "answer")), end="\n\n")
        print(diagnostic_table(studies, tuple(args.skip)), end="\n\n")
        print(within_model(studies, tuple(args.skip)))
    if args.plot:
        plot(logged + [d for d in (dropped(s, args.skip) for s in studies) if d["runs"]], args.plot)


if __name__ == "__main__":
    main()

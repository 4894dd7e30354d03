"""The transfer study's table (docs/results.md) from its JSON: per task, the full model's accuracy, then KL (and in
brackets the share of held-out queries agreeing with the full model) for every condition the run has.

    python examples/transfer_tables.py examples/figures/transfer_qwen05.json
"""

from __future__ import annotations

import argparse
import json

LABELS = {"made-up suffix": "made-up suffix `x -> xzo`"}


def table(study: dict) -> str:
    conditions = [c for c in study["tasks"][0]["rows"] if c != "full"]
    head = ["task (K)", "full: correct", *(f"{c} KL (agree)" for c in conditions)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in study["tasks"]:
        rows = task["rows"]
        cells = [f"{LABELS.get(task['task'], task['task'])} ({task['k']})", f"{rows['full']['correct']:.2f}"]
        cells += [f"{rows[c]['kl']:.2f} ({rows[c]['agree']:.2f})" for c in conditions]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(study: dict) -> str:
    """The run's own checks: how exact the stacked update is on its training queries, the gradient cosines, the time."""
    tasks = study["tasks"]
    exact = [t["max_abs_logit_diff_on_training_queries"] for t in tasks]
    cosines = [t["cosine_update_vs_first_gradient_step"] for t in tasks]
    return (f"{study['model']} ({study['dtype']}{', factored' if study.get('factored') else ''}): stacked-4 update on "
            f"its own training queries max |logit diff| {min(exact):.1e} to {max(exact):.1e}; cosine to the first "
            f"gradient step {min(cosines):+.3f} to {max(cosines):+.3f}; {sum(t['seconds'] for t in tasks) / 60:.0f} "
            f"min{' (partial run)' if study.get('partial') else ''}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+")
    for path in parser.parse_args(argv).json:
        with open(path) as f:
            study = json.load(f)
        print(summary(study) + "\n\n" + table(study) + "\n")


if __name__ == "__main__":
    main()

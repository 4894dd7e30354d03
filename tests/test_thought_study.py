"""The thought-patch study (examples/thought_study.py) and its tables end to end on stories260K (the team's tiny
Llama): every condition runs on every seed, the exact updates reproduce the full model on their own training
queries, the full model agrees with itself, spreads come from the seeds, and the tables and figure are written."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared/models/stories260K"
pytestmark = pytest.mark.usefixtures("one_thread")


def example(name: str):
    """A script of examples/ imported as a module (its sibling imports resolved)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "examples"))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found at {STORIES} (the team's ../shared next to the repository)")
    pytest.importorskip("peft")
    thought_study = example("thought_study")
    out = tmp_path_factory.mktemp("study") / "s.json"
    thought_study.main(["--model", str(STORIES), "--task", "addition", "--seeds", "2", "--steps", "2",
                        "--json", str(out)])
    return json.loads(out.read_text()), out


def test_every_condition_on_every_seed(study):
    payload, _ = study
    runs = payload["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all(r["n_train"] == 16 and r["n_held_out"] >= 20 for r in runs)
    expected = {"full", "zero-shot", "exact 4", "exact 16", "mean of 16 exact", "matrix ridge 0.001",
                "matrix ridge 0.01", "matrix ridge 0.1", "matrix ridge 1", "matrix rank 1", "matrix rank 4",
                "matrix rank 16", "matrix rank 4, ridge 0.01", "vector", "both", "LoRA GD rank 4",
                "exact 16, specials only", "zero-shot + specials"}  # stories' tokenizer prepends <s>
    for r in runs:
        assert set(r["rows"]) == expected
        assert r["rows"]["full"]["agree"] == 1.0 and r["rows"]["full"]["kl"] == 0.0
        for row in r["rows"].values():
            assert "error" in row or (0 <= row["agree"] <= 1 and row["kl"] >= 0 and 0 <= row["answer"] <= 1)
        # 4 queries of 11 tokens fit the 64-wide stream: exact on them, a literal check of the machinery
        assert r["max_abs_logit_diff_on_training"]["exact 4"] <= 1e-9
        assert set(r["diagnostic"]["mean"]) >= {"coverage", "first_layer_residual"}
    assert "continuations" in runs[0] and "continuations" not in runs[1]
    kls = [r["rows"]["zero-shot"]["kl"] for r in runs]
    spread = payload["summary"]["addition"]["zero-shot"]["kl"]
    assert spread["mean"] == pytest.approx(sum(kls) / 2) and spread["sd"] == pytest.approx(abs(kls[0] - kls[1]) / 2)


def test_tables_and_figure(study, tmp_path, capsys):
    _, path = study
    thought_tables = example("thought_tables")
    thought_tables.main([str(path), "--plot", str(tmp_path / "t.png")])
    text = capsys.readouterr().out
    assert "| exact 4 |" in text and "| addition (11; 100%)" in text and "Spearman" in text
    assert (tmp_path / "t.png").stat().st_size > 10_000
    without = thought_tables.dropped(json.loads(path.read_text()), ["addition"])  # its only task
    assert without["runs"] == [] and without["n_tasks"] == 0
    thought_tables.main([str(path), "--skip", "addition"])  # nothing left to tabulate without it: no crash


def test_merge_recomputes_the_summary(study, tmp_path):
    """Two halves of a study (one seed each) merge into the same summary as the whole; a (task, seed) twice, or a
    different setting, is refused."""
    payload, _ = study
    thought_study = example("thought_study")
    halves = []
    for i, run in enumerate(payload["runs"]):
        halves.append(tmp_path / f"half{i}.json")
        halves[-1].write_text(json.dumps({**payload, "seeds": 1, "runs": [run]}))
    merged = thought_study.main(["--merge", *map(str, halves), "--json", str(tmp_path / "m.json")])
    assert merged["summary"] == payload["summary"] and merged["runs"] == payload["runs"]
    assert json.loads((tmp_path / "m.json").read_text())["merged_from"] == ["half0.json", "half1.json"]
    assert thought_study.merge([str(tmp_path / "m.json")])["merged_from"] == ["half0.json", "half1.json"]
    with pytest.raises(SystemExit, match="appears twice"):
        thought_study.merge([str(halves[0]), str(halves[0])])
    partial = tmp_path / "partial.json"  # a stopped run's file: the model and its runs
    partial.write_text(json.dumps({"model": payload["model"], "partial": True, "runs": [payload["runs"][1]]}))
    assert thought_study.merge([str(halves[0]), str(partial)])["summary"] == payload["summary"]
    with pytest.raises(SystemExit, match="one complete study"):
        thought_study.merge([str(partial)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**payload, "steps": 7, "runs": [payload["runs"][1]]}))
    with pytest.raises(SystemExit, match="steps differ"):
        thought_study.merge([str(halves[0]), str(other)])


def test_paired_control_uses_only_runs_where_both_ran():
    thought_tables = example("thought_tables")

    def run(exact, control):
        rows = {"exact 16": {"agree": exact, "kl": 1.0}, "zero-shot + specials": {"agree": 0.0, "kl": 5.0}}
        rows["exact 16, specials only"] = {"agree": control, "kl": 2.0} if control is not None else {"error": "x"}
        return {"rows": rows}

    study = {"model": "gemma-3-270m", "runs": [run(0.5, 0.1), run(0.7, 0.3), run(0.9, None)]}
    lines = thought_tables.paired_control([study]).splitlines()
    assert lines[-1] == "| Gemma-3-270M | 2 of 3 | 0.60, 1.00 | 0.20, 2.00 | 0.00, 5.00 |"
    assert thought_tables.paired_control([{**study, "runs": [run(0.9, None)]}]) == ""


def test_float32_detour_compares_the_model_as_written_with_its_float64_formula():
    """examples/float32_detour.py on stories260K (a Llama: its RMSNorm normalises in float32): both formulas give a
    row per exact fit; in the float64 formula every fit that is solved reproduces its training queries to float64
    rounding, and the model as written to float32 rounding at worst; the full model's own logits differ between the
    two formulas (so the float64 formula was in force), by rounding only."""
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found at {STORIES} (the team's ../shared next to the repository)")
    result = example("float32_detour").main(["--model", str(STORIES), "--task", "capital", "--seed", "0"])
    rows = result["rows"]
    assert 0 < result["full_model_detour"] <= 1e-4  # the float64 formula is really another forward, by rounding only
    assert [(r["formula"], r["exact"]) for r in rows] == [("as written", 4), ("as written", 16),
                                                           ("float64 formula", 4), ("float64 formula", 16)]
    kept = [r for r in rows if r["formula"] == "float64 formula"]
    assert any("max_abs_logit_diff" in r for r in kept)
    assert all(r["max_abs_logit_diff"] <= 1e-9 for r in kept if "max_abs_logit_diff" in r)
    assert all(r.get("max_abs_logit_diff", 0.0) <= 1e-3 for r in rows if r["formula"] == "as written")

"""The CLI's JSON, the demo, the presets, and the install layout (adapters/ only as implicit_updates.adapters)."""

from __future__ import annotations

import email
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from implicit_updates.cli import main
from implicit_updates.experiments import icl
from implicit_updates.models import PRESETS
from implicit_updates.models.loading import hooked_classes


@pytest.fixture
def hooked():
    """random:PRESET models are HookedTransformers: on TransformerLens 4.x the CLI exits 2 saying so, and conftest
    reports these tests as skipped when this raises first."""
    hooked_classes()


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"gpt2-small"}))
def test_verify_cli_every_small_preset(preset, tmp_path, capsys, hooked):
    out = tmp_path / "out.json"
    assert main(["verify", "--model", f"random:{preset}", "--seq-len", "24", "--dtype", "float64",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"model", "dtype", "query", "n_positions", "blocks", "max_rel_err"} <= data.keys()
    assert data["model"] == f"random:{preset}" and data["dtype"] == "float64" and data["n_positions"] == 24
    assert len(data["blocks"]) == PRESETS[preset]["n_layers"]
    for block in data["blocks"]:
        assert block["max_rel_err"] <= 1e-10 and block["rank"] == 1
        assert {"block", "msd", "max_abs_err", "max_rel_err", "rank", "factored_max_rel_err", "literal_max_rel_err",
                "literal_positions", "worst_position", "worst_batch", "position_rel_errs"} == block.keys()
        assert block["literal_max_rel_err"] <= 1e-10 and len(block["literal_positions"]) == 3
        assert len(block["position_rel_errs"]) == 24 and max(block["position_rel_errs"]) <= block["max_rel_err"]
    assert "max relative error" in capsys.readouterr().out


def test_verify_cli_gpt2_small_shapes(tmp_path, hooked):
    """The issue's headline command on GPT-2-small's real shapes (12 blocks), shorter prompt to keep CI fast."""
    out = tmp_path / "out.json"
    main(["verify", "--model", "random:gpt2-small", "--seq-len", "32", "--dtype", "float64", "--json", str(out)])
    data = json.loads(out.read_text())
    assert len(data["blocks"]) == 12 and data["max_rel_err"] <= 1e-10


@pytest.mark.parametrize("load_dtype", ["bfloat16", "float16"])
def test_load_dtype_half_weights_computed_in_float64_and_float32(load_dtype, tmp_path, hooked):
    """``--load-dtype``: the weights are held in half precision; ``--dtype float64`` computes exactly in float64 (one
    module upcast at a time), and without ``--dtype`` the package warns and computes in float32."""
    out = tmp_path / "out.json"
    main(["verify", "--model", "random:llama", "--load-dtype", load_dtype, "--seq-len", "12", "--dtype", "float64",
          "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["dtype"] == "float64" and data["max_rel_err"] <= 1e-12
    with pytest.warns(UserWarning, match="float32"):
        main(["verify", "--model", "random:llama", "--load-dtype", load_dtype, "--seq-len", "12", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["dtype"] == "float32" and data["max_rel_err"] <= 1e-4


def test_load_dtype_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as err:
        main(["verify", "--model", "random:llama", "--load-dtype", "float64"])
    assert err.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err


def test_verify_cli_token_prompt_and_query_self(tmp_path, hooked):
    out = tmp_path / "out.json"
    main(["verify", "--model", "random:llama", "--prompt", "5,9,13,2,7", "--query", "self", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["query"] == "self" and data["n_positions"] == 5 and data["dtype"] == "float32"
    assert data["max_rel_err"] <= 1e-4


def test_demo_trains_and_verifies(tmp_path, capsys):
    out = tmp_path / "demo.json"
    main(["demo", "--steps", "20", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["train_loss_last"] < data["train_loss_first"]
    by = {(r["dtype"], r["query"]): r for r in data["runs"]}
    assert by[("float64", "last")]["max_rel_err"] <= 1e-12
    assert by[("float32", "last")]["max_rel_err"] <= 1e-4
    assert all(b["rank"] == 1 for b in by[("float64", "last")]["blocks"])
    assert "block" in capsys.readouterr().out


def test_regression_tasks():
    tasks = icl.sample_tasks(4, 10, 3, torch.Generator().manual_seed(0))
    assert tasks.prompts.shape == (4, 11, 4) and tasks.targets.shape == (4,)
    assert torch.all(tasks.prompts[:, -1, -1] == 0)
    # every context label is <w, x_i> for the task's one w: solve for w from the context, check the query target
    x, y = tasks.prompts[:, :-1, :3], tasks.prompts[:, :-1, 3]
    w = torch.linalg.lstsq(x, y[..., None]).solution[..., 0]
    torch.testing.assert_close(torch.einsum("bd,bd->b", tasks.prompts[:, -1, :3], w), tasks.targets,
                               rtol=1e-4, atol=1e-4)


def test_adapters_install_only_inside_the_package(tmp_path):
    code = ("import importlib.util, implicit_updates.adapters as a; "
            "print(importlib.util.find_spec('adapters') is None, a.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "implicit_updates.adapters"]


def test_package_metadata_license_urls_and_no_setuptools_deprecation(tmp_path):
    """The metadata pip sees: PEP 639 license expression and file, project URLs, classifiers; setuptools raises on
    any of its deprecation warnings here (a ``license = {text = ...}`` table brings its box back)."""
    pytest.importorskip("setuptools", minversion="77", reason="PEP 639 metadata needs setuptools>=77")
    root = Path(__file__).resolve().parents[1]
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / name, tmp_path / name)
    for package in ("implicit_updates", "adapters"):  # a copy: building metadata writes egg-info next to the sources
        shutil.copytree(root / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "meta").mkdir()
    code = ("import sys, warnings\nfrom setuptools.warnings import SetuptoolsDeprecationWarning\n"
            "warnings.simplefilter('error', SetuptoolsDeprecationWarning)\n"
            "from setuptools.build_meta import prepare_metadata_for_build_wheel\n"
            "print(prepare_metadata_for_build_wheel(sys.argv[1]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "meta")], cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    info = tmp_path / "meta" / out.stdout.split()[-1]
    meta = email.message_from_string((info / "METADATA").read_text())
    assert meta["License-Expression"] == "MIT" and meta["License-File"] == "LICENSE"
    assert (info / "licenses" / "LICENSE").read_text() == (root / "LICENSE").read_text()
    assert "MIT License" in (root / "LICENSE").read_text()
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert set(urls) == {"Homepage", "Repository", "Issues"}
    assert all(u.startswith("https://github.com/implicit-updates/implicit-updates") for u in urls.values())
    assert "Programming Language :: Python :: 3" in meta.get_all("Classifier")
    assert not any(c.startswith("License ::") for c in meta.get_all("Classifier"))  # PEP 639: the expression only


def test_help_reads_as_plain_text():
    """``implicit-updates --help`` and every subcommand's help print no reStructuredText double backticks."""
    import argparse

    from implicit_updates.cli.commands import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {"implicit-updates": parser.format_help()}
    helps.update({name: sub.format_help() for name, sub in subparsers.choices.items()})
    assert set(helps) >= {"implicit-updates", "verify", "absorb", "demo", "dynamics", "attribute", "report"}
    for name, text in helps.items():
        assert "``" not in text, f"{name} --help shows RST markup:\n{text}"


ROOT = Path(__file__).resolve().parents[1]
# docs pages that are generated (zoo.md by tests/test_zoo.py), include another file (changelog.md) or are about to
# move (api/): outside the single-source check
NOT_SINGLE_SOURCED = {"zoo.md", "changelog.md"}


def prose_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs outside code fences, whitespace-normalised; fenced code is left out (the same
    command may well appear on two pages), tables and lists are kept."""
    paragraphs, current, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        if fenced:
            continue
        if line.strip() and "--8<--" not in line:  # a snippet include or section marker ends a paragraph
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def duplicated_paragraphs(files: dict[str, str], min_chars: int = 80) -> dict[str, list[str]]:
    """Each non-trivial paragraph (longer than ``min_chars``) that appears in more than one file, with the files."""
    seen: dict[str, list[str]] = {}
    for name, text in files.items():
        for paragraph in set(prose_paragraphs(text)):
            if len(paragraph) > min_chars:
                seen.setdefault(paragraph, []).append(name)
    return {p: names for p, names in seen.items() if len(names) > 1}


def single_sourced_files() -> dict[str, str]:
    files = {"README.md": (ROOT / "README.md").read_text()}
    for path in sorted((ROOT / "docs").glob("*.md")):
        if path.name not in NOT_SINGLE_SOURCED:
            files[f"docs/{path.name}"] = path.read_text()
    return files


def test_no_paragraph_exists_twice_between_readme_and_docs():
    """README.md and docs/ share text by mkdocs snippets (``--8<--``), never by copies that drift apart."""
    files = single_sourced_files()
    assert len(files) > 10
    duplicates = duplicated_paragraphs(files)
    assert not duplicates, "\n\n".join(f"{names}: {p[:200]}" for p, names in duplicates.items())


def test_duplicate_paragraph_check_can_fail():
    files = single_sourced_files()
    paragraph = next(p for p in prose_paragraphs(files["docs/math.md"]) if len(p) > 80)
    files["README.md"] += "\n\n" + paragraph + "\n"
    assert list(duplicated_paragraphs(files).values()) == [["README.md", "docs/math.md"]]


def test_readme_first_screen_says_how_to_install_run_and_test():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:100])
    assert any(line.lstrip().startswith("pip install") for line in first_screen.splitlines())
    for needed in ("make demo", "make test", "iu.decompose"):
        assert needed in first_screen, needed

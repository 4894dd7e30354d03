"""The import contract (``.importlinter``: the layers, no backend module imported above the adapters, a torch-only
math, no cycles), checked by import-linter on a staged copy of the package in which ``adapters/`` sits at
``implicit_updates/adapters``, as it is installed (import-linter reads the package from one folder).

    python tests/import_contract.py      # `make imports`, part of `make test`; exit 0 iff every contract is kept
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage(target: Path) -> Path:
    """A copy of the package with ``adapters/`` inside it, under ``target``; returns ``target``."""
    shutil.rmtree(target, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "implicit_updates", target / "implicit_updates", ignore=ignore)
    shutil.copytree(ROOT / "adapters", target / "implicit_updates" / "adapters", ignore=ignore)
    return target


def lint(staged: Path) -> subprocess.CompletedProcess:
    """import-linter over the staged copy (it, not the editable install, is first on the path)."""
    linter = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(linter), "--no-cache", str(ROOT / ".importlinter")], cwd=staged, capture_output=True,
                          text=True, env={"PYTHONPATH": str(staged), "PATH": str(linter.parent)})


if __name__ == "__main__":
    done = lint(stage(ROOT / "build" / "imports"))
    print(done.stdout[done.stdout.find("Contracts"):] if "Contracts" in done.stdout else done.stdout + done.stderr)
    sys.exit(done.returncode)

"""The package's layering and the adapter interface: the import contract holds and catches what it forbids, no
analysis reads an adapter's private member, and every backend declares what it serves (or why not)."""

from __future__ import annotations

import re

import pytest
from import_contract import ROOT, lint, stage

from implicit_updates.adapters import adapter_classes
from implicit_updates.adapters.base import CAPABILITIES, require
from implicit_updates.errors import UnsupportedArchitectureError

pytest.importorskip("importlinter", reason="import-linter is in the dev extra: pip install -e '.[dev]'")


def test_the_import_contract_holds(tmp_path):
    done = lint(stage(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("math/core.py", "from implicit_updates.analyses import decompose", "The layers"),  # upward
    ("analyses/verify.py", "from implicit_updates.adapters import hf", "No analysis"),  # a backend module
    ("math/core.py", "import transformers", "torch only"),  # a framework in the math
    ("adapters/toy.py", "from implicit_updates.adapters import nnsight_adapter", "No import cycles"),  # a cycle
])
def test_the_import_contract_catches_each_violation(tmp_path, module, line, broken):
    staged = stage(tmp_path)
    path = staged / "implicit_updates" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    if "nnsight_adapter" in line:  # close the cycle: nnsight_adapter -> hf -> modules; make one back to toy
        hf = staged / "implicit_updates" / "adapters" / "nnsight_adapter.py"
        hf.write_text(hf.read_text() + "\nfrom implicit_updates.adapters import toy\n")
    done = lint(staged)
    assert done.returncode != 0
    assert re.search(rf"{re.escape(broken)}[^\n]*\n?[^\n]*BROKEN", done.stdout), done.stdout


def test_no_private_adapter_member_is_read_outside_the_adapters():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "implicit_updates").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"adapter\._[a-z]", line)]
    assert offenders == []


def test_every_backend_serves_or_explains_every_capability():
    classes = adapter_classes()
    assert list(classes) == ["nnsight", "toy", "TransformerBridge", "HookedTransformer", "Hugging Face"]
    for name, cls in classes.items():
        assert cls.backend == name
        assert "decompose" in cls.capabilities
        assert set(cls.capabilities) <= set(CAPABILITIES)
        for capability in set(CAPABILITIES) - set(cls.capabilities):
            assert cls.limits.get(capability), f"{name} lacks {capability} without saying why"


def test_a_missing_capability_is_refused_naming_it():
    class Stub:
        backend, capabilities = "stub", frozenset({"decompose"})
        limits = {"attribution": "stubs have no attention"}

    with pytest.raises(UnsupportedArchitectureError, match=r"attribute is not available on the stub backend "
                                                            r"\(capability 'attribution'\): stubs have no attention"):
        require(Stub(), "attribution")
    require(Stub(), "decompose")
    with pytest.raises(ValueError, match="unknown capability"):
        require(Stub(), "telepathy")


def test_the_readme_table_is_generated_from_the_capabilities():
    from capability_table import markdown, table_in

    assert table_in((ROOT / "README.md").read_text()) == markdown(), \
        "README.md's capability table is stale: python tests/capability_table.py README.md"

"""mutmut's view of this repository (``make mutation``; not part of ``make test``).

Loaded into every pytest run mutmut makes (``-p tests.mutation.plugin`` in pyproject's ``[tool.mutmut]``):

- ``implicit_updates.adapters`` lives in ``adapters/`` (pyproject's package-dir), so the editable install maps it to
  the original files. mutmut copies the mutated ones to ``mutants/adapters`` and names their mutants
  ``adapters.<module>...``, matched against each function's ``__module__``; so ``implicit_updates.adapters[.X]`` is
  imported here as the very module ``adapters[.X]`` from ``mutants/``.
- Each module's mutants run against its own fast test selection (``SELECTIONS``, chosen by ``MUTATION_MODULE``):
  mutmut reruns, for every mutant, each selected test that reaches the mutated function, so the whole suite (7+
  minutes) per mutant would take days.

As a script: ``python tests/mutation/plugin.py --glob MODULE`` prints the mutant-name pattern of a module, and
``--score MODULE...`` the killed/survived counts read from ``mutants/``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
from collections import Counter
from pathlib import Path

from hypothesis import Phase, settings

# ``HYPOTHESIS_PROFILE=mutation``: the same examples every run, and no shrinking (a mutant that fails a property test
# is killed at its first failing example; shrinking it would only run into mutmut's timeout)
settings.register_profile("mutation", derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])

ROOT = Path(__file__).resolve().parents[2]  # mutants/ when mutmut runs it, the checkout when run as a script

ARCH = "tests/test_architectures.py::test_literal_weight_edit_reproduces_context"
CHECKERS = "tests/test_checkers.py::"
CORE_TESTS = ["tests/test_core.py", CHECKERS + "test_verify_passes_the_uncorrupted_decomposition",
              CHECKERS + "test_verify_reports_a_corrupted_column", "tests/test_references.py::test_moe"]
LITERAL = [f"{ARCH}[float64-{a}]" for a in ("gated", "layernorm", "parallel-neox", "pre-post-norm-gemma",
                                             "post-norm-olmo2", "moe-mixtral", "solu", "no-norm")]
STRUCTURES = "tests/test_hooked_structures.py"  # MoE before a post-norm, dead ReLU hidden/experts, identity norms
SCALED_AND_DEAD = "tests/test_scaled_and_dead.py"  # Granite's scaled joins, refused dead hidden, small expert hidden
FUSED = "tests/test_fused_experts.py"  # experts fused into stacked parameters (RankOneUpdate.experts / expert)
VERIFY_TESTS = [CHECKERS + t for t in ("test_verify_reports_a_corrupted_output_correction_exactly",
                                       "test_verify_query_self_reports_the_corrupted_position",
                                       "test_verify_report_table_and_json")]
MODULE_BACKENDS = ("Hugging_Face-gpt2", "Hugging_Face-llama", "TransformerBridge-gpt2", "TransformerBridge-llama",
                   "nnsight-gpt2", "nnsight-llama")  # (stories260K's cases skip under mutants/: no ../shared there)
CONFORMANCE = "tests/test_conformance.py::test_capability"
GENERATE = "tests/test_generate.py::"
# absorbed generation on the backends run by their own forward (HF, TransformerBridge, nnsight): drawn architectures
# against plain float64 forwards, refusals, and each backend's conformance case
MODULE_GENERATION = [GENERATE + t for t in ("test_every_step_matches_plain_forwards_of_the_history",
                                            "test_bad_input_is_refused_in_one_line",
                                            "test_non_finite_activations_leave_no_hook",
                                            "test_what_the_absorbing_run_cannot_patch")] + [
    f"{CONFORMANCE}[{b}-generation]" for b in MODULE_BACKENDS]
# a bridge's components (and the modules they wrap) streamed in float64: GPT-2's, and Llama's against plain HF
STREAMED_BRIDGE = ["tests/test_bridge.py::test_bridge_literal_weight_edit[gpt2-float64]",
                   "tests/test_bridge.py::test_bridge_decomposition_equals_hf"]
# module -> (the mutants' source file, the tests that run against them)
SELECTIONS: dict[str, tuple[str, list[str]]] = {
    "core": ("implicit_updates/math/core.py", CORE_TESTS + VERIFY_TESTS[:1] + ["tests/test_analysis.py"]),
    "updates": ("implicit_updates/math/updates.py", CORE_TESTS + LITERAL + ["tests/test_analysis.py", STRUCTURES,
                                                                      SCALED_AND_DEAD,
                                                                      "tests/test_hf.py::test_gemma_post_norm_exact",
                                                                      "tests/test_references.py::test_two_token",
                                                                      FUSED]),
    "verify": ("implicit_updates/analyses/verify.py", VERIFY_TESTS + ["tests/test_html.py::test_repr"]),  # no browser
    "decompose": ("implicit_updates/analyses/decompose.py", VERIFY_TESTS + LITERAL[:3] + ["tests/test_bad_input.py"]),
    "capture": ("implicit_updates/capture.py", LITERAL[:3] + ["tests/test_references.py",
                                                              "tests/test_absorb.py::test_absorbed_model_other"]),
    "absorb": ("implicit_updates/analyses/absorb.py", ["tests/test_absorb.py", CHECKERS + "test_absorbed_chain"]),
    "dynamics": ("implicit_updates/analyses/dynamics.py", ["tests/test_dynamics.py::test_prop31",
                                                  "tests/test_dynamics.py::test_step_with_row_change",
                                                  "tests/test_dynamics.py::test_naive_prefix",
                                                  "tests/test_dynamics.py::test_suffix_removal",
                                                  CHECKERS + "test_onepass_vs_naive"]),
    "analysis": ("implicit_updates/math/analysis.py", ["tests/test_analysis.py"]),
    "hooked_transformer": ("adapters/hooked_transformer.py", LITERAL + ["tests/test_references.py", STRUCTURES]),
    "hooked_prefixes": ("adapters/hooked_prefixes.py", ["tests/test_dynamics.py::test_onepass_equals_naive_arch"]),
    "modules": ("adapters/modules.py", ["tests/test_hf.py::test_literal_weight_edit_every_layout",
                                        "tests/test_hf.py::test_gemma_post_norm_exact"]),
    # the shared algorithms of the adapter interface (#24): the one capture assembler and patched-run row layout, the
    # one parameter swap
    "assemble": ("adapters/assemble.py", LITERAL[:3] + VERIFY_TESTS + [CHECKERS + "test_query_one_token_early",
                                                                       "tests/test_toy.py",
                                                                       "tests/test_patched_rows.py"]),
    "dispatch": ("implicit_updates/runtime/dispatch.py", ["tests/test_swap.py", "tests/test_accelerate.py",
                                                          "tests/test_absorb.py", "tests/test_streaming.py"]),
    "precision": ("implicit_updates/runtime/precision.py", ["tests/test_streaming.py", "tests/test_float64_formula.py",
                                                            *STREAMED_BRIDGE]),
    # the one patched run's edit application (verify's factored run, absorbed generation): edit_hooks, add_*; and
    # the helpers on the inputs those layouts do not give them (flattened MLPs, weight * z post-norms, keyword
    # hidden states, tuple outputs, close's boundary): tests/test_module_hooks.py
    "module_hooks": ("adapters/module_hooks.py", ["tests/test_hf.py::test_literal_weight_edit_every_layout",
                                                  "tests/test_hf.py::test_gemma_post_norm_exact",
                                                  "tests/test_module_hooks.py"]
                     + MODULE_GENERATION[:1] + [f"{CONFORMANCE}[{b}-{c}]" for b in MODULE_BACKENDS
                                                for c in ("decompose", "generation")]),
    "module_generation": ("adapters/module_generation.py", MODULE_GENERATION),
}


def mutant_glob(module: str) -> str:
    """mutmut names a mutant ``<dotted file path>.x_<function>__mutmut_<n>``."""
    return SELECTIONS[module][0].removesuffix(".py").replace("/", ".") + ".*"


class _AdaptersAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``implicit_updates.adapters[.X]`` is ``adapters[.X]`` (from ``mutants/``, first on ``sys.path``)."""

    prefix = "implicit_updates.adapters"

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.prefix or fullname.startswith(self.prefix + "."):
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("adapters" + spec.name.removeprefix(self.prefix))

    def exec_module(self, module):
        pass  # already executed under its own name


def install_alias() -> None:
    """At this plugin's import (``-p``, before the conftests import the package, whose analyses import the
    adapters' interface): the mutated ``adapters/`` answer for ``implicit_updates.adapters``."""
    if ROOT.name == "mutants" and not any(isinstance(f, _AdaptersAlias) for f in sys.meta_path):
        assert "implicit_updates.adapters" not in sys.modules, "the original adapters were imported first"
        sys.meta_path.insert(0, _AdaptersAlias())


install_alias()


def pytest_collection_modifyitems(config, items):
    module = os.environ.get("MUTATION_MODULE")
    if not module:
        return
    prefixes = tuple(SELECTIONS[module][1])
    selected = [item for item in items if item.nodeid.startswith(prefixes)]
    config.hook.pytest_deselected(items=[item for item in items if item not in selected])
    items[:] = selected


def score(modules: list[str]) -> list[dict]:
    """Per module: mutmut's count of each status (read from ``mutants/``), and killed / (killed + survived)."""
    from mutmut.stats import status_by_exit_code

    rows = []
    for module in modules:
        meta = ROOT / "mutants" / (SELECTIONS[module][0] + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        counts = Counter(status_by_exit_code[code] for code in codes.values())
        tried = counts["killed"] + counts["survived"]
        statuses = ("killed", "survived", "no tests", "timeout", "not checked", "suspicious", "segfault")
        rows.append({"module": module, "mutants": len(codes), **{k: counts[k] for k in statuses},
                     "score": counts["killed"] / tried if tried else float("nan"),
                     "survivors": sorted(k for k, code in codes.items() if code == 0)})
    return rows


if __name__ == "__main__":
    if sys.argv[1] == "--glob":
        print(mutant_glob(sys.argv[2]))
    elif sys.argv[1] == "--score":
        for row in score(sys.argv[2:] or sorted(SELECTIONS)):
            print(f"{row['module']:>18}: {row['mutants']:4d} mutants, killed {row['killed']:4d}, survived "
                  f"{row['survived']:3d}, no tests {row['no tests']:3d}, timeout {row['timeout']:3d}, not checked "
                  f"{row['not checked']:3d}: {row['score']:.1%} killed")
            for name in row["survivors"]:
                print(f"    survived: {name}")
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --glob MODULE | --score [MODULE...]")

"""A config fuzzer: random-but-valid tiny HookedTransformers over TransformerLens's structural options.

Every draw passes every check of :func:`fuzz_configs.check` (verify with its literal check, an independent literal
weight edit against ``run_with_cache``, the absorbed model, the one pass against the naive dynamics on a subset, the
model untouched), or is refused with an ``UnsupportedArchitectureError`` whose message is one of the justified
refusals in ``fuzz_configs.REFUSALS`` (the README's table). CI draws the same examples every run (derandomized).
"""

from __future__ import annotations

import pytest
import torch
from fuzz_configs import REFUSALS, check, configs
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from implicit_updates.models.loading import hooked_classes

try:
    hooked_classes()
except ImportError as err:  # TransformerLens 4.x: no HookedTransformer
    pytest.skip(str(err).splitlines()[0], allow_module_level=True)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(cfg=configs(), onepass=st.integers(0, 3), batch=st.sampled_from([1, 1, 2]), continuous=st.integers(0, 5))
def test_random_config_is_exact_or_refused(one_thread, cfg, onepass, batch, continuous):
    outcome = check(cfg, onepass=onepass == 0, batch=batch, continuous=continuous == 0)
    assert outcome == "ok" or outcome in REFUSALS


def test_fuzzer_reaches_the_options():
    """Guard against a vacuous fuzzer: the strategy really draws each structural option."""
    for wanted in (lambda c: c.get("num_experts") and c.get("original_architecture"),
                   lambda c: c["positional_embedding_type"] == "alibi" and c["n_heads"] == 3,
                   lambda c: c.get("use_attention_sinks") and c["positional_embedding_type"] == "shortformer",
                   lambda c: c.get("ungroup_grouped_query_attention"),
                   lambda c: c.get("use_normalization_before_and_after") and c["gated_mlp"],
                   lambda c: c["parallel_attn_mlp"] and c["dtype"] == torch.float32):
        assert find(configs(), wanted, settings=settings(max_examples=2000, database=None))

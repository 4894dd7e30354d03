"""Shared fixtures: small random TransformerLens models of every block variant, and a model-integrity check."""

from __future__ import annotations

import copy
import os
import warnings
from contextlib import contextmanager

import pytest
import torch
from hypothesis import settings

from implicit_updates.models.loading import hooked_classes

warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")

# CI (``.ci/run``) draws the same hypothesis examples every run, so a landing never hangs on a new random draw;
# plain ``pytest`` keeps exploring fresh examples (a failure there becomes a regression test, as in test_core).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On TransformerLens 4.x a test that needs HookedTransformer is reported skipped, with the reason (``-rs``)."""
    outcome = yield
    report = outcome.get_result()
    err = call.excinfo.value if call.excinfo is not None else None
    if isinstance(err, ImportError) and "HookedTransformer" in str(err):  # ours, or TL 4.x's own ImportError
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {str(err).splitlines()[0]}")


BASE = dict(n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=48, n_ctx=64, d_vocab=61, act_fn="gelu",
            normalization_type="LN")

# Every HookedTransformer block variant the foundation issue lists.
ARCHITECTURES: dict[str, dict] = {
    "layernorm": dict(),
    "layernorm-folded": dict(normalization_type="LNPre"),
    "rmsnorm": dict(normalization_type="RMS", act_fn="silu"),
    "rmsnorm-folded": dict(normalization_type="RMSPre"),
    "no-norm": dict(normalization_type=None, act_fn="relu"),
    "gated": dict(normalization_type="RMS", gated_mlp=True, act_fn="silu"),
    "solu": dict(act_fn="solu_ln"),
    "parallel-neox": dict(parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=4),
    "gqa-rotary": dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", n_key_value_heads=2,
                       positional_embedding_type="rotary", rotary_dim=8),
    "shortformer": dict(positional_embedding_type="shortformer"),
    "alibi": dict(positional_embedding_type="alibi"),
    "pre-post-norm-gemma": dict(normalization_type="RMS", use_normalization_before_and_after=True, gated_mlp=True,
                                act_fn="gelu_pytorch_tanh", n_key_value_heads=2, positional_embedding_type="rotary",
                                rotary_dim=8, use_local_attn=True, attn_types=["global", "local", "global"],
                                window_size=4),
    "post-norm-olmo2": dict(normalization_type="RMS", gated_mlp=True, act_fn="silu",
                            original_architecture="Olmo2ForCausalLM", positional_embedding_type="rotary",
                            rotary_dim=8),
    "moe-mixtral": dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", num_experts=4, experts_per_token=2,
                        positional_embedding_type="rotary", rotary_dim=8),
}


def build(seed: int = 0, zero_biases: bool = False, **overrides):
    """A random model whose biases and norm scales are random too (unless ``zero_biases``)."""
    HookedTransformer, HookedTransformerConfig = hooked_classes()
    cfg = HookedTransformerConfig(**{**BASE, **overrides}, seed=seed)
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if last in ("b_in", "b_out", "b_O", "b_Q", "b_K", "b_V", "b") and not zero_biases:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif last == "w":
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture
def one_thread():
    """Tiny models run several times faster on one thread (and the machine is shared); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(ARCHITECTURES), ids=sorted(ARCHITECTURES))
def arch(request):
    return request.param, build(**ARCHITECTURES[request.param])


def hook_count(model: torch.nn.Module) -> int:
    """Every torch hook and every TransformerLens hook-point hook on the model."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "fwd_hooks", [])) + len(getattr(m, "bwd_hooks", []))
    return n


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so NaN == NaN and -0.0 != 0.0: bit-identical means bit-identical."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


@contextmanager
def assert_untouched(model: torch.nn.Module):
    """Parameters bit-identical, no hooks left, every module's train/eval mode and the device unchanged."""
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    device = next(model.parameters()).device
    hooks = hook_count(model)
    try:
        yield
    finally:
        after = model.state_dict()
        assert params.keys() == after.keys()
        for k, v in params.items():
            assert after[k].dtype == v.dtype and torch.equal(_bits(after[k]), _bits(v)), f"parameter {k} changed"
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert next(model.parameters()).device == device
        assert hook_count(model) == hooks


def plain_query_input(model, prompt: torch.Tensor, query: str, block: int, position: int, batch: int = 0
                      ) -> torch.Tensor:
    """Block ``block``'s query input from a plain ``run_with_cache`` of ``model`` (none of our code): its input with
    context at the last position (``query="last"``) or at ``position`` (``"self"``), as ``[1, 1, d_model]``."""
    if query not in ("last", "self"):
        raise ValueError(f"no plain-forward reference for query={query!r}")
    name = f"blocks.{block}.hook_resid_pre"
    dtype = next(model.parameters()).dtype
    floats = prompt.is_floating_point()  # continuous inputs are fed at block 0
    with torch.no_grad():
        _, cache = model.run_with_cache(prompt.to(dtype) if floats else prompt, names_filter=name,
                                        stop_at_layer=block + 1, **({"start_at_layer": 0} if floats else {}))
    return cache[name][batch, -1 if query == "last" else position][None, None]


def literal_edit_output(model, result, block: int, position: int, batch: int = 0, prompt=None) -> torch.Tensor:
    """Add ``result.patch`` to a deep copy's real parameters and run that copy's block on the query alone.

    The query's input comes from a plain forward of the unedited copy on ``prompt`` (default: the decomposed
    inputs), never from ``result``: a decomposition built for the wrong query (say, one token early) reproduces its
    own ``result.query_input`` exactly, so only an independent query input catches it.
    """
    edited = copy.deepcopy(model).to(result.dtype)
    prompt = result.inputs if prompt is None else prompt
    query_input = plain_query_input(edited, prompt, result.query, block, position, batch)
    params = dict(edited.named_parameters())
    with torch.no_grad():
        for name, delta in result.patch(block, position, batch).items():
            assert params[name].shape == delta.shape, name
            params[name].add_(delta)
        return edited.blocks[block](query_input)[0, 0]


def context_outputs(model, tokens, dtype) -> dict[int, torch.Tensor]:
    """With-context block outputs, from a plain ``run_with_cache`` on an upcast copy (none of our hooks)."""
    ref = copy.deepcopy(model).to(dtype)
    _, cache = ref.run_with_cache(tokens)
    return {b: cache[f"blocks.{b}.hook_resid_post"] for b in range(model.cfg.n_layers)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (0 when both are zero)."""
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))


def check_onepass(model, prompt, blocks=None, chunk_size: int = 64, atol: float = 0.0) -> None:
    """The one-pass prefix dynamics equals the naive one (one decompose per prefix) in float64, and verifies."""
    from implicit_updates.analyses.dynamics import max_relative_difference, prefix_decomposition

    with assert_untouched(model):
        one = prefix_decomposition(model, prompt, blocks=blocks, dtype=torch.float64, chunk_size=chunk_size)
        naive = prefix_decomposition(model, prompt, blocks=blocks, dtype=torch.float64, method="naive")
    assert one.n_positions == prompt.shape[1] - 1
    assert max_relative_difference(one, naive, atol) <= 1e-10
    assert one.verify().max_rel_err <= 1e-10

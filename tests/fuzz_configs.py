"""Random-but-valid tiny ``HookedTransformerConfig``s over TransformerLens 3.9's structural options, and the checks
every draw must pass (or be refused with an ``UnsupportedArchitectureError`` naming the part).

Used by ``tests/test_fuzz.py`` (hypothesis, derandomized in CI) and runnable by hand for a longer search:
``python tests/fuzz_configs.py --n 2000 --seed 7``.
"""

from __future__ import annotations

import copy
import re

import torch
from hypothesis import strategies as st

NORMS = ["LN", "LNPre", "RMS", "RMSPre", None]
ACTIVATIONS = ["relu", "gelu", "silu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "solu_ln", "relu2"]

# Every refusal the fuzzer accepts: (pattern of the message, why it is justified). The README's table lists these.
REFUSALS = {
    "two norms after the MLP": "post-norm architecture with use_normalization_before_and_after",
    "reads ln2 both before and after the MLP": "post-norm architecture with parallel attention + MLP",
    "has no learnable scale": "a parameter-free norm after the MLP",
    "ungroup_grouped_query_attention=True: TransformerLens's key-value cache": "the one pass with ungrouped GQA",
}


@st.composite
def configs(draw) -> dict:
    """A tiny valid config (2 layers, d_model <= 24) with every structural option drawn."""
    n_heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    d_head = draw(st.sampled_from([2, 4, 6] if n_heads < 6 else [2, 4]))
    # d_model = n_heads * d_head: TransformerLens's post-norm and attention-result paths assume it
    cfg = dict(n_layers=2, n_heads=n_heads, d_head=d_head, d_model=n_heads * d_head,
               d_mlp=draw(st.sampled_from([8, 20, 32])), n_ctx=draw(st.sampled_from([10, 16, 64])), d_vocab=23,
               normalization_type=draw(st.sampled_from(NORMS)), act_fn=draw(st.sampled_from(ACTIVATIONS)),
               gated_mlp=draw(st.booleans()), parallel_attn_mlp=draw(st.booleans()))
    if cfg["act_fn"] == "solu_ln":
        cfg["gated_mlp"] = False  # TransformerLens's gated MLP has no SoLU LayerNorm
    if cfg["normalization_type"] is not None and draw(st.integers(0, 3)) == 0:
        cfg["original_architecture"] = "Olmo2ForCausalLM"  # post-norm blocks
    pos = draw(st.sampled_from(["standard", "shortformer", "rotary", "alibi"]))
    cfg["positional_embedding_type"] = pos
    if pos == "rotary":
        cfg["rotary_dim"] = draw(st.sampled_from([d for d in (2, 4, 6) if d <= d_head]))
        cfg["rotary_base"] = draw(st.sampled_from([100, 10000]))
        cfg["rotary_adjacent_pairs"] = draw(st.booleans())
    kv = draw(st.sampled_from([None] + [k for k in (1, 2, 3) if n_heads % k == 0 and k < n_heads]))
    if cfg.get("original_architecture"):
        kv = None  # OLMo 2's q/k norm spans all query heads: TransformerLens fails with fewer key/value heads
    if kv is not None:
        cfg["n_key_value_heads"] = kv
        cfg["ungroup_grouped_query_attention"] = draw(st.booleans())
    if draw(st.booleans()):
        cfg.update(use_local_attn=True, window_size=draw(st.sampled_from([1, 3])),
                   attn_types=[draw(st.sampled_from(["global", "local"])) for _ in range(2)])
    if cfg["normalization_type"] in (None, "RMS", "RMSPre") and draw(st.booleans()):  # TransformerLens fails on LN
        cfg["use_normalization_before_and_after"] = True
    if draw(st.integers(0, 3)) == 0:
        n_experts = draw(st.sampled_from([2, 3, 4]))
        cfg.update(num_experts=n_experts, experts_per_token=draw(st.integers(1, n_experts)),
                   norm_topk_prob=draw(st.booleans()), gated_mlp=True)
        if cfg["act_fn"] == "solu_ln":
            cfg["act_fn"] = "silu"
    if draw(st.integers(0, 3)) == 0 and "original_architecture" not in cfg:
        cfg["use_qk_norm"] = True  # OLMo 2 has its own q/k norm over d_model (TransformerLens fails with both)
    if draw(st.booleans()):
        cfg["use_attn_scale"] = draw(st.booleans())
        cfg["attn_scale"] = draw(st.sampled_from([-1.0, 2.5]))
    if draw(st.integers(0, 3)) == 0:
        cfg["attn_scores_soft_cap"] = draw(st.sampled_from([2.0, 30.0]))
    if draw(st.integers(0, 3)) == 0:
        cfg["output_logits_soft_cap"] = 5.0
    if draw(st.integers(0, 3)) == 0:
        cfg["use_attention_sinks"] = True
    if draw(st.integers(0, 4)) == 0 and (kv is None or cfg["ungroup_grouped_query_attention"]):
        cfg["use_split_qkv_input"] = True  # TransformerLens's split input has one key/value per query head
    if draw(st.integers(0, 4)) == 0:
        cfg["use_attn_result"] = True
    if draw(st.integers(0, 4)) == 0:
        cfg["final_rms"] = True
    cfg["dtype"] = draw(st.sampled_from([torch.float32, torch.float64]))
    cfg["seed"] = draw(st.integers(0, 2**16))
    return cfg


def build_model(cfg: dict):
    """The model of ``cfg`` with every parameter perturbed (biases, norm scales and sinks too), in eval mode."""
    from implicit_updates.models.loading import hooked_classes

    HookedTransformer, HookedTransformerConfig = hooked_classes()
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    gen = torch.Generator().manual_seed(cfg["seed"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def alone_kwargs(model, continuous: bool = False) -> dict:
    """What a block run on one token alone also reads: for token ids shortformer attention adds position 0's
    embedding; continuous inputs (``start_at_layer=0``) get no positional embedding from TransformerLens."""
    if model.cfg.positional_embedding_type != "shortformer" or continuous:
        return {}
    return {"shortformer_pos_embed": model.pos_embed(torch.zeros(1, 1, dtype=torch.long))}


def refusal_reason(err: Exception) -> str | None:
    """The justified refusal an ``UnsupportedArchitectureError`` corresponds to, or None."""
    for pattern in REFUSALS:
        if re.search(pattern, str(err)):
            return pattern
    return None


def check(cfg: dict, seq_len: int = 7, onepass: bool = False, absorb: bool = True, batch: int = 1,
          continuous: bool = False) -> str:
    """Every check on one config; returns ``"ok"`` or the refusal's pattern, raises on anything wrong."""
    from conftest import assert_untouched, rel_err

    import implicit_updates as iu
    from implicit_updates.adapters.tl_common import exact_alibi

    model = build_model(cfg)
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    seq_len = min(seq_len, cfg["n_ctx"])
    tokens = torch.randint(0, cfg["d_vocab"], (batch, seq_len), generator=gen)
    prompt = tokens
    if continuous:
        prompt = torch.randn(batch, seq_len, cfg["d_model"], generator=gen, dtype=cfg["dtype"])
    try:
        with assert_untouched(model):
            result = iu.decompose(model, prompt, dtype=torch.float64)
            report = result.verify(literal_positions=2)
    except iu.UnsupportedArchitectureError as err:
        reason = refusal_reason(err)
        if reason is None:
            raise
        return reason
    assert report.max_rel_err <= 1e-9, (report, cfg)

    # an independent literal edit: a float64 copy, real parameters edited, its own block run on the query token's
    # input taken from a plain run_with_cache (not from the result), compared with that forward's block output
    ref = copy.deepcopy(model).to(torch.float64)
    ref.cfg.dtype = torch.float64
    run = (lambda m, **kw: m.run_with_cache(prompt.to(torch.float64), start_at_layer=0, **kw)) if continuous else (
        lambda m, **kw: m.run_with_cache(tokens, **kw))
    with torch.no_grad(), exact_alibi(ref):  # what a model with fresh float64 ALiBi tables computes
        _, cache = run(ref)
        for block in range(cfg["n_layers"]):
            for position in (0, seq_len // 2, seq_len - 1):
                edited = copy.deepcopy(ref)
                for name, delta in result.patch(block, position, batch - 1).items():
                    edited.get_parameter(name).add_(delta)
                x = cache[f"blocks.{block}.hook_resid_pre"][batch - 1, -1][None, None]
                with exact_alibi(edited):
                    out = edited.blocks[block](x, **alone_kwargs(edited, continuous))[0, 0]
                target = cache[f"blocks.{block}.hook_resid_post"][batch - 1, position]
                assert rel_err(out, target) <= 1e-9, (block, position, rel_err(out, target), cfg)

    if absorb and batch == 1:
        with assert_untouched(model):
            absorbed = iu.compare_absorbed(model, prompt, dtype=torch.float64)
        assert absorbed.max_abs_logit_diff <= 1e-8, (absorbed.max_abs_logit_diff, cfg)
    if onepass and batch == 1 and not continuous:
        from conftest import check_onepass

        try:
            check_onepass(model, tokens, chunk_size=3, atol=1e-12)
        except iu.UnsupportedArchitectureError as err:
            reason = refusal_reason(err)
            if reason is None:
                raise
            return reason
    return "ok"


if __name__ == "__main__":  # a longer search by hand
    import argparse
    import collections
    import sys
    import traceback
    import warnings
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--onepass", action="store_true")
    args = parser.parse_args()
    counts: collections.Counter = collections.Counter()
    for _ in range(args.n):
        cfg = configs().example()  # random draws (hypothesis's own search runs in test_fuzz.py)
        try:
            counts[check(cfg, onepass=args.onepass)] += 1
        except Exception as err:  # noqa: BLE001 - a search reports every failure
            counts["FAIL"] += 1
            print(f"--- {type(err).__name__}: {str(err)[:300]}\n{cfg}")
            if args.n < 20:
                traceback.print_exc()
    print(dict(counts))

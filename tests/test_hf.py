"""Plain Hugging Face causal LMs: every supported block layout, by a literal weight edit on a deep copy.

Small random models built from configs (biases and norm scales randomised so no term is trivially zero). The
helpers here use only the model's own forward and plain torch hooks, none of the adapter's code; test_bridge.py
and test_stories260k.py reuse them.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import assert_untouched, hook_count, rel_err

import implicit_updates as iu
from implicit_updates.adapters import adapter_for
from implicit_updates.runtime.precision import casts_parameters, exact_formula

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
# transformers computes Gemma's RMSNorm in float32 whatever the model's dtype (``x.float()``, then
# ``(1 + weight.float())``), so a float64 edit of the post-MLP norm's scale is rounded to float32 on its way in.
GEMMA_FLOAT64_TOL = 1e-6
SMALL = dict(vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=64)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=3, n_head=4, n_positions=64, n_inner=48,
                                            bos_token_id=0, eos_token_id=0),
    "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, head_dim=8),
    "llama-mlp-bias": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, mlp_bias=True,
                                                       attention_bias=True),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2),
    "neox-parallel": lambda: transformers.GPTNeoXConfig(**SMALL, rotary_pct=0.5),
    "neox-sequential": lambda: transformers.GPTNeoXConfig(**SMALL, use_parallel_residual=False),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=8, sliding_window=4),
    "gemma3": lambda: transformers.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=8, sliding_window=4),
}
LAYERS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}  # the rest: model.layers


def tiny_hf(kind: str, seed: int = 0) -> torch.nn.Module:
    cfg = CONFIGS[kind]()
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # biases and norm scales
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def tokens(n: int, seed: int = 3, vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def layers_of(model) -> torch.nn.ModuleList:
    if hasattr(model, "original_model"):  # a TransformerBridge
        return model.blocks
    if model.config.model_type in LAYERS or hasattr(model, "model") and hasattr(model.model, "layers"):
        return model.get_submodule(LAYERS.get(model.config.model_type, "model.layers"))
    # any other architecture (test_zoo): the ModuleList holding most of the parameters, found without the adapter
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=lambda layers: sum(p.numel() for p in layers.parameters()))


def _forward(model, ids):
    return model(ids) if hasattr(model, "original_model") else model(input_ids=ids, use_cache=False)


class _Done(Exception):
    pass


def run_layer(model, block: int, x: torch.Tensor) -> torch.Tensor:
    """Layer ``block`` of ``model`` on ``x`` ``[1, len, d]`` (a one-token sequence, or a longer one) by the model's
    own forward: dummy ids of its length, the layer's hidden-states input swapped for ``x``, its output read."""
    layer, out = layers_of(model)[block], {}

    def swap(module, args, kwargs):
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    def done(module, args, output):
        out["y"] = output if isinstance(output, torch.Tensor) else output[0]
        raise _Done

    handles = [layer.register_forward_pre_hook(swap, with_kwargs=True), layer.register_forward_hook(done)]
    try:
        _forward(model, torch.zeros(x.shape[:2], dtype=torch.long))
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
    return out["y"]


def context_outputs(model, ids: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every layer's with-context output from a plain forward of an upcast copy."""
    ref, outs = copy.deepcopy(model).to(dtype), []
    handles = [layer.register_forward_hook(lambda m, a, o: outs.append(o if isinstance(o, torch.Tensor) else o[0]))
               for layer in layers_of(ref)]
    with torch.no_grad():
        _forward(ref, ids)
    for h in handles:
        h.remove()
    return outs


def layer_input(model, ids: torch.Tensor, block: int) -> torch.Tensor:
    """Layer ``block``'s input with context ``[batch, pos, d]``, from a plain forward (a pre-hook that ends it)."""
    seen = {}

    def save(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        raise _Done

    handle = layers_of(model)[block].register_forward_pre_hook(save, with_kwargs=True)
    try:
        with torch.no_grad():
            _forward(model, ids)
    except _Done:
        pass
    finally:
        handle.remove()
    return seen["x"]


def literal_edit_output(model, result, block: int, position: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Add ``result.patch`` to a deep copy's real parameters and run that copy's layer on the query alone.

    The query's input is the unedited copy's layer input on ``ids`` (default: the decomposed tokens) at the last
    position (``query="last"``) or at ``position`` (``"self"``), from a plain forward: never ``result.query_input``.
    """
    edited = copy.deepcopy(model).to(result.dtype)
    x = layer_input(edited, result.inputs if ids is None else ids, block)
    query_input = x[0, -1 if result.query == "last" else position][None, None]
    params = dict(edited.named_parameters())
    with torch.no_grad():
        for name, delta in result.patch(block, position).items():
            assert params[name].shape == delta.shape, name
            params[name].add_(delta)
        return run_layer(edited, block, query_input)[0, 0]


def check_literal_edits(model, ids, dtype, tol: float, positions=(0, 4, 10)) -> iu.Decomposition:
    with assert_untouched(model):
        result = iu.decompose(model, ids, dtype=dtype)
        report = result.verify()
    # factored form: exact up to dtype rounding everywhere; verify's literal edit up to the model's own rounding
    assert max(b.factored_max_rel_err for b in report.blocks) <= TOL[dtype]
    assert report.max_rel_err <= max(tol, TOL[dtype])
    assert [b.rank for b in report.blocks] == [1] * len(report.blocks)
    with exact_formula(model, dtype):  # the model's own forward (Gemma's float32 norm casts kept in float64)
        targets = context_outputs(model, ids, dtype)
        for block in range(len(targets)):
            for position in positions:
                out = literal_edit_output(model, result, block, position)
                assert rel_err(out, targets[block][0, position]) <= tol, (block, position)
    if casts_parameters(model, dtype):  # and as written, float32 casts and all, within float32 rounding of it
        plain = context_outputs(model, ids, dtype)
        assert 1e-12 < max(rel_err(p, t) for p, t in zip(plain, targets, strict=True)) <= GEMMA_FLOAT64_TOL
    return result


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_literal_weight_edit_every_layout(kind, dtype):
    model = tiny_hf(kind)
    assert casts_parameters(model, torch.float64) == kind.startswith("gemma")  # (1 + weight.float()) in its norms
    result = check_literal_edits(model, tokens(11), dtype, TOL[dtype])
    update = result.block(1)  # not vacuous: the context moved the residual and the MLP input
    assert update.delta_b[0, :-1].abs().max() > 1e-3
    assert max(u.column[0, :-1].abs().max() for u in update.first_layer) > 1e-3


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_absorbed_model_matches_full_logits(kind):
    model = tiny_hf(kind)
    with assert_untouched(model):
        report = iu.compare_absorbed(model, tokens(12, seed=1), dtype=torch.float64)
    assert report.max_abs_logit_diff <= 1e-9 and report.top1_agree
    assert report.max_abs_logit_diff_control > 1e-3  # the context mattered


@pytest.fixture(params=["float64", "float32-normalize"])
def exact_gemma_norms(request, monkeypatch):
    """Gemma 2/3's RMSNorm as transformers writes it, but scaled in the input's dtype: normalized in float64 too, or
    in float32 as transformers does. Without transformers' rounding of the scale to float32, a float64 edit of the
    post-MLP norm's scale must be exact to float64 rounding, so an adapter whose normalized ``z`` is computed in
    another dtype than the norm's (either way) shows at 1e-12 instead of hiding under the 1e-6 transformers needs."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    def forward(self, x):
        z = self._norm(x) if request.param == "float64" else self._norm(x.float()).to(x.dtype)
        return z * (1.0 + self.weight)

    x = torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for cls in (Gemma2RMSNorm, Gemma3RMSNorm):
        norm = cls(32).double()
        with torch.no_grad():
            norm.weight.normal_(generator=torch.Generator().manual_seed(1))
            rounded = norm(x)
            monkeypatch.setattr(cls, "forward", forward)
            assert norm(x).dtype == torch.float64 and 0 < float((norm(x) - rounded).abs().max()) < 1e-6


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_gemma_post_norm_exact_when_the_norm_keeps_float64(kind, exact_gemma_norms):
    model = tiny_hf(kind)
    check_literal_edits(model, tokens(11), torch.float64, 1e-12)
    report = iu.compare_absorbed(model, tokens(12, seed=1), dtype=torch.float64)
    assert report.max_abs_logit_diff <= 1e-9 and report.max_abs_logit_diff_control > 1e-3


def test_patch_keys_and_corrections():
    """Patches use the model's own parameter names; bias-free MLPs take the correction in the output projection,
    Gemma's post-MLP norm takes it in its scale after a rank-one down_proj update flattens the MLP output."""
    expected = {
        "gpt2": {"transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.bias"},
        "llama": {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
        "llama-mlp-bias": {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                           "model.layers.1.mlp.down_proj.bias"},
        "neox-parallel": {"gpt_neox.layers.1.mlp.dense_h_to_4h.weight", "gpt_neox.layers.1.mlp.dense_4h_to_h.bias"},
        "gemma2": {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                   "model.layers.1.mlp.down_proj.weight", "model.layers.1.post_feedforward_layernorm.weight"},
    }
    for kind, names in expected.items():
        model = tiny_hf(kind)
        result = iu.decompose(model, tokens(6), dtype=torch.float64)
        assert set(result.patch(1, 2)) == names, kind


def test_query_self_and_continuous_inputs():
    model = tiny_hf("llama")
    result = iu.decompose(model, tokens(9), query="self", dtype=torch.float64)
    targets = context_outputs(model, tokens(9), torch.float64)
    for position in (1, 5, 8):
        assert rel_err(literal_edit_output(model, result, 2, position), targets[2][0, position]) <= 1e-10
    assert result.verify().max_rel_err <= 1e-10
    residual = torch.randn(1, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    continuous = iu.decompose(model.double(), residual)
    assert continuous.verify().max_rel_err <= 1e-10
    # block 0 reads the residual fed in (not the dummy token's embedding); its with-context output is the model's own
    # on inputs_embeds (an independent forward)
    assert torch.equal(continuous.query_input(0), residual[:, -1:])
    with torch.no_grad():
        hidden = model(inputs_embeds=residual, output_hidden_states=True).hidden_states
    for block in (0, 1):
        assert rel_err(continuous.block(block).target_output[0], hidden[block + 1][0]) <= 1e-12


def test_unsupported_layout_is_named():
    """Refused by name, never decomposed wrongly: a class no structure describes, a state-space model, and GPT-1's
    post-LN block, whose TransformerLens names look pre-norm (ln_2 is applied after the residual add): the data-flow
    check refuses it on the with-context run. OPT, refused by model_type before, is supported by its class now."""
    small = dict(vocab_size=61, num_hidden_layers=1, max_position_embeddings=64)
    models = {
        "no known block layout for BioGptForCausalLM": transformers.BioGptConfig(
            **small, hidden_size=32, num_attention_heads=4, intermediate_size=48),
        "MambaForCausalLM|state-space": transformers.MambaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1),
        "not the output of its pre-MLP norm|OpenAIGPTLMHeadModel": transformers.OpenAIGPTConfig(
            vocab_size=61, n_embd=32, n_layer=1, n_head=4, n_positions=64),
    }
    for message, cfg in models.items():
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with assert_untouched(model), pytest.raises(iu.UnsupportedArchitectureError, match=message):
            iu.decompose(model, tokens(5), dtype=torch.float64)
    opt = transformers.OPTConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, ffn_dim=48,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    try:
        adapter_for(transformers.AutoModelForCausalLM.from_config(opt))
    except iu.UnsupportedArchitectureError as err:  # without TransformerLens 4: the table does not know OPT
        assert "no known block layout for OPTForCausalLM" in str(err)


def test_model_untouched_on_failure_and_in_train_mode():
    model = tiny_hf("gpt2").train()
    with assert_untouched(model), pytest.raises(ValueError, match="token ids must lie"):
        iu.decompose(model, torch.tensor([[1, 2, 99]]))
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    with assert_untouched(broken), pytest.raises(iu.NonFiniteActivationError, match="block 1"):
        iu.decompose(broken, tokens(6))
    assert hook_count(broken) == 0 and broken.training

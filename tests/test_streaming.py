"""Layer-streamed precision: float64 results without a float64 copy of the model, equal to the whole-copy path."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, assert_untouched, build
from test_hf import tiny_hf

import implicit_updates as iu
from implicit_updates.analyses.dynamics import max_relative_difference, prefix_decomposition
from implicit_updates.models import PRESETS, random_model
from implicit_updates.runtime.precision import computed_in, exact_formula


def tokens(vocab: int, n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"gpt2-small"}))
def test_streamed_equals_whole_copy_every_preset(preset):
    model = random_model(preset)
    prompt = tokens(model.cfg.d_vocab)
    with assert_untouched(model):
        streamed = iu.decompose(model, prompt, dtype=torch.float64)
        report = streamed.verify()
    copied = iu.decompose(model, prompt, dtype=torch.float64, upcast="copy")
    assert streamed.dtype == torch.float64 and next(model.parameters()).dtype == torch.float32
    assert max_relative_difference(streamed, copied) <= 1e-14
    assert report.max_rel_err <= 1e-12 and report.max_rel_err == pytest.approx(copied.verify().max_rel_err, rel=0.5)


@pytest.mark.parametrize("name", ["parallel-neox", "alibi", "shortformer", "solu", "pre-post-norm-gemma"])
def test_streamed_one_pass_and_absorb(name):
    model = build(**ARCHITECTURES[name])
    prompt = tokens(model.cfg.d_vocab, 12, seed=1)
    with assert_untouched(model):
        one = prefix_decomposition(model, prompt, dtype=torch.float64, chunk_size=4)
        report = iu.compare_absorbed(model, prompt, dtype=torch.float64)
    copy_one = prefix_decomposition(model, prompt, dtype=torch.float64, chunk_size=4)
    assert max_relative_difference(one, copy_one) <= 1e-14
    assert report.max_abs_logit_diff <= 1e-9 < report.max_abs_logit_diff_control


def test_at_most_one_module_is_upcast_at_a_time():
    """The point of streaming: never a float64 copy of the model, only of the module running now."""
    model = random_model("llama")
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    seen = []

    def count(module, args):
        seen.append(sum(p.numel() for p in model.parameters() if p.dtype == torch.float64))

    handles = [m.register_forward_pre_hook(count) for m in model.modules()]
    try:
        result = iu.decompose(model, tokens(model.cfg.d_vocab), dtype=torch.float64)
        during_decompose = max(seen)
        result.verify()  # its literal check also swaps in one block's edited (float64) parameters
    finally:
        for h in handles:
            h.remove()
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.blocks[0].parameters())
    assert 0 < during_decompose <= largest < total / 4
    assert max(seen) <= block < total / 4


def test_parameters_put_back_when_a_forward_raises():
    model = random_model("llama")
    before = {name: p for name, p in model.named_parameters()}

    def boom(module, args):
        raise RuntimeError("boom")

    handle = model.blocks[1].mlp.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"), computed_in(model, torch.float64):
            model(tokens(model.cfg.d_vocab))
    finally:
        handle.remove()
    assert all(p is before[name] and p.dtype == torch.float32 for name, p in model.named_parameters())
    assert model.cfg.dtype == torch.float32


def test_a_hooked_transformer_runs_no_probe_forward():
    """A HookedTransformer computes in ``cfg.dtype`` throughout, so :func:`exact_formula` probes it for float32 casts
    with no forward of its own: the user's hooks on the model see the user's forward only (no two-token probe)."""
    model = random_model("llama")
    prompt = tokens(model.cfg.d_vocab, 5)
    seen = []
    model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: seen.append(tuple(x.shape)))
    try:
        with torch.no_grad(), computed_in(model, torch.float64):
            logits = model(prompt)
    finally:
        model.reset_hooks()
    assert logits.dtype == torch.float64 and seen == [(1, 5, model.cfg.d_model)]


def test_half_precision_model_computes_in_float32_without_a_copy():
    model = random_model("llama").to(torch.bfloat16)
    with pytest.warns(UserWarning, match="float32"), assert_untouched(model):
        result = iu.decompose(model, tokens(model.cfg.d_vocab, 10))
    assert result.dtype == torch.float32 and result.adapter.model is model
    assert result.verify().max_rel_err <= 1e-4


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"gpt2-small"}))
def test_absorbed_by_hooks_equals_the_patched_copy(preset):
    """``absorbed(model, prompt)``: the user's own model, no copy, gives the full prompt's logits on the query."""
    model = random_model(preset)
    prompt = tokens(model.cfg.d_vocab, 14, seed=2)
    with torch.no_grad(), computed_in(model, torch.float64):
        full = model(prompt)[0, -1]
    with torch.no_grad():
        copy_logits = iu.absorb(model, prompt, dtype=torch.float64)(prompt[:, -1:])[0, -1]
    with assert_untouched(model):
        with torch.no_grad(), iu.absorbed(model, prompt, dtype=torch.float64):
            inside = model(prompt[:, -1:])[0, -1]
        after = model(prompt[:, -1:])[0, -1]  # the hooks are gone: the plain model again
    assert inside.dtype == torch.float64 and float((inside - full).abs().max()) <= 1e-9
    assert float((inside - copy_logits).abs().max()) <= 1e-12
    assert float((after.double() - full).abs().max()) > 1e-2


def test_absorbed_restores_on_error():
    model = random_model("llama")
    with assert_untouched(model), pytest.raises(RuntimeError, match="inside"):
        with iu.absorbed(model, tokens(model.cfg.d_vocab, 8), dtype=torch.float64):
            model(tokens(model.cfg.d_vocab, 1))
            raise RuntimeError("inside")


@pytest.mark.parametrize("kind", ["hooked", "hf", "bridge"])
def test_large_unembedding_computed_in_slices(kind, monkeypatch, tmp_path):
    """A vocabulary-sized projection (TransformerLens ``Unembed``, an HF ``lm_head``) is never upcast whole: its
    forward computes slices of output rows, each slice's weights upcast alone; the logits equal the upcast copy's,
    and its own ``forward`` is back afterwards."""
    import copy

    import transformers

    from implicit_updates.runtime import precision

    if kind == "hooked":
        model = random_model("llama")
        head, weight = model.unembed, model.unembed.W_U
    else:
        config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config).eval()
        if kind == "bridge":  # its unembedding component wraps the lm_head and calls it
            from test_bridge import boot

            model = boot(model, tmp_path)
            head = model.unembed.original_component
        else:
            head = model.lm_head
        weight = head.weight
    monkeypatch.setattr(precision, "CHUNK_ELEMENTS", weight.numel() // 5)  # 5-6 slices
    prompt = tokens(512, 9)
    run = (lambda m: m(prompt)) if kind != "hf" else (lambda m: m(prompt).logits)
    with torch.no_grad():
        reference = run(copy.deepcopy(model).to(torch.float64))
    upcasts = []
    real_to = torch.Tensor.to

    def spy(t, *args, **kwargs):
        out = real_to(t, *args, **kwargs)
        if out.dtype == torch.float64 and t.dtype == torch.float32 and t.dim() == 2:
            upcasts.append((tuple(t.shape), t.data_ptr()))
        return out

    with assert_untouched(model), torch.no_grad(), computed_in(model, torch.float64):
        monkeypatch.setattr(torch.Tensor, "to", spy)
        streamed = run(model)
        monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert streamed.dtype == torch.float64 and float((streamed - reference).abs().max()) <= 1e-13
    first, last = weight.data_ptr(), weight[-1:].data_ptr() if kind != "hooked" else weight[:, -1:].data_ptr()
    slices = [s for s, ptr in upcasts if first <= ptr <= last]  # the unembedding's own: slices of rows
    assert 5 <= len(slices) <= 6 and all(max(s) < 512 for s in slices)  # never the whole matrix, nor row by row
    assert "forward" not in head.__dict__  # the module's own forward again


def test_large_unembedding_in_slices_keeps_its_bias_and_hook_points(monkeypatch):
    """The sliced forward is the ``Unembed``'s own: its bias added (``b_U``, nonzero here) and its hook points run (a
    hook on ``unembed.hook_in`` and one on ``unembed.hook_out`` change the logits as on the upcast copy)."""
    from implicit_updates.runtime import precision

    model = random_model("llama")
    with torch.no_grad():
        model.unembed.b_U.copy_(torch.randn(model.unembed.b_U.shape, generator=torch.Generator().manual_seed(5)))
    monkeypatch.setattr(precision, "CHUNK_ELEMENTS", model.unembed.W_U.numel() // 5)
    hooks = [("unembed.hook_in", lambda x, hook: 1.5 * x), ("unembed.hook_out", lambda x, hook: 2 * x)]
    prompt = tokens(model.cfg.d_vocab, 7)
    with torch.no_grad():
        reference = copy.deepcopy(model).to(torch.float64).run_with_hooks(prompt, fwd_hooks=hooks)
    with assert_untouched(model), torch.no_grad(), computed_in(model, torch.float64):
        streamed = model.run_with_hooks(prompt, fwd_hooks=hooks)
    assert streamed.dtype == torch.float64 and float((streamed - reference).abs().max()) <= 1e-13


def test_large_unembedding_of_an_offloaded_model_computed_in_slices(monkeypatch):
    """On a model accelerate drives (``cpu_offload``: the weights on ``meta`` until its hook loads them) the sliced
    forward replaces the head's inner ``_old_forward`` while the block runs, and accelerate's own forward and
    ``_old_forward`` are back afterwards (the same objects): the model runs as before."""
    import transformers

    from implicit_updates.runtime import precision

    accelerate = pytest.importorskip("accelerate")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    prompt = tokens(512, 9)
    with torch.no_grad():
        reference = copy.deepcopy(model).to(torch.float64)(prompt).logits
        plain = model(prompt).logits
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    head = model.lm_head
    forwards = (head.__dict__["forward"], head.__dict__["_old_forward"])
    assert head.weight.is_meta
    monkeypatch.setattr(precision, "CHUNK_ELEMENTS", 512 * 64 // 5)
    with torch.no_grad(), computed_in(model, torch.float64):
        assert head.__dict__["_old_forward"] is not forwards[1]  # the sliced forward, inside accelerate's hook
        streamed = model(prompt).logits
    assert head.__dict__["forward"] is forwards[0] and head.__dict__["_old_forward"] is forwards[1]
    assert head.weight.is_meta
    assert streamed.dtype == torch.float64 and float((streamed - reference).abs().max()) <= 1e-13
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, plain)


class _Indexer(torch.nn.Module):
    """No parameters of its own, leaf children: a table and a projection whose dtype it reads before calling it
    (GLM-DSA's indexer: ``weights_proj(h.to(weights_proj.weight.dtype))``)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, ids):
        return self.proj(self.embed(ids).to(self.proj.weight.dtype))


class _ReadsChildDtype(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.indexer = _Indexer()
        self.norm = torch.nn.LayerNorm(3)

    def forward(self, ids):
        return self.norm(self.indexer(ids))


def _table_dtypes_while_running(model, names, ids):
    """The dtype of each named table's weight while its own forward runs (streamed), and the output."""
    seen = {}
    tables = dict(model.named_modules())

    def record(name):
        def hook(module, args, output):
            seen[name] = {p.dtype for p in module.parameters()}

        return hook

    hooks = [tables[name].register_forward_hook(record(name)) for name in names]
    try:
        with torch.no_grad(), computed_in(model, torch.float64):
            out = model(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen, out if isinstance(out, torch.Tensor) else out.logits


def test_a_module_reading_its_childs_dtype_gets_it_upcast_and_tables_never_are():
    """A parameterless module of leaf children upcasts them with itself (it reads one's dtype before calling it),
    except a table: embedding tables are never upcast (their output is cast), and the result is the float64 copy's."""
    model = _ReadsChildDtype()
    with assert_untouched(model):
        seen, out = _table_dtypes_while_running(model, ["indexer.embed"], tokens(7, 5))
    with torch.no_grad():
        copied = copy.deepcopy(model).double()(tokens(7, 5))
    assert seen == {"indexer.embed": {torch.float32}}
    assert out.dtype == torch.float64 and torch.equal(out, copied)


@pytest.mark.parametrize("build_model,tables", [
    (lambda: random_model("llama"), ["embed"]),  # TransformerLens's Embed
    (lambda: build(**ARCHITECTURES["layernorm"]), ["embed", "pos_embed"]),  # and PosEmbed
    (lambda: tiny_hf("gpt2"), ["transformer.wte", "transformer.wpe"]),  # nn.Embedding
    (lambda: tiny_hf("gemma2"), ["model.embed_tokens"]),  # Gemma's scaled embedding, scaled in float64
], ids=["hooked-embed", "hooked-pos-embed", "hf-embedding", "hf-gemma-scaled"])
def test_embedding_tables_are_never_upcast(build_model, tables):
    """The largest parameters are the tables: streamed, each is read as float32 rows and its output cast (their
    float64 lookup exactly), never copied to float64; the logits are the float64 copy's."""
    model = build_model()
    ids = tokens(model.cfg.d_vocab if hasattr(model, "cfg") else model.config.vocab_size, 5)
    seen, logits = _table_dtypes_while_running(model, tables, ids)
    assert seen == dict.fromkeys(tables, {torch.float32})
    with torch.no_grad(), exact_formula(model, torch.float64):
        ref = copy.deepcopy(model).to(torch.float64)(ids)
    ref = ref if isinstance(ref, torch.Tensor) else ref.logits
    assert logits.dtype == torch.float64 and float((logits - ref).abs().max()) <= 1e-12


class _NormedEmbedding(torch.nn.Embedding):
    """An ``nn.Embedding`` subclass with a forward of its own that normalizes the rows it looks up (transformers'
    ``InklingNormedEmbedding``): more than a lookup, so its table is upcast while it runs, not its output cast."""

    def __init__(self, vocab: int, d: int):
        super().__init__(vocab, d)
        self.embed_norm = torch.nn.RMSNorm(d)

    def forward(self, ids):
        return self.embed_norm(super().forward(ids))


def _normed_embedding_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_NormedEmbedding(13, 8), torch.nn.Linear(8, 5))
    with torch.no_grad():
        model[0].embed_norm.weight.add_(0.2 * torch.randn(8))
    return model.eval(), tokens(13, 6)


def _post_embedding_norm_model():  # TransformerLens's Embed with its post-embedding LayerNorm (Bloom)
    model = build(**ARCHITECTURES["layernorm"], post_embedding_ln=True)
    return model, tokens(model.cfg.d_vocab, 6)


@pytest.mark.parametrize("build_model", [_post_embedding_norm_model, _normed_embedding_model],
                         ids=["hooked-post-embedding-ln", "embedding-subclass-with-norm"])
def test_an_embedding_computing_more_than_a_lookup_is_upcast(build_model):
    """A table whose own forward does more than look rows up (a norm after the lookup) is no pure lookup: cast
    after a float32 forward its output would carry float32 rounding; streamed, it computes in float64 as the copy."""
    model, ids = build_model()
    with assert_untouched(model), torch.no_grad(), computed_in(model, torch.float64):
        out = model(ids)
    with torch.no_grad():
        ref = copy.deepcopy(model).to(torch.float64)(ids)
    assert out.dtype == torch.float64 and float((out - ref).abs().max()) <= 1e-13


def _boot_encoder_decoder(kind: str, tmp_path):
    """A random tiny T5 or Switch Transformers booted as a TransformerBridge (offline; Switch's adapter loads a
    ``pytorch_model.bin`` only)."""
    import transformers
    from safetensors.torch import load_file
    from test_bridge import boot

    shape = dict(vocab_size=61, d_model=16, d_kv=4, d_ff=24, num_heads=4)
    torch.manual_seed(0)
    if kind == "t5":
        hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**shape, num_layers=1))
    else:  # a dense and a sparse (two-expert) feed-forward in each stack
        hf = transformers.SwitchTransformersForConditionalGeneration(transformers.SwitchTransformersConfig(
            **shape, num_layers=2, num_sparse_encoder_layers=1, num_decoder_layers=2, num_sparse_decoder_layers=1,
            num_experts=2, expert_capacity=8))

    save = hf.save_pretrained

    def save_bin(path):
        save(path)
        if kind == "switch":
            torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
            (path / "model.safetensors").unlink()

    hf.save_pretrained = save_bin
    return boot(hf.eval(), tmp_path)


@pytest.mark.parametrize("kind", ["t5", "switch"])
def test_a_bridge_feed_forward_reading_its_projection_dtype_computes_in_float64(kind, tmp_path):
    """T5's and Switch Transformers' dense feed-forward (``DenseActDense``) casts its hidden activation to
    ``wo.weight``'s dtype before calling ``wo``: wrapped by an ``MLPBridge`` (T5) or ``MoEBridge`` (Switch), the bridge
    upcasts all the wrapped module's projections with itself, so that read sees float64 (not a float32 weight that
    would round the activation, or make ``wo`` refuse it); each feed-forward's output is the float64 copy's."""
    bridge = _boot_encoder_decoder(kind, tmp_path)
    names = [n for n, m in bridge.named_modules() if type(m).__name__ in ("MLPBridge", "MoEBridge")
             and type(m.original_component).__name__.endswith("DenseActDense")]  # (Switch's sparse ones: experts)
    assert len(names) == 2
    x = torch.randn(1, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with assert_untouched(bridge), torch.no_grad(), computed_in(bridge, torch.float64):
        outs = [bridge.get_submodule(n)(x) for n in names]
    with torch.no_grad():
        refs = [copy.deepcopy(bridge.get_submodule(n)).double()(x) for n in names]
    assert all(o.dtype == torch.float64 and torch.equal(o, r) for o, r in zip(outs, refs, strict=True))


def test_a_bridge_upcasts_one_attention_or_mlp_at_a_time(tmp_path):
    """On a TransformerBridge only a component that reimplements or reads its wrapped module (attention, MLP) takes
    the wrapped module's parameters with its own; a block does not: at most one attention's or MLP's parameters are
    float64 at a time, never a whole block's."""
    from test_bridge import boot

    bridge = boot(tiny_hf("llama"), tmp_path)
    parts = [m for b in bridge.blocks for m in (b.attn, b.mlp)]
    largest = max(sum(p.numel() for p in m.parameters()) for m in parts)
    block = min(sum(p.numel() for p in b.parameters()) for b in bridge.blocks)
    seen = []

    def count(module, args, kwargs):
        seen.append(sum(p.numel() for p in bridge.parameters() if p.dtype == torch.float64))

    handles = [m.register_forward_pre_hook(count, with_kwargs=True) for m in bridge.modules()]
    try:
        with assert_untouched(bridge), torch.no_grad(), computed_in(bridge, torch.float64):
            logits = bridge(tokens(61, 6))
    finally:
        for h in handles:
            h.remove()
    assert logits.dtype == torch.float64
    assert 0 < max(seen) <= largest < block


def test_a_model_already_in_the_dtype_computes_as_loaded():
    """A model whose parameters are all in the compute dtype is not touched: transformers loads a float64 Gemma with a
    float32 rotary table (``inv_freq``), and ``computed_in`` leaves it float32 (an upcast table would change the
    rotary angles, which Gemma's float32 casts, kept in float64, then compute in float64)."""
    import transformers
    from test_hf import CONFIGS

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["gemma2"](), dtype=torch.float64).eval()
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = tokens(61, 7)
    with torch.no_grad(), exact_formula(model, torch.float64):
        reference = model(ids).logits
    with assert_untouched(model), torch.no_grad(), computed_in(model, torch.float64):
        logits = model(ids).logits
    assert logits.dtype == torch.float64 and torch.equal(logits, reference)


def _dtypes_while_running(model, module, run):
    """The dtypes of ``module``'s parameters while its forward runs inside ``computed_in(model, float64)``; and
    ``run(model)``'s output."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append({p.dtype for p in m.parameters()}))
    try:
        with assert_untouched(model), torch.no_grad(), computed_in(model, torch.float64):
            out = run(model)
    finally:
        handle.remove()
    return seen, out


@pytest.mark.parametrize("kind", ["linear", "hooked"])
def test_slices_only_above_chunk_elements(kind, monkeypatch):
    """A projection of exactly :data:`CHUNK_ELEMENTS` weights is upcast whole while it runs; one weight fewer allowed
    and it computes in slices (its weight stays float32); the output is the upcast copy's either way."""
    from implicit_updates.runtime import precision

    if kind == "linear":
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
        x = torch.randn(2, 8, dtype=torch.float64)
        head, run, size = model[2], (lambda m: m(x)), 80
    else:
        model = random_model("llama")
        prompt = tokens(model.cfg.d_vocab, 5)
        head, run, size = model.unembed, (lambda m: m(prompt)), model.unembed.W_U.numel()
    with torch.no_grad():
        reference = run(copy.deepcopy(model).to(torch.float64))
    for budget, dtype in ((size, torch.float64), (size - 1, torch.float32)):
        monkeypatch.setattr(precision, "CHUNK_ELEMENTS", budget)
        seen, out = _dtypes_while_running(model, head, run)
        assert seen == [{dtype}] and out.dtype == torch.float64
        assert float((out - reference).abs().max()) <= 1e-13


@pytest.mark.parametrize("n_in", [3, 6, 12])
def test_slices_keep_to_the_budget(n_in, monkeypatch):
    """Each slice upcasts at most :data:`CHUNK_ELEMENTS` weights (here 10: 3 rows of 3 inputs, one row of 6), or one
    row where a row alone is larger (12 inputs); together the slices are every row once."""
    from implicit_updates.runtime import precision

    monkeypatch.setattr(precision, "CHUNK_ELEMENTS", 10)
    torch.manual_seed(0)
    model = torch.nn.Linear(n_in, 7)
    x = torch.randn(3, n_in, dtype=torch.float64)
    upcasts = []
    real_to = torch.Tensor.to

    def spy(t, *args, **kwargs):
        out = real_to(t, *args, **kwargs)
        if t.dtype == torch.float32 and out.dtype == torch.float64 and t.dim() == 2:
            upcasts.append(tuple(t.shape))
        return out

    with assert_untouched(model), torch.no_grad(), computed_in(model, torch.float64):
        monkeypatch.setattr(torch.Tensor, "to", spy)
        out = model(x)
        monkeypatch.setattr(torch.Tensor, "to", real_to)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x)
    assert sum(rows for rows, _ in upcasts) == 7 and all(cols == n_in for _, cols in upcasts)
    assert max(rows * cols for rows, cols in upcasts) == (9 if n_in == 3 else n_in)
    assert out.dtype == torch.float64 and float((out - reference).abs().max()) <= 1e-15


class Unembed(torch.nn.Module):
    """Another library's head named like TransformerLens's ``Unembed`` (no ``cfg``), whose forward is not
    ``x W_U + b_U``: a soft-capped one."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.W_U = torch.nn.Parameter(torch.randn(8, 11, generator=generator))
        self.b_U = torch.nn.Parameter(torch.randn(11, generator=generator))

    def forward(self, x):
        return 3 * torch.tanh((x @ self.W_U + self.b_U) / 3)


def test_a_head_named_unembed_without_cfg_runs_its_own_forward(monkeypatch):
    """Only TransformerLens's ``Unembed`` (it has a ``cfg``) is computed in slices of ``x W_U + b_U``; another
    module named so is upcast whole and runs its own forward, as the upcast copy."""
    from implicit_updates.runtime import precision

    monkeypatch.setattr(precision, "CHUNK_ELEMENTS", 10)
    model = Unembed()
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen, out = _dtypes_while_running(model, model, lambda m: m(x))
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x)
    assert seen == [{torch.float64}] and torch.equal(out, reference)

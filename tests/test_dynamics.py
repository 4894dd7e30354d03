"""Prefix dynamics (Dherin et al. Prop. 3.1) in one pass vs one decompose per prefix, and Appendix B suffix removal."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from conftest import ARCHITECTURES, assert_untouched, build, check_onepass, rel_err

import implicit_updates as iu
from implicit_updates.analyses.dynamics import (
    block_dynamics,
    edited_block_output,
    prefix_decomposition,
    prefix_dynamics,
    suffix_removal,
)
from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.experiments.icl import regression_transformer, sample_tasks
from implicit_updates.math.updates import RankOneUpdate
from implicit_updates.models import PRESETS, random_model

F64 = torch.float64


def tokens(model, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.cfg.d_vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_onepass_equals_naive_every_preset(preset):
    model = random_model(preset)
    if preset == "gpt2-small":  # 12 blocks of GPT-2 small's shapes: fewer prefixes and blocks keep it quick
        check_onepass(model, tokens(model, 6), blocks=[0, 3])
    else:
        check_onepass(model, tokens(model, 10), chunk_size=4)  # three chunks, the last one short


@pytest.mark.parametrize("name", ["shortformer", "alibi", "layernorm-folded", "solu", "no-norm",
                                  "pre-post-norm-gemma", "moe-mixtral"])
def test_onepass_equals_naive_architectures(name):
    """Shortformer keys, ALiBi and local windows (window 4 < 8 prefixes) in the query rows' attention; MoE chunks."""
    model = build(**ARCHITECTURES[name])
    check_onepass(model, tokens(model, 9, seed=1), chunk_size=3)


ATTENTION_VARIANTS = {
    "attn-result": dict(use_attn_result=True),
    "split-qkv-gqa": dict(use_split_qkv_input=True, n_key_value_heads=2, positional_embedding_type="rotary",
                          rotary_dim=8),
    "qk-norm": dict(normalization_type="RMS", use_qk_norm=True, n_key_value_heads=2,
                    positional_embedding_type="rotary", rotary_dim=8),
    "clip-qkv": dict(clip_qkv=0.5, positional_embedding_type="rotary", rotary_dim=8),
    "sinks": dict(use_attention_sinks=True, positional_embedding_type="rotary", rotary_dim=8),
    "layer-scale-softcap": dict(scale_attn_by_inverse_layer_idx=True, attn_scores_soft_cap=3.0),
    "alibi-local": dict(positional_embedding_type="alibi", use_local_attn=True,
                        attn_types=["local", "global", "local"], window_size=3),
}


@pytest.mark.parametrize("name", sorted(ATTENTION_VARIANTS))
def test_onepass_equals_naive_attention_variants(name):
    """The query rows' own attention: hook_result, split q/k/v inputs, q/k-norms, clipping, sinks, scales, windows."""
    model = build(**ATTENTION_VARIANTS[name])
    if name == "sinks":
        with torch.no_grad():
            for block in model.blocks:
                block.attn.sinks.normal_(generator=torch.Generator().manual_seed(3))
    check_onepass(model, tokens(model, 9, seed=1), chunk_size=3)


def test_onepass_continuous_inputs():
    """The in-context regression model reads continuous tokens at block 0 (no embedding, no positions)."""
    model = regression_transformer(n_layers=2)
    prompt = sample_tasks(1, 8, 2, torch.Generator().manual_seed(0)).prompts
    check_onepass(model, prompt)


def test_naive_prefix_is_decompose_of_that_prefix():
    """Prefix i of the result is literally decompose([c_1..c_i, x]) at its last position."""
    model = random_model("llama")
    toks = tokens(model, 7)
    result = prefix_decomposition(model, toks, dtype=F64)
    for i in (1, 4, 6):
        ref = iu.decompose(model, torch.cat([toks[:, :i], toks[:, -1:]], 1), dtype=F64).block(2)
        got = result.block(2)
        assert rel_err(got.first_layer[0].column[0, i - 1], ref.first_layer[0].column[0, -1]) <= 1e-10
        assert rel_err(got.row[0, i - 1], ref.row[0, 0]) <= 1e-10
        assert rel_err(got.delta_b[0, i - 1], ref.delta_b[0, -1]) <= 1e-10


def _mlp_inputs(model, prompts: list[torch.Tensor], block: int) -> torch.Tensor:
    """What block ``block``'s MLP reads at the last position of each prompt (a plain forward pre-hook)."""
    seen = []
    handle = model.blocks[block].mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0][0, -1]))
    try:
        with torch.no_grad():
            for p in prompts:
                model(p, stop_at_layer=block + 1)
    finally:
        handle.remove()
    return torch.stack(seen)


def test_prop31_gradient_step_with_shared_row():
    """Block 0 with rotary positions: one row for all prefixes, and dW_{i+1} - dW_i = -h W (m_i - m_{i+1}) m_x^T."""
    model = build(**ARCHITECTURES["gqa-rotary"])
    toks = tokens(model, 8)
    dyn = prefix_dynamics(model, toks, blocks=0, dtype=F64).blocks[0]
    assert dyn.shared_row and float(dyn.row_change_norms.max()) <= 1e-12 * float(dyn.update_norms.max())
    ref = copy.deepcopy(model).to(F64)
    m = _mlp_inputs(ref, [torch.cat([toks[:, :i], toks[:, -1:]], 1) for i in range(1, 8)], 0)
    mlp = ref.blocks[0].mlp
    w = torch.cat([mlp.W_gate, mlp.W_in], dim=1).detach()  # both maps read m and share the row: stacked
    m_x = _mlp_inputs(ref, [toks[:, -1:]], 0)[0]
    h = 1 / m_x.pow(2).sum()
    for k in range(6):
        grad = torch.outer((m[k] - m[k + 1]) @ w, m_x)  # Prop. 3.1: grad L_i = W (m_i - m_{i+1}) m_x^T
        assert rel_err(dyn.gradient(k), grad) <= 1e-10
        step = dyn.update(k + 1) - dyn.update(k)
        assert rel_err(step, -h * grad) <= 1e-10
        assert abs(float(dyn.step_norms[k]) - float(step.norm())) <= 1e-10 * float(step.norm())
    assert rel_err(dyn.implicit_lr, h.expand(7)) <= 1e-12


def _first_layer_outputs(model, prompt: torch.Tensor, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 0's gated-MLP first-layer outputs (``hook_pre``, ``hook_pre_linear``) at the last position, stacked
    along d_out, and the MLP input there, from a plain forward (with the graph kept when ``grad``)."""
    seen = {}
    hooks = [(f"blocks.0.mlp.{h}", lambda act, hook: seen.__setitem__(hook.name, act[0, -1]))
             for h in ("hook_pre", "hook_pre_linear")]
    handle = model.blocks[0].mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("m", args[0][0, -1]))
    try:
        with torch.set_grad_enabled(grad), model.hooks(fwd_hooks=hooks):
            model(prompt, stop_at_layer=1)
    finally:
        handle.remove()
    return torch.cat([seen["blocks.0.mlp.hook_pre"], seen["blocks.0.mlp.hook_pre_linear"]]), seen["m"]


def test_prop31_gradient_norms_match_autograd():
    """``gradient_norms[k] = h ||grad L||_F`` (Dherin et al. Prop. 3.1) with the gradient taken by autograd through
    the model's own MLP: ``L(W) = <W m_x, W (m_i - m_{i+1})>``, the query's first-layer outputs (run alone, W
    differentiable) against the fixed change that context token i+1 makes to them (plain forwards of prefixes i and
    i+1, i = k + 1), whose gradient is Prop. 3.1's ``G_i = W (m_i - m_{i+1}) m_x^T``."""
    model = build(**ARCHITECTURES["gqa-rotary"])
    toks = tokens(model, 8)
    dyn = prefix_dynamics(model, toks, blocks=0, dtype=F64).blocks[0]
    ref = copy.deepcopy(model).to(F64)
    weights = [ref.blocks[0].mlp.W_gate, ref.blocks[0].mlp.W_in]
    query_out, m_x = _first_layer_outputs(ref, toks[:, -1:], grad=True)
    h = 1 / m_x.detach().pow(2).sum()
    prefix = [_first_layer_outputs(ref, torch.cat([toks[:, :i], toks[:, -1:]], 1))[0] for i in range(1, 8)]
    assert len(dyn.gradient_norms) == 6
    for k in range(6):
        loss = (query_out * (prefix[k] - prefix[k + 1])).sum()
        grads = torch.autograd.grad(loss, weights, retain_graph=True)
        expected = h * torch.cat([g.flatten() for g in grads]).norm()
        assert abs(float(dyn.gradient_norms[k]) - float(expected)) <= 1e-10 * float(expected), k
        assert abs(float(dyn.step_norms[k]) - float(expected)) <= 1e-10 * float(expected), k  # shared row: all


def test_step_with_row_change_absolute_positions():
    """Absolute positions move the query's row with i: the step is the gradient term plus the row-change term."""
    model = build(**ARCHITECTURES["layernorm"])
    result = prefix_decomposition(model, tokens(model, 8), dtype=F64)
    for block in (0, 2):
        dyn = block_dynamics(result.block(block))
        assert not dyn.shared_row and float(dyn.row_change_norms.min()) > 0
        for k in range(6):
            step = dyn.update(k + 1) - dyn.update(k)
            row_change = torch.outer(dyn.columns[k], dyn.rows[k + 1] - dyn.rows[k])
            assert rel_err(-dyn.implicit_lr[k + 1] * dyn.gradient(k) + row_change, step) <= 1e-10
            assert abs(float(dyn.step_norms[k]) - float(step.norm())) <= 1e-10 * float(step.norm())
            assert abs(float(dyn.row_change_norms[k]) - float(row_change.norm())) <= 1e-10 * float(step.norm())
            gradient_term = dyn.implicit_lr[k + 1] * dyn.gradient(k)  # h_{i+1} G_i, the step's first term
            assert abs(float(dyn.gradient_norms[k]) - float(gradient_term.norm())) <= 1e-10 * float(step.norm())
        dense = torch.stack([dyn.update(k).norm() for k in range(7)])
        assert rel_err(dyn.update_norms, dense) <= 1e-12
    payload = prefix_dynamics(model, tokens(model, 5), dtype=F64).to_dict()
    assert payload["n_prefixes"] == 4 and len(payload["blocks"][0]["step_norms"]) == 3


def test_prefix_dynamics_errors_and_untouched_on_failure():
    model = build()
    with pytest.raises(ValueError, match="batch 1"):
        prefix_decomposition(model, torch.randint(0, 61, (2, 5)))
    with pytest.raises(ValueError, match="context token"):
        prefix_decomposition(model, torch.tensor([[3]]))
    with pytest.raises(ValueError, match="method"):
        prefix_decomposition(model, tokens(model, 4), method="fast")
    with pytest.raises(UnsupportedArchitectureError, match="bidirectional"):
        prefix_decomposition(build(attention_dir="bidirectional"), tokens(model, 4))

    def boom(act, hook):
        if act.shape[0] > 1:  # only the batched query rows
            raise RuntimeError("boom")

    model.add_hook("blocks.1.hook_resid_pre", boom)
    try:
        with assert_untouched(model), pytest.raises(RuntimeError, match="boom"):
            prefix_decomposition(model, tokens(model, 6))
    finally:
        model.reset_hooks()
    assert not any("forward" in vars(block.attn) for block in model.blocks)  # the query rows' attention undone
    qwen = build(positional_embedding_type="rotary", rotary_dim=8, use_logn_attn=True, train_seq_length=6)
    with pytest.raises(UnsupportedArchitectureError, match="training length"):
        prefix_decomposition(qwen, tokens(qwen, 8))
    prefix_decomposition(qwen, tokens(qwen, 6))  # within the training length nothing is scaled


# -- Appendix B ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,block", [("gqa-rotary", 1), ("alibi", 2), ("pre-post-norm-gemma", 1)])
def test_suffix_removal_factorisation(name, block):
    """W_n = W_0 (I + h_1 A_1)...(I + h_n A_n); W_i a_i = W_0 A(C, x); every partial edit keeps the output."""
    model = build(**ARCHITECTURES[name])
    toks = tokens(model, 7, seed=2)
    with assert_untouched(model):
        sr = suffix_removal(model, toks, block, dtype=F64)
    n = sr.n
    assert n == 6
    final = sr.weights(n)
    for name_, w0 in sr.maps.items():
        assert rel_err(w0 @ sr.product(n), final[name_]) <= 1e-10  # the factorised form
        target = w0 @ sr.a[0]
        for i in range(n + 1):
            assert rel_err(sr.weights(i)[name_] @ sr.a[i], target) <= 1e-10  # telescoping
    # the output correction telescopes to Thm A.2's delta_b of decompose at the query
    ref = iu.decompose(model, toks, blocks=block, dtype=F64).block(block)
    assert rel_err(sr.residuals[0] - sr.residuals[n], ref.delta_b[0, -1]) <= 1e-10
    # (W_n - W_0) a_n = the direct Eq. 8 update's action on A(x): both move the query onto W_0 A(C, x)
    direct = {u.name: u for u in ref.first_layer}
    for name_, w0 in sr.maps.items():
        u: RankOneUpdate = direct[name_]
        assert rel_err((final[name_] - w0) @ sr.a[n], u.column[0, -1] * float(u.row[0, 0] @ sr.a[n])) <= 1e-10
    for i in range(n + 1):  # literal weight edits on a deep copy, block run on the shortened input sequence
        assert rel_err(edited_block_output(sr, model, i), sr.target_output) <= 1e-10
    with torch.no_grad():
        unedited = copy.deepcopy(model).to(F64).blocks[block](sr.inputs[:, n:])[0, -1]
    assert rel_err(unedited, sr.target_output) > 1e-3  # removing the context mattered


def test_suffix_removal_errors():
    with pytest.raises(UnsupportedArchitectureError, match="shortformer"):
        model = build(**ARCHITECTURES["shortformer"])
        suffix_removal(model, tokens(model, 5), 1)
    with pytest.raises(UnsupportedArchitectureError, match="mixture of experts"):
        model = build(**ARCHITECTURES["moe-mixtral"])
        suffix_removal(model, tokens(model, 5), 0)


def test_cli_dynamics(tmp_path, capsys):
    from implicit_updates.cli import main
    from implicit_updates.models.loading import hooked_classes

    hooked_classes()  # random:PRESET is a HookedTransformer: the CLI exits 2 on TL 4.x; conftest skips on this

    out, fig = tmp_path / "dyn.json", tmp_path / "dyn.png"
    args = ["dynamics", "--model", "random:llama", "--seq-len", "9", "--dtype", "float64", "--block", "0",
            "--block", "2", "--json", str(out)]
    if importlib.util.find_spec("matplotlib"):
        args += ["--plot", str(fig)]
    assert main(args) == 0
    payload = json.loads(out.read_text())
    assert payload["n_prefixes"] == 8 and [b["block"] for b in payload["blocks"]] == [0, 2]
    assert len(payload["blocks"][0]["step_norms"]) == 7 and payload["blocks"][0]["shared_row"] is True
    assert "step first" in capsys.readouterr().out
    assert not args[-1].endswith(".png") or fig.stat().st_size > 1000

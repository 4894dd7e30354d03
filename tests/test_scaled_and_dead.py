"""Two block structures no other fast test reaches: a residual join scaled by a constant (Granite's
``y = r + s * mlp(m)``, with and without a norm after the MLP), and hidden activations that are exactly zero, where no
update of an output matrix can move the output (refused with one clear error naming the parameter, never a wrong
answer; a tiny but nonzero hidden still carries its update).

Scaled joins: a tiny ``GraniteForCausalLM`` (``residual_multiplier = s``) decomposed through the Hugging Face adapter
with the block structure TransformerLens 4's Granite adapter declares (``ScaledResidualBlockBridge``, the MLP's
output joining the residual times s), given here so the test runs without TransformerLens 4; s = 2 and 0.5, so a
correction that ignores s, multiplies by it or only divides when s is not 2 is off. The post-norm variant wraps each
layer's MLP with an RMSNorm after it. Each is checked by ``verify()`` and by a literal weight edit of a deep copy run
by the model's own forward against a plain forward (``test_hf`` helpers).

About 25 s on 2 shared CPU cores.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from conftest import assert_untouched, build, hook_count, rel_err
from test_cli_errors import run_error
from test_hf import SMALL, context_outputs, literal_edit_output, tiny_hf, tokens
from torch import nn

import implicit_updates as iu
from implicit_updates.adapters import hf as hf_adapter
from implicit_updates.adapters.structure import FALLBACK

TOL = 1e-10
DEAD_EXPERTS = "every routed expert's hidden activation is exactly zero at some position"
DEAD_HIDDEN = ("the MLP's hidden activation is exactly zero at some position and the MLP has no output bias, so no "
               "update of its output layer can change the MLP output there")


class PostNormed(nn.Module):
    """An MLP followed by an RMSNorm (``post_norm(mlp(m))``), which the layer then adds to its residual times s."""

    def __init__(self, mlp: nn.Module, d_model: int):
        super().__init__()
        self.mlp, self.norm = mlp, nn.RMSNorm(d_model, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.mlp(x))


def granite(scale: float, post_norm: bool, monkeypatch) -> nn.Module:
    """A tiny Granite whose layers add ``scale *`` the (post-normed) MLP output; biases and norm scales random."""
    cfg = transformers.GraniteConfig(**SMALL, num_key_value_heads=2, residual_multiplier=scale,
                                     embedding_multiplier=3.0, logits_scaling=2.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    structure = dataclasses.replace(FALLBACK["LlamaForCausalLM"], residual_scale=scale, source="Granite, in the test")
    if post_norm:
        for layer in model.model.layers:
            layer.mlp = PostNormed(layer.mlp, cfg.hidden_size)
        structure = dataclasses.replace(structure, mlp="mlp.mlp", post_norm="mlp.norm")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    monkeypatch.setattr(hf_adapter, "structure_of_hf", lambda hf: structure)
    return model.eval()


@pytest.mark.parametrize("scale", [2.0, 0.5])
@pytest.mark.parametrize("post_norm", [False, True], ids=["granite", "granite-post-norm"])
def test_scaled_residual_join_is_exact(post_norm, scale, monkeypatch):
    model, ids = granite(scale, post_norm, monkeypatch), tokens(11)
    with assert_untouched(model):
        result = iu.decompose(model, ids, dtype=torch.float64)
        report = result.verify()
    assert report.max_rel_err <= TOL and max(b.factored_max_rel_err for b in report.blocks) <= TOL
    assert {result.block(b).correction for b in range(3)} == {"scale" if post_norm else "expert_out"}
    targets = context_outputs(model, ids, torch.float64)  # plain forward of an upcast copy
    for block in range(3):
        for position in (0, 5, 10):
            out = literal_edit_output(model, result, block, position)
            assert rel_err(out, targets[block][0, position]) <= TOL, (block, position)
    assert result.block(1).delta_b[0, :-1].abs().max() > 1e-3  # not vacuous: the context moved the residual


@pytest.mark.parametrize("kind", ["gemma2", "llama"])
def test_dead_hidden_without_an_output_bias_is_refused_by_name(kind, tmp_path, capsys):
    """Block 1's gate is zero, so its hidden ``act(0) * up`` is exactly zero at every position: with no output bias
    (Llama, and Gemma 2's post-MLP norm) nothing can move the MLP output there. One ValueError naming the output
    matrix, the model untouched; the CLI says it in one line and exits 2."""
    model = tiny_hf(kind)
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight.zero_()
    with assert_untouched(model), pytest.raises(ValueError) as err:
        iu.decompose(model, tokens(9), dtype=torch.float64)
    assert "model.layers.1.mlp.down_proj.weight" in str(err.value) and DEAD_HIDDEN in str(err.value)
    assert hook_count(model) == 0
    model.save_pretrained(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar
    line = run_error(["verify", "--model", str(tmp_path), "--prompt", "5,9,2,7,11,3,8", "--dtype", "float64",
                      "--backend", "hf"], capsys)  # exit 2, one line, nothing on stdout
    assert "model.layers.1.mlp.down_proj.weight" in line and DEAD_HIDDEN in line


MOE = dict(num_experts=3, gated_mlp=True, act_fn="relu")


def moe_with_expert_0_dead(**overrides) -> nn.Module:
    """A ReLU mixture whose expert 0 has a zero hidden wherever it is routed."""
    model = build(**{**MOE, **overrides})
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.experts[0].W_gate.weight.zero_()
            block.mlp.experts[0].W_gate.weight[:, 0] = -1.0
            block.mlp.experts[0].W_in.weight.zero_()
    return model


def test_token_whose_every_routed_expert_is_dead_is_refused():
    """One expert per token: the tokens routed to the dead expert have no expert to carry their correction (the
    others have one), and the error names the block's expert matrices."""
    model = moe_with_expert_0_dead(experts_per_token=1)
    ids = tokens(10, seed=7)
    _, cache = model.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_expert_indices"))
    routed = cache["blocks.0.mlp.hook_expert_indices"].flatten()
    assert (routed == 0).any() and (routed != 0).any()  # some tokens can carry, some cannot
    with assert_untouched(model), pytest.raises(ValueError) as err:
        iu.decompose(model, ids, dtype=torch.float64)
    assert str(err.value).startswith("expert outputs blocks.0.mlp.experts.0.W_out.weight...: " + DEAD_EXPERTS)
    assert hook_count(model) == 0


def test_experts_with_a_small_hidden_still_carry():
    """A routed expert whose hidden is nonzero but small (squared norm below 1) carries its share exactly."""
    model = build(**{**MOE, "act_fn": "silu", "experts_per_token": 2})
    with torch.no_grad():
        for block in model.blocks:
            for expert in block.mlp.experts:
                expert.W_in.weight.mul_(1e-2)
    result = iu.decompose(model, tokens(10, seed=7), dtype=torch.float64)
    assert result.verify().max_rel_err <= TOL
    rows = [u.row for u in result.block(0).updates if ".experts." in u.name and u.row is not result.block(0).row]
    assert max(float(r.norm(dim=-1).max()) for r in rows) > 1  # row = p / ||p||^2: some ||p|| < 1

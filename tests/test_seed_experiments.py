"""The seed experiments' shared code: data, a short training run that verifies, theory predictions, alignment,
fine-tuning vs transfer."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_untouched

import implicit_updates as iu
from implicit_updates.experiments import icl, seeds
from implicit_updates.models.toy import ToyTransformer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def tasks(batch: int = 4, n: int = 10, d: int = 2, seed: int = 0, dtype=torch.float32) -> icl.RegressionTasks:
    return icl.sample_tasks(batch, n, d, torch.Generator().manual_seed(seed), dtype)


def test_data_generator_follows_the_papers_setting():
    t = tasks(batch=64, n=30, d=3, dtype=torch.float64)
    assert t.prompts.shape == (64, 31, 4) and t.targets.shape == (64,) and t.prompts.dtype == torch.float64
    assert torch.all(t.prompts[:, -1, -1] == 0)  # the query token is [x_q; 0]
    x, y = t.prompts[:, :-1, :3], t.prompts[:, :-1, 3]
    w = torch.linalg.lstsq(x, y[..., None]).solution[..., 0]  # one w per task explains every label
    torch.testing.assert_close(torch.einsum("bnd,bd->bn", x, w), y)
    torch.testing.assert_close(torch.einsum("bd,bd->b", t.prompts[:, -1, :3], w), t.targets)
    assert abs(float(w.std()) - 1) < 0.2 and abs(float(x.std()) - 1) < 0.1  # N(0, I)
    assert torch.equal(tasks(seed=3).prompts, tasks(seed=3).prompts)
    prefix = seeds.prefix_prompts(t, 5)
    assert prefix.shape == (64, 6, 4) and torch.equal(prefix[:, -1], t.prompts[:, -1])


def test_short_training_run_decomposes_and_verifies():
    model = ToyTransformer(seed=0, **seeds.INNOCENTI)
    with assert_untouched(model):
        before = seeds.theory_vs_empirical(model, tasks(batch=16, n=20))
    evals = []
    log = seeds.train_tracked(model, steps=25, batch=64, n_context=20, lr=5e-2, progress=False, n_test=32,
                              evaluate=lambda step, t: evals.append(seeds.theory_vs_empirical(model, t)))
    assert sum(log["train_loss"][-4:]) < sum(log["train_loss"][:4])
    assert len(evals) == 25 and evals[0]["test_loss"] == pytest.approx(before["test_loss"], rel=0.5)
    for e in evals:  # float32 as trained
        assert max(e["msd"]) <= 1e-11 and max(e["chained_msd"]) <= 1e-11
        assert abs(e["test_loss"] - e["theory_test_loss"]) <= 1e-5
        assert e["rank_min"] == e["rank_max"] == [1] * 5
    final = seeds.theory_vs_empirical(model, tasks(batch=16, n=20), torch.float64)
    assert max(final["msd"]) <= 1e-26 and max(final["max_rel_err"]) <= 1e-12
    assert abs(final["test_loss"] - final["theory_test_loss"]) <= 1e-12


def test_chained_theory_outputs_match_every_block():
    model = ToyTransformer(seed=1, layer_norm=True).double()
    t = tasks(dtype=torch.float64)
    result = iu.decompose(model, t.prompts)
    for out, update in zip(seeds.theory_outputs(result), result.blocks, strict=True):
        torch.testing.assert_close(out, update.target_output, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(seeds.theory_outputs(result)[-1][:, -1, -1], model.predict(t.prompts))


def test_frobenius_alignment_matches_dense_matrices():
    gen = torch.Generator().manual_seed(0)
    rows, cols = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen,
                                                                                    dtype=torch.float64)
    dense = torch.einsum("ni,no->nio", rows, cols).reshape(6, -1)
    expected = (dense @ dense.T) / (dense.norm(dim=1)[:, None] * dense.norm(dim=1)[None])
    torch.testing.assert_close(seeds.frobenius_alignment(rows, cols), expected)
    shared = seeds.frobenius_alignment(rows[:1], cols)  # one row for every position: the cosine of the columns
    torch.testing.assert_close(shared, torch.nn.functional.cosine_similarity(cols[:, None], cols[None], dim=-1))


def test_alignments_and_ranks_shapes():
    model = ToyTransformer(seed=0, n_layers=3)
    result = iu.decompose(model, tasks().prompts, dtype=torch.float64)
    a = seeds.alignments(result, batch=1)
    assert a["within_blocks"].shape == (3, 11, 11) and a["between_blocks"].shape == (3, 3)
    torch.testing.assert_close(a["within_blocks"].diagonal(dim1=-2, dim2=-1), torch.ones(3, 11, dtype=torch.float64))
    assert seeds.summed_update_ranks(result) == [[1] * 4] * 3


def test_finetuning_matches_a_plain_sgd_loop():
    model = ToyTransformer(seed=0, **seeds.DHERIN).double()
    t = tasks(batch=2, n=4, dtype=torch.float64)
    preds = seeds.finetune_first_weight(model, t, n_steps=4, lr=0.05)
    assert preds.shape == (5, 2)
    for trial in range(2):
        ref = copy.deepcopy(model)
        weight = ref.blocks[0].mlp.layers[0].weight
        opt = torch.optim.SGD([weight], lr=0.05)
        for k in range(4):
            token = t.prompts[trial, k].clone()
            token[-1] = 0
            loss = 0.5 * (ref(token[None, None])[0, 0, -1] - t.prompts[trial, k, -1]) ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            torch.testing.assert_close(preds[-1, trial], ref(t.prompts[trial, -1][None, None])[0, 0, -1])
    assert not torch.equal(preds[0], preds[-1])


def test_prefix_update_transfer_equals_the_context_run():
    model = ToyTransformer(seed=0, **seeds.DHERIN).double()
    t = tasks(batch=3, n=8, dtype=torch.float64)
    deltas = []
    for i in (1, 4, 8):
        delta, pred = seeds.prefix_update(model, t, i)
        assert delta.shape == (3, 3, 128)  # [batch, d_in, d_out] of the first MLP weight (transposed layout)
        with torch.no_grad():
            torch.testing.assert_close(pred, model.predict(seeds.prefix_prompts(t, i)), rtol=1e-12, atol=1e-13)
        deltas.append(delta)
    steps = seeds.frobenius_steps(torch.stack(deltas))
    torch.testing.assert_close(steps[0], (deltas[1] - deltas[0]).flatten(1).norm(dim=1))

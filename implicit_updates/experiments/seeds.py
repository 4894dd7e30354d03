"""Shared code of the seed-paper experiments (``examples/dherin_*.py``, ``examples/innocenti_*.py``, the demo).

Theory predictions are the query alone run through every block with that block's patched weights, fed by the
previous patched block (Innocenti & Achour Sec. 3; Dherin et al. Eq. 8 / Thm A.2); empirical predictions are the
model on the whole prompt. Everything is computed with the engine (``decompose``) on a ``ToyTransformer``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor
from torch.func import functional_call, grad, vmap
from tqdm.auto import trange

from implicit_updates.adapters.assemble import run_patched_block
from implicit_updates.analyses.decompose import Decomposition, decompose
from implicit_updates.experiments import icl
from implicit_updates.math import core
from implicit_updates.models.toy import ToyTransformer

# Innocenti & Achour's default run: d = 2, 5 blocks, 3 heads of size 1, Equinox MLP(depth=2) 3 -> 12 -> 12 -> 3.
INNOCENTI = dict(d_model=3, n_layers=5, n_heads=3, d_mlp=12, mlp_depth=2, mlp_skip=True, layer_norm=False,
                 causal=True)
INNOCENTI_TRAIN = dict(steps=100, batch=128, n_context=50, lr=5e-2)
# Dherin et al. Sec. 4: one standard block without the MLP skip connection, d = 2, N = 50.
# 8 heads and d_mlp 128 as the public replication; tokens stay 3-wide (no embedding), heads of size 4.
DHERIN = dict(d_model=3, n_layers=1, n_heads=8, d_head=4, d_mlp=128, mlp_depth=1, mlp_skip=False, layer_norm=False,
              causal=True)
DHERIN_TRAIN = dict(steps=400, batch=64, n_context=50, lr=1e-2)


def theory_outputs(result: Decomposition) -> list[Tensor]:
    """Every block's patched query-alone output ``[batch, pos, d]``, block l fed by block l-1's patched output.

    Innocenti & Achour Sec. 3 (all positions, all blocks): block l's query input is the previous patched block's
    output at the query (last) position, so nothing from the with-context run enters after block 0's updates.
    """
    outputs, x = [], result.blocks[0].query_input
    with result.computing():
        for update in result.blocks:
            out = run_patched_block(result.adapter, dataclasses.replace(update, query_input=x))
            outputs.append(out)
            x = out[:, -1:]
    return outputs


def summed_update_ranks(result: Decomposition) -> list[list[int]]:
    """Numerical rank of each block's dense ``sum_i dW_i``, per prompt (Innocenti & Achour Sec. 4).

    ``torch.linalg.matrix_rank`` in the decomposition's dtype, so its tolerance is that dtype's rounding, as
    ``jnp.linalg.matrix_rank`` in the reference code."""
    ranks = []
    for update in result.blocks:
        (first,) = update.first_layer
        per_position = core.rank_one_delta(update.row, first.column)  # dense dW_i [batch, pos, d_in, d_out]
        dense = per_position.sum(1)  # summed as the reference code does, then its numerical rank
        ranks.append(torch.linalg.matrix_rank(dense).tolist())
    return ranks


def theory_vs_empirical(model: ToyTransformer, tasks: icl.RegressionTasks, dtype: torch.dtype | None = None) -> dict:
    """Per-block MSD between patched (theory) and with-context (empirical) block outputs, test losses of both.

    The per-block MSD feeds each block its with-context input (as the Innocenti & Achour code); the theory test
    loss uses the chained patched blocks (``theory_outputs``). Loss ``1/(2B) sum (y_hat - y)^2``.
    """
    result = decompose(model, tasks.prompts, dtype=dtype)
    with torch.no_grad(), result.computing():
        per_block = [core.reproduction_errors(run_patched_block(result.adapter, u), u.target_output)
                     for u in result.blocks]
        chained = theory_outputs(result)
    targets = tasks.targets.to(result.dtype)
    empirical = result.blocks[-1].target_output[:, -1, -1]
    theory = chained[-1][:, -1, -1]
    ranks = summed_update_ranks(result)
    return {
        "msd": [e["msd"] for e in per_block],
        "max_rel_err": [e["max_rel_err"] for e in per_block],
        "chained_msd": [float((c - u.target_output).double().pow(2).mean()) for c, u in zip(chained, result.blocks,
                                                                                               strict=True)],
        "test_loss": float(0.5 * (empirical - targets).pow(2).mean()),
        "theory_test_loss": float(0.5 * (theory - targets).pow(2).mean()),
        "rank_min": [min(r) for r in ranks],
        "rank_max": [max(r) for r in ranks],
    }


def train_tracked(model: ToyTransformer, steps: int, batch: int, n_context: int, lr: float, seed: int = 0,
                  evaluate: Callable[[int, icl.RegressionTasks], dict] | None = None, n_test: int | None = None,
                  progress: bool = True) -> dict[str, list]:
    """Adam on fresh tasks every step; before each step ``evaluate(step, test_tasks)`` on a fresh test batch.

    As the Innocenti & Achour code: train and test batches drawn anew each step, metrics taken before the update.
    """
    d = model.cfg.d_model - 1
    train_gen, test_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 10_000)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    log: dict[str, list] = {"train_loss": [], "eval": []}
    for step in trange(steps, desc="train", disable=not progress, leave=False):
        train_tasks = icl.sample_tasks(batch, n_context, d, train_gen)
        test_tasks = icl.sample_tasks(n_test or batch, n_context, d, test_gen)
        if evaluate is not None:
            model.eval()
            log["eval"].append(evaluate(step, test_tasks))
        model.train()
        value = icl.loss(model, train_tasks)
        opt.zero_grad()
        value.backward()
        opt.step()
        log["train_loss"].append(value.item())
    model.eval()
    return log


def trained_dherin_block(seed: int = 0) -> ToyTransformer:
    """Dherin et al.'s block without MLP skip, trained as in their Fig. 1 (``DHERIN_TRAIN``), in float64."""
    model = ToyTransformer(seed=seed, **DHERIN)
    train_tracked(model, seed=seed, **DHERIN_TRAIN)
    return model.double()


def frobenius_alignment(rows: Tensor, columns: Tensor) -> Tensor:
    """Normalised Frobenius inner products ``<dW_i, dW_j>_F / (||dW_i|| ||dW_j||)`` of ``dW_i = outer(row_i, col_i)``.

    Innocenti & Achour Figs A.1/A.2. From the factors: ``<outer(r_i, c_i), outer(r_j, c_j)>_F = (r_i.r_j)(c_i.c_j)``.
    ``rows`` ``[n, d_in]`` (or ``[1, d_in]`` shared), ``columns`` ``[n, d_out]``; returns ``[n, n]``.
    """
    rows = rows.expand(columns.shape[0], -1).double()
    columns = columns.double()
    gram = (rows @ rows.T) * (columns @ columns.T)
    norms = gram.diagonal().clamp_min(torch.finfo(gram.dtype).tiny).sqrt()
    return gram / (norms[:, None] * norms[None, :])


def alignments(result: Decomposition, batch: int = 0) -> dict[str, Tensor]:
    """Alignment between every position's update within each block ``[blocks, pos, pos]`` and between blocks for
    the last token ``[blocks, blocks]`` (first-layer weight updates only)."""
    within = torch.stack([frobenius_alignment(u.row[batch], u.first_layer[0].column[batch]) for u in result.blocks])
    rows = torch.cat([u.row[batch, -1:] for u in result.blocks])
    columns = torch.cat([u.first_layer[0].column[batch, -1:] for u in result.blocks])
    return {"within_blocks": within, "between_blocks": frobenius_alignment(rows, columns)}


def prefix_prompts(tasks: icl.RegressionTasks, i: int) -> Tensor:
    """The prompts with only the first ``i`` context examples kept before the query: ``[batch, i + 1, d + 1]``."""
    return torch.cat([tasks.prompts[:, :i], tasks.prompts[:, -1:]], dim=1)


def prefix_update(model: ToyTransformer, tasks: icl.RegressionTasks, i: int, dtype=None) -> tuple[Tensor, Tensor]:
    """Dherin et al. Eq. 8 for context ``C_i`` (first i examples) and the query: the dense first-layer ``dW(C_i)``
    ``[batch, d_in, d_out]`` of block 0, and the prediction of the query alone with ``W + dW(C_i)`` ``[batch]``."""
    result = decompose(model, prefix_prompts(tasks, i), dtype=dtype)
    update = result.blocks[0]
    delta = core.rank_one_delta(update.row[:, 0], update.first_layer[0].column[:, -1])
    with torch.no_grad():
        out = theory_outputs(result)[-1]
    return delta, out[:, -1, -1]


def finetune_first_weight(model: ToyTransformer, tasks: icl.RegressionTasks, n_steps: int, lr: float = 0.01,
                          block: int = 0) -> Tensor:
    """Explicit fine-tuning (Dherin et al. Fig. 3): SGD on block ``block``'s first MLP weight only, batch 1, on the
    context examples in order, each fed alone as a query token ``[x_k; 0]`` with target ``y_k``.

    One independent run per prompt (vectorised with ``torch.func``). Returns the query's prediction after each
    number of steps, ``[n_steps + 1, batch]`` (row 0: no fine-tuning).
    """
    name = f"blocks.{block}.mlp.layers.0.weight"
    params = {k: v.detach() for k, v in model.named_parameters()}

    def predict(weight: Tensor, token: Tensor) -> Tensor:
        return functional_call(model, {**params, name: weight}, (token[None, None],))[0, 0, -1]

    def loss(weight: Tensor, token: Tensor, target: Tensor) -> Tensor:
        return 0.5 * (predict(weight, token) - target) ** 2

    step_grad, batched_predict = vmap(grad(loss)), vmap(predict)
    prompts = tasks.prompts
    queries_alone = prompts.clone()
    queries_alone[..., -1] = 0.0  # each context example as a query token [x_k; 0]
    weight = params[name].expand(prompts.shape[0], *params[name].shape).clone()
    preds = [batched_predict(weight, prompts[:, -1])]
    for k in range(n_steps):
        weight = weight - lr * step_grad(weight, queries_alone[:, k], prompts[:, k, -1])
        preds.append(batched_predict(weight, prompts[:, -1]))
    return torch.stack(preds).detach()


def frobenius_steps(deltas: Tensor) -> Tensor:
    """``||dW_{i+1} - dW_i||_F`` for consecutive context lengths; ``deltas`` ``[n, batch, d_in, d_out]``."""
    return rearrange(deltas[1:] - deltas[:-1], "n b i o -> n b (i o)").norm(dim=-1)


# -- what every example script shares -----------------------------------------------------------------------------


def example_args(script: str, description: str | None) -> argparse.Namespace:
    """``--json PATH`` (default ``OUT_DIR/NAME.json``), ``--out-dir`` (default ``figures/`` beside the script),
    ``--seed``; ``NAME`` is the script's file name."""
    name = Path(script).stem
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", metavar="PATH", help=f"where to write the numbers (default OUT_DIR/{name}.json)")
    parser.add_argument("--out-dir", default=str(Path(script).resolve().parent / "figures"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    args.json = args.json or str(Path(args.out_dir) / f"{name}.json")
    args.png = str(Path(args.out_dir) / f"{name}.png")
    torch.set_num_threads(1)  # these models are tiny: one thread is several times faster than two fighting
    return args


def save_outputs(args: argparse.Namespace, figure, payload: dict) -> None:
    """Write the figure (PNG, dpi 100) and the numbers (JSON); print where."""
    figure.savefig(args.png, dpi=100)
    with open(args.json, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {args.png} and {args.json}")

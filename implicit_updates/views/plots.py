"""Matplotlib figures for the analysis helpers: alignment heatmaps and step-norm decay curves with error bands.

matplotlib is optional (``pip install 'implicit-updates[plot]'``); every function raises a clear ImportError
without it. Functions draw on ``ax`` when given, else on a new figure, and return the axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():
    try:  # without a display matplotlib picks a headless backend (Agg) itself
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'implicit-updates[plot]' (or pip install matplotlib)"
                          ) from err
    return plt


def _axes(ax, figsize: tuple[float, float]):
    if ax is not None:
        return ax
    _, ax = _pyplot().subplots(figsize=figsize)
    return ax


def alignment_heatmap(matrix, ax=None, title: str = "", labels: Sequence[str] | None = None,
                      axis_label: str = "position"):
    """Heatmap of an alignment matrix (values in [-1, 1]) with a diverging colormap and a colorbar."""
    plt = _pyplot()
    matrix = np.asarray(_numpy(matrix))
    ax = _axes(ax, (4.5, 4))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    plt.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="alignment")
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels, rotation=90)
        ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel(axis_label)
    ax.set_ylabel(axis_label)
    ax.set_title(title)
    return ax


def mean_and_standard_error(curves) -> tuple[np.ndarray, np.ndarray]:
    """Mean over prompts and its standard error ``std / sqrt(n)`` (zero for one prompt), ``curves`` ``[prompts, k]``."""
    curves = np.atleast_2d(np.asarray(_numpy(curves), dtype=float))
    n = curves.shape[0]
    sem = curves.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(curves.shape[1])
    return curves.mean(axis=0), sem


def decay_curves(curves: Mapping[str, object], ax=None, x=None, log_y: bool = True, title: str = "",
                 xlabel: str = "context length i", ylabel: str = r"$\|\Delta W_{i+1} - \Delta W_i\|_F$"):
    """One line per label: the mean over prompts of a step-norm curve ``[prompts, k]``, with a mean ± SE band."""
    ax = _axes(ax, (5.5, 3.6))
    for label, values in curves.items():
        mean, sem = mean_and_standard_error(values)
        xs = np.arange(1, len(mean) + 1) if x is None else np.asarray(x)
        line, = ax.plot(xs, mean, label=label, lw=1.5)
        lower = mean - sem
        if log_y:
            lower = np.where(lower > 0, lower, mean)  # a log axis cannot show a band below zero
        ax.fill_between(xs, lower, mean + sem, color=line.get_color(), alpha=0.25, lw=0)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


def attribution_heatmap(scores, tokens: Sequence[str], blocks: Sequence[int] | None = None, ax=None,
                        title: str = ""):
    """Heatmap of per-source-token shares of an update, ``scores`` ``[block, token]`` (rows: blocks), with a diverging
    colormap centred on 0 (shares can be negative) and the tokens as column labels."""
    plt = _pyplot()
    scores = np.asarray(_numpy(scores), dtype=float)
    ax = _axes(ax, (max(4.0, 0.32 * len(tokens) + 1.5), max(2.5, 0.3 * scores.shape[0] + 1.2)))
    bound = float(np.abs(scores).max()) or 1.0
    image = ax.imshow(scores, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    plt.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the update")
    ax.set_xticks(range(len(tokens)), list(tokens), rotation=90, fontsize="small")
    blocks = list(range(scores.shape[0])) if blocks is None else list(blocks)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize="small")
    ax.set_xlabel("source token")
    ax.set_ylabel("block")
    ax.set_title(title, fontsize="small")
    return ax


def generation_steps(g: Mapping, ax=None, path: str | None = None):
    """Per generation step (a ``Generation.to_dict()``): max |logit diff| from the full model of the absorbed model
    and of the unpatched control, on a log axis; disagreeing steps marked."""
    ax = _axes(ax, (5.5, 3.4))
    steps = g["steps"]
    x = np.arange(len(steps))
    floor = np.finfo(float).tiny  # an exact 0 cannot sit on a log axis
    for key, label in (("max_abs_logit_diff", "absorbed"), ("control_max_abs_logit_diff", "control (unpatched)")):
        if all(s[key] is not None for s in steps):  # generated with control=False: no control curve
            ax.plot(x, [max(s[key], floor) for s in steps], marker="o", markersize=3, label=label)
    bad = [i for i, s in enumerate(steps) if not s["agree"]]
    if bad:
        ax.scatter(bad, [max(steps[i]["max_abs_logit_diff"], floor) for i in bad], color="red", zorder=3,
                   label="top-1 differs")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(_pyplot().MaxNLocator(integer=True))
    ax.set_xlabel("generation step")
    ax.set_ylabel("max |logit diff| vs full model")
    ax.set_title(f"{g.get('model') or ''} {g['dtype']}: {g['agree']}/{g['n_steps']} agree".strip(), fontsize="small")
    ax.legend(fontsize="small")
    if path:
        save(ax, path)
    return ax


def save(ax, path: str, dpi: int = 110) -> None:
    """Tight layout and save the axes' figure to ``path``; closes it."""
    plt = _pyplot()
    fig = ax.figure
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x

"""``attribute(model, prompt)``: every block's implicit update split exactly into one rank-one update per (head,
context token); the algebra is :mod:`implicit_updates.math.attribution`."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from implicit_updates.math.attribution import (  # noqa: F401 (re-exported)
    EXTRAS,
    AttentionCapture,
    BlockAttribution,
    attribute_block,
)


class Attribution:
    """Every block's attribution (``block(l)``), and the decomposition it splits (``decomposition``)."""

    def __init__(self, decomposition, blocks: list[BlockAttribution]):
        self.decomposition = decomposition
        self.blocks = blocks
        self._by_block = {b.block: b for b in blocks}

    def __repr__(self) -> str:
        from implicit_updates.views.html import attribution_repr

        return attribution_repr(self)

    def _repr_html_(self) -> str:  # notebooks: source tokens shaded by their share of the last position's update
        from implicit_updates.views.html import attribution_html

        return attribution_html(self)

    def block(self, block: int) -> BlockAttribution:
        if block not in self._by_block:
            raise IndexError(f"block {block} was not attributed; attributed blocks: {sorted(self._by_block)}")
        return self._by_block[block]

    def completeness_error(self) -> float:
        """The largest ``||sum_t - total|| / ||total||`` over blocks, positions and the three totals."""
        return max(b.max_completeness_error() for b in self.blocks)

    def token_scores(self, position: int = -1, batch: int = 0) -> Float[Tensor, "block pos"]:
        """``[block, source token]`` shares of position ``position``'s update at every attributed block."""
        return torch.stack([b.token_scores(position, batch) for b in self.blocks])

    def head_scores(self, position: int = -1, batch: int = 0) -> Float[Tensor, "block head"]:
        """``[block, head]`` shares of position ``position``'s update."""
        return torch.stack([b.head_scores(position, batch) for b in self.blocks])

    def term_patch(self, block: int, term: tuple[int, int] | str, position: int = -1, batch: int = 0
                   ) -> dict[str, Tensor]:
        """The dense first-layer update of one term, ``{parameter: (W a_t) v^T}`` shaped like the parameters (as
        :meth:`Decomposition.patch`); summed over :meth:`BlockAttribution.terms` it is the patch's first-layer part."""
        from implicit_updates.math.updates import RankOneUpdate

        b = self.block(block)
        position, batch = self.decomposition._index(position, batch)
        index = b.terms().index(term)
        updates = {u.name: u for u in self.decomposition.block(block).first_layer}
        out = {}
        for name, cols in b.term_columns(position, batch).items():
            u = updates[name]
            column = torch.zeros_like(u.column[:, : position + 1])
            column[batch, position] = cols[index]
            out[name] = RankOneUpdate(name, u.row, column, u.transposed).dense(batch, position)
        return out


def attribute(model, prompt, query: str = "last", blocks=None, dtype=None, nodes: int = 64,
              progress: bool | None = None) -> Attribution:
    """Split every block's implicit update exactly into one rank-one update per (head, context token).

    Returns, per block and position, each term's contribution to the first-layer columns and to the output correction,
    factored (Eqs. 1-3 of this module), with ``completeness_error()``, per-token and per-head scores and dense per-term
    updates on request (``term_patch``). This is the *direct* attribution at each block: a token's influence through
    earlier blocks is in ``residual`` (the block input's difference). Arguments as
    :func:`implicit_updates.analyses.decompose`; ``nodes``: Gauss-Legendre points of the path integrals. The user's
    model is left bit-identical, without hooks, in its mode, on its device. Hugging Face models and TransformerBridge
    run with eager attention while this runs (both the decomposition and the capture: the pattern split is the one the
    decomposed forward used), their configs' attention implementation restored on any exit.
    """
    from implicit_updates.adapters.base import require
    from implicit_updates.analyses.decompose import Decomposition, _dtype, decompose_captures, prepared, untouched

    if query not in ("last", "self"):
        raise ValueError(f"query must be 'last' or 'self', not {query!r}")
    if not isinstance(nodes, int) or nodes < 2:
        raise ValueError(f"nodes must be an integer >= 2 (Gauss-Legendre points), not {nodes!r}")
    with prepared(model, prompt, blocks, dtype) as (adapter, block_ids, inputs):
        require(adapter, "attribution")
        with untouched(adapter.model), adapter.attention_readable():  # HF: eager attention, for both captures
            captures = adapter.capture(inputs, block_ids, query, progress=progress)
            attention = adapter.capture_attention(inputs, block_ids, query)
        result = Decomposition(adapter, decompose_captures(captures), query, _dtype(adapter), inputs)
        out = []
        for cap in attention:
            update = result.block(cap.block)
            maps = {u.name: _weight_view(adapter.model, u.name, u.transposed, update.row.dtype)
                    for u in update.first_layer}
            columns = {u.name: u.column for u in update.first_layer}
            out.append(attribute_block(cap, maps, columns, update.row, update.delta_b, nodes))
            out[-1].completeness(), out[-1].scores()  # while the model is guarded (no grad, eval mode)
    return Attribution(result, out)


def _weight_view(model, name: str, transposed: bool, dtype: torch.dtype) -> Tensor:
    """The ``[d_in, d_out]`` view of a first-layer parameter (``nn.Linear`` weights are stored transposed)."""
    w = model.get_parameter(name).detach().to(dtype)  # exact upcast: the model may compute upcast module by module
    return w.T if transposed else w

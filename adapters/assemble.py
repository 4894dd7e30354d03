"""The one capture assembler: after a backend's with-context run filled a store, each block on its query alone and
its :class:`~implicit_updates.capture.BlockCapture` built, through the adapter interface only; and the one factored
patched run (:func:`run_patched_block`, rows laid out by :class:`PatchedRows`), which a backend serves by running a
block on rows with edits applied (``run_edited``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from implicit_updates.capture import BlockCapture
from implicit_updates.math.updates import BlockUpdate


def assemble(adapter, store: dict[str, Tensor], resid_pre: Callable[[int], str], blocks: list[int], query: str,
             query_inputs: dict[int, Tensor] | None, progress: bool | None) -> list[BlockCapture]:
    """After the with-context forward filled ``store``, run each block on its query alone and build its capture.

    The query input is the block's input at the last position (``query="last"``), at every position (``"self"``),
    or what ``query_inputs`` gives for that block. ``resid_pre(b)`` names block b's input in ``store``.
    """
    query_inputs = query_inputs or {}
    captures = []
    for b in tqdm(blocks, desc="decompose", disable=not progress, leave=False):
        x = store[resid_pre(b)]
        query_input = query_inputs.get(b, x[:, -1:] if query == "last" else x)
        alone = adapter.run_block_alone(b, query_input)
        captures.append(adapter.block_capture(b, store, alone, query_input))
    return captures


def run_patched_block(adapter, update: BlockUpdate, positions: slice = slice(None)) -> Tensor:
    """Block ``update.block`` on the query alone with each position's updates added in factored form, by the
    model's own forward: ``[batch, pos, d_model]`` for the ``positions`` asked.

    A rank-one ``W + outer(row, column)`` changes its map's output by ``(input . row) column``, added where the map's
    output appears, so no dense matrix is formed (the backend's ``run_edited`` applies each edit as the literal
    weight edit acts). With one query for all positions the block runs on that single token and the MLP fans out to
    one row per position (attention runs once), where the backend can (``fans_out``)."""
    rows = PatchedRows.of(update, positions, adapter.fans_out(update.block))
    return rows.unfold(adapter.run_edited(update.block, rows.query, update.edits(rows)))


@dataclass(frozen=True)
class PatchedRows:
    """The rows a block runs on when ``update``'s per-position edits are added in factored form.

    With one query for all positions (``fan_out``) the block runs on that one token and the MLP fans out: each
    factor keeps its ``[batch, pos, ...]`` shape, one row per position after the MLP's first map (attention runs
    once). Otherwise (a query per position, or a backend that cannot fan out: routed experts, a flattening MLP) every
    (batch, position) pair is its own one-token row: ``[(batch pos), 1, ...]``.
    """

    update: BlockUpdate
    positions: slice
    fan_out: bool

    @classmethod
    def of(cls, update: BlockUpdate, positions: slice, can_fan_out: bool = True) -> PatchedRows:
        return cls(update, positions, can_fan_out and update.query_input.shape[1] == 1)

    def __call__(self, t: Tensor) -> Tensor:
        """A factor ``[batch, q or pos, ...]`` shaped for the rows: as it is, or ``[(batch pos), 1, ...]``."""
        t = t if t.shape[1] == 1 else t[:, self.positions]
        if self.fan_out:
            return t
        batch, n_pos = self.update.target_output[:, self.positions].shape[:2]
        return rearrange(t.expand(batch, n_pos, *t.shape[2:]), "b n ... -> (b n) 1 ...")

    @property
    def query(self) -> Tensor:
        """The block's input rows, ``[rows, 1, d_model]`` either way."""
        return self.update.query_input if self.fan_out else self(self.update.query_input)

    def unfold(self, out: Tensor) -> Tensor:
        """The block's output on the rows back as ``[batch, pos, d_model]``."""
        if self.fan_out:
            return out
        return rearrange(out, "(b n) 1 d -> b n d", b=self.update.target_output.shape[0])

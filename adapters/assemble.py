"""The one capture assembler: after a backend's with-context run filled a store, each block on its query alone and
its :class:`~implicit_updates.capture.BlockCapture` built, through the adapter interface only."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from tqdm.auto import tqdm

from implicit_updates.capture import BlockCapture


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

"""The adapter interface: the one thing every analysis knows about a framework.

An adapter translates a live model into the plain tensors of :mod:`implicit_updates.capture` and runs the model's
own code on substituted inputs; it never does math. Analyses use only the members of :class:`Adapter` below (no
private member, no type switch): what a backend cannot serve it lacks as a *capability*, and :func:`require`
refuses it in one line that names the capability and the backend's reason.

Every adapter serves the core capabilities (decompose and both verify checks); the optional ones are named in
:data:`CAPABILITIES`. The README's backend x feature table is generated from the adapters' ``capabilities`` and
``limits`` (:func:`capability_table`) and checked by a test.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from implicit_updates.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from implicit_updates.capture import BlockCapture
    from implicit_updates.math.attribution import AttentionCapture
    from implicit_updates.math.lowrank import BlockSystem
    from implicit_updates.math.updates import AdditiveUpdate, BlockUpdate, RankOneUpdate

# capability -> what it serves (the analyses that need it)
CAPABILITIES: dict[str, str] = {
    "decompose": "decompose / verify (factored and literal)",
    "copy": "absorb (a patched deep copy)",
    "absorbed": "absorbed (patched in place while it runs)",
    "attribution": "attribute",
    "continuation": "continuation",
    "lora": "LoRA export (PEFT)",
    "prefix_onepass": "one-pass prefix dynamics",
    "suffix_removal": "suffix removal",
    "generation": "absorbed generation (KV-cached)",
}


@runtime_checkable
class Adapter(Protocol):
    """What an analysis may use of a backend.

    Model facts: ``model`` (the torch module guarded and computed with), ``user_model`` (what the user passed: an
    nnsight model for nnsight, else ``model``), ``n_blocks``, ``d_model``, ``d_vocab``, ``n_ctx`` (None: no limit),
    ``device``, ``compute_dtype`` and ``continuous`` (set by the analysis' guard: the dtype computed in, and whether
    the inputs are residuals fed at block 0, whose query-alone runs follow the model's own convention for them),
    ``backend`` (the registry's name),
    ``capabilities`` and ``limits`` (capability -> why it is not served).
    """

    model: nn.Module
    n_blocks: int
    compute_dtype: torch.dtype
    continuous: bool
    backend: str
    capabilities: frozenset[str]
    limits: dict[str, str]

    @property
    def user_model(self) -> object: ...

    @property
    def device(self) -> torch.device: ...

    def tokenize(self, text: str) -> Tensor: ...

    def embed_alone(self, inputs: Tensor) -> Tensor:
        """Block 0's input when the model sees only the last token, at position 0: ``[batch, 1, d_model]``."""

    def logits(self, inputs: Tensor) -> Tensor:
        """The model's own output ``[batch, pos, d_vocab]`` on token ids or continuous block-0 inputs."""

    # -- decompose and verify ------------------------------------------------------------------------------------

    def capture(self, inputs: Tensor, blocks: list[int], query: str, progress: bool | None = None,
                query_inputs: dict[int, Tensor] | None = None) -> list[BlockCapture]:
        """With-context quantities of ``blocks``, then each block on its query alone
        (:func:`implicit_updates.adapters.assemble.assemble` for hook-based backends)."""

    def run_block_alone(self, block: int, query_input: Tensor) -> dict[str, Tensor]:
        """Block ``block`` on each query residual as its own one-token sequence: its named quantities."""

    def block_capture(self, block: int, context: dict[str, Tensor], alone: dict[str, Tensor],
                      query_input: Tensor) -> BlockCapture:
        """One block's capture from its with-context and query-alone quantities."""

    def run_block_output(self, block: int, query_input: Tensor) -> Tensor:
        """Block ``block``'s output on each query residual alone, by the model's own forward (the literal check)."""

    def fans_out(self, block: int) -> bool:
        """Whether block ``block`` can run one query once and fan its MLP out to one row per position (not where
        rows are routed by index, or the MLP reads a flattened input)."""

    def run_edited(self, block: int, rows: Tensor, edits: list[RankOneUpdate | AdditiveUpdate]) -> Tensor:
        """Block ``block`` on ``rows`` ``[n, 1, d_model]`` (each a one-token sequence) with ``edits`` added as the
        literal weight edits act, their factors already shaped for the rows (``BlockUpdate.edits``): a rank-one
        ``(input . row) column`` at its map's output, a bias ``delta`` at its module's output, a norm scale
        ``delta * z`` at the norm's output. Returns the block's output per row, ``[n, 1, d_model]``, or
        ``[n, positions, d_model]`` where the edits' factors are ``[n, positions, ...]`` and the MLP fans out (the
        factored patched run, :func:`~implicit_updates.adapters.assemble.run_patched_block`)."""

    def rebind(self, model: nn.Module) -> Adapter:
        """The same adapter over ``model`` (a patched copy); cleans what a copy inherits."""

    # -- optional capabilities ---------------------------------------------------------------------------------

    def prefix_captures(self, inputs: Tensor, blocks: list[int], chunk_size: int = 64,
                        progress: bool | None = None) -> list[BlockCapture]:
        """``prefix_onepass``: every prefix ``[c_1..c_i, x]`` of ``inputs`` as one position."""

    def continuation_systems(self, inputs: Tensor, blocks: list[int], k: int) -> tuple[list[BlockSystem], Tensor]:
        """``continuation``: what each block's update over the last ``k`` tokens is solved from (plain rows; the
        solving is :func:`implicit_updates.math.lowrank.solve_block`'s), and the full logits there."""

    def output_shifts(self, vectors: dict[int, Tensor]) -> AbstractContextManager:
        """``continuation``: a context adding ``vectors[b]`` to block b's output (the residual stream after it) while
        it is open: a thought patch's steering vectors."""

    def attention_readable(self) -> AbstractContextManager:
        """``attribution``: a context in which the attention pattern is readable (checks support on entry)."""

    def capture_attention(self, inputs: Tensor, blocks: list[int], query: str) -> list[AttentionCapture]:
        """``attribution``: per block, the pattern, values and output maps per head."""

    def suffix_runs(self, inputs: Tensor, block: int) -> dict:
        """``suffix_removal``: block ``block`` on every suffix of its with-context input sequence."""

    def peft_base(self) -> nn.Module:
        """``continuation`` exports: the Hugging Face model a PEFT LoRA attaches to."""

    def cached_step(self, inputs: Tensor, cache: object | None) -> tuple[dict[str, Tensor], Tensor, object]:
        """``generation``: the model's own KV-cached forward on new token ids ``inputs`` ``[1, new]`` after those
        ``cache`` holds (None: none yet). Returns every block's with-context quantities at the last new position
        (a store for :meth:`block_capture`, each ``[1, 1, ...]``), the logits there ``[1, d_vocab]``, and the cache
        grown by ``inputs``."""

    def run_absorbing(self, token: Tensor, context: dict[str, Tensor],
                      update_for: Callable[[BlockCapture], BlockUpdate], control: bool = True
                      ) -> tuple[Tensor, Tensor]:
        """``generation``: the model on ``token`` ``[1, 1]`` alone (position 0) as two rows of one batch. Row 0 is
        the absorbed model: each block's update, computed by ``update_for`` from the block's capture (``context``
        and the query-alone quantities of the input the block actually receives), is added in factored form while
        the block runs. Row 1 runs unpatched (the control; none with ``control=False``). Returns the rows' logits
        ``[2 or 1, d_vocab]`` and every
        block's output in row 0 ``[n_blocks, d_model]`` (an update computed where a block actually runs maps any input
        to its with-context output, so only these show an earlier block's error)."""


def require(adapter: Adapter, capability: str) -> None:
    """Refuse, in one line naming the capability and the backend's reason, what ``adapter`` cannot serve."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
    if capability not in adapter.capabilities:
        reason = adapter.limits.get(capability, "not implemented for this backend")
        raise UnsupportedArchitectureError(
            f"{CAPABILITIES[capability]} is not available on the {adapter.backend} backend "
            f"(capability {capability!r}): {reason}")


def capability_table(adapters: dict[str, type]) -> str:
    """The backend x feature table (markdown) from each adapter class's ``capabilities`` and ``limits``: "yes", or
    "no" with a numbered note giving the backend's reason."""
    names = list(adapters)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    notes: list[str] = []
    for cap, label in CAPABILITIES.items():
        cells = []
        for name in names:
            cls = adapters[name]
            if cap in cls.capabilities:
                cells.append("yes")
            else:
                notes.append(f"{name}, {label}: {cls.limits[cap]}")
                cells.append(f"no [{len(notes)}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"[{i}] {note}  " for i, note in enumerate(notes, 1)]).rstrip() + "\n"

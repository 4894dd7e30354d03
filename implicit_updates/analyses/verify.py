"""Verification reports: does the patched query alone reproduce the with-context output of every block?"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class BlockReport:
    """One block's errors. ``max_rel_err`` is the larger of the factored check (every position) and the literal one
    (dense ``param + delta`` swapped into the model at ``literal_positions``, run by the model's own forward);
    ``worst_position`` is where it occurs (batch ``worst_batch``); ``position_rel_errs`` the factored check's
    relative error at every position (the largest over the batch)."""

    block: int
    msd: float
    max_abs_err: float
    max_rel_err: float
    rank: int
    factored_max_rel_err: float = 0.0
    literal_max_rel_err: float = 0.0
    literal_positions: tuple[int, ...] = ()
    worst_position: int = 0
    worst_batch: int = 0
    position_rel_errs: tuple[float, ...] = ()


@dataclass(frozen=True)
class VerifyReport:
    """Per-block reproduction errors over every position (and batch element), and the summed update's rank."""

    blocks: tuple[BlockReport, ...]
    n_positions: int
    query: str
    dtype: str

    @property
    def max_rel_err(self) -> float:
        return max(b.max_rel_err for b in self.blocks)

    @property
    def max_abs_err(self) -> float:
        return max(b.max_abs_err for b in self.blocks)

    def to_dict(self) -> dict:
        return {
            "dtype": self.dtype,
            "query": self.query,
            "n_positions": self.n_positions,
            "blocks": [asdict(b) for b in self.blocks],
            "max_rel_err": self.max_rel_err,
        }

    def __str__(self) -> str:
        lines = [f"{'block':>5}  {'MSD':>10}  {'max |err|':>10}  {'max rel err':>11}  {'literal':>9}  {'rank':>4}"]
        for b in self.blocks:
            lines.append(f"{b.block:>5}  {b.msd:10.3e}  {b.max_abs_err:10.3e}  {b.max_rel_err:11.3e}  "
                         f"{b.literal_max_rel_err:9.2e}  {b.rank:>4}")
        lines.append(f"max relative error {self.max_rel_err:.3e} over {len(self.blocks)} blocks x "
                     f"{self.n_positions} positions ({self.dtype}, query={self.query})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        from implicit_updates.views.html import verify_repr

        return verify_repr(self)

    def _repr_html_(self) -> str:
        from implicit_updates.views.html import verify_html

        return verify_html(self)

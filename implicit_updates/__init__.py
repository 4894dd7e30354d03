"""implicit-updates: in-context learning as exact, per-token rank-one MLP weight updates on live models.

Dherin et al. 2025 ("Learning without training"), Innocenti & Achour 2025, Goldwaser et al. 2025.
"""

from implicit_updates.analyses.absorb import AbsorbReport, absorb, absorbed, compare_absorbed
from implicit_updates.analyses.attribution import Attribution, attribute
from implicit_updates.analyses.decompose import Decomposition, decompose
from implicit_updates.analyses.generate import Generation, generate
from implicit_updates.analyses.thought import ThoughtPatch, ThoughtSystems, thought_patch, thought_systems
from implicit_updates.analyses.transfer_diagnostic import TransferDiagnostic, transfer_diagnostic
from implicit_updates.analyses.verify import BlockReport, VerifyReport
from implicit_updates.errors import NonFiniteActivationError, UnsupportedArchitectureError
from implicit_updates.math.core import ZeroQueryNormError

__all__ = [
    "Attribution",
    "attribute",
    "AbsorbReport",
    "absorb",
    "absorbed",
    "compare_absorbed",
    "BlockReport",
    "Decomposition",
    "Generation",
    "NonFiniteActivationError",
    "UnsupportedArchitectureError",
    "VerifyReport",
    "ZeroQueryNormError",
    "decompose",
    "generate",
    "ThoughtPatch",
    "thought_patch",
    "ThoughtSystems",
    "thought_systems",
    "TransferDiagnostic",
    "transfer_diagnostic",
]
__version__ = "0.1.0"

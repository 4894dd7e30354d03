"""What an adapter hands to the core: plain tensors per block, and handles to the parameters the theory touches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor


@dataclass(frozen=True)
class FirstLayerMap:
    """A linear map that reads the MLP input: ``m @ weight`` with ``weight`` ``[d_in, d_out]``.

    ``name`` is the parameter's key in ``model.named_parameters()``; ``transposed`` says the parameter is stored
    ``[d_out, d_in]`` (``nn.Linear``) and ``weight`` is its transpose view. ``experts``: the parameter stacks that many
    experts' maps (``[E, d_out, d_in]``, or ``[E, d_in, d_out]`` when not ``transposed``: transformers' fused experts)
    and ``weight`` is all of them side by side, ``[d_in, E * d_out]``, expert-major.
    """

    name: str
    weight: Tensor
    transposed: bool = False
    experts: int = 0


@dataclass(frozen=True)
class OutputCorrection:
    """Where the residual difference ``r_i - r_x`` goes.

    - ``bias``: add it to the MLP's last bias ``name`` (Dherin Thm A.2).
    - ``scale``: a norm after the MLP (Goldwaser et al.). The MLP's output matrix ``output_weight`` gets the
      rank-one update ``(h'_i - h_i) p_i^T/||p_i||^2`` mapping its hidden ``p_i`` (``hidden``) from the MLP output
      ``h_i`` (``mlp_output``, the norm's input) to the flattened ``h'_i`` (``core.flattened_output``), and the
      norm's scale ``name`` takes ``core.post_norm_scale``; where ``p_i`` is exactly zero the MLP's output bias
      ``output_bias`` (if any) takes the flattening instead; ``post_norm(x)`` returns the norm's
      ``(normalized, output)`` on ``x`` as the model computes them. ``normalized`` is the with-context ``z_i``.
    - ``expert_out``: a mixture of experts without output bias; each routed expert's output matrix (``names``)
      gets the rank-one update ``(r_i - r_x)/S_i`` x ``p_e/||p_e||^2`` with ``p_e`` its hidden activation
      (``expert_hidden``) and ``S_i`` the sum of routing weights (``routing_weights``). ``expert_slots``: where
      ``names`` repeat one stacked parameter of ``stacked_experts`` experts, the expert each entry updates (its
      per-expert matrix stored ``[d_out, d_in]`` when ``output_transposed``).
    - ``none``: the block has no MLP skip connection, so the first-layer updates alone are exact (Dherin Eq. 8).

    ``residual_scale``: s where the block adds ``s *`` the MLP's (post-normed) output to its residual (Granite's
    ``residual_multiplier``); the correction then makes the MLP output move by ``(r_i - r_x) / s``.
    """

    kind: Literal["bias", "scale", "expert_out", "none"]
    name: str | None = None
    normalized: Tensor | None = None
    names: tuple[str, ...] = ()
    expert_hidden: tuple[Tensor, ...] = ()
    routing_weights: Tensor | None = None
    output_weight: str | None = None
    output_bias: str | None = None
    output_transposed: bool = False
    hidden: Tensor | None = None
    mlp_output: Tensor | None = None
    post_norm: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    residual_scale: float = 1.0
    expert_slots: tuple[int | None, ...] = ()
    stacked_experts: int = 0


@dataclass
class BlockCapture:
    """Activations of one block with context (``[batch, pos, d]``) and on the query alone (``[batch, q, d]``)."""

    block: int
    query_input: Tensor
    mlp_input: Tensor
    query_mlp_input: Tensor
    residual: Tensor
    query_residual: Tensor
    output: Tensor
    attention_output: Tensor
    query_attention_output: Tensor
    maps: list[FirstLayerMap] = field(default_factory=list)
    correction: OutputCorrection = field(default_factory=lambda: OutputCorrection("none"))

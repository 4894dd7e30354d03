"""Export an absorbed continuation as a PEFT LoRA adapter directory (Hugging Face models and TransformerBridges).

Each block's rank-K update ``delta = rows @ columns`` (``m @ W`` layout: ``rows`` ``[d_in, K]``, ``columns``
``[K, d_out]``) is, for a map stored ``[d_out, d_in]`` (``nn.Linear``), ``columns^T @ rows^T``: LoRA's
``lora_B @ lora_A * scaling`` with ``lora_A = rows^T`` (``[K, d_in]``), ``lora_B = columns^T`` (``[d_out, K]``) and
``lora_alpha = r = K`` (scaling 1). GPT-2's ``Conv1D`` stores ``[d_in, d_out]``; PEFT's ``fan_in_fan_out`` transposes
``lora_B @ lora_A``, so the same two factors apply. A loaded adapter computes ``W x + lora_B (lora_A x)``, the
literal weight edit up to rounding. What is not a low-rank matrix (an output bias when K = 1) is refused: build the
absorption with ``output="matrix"`` so the output matrix takes it as a rank-one update.

``peft.PeftModel.from_pretrained(base, path)`` loads the directory onto the Hugging Face model (for a bridge, onto
the plain Hugging Face model of the same checkpoint); the adapter is written in the absorption's dtype (float64 for
the exact check).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from implicit_updates.errors import UnsupportedArchitectureError
from implicit_updates.math.lowrank import LowRankUpdate

PEFT_INSTALL = "pip install peft   (or the package's [lora] extra)"


def hf_model_of(model: nn.Module) -> nn.Module:
    """The Hugging Face model a PEFT adapter attaches to: the model itself, or a TransformerBridge's
    ``original_model``; a backend without one (a HookedTransformer: its update is applied by
    ``absorption.patched()``) is refused by its missing ``lora`` capability."""
    from implicit_updates.adapters import adapter_for
    from implicit_updates.adapters.base import require

    adapter = adapter_for(model)
    require(adapter, "lora")
    return adapter.peft_base()


def lora_factors(absorption) -> dict[str, tuple[Tensor, Tensor, bool]]:
    """``{Hugging Face module name: (lora_A [K, d_in], lora_B [d_out, K], is_linear)}`` with ``lora_B @ lora_A``
    the update of that module's weight (transposed for a ``Conv1D``, as PEFT's ``fan_in_fan_out`` applies it)."""
    model = absorption.model
    hf = hf_model_of(model)
    hf_names = {id(p): n for n, p in hf.named_parameters()}
    out: dict[str, tuple[Tensor, Tensor, bool]] = {}
    for block in absorption.blocks:
        for u in block.updates:
            if not isinstance(u, LowRankUpdate):
                raise UnsupportedArchitectureError(
                    f"{u[0]}: a bias or norm-scale update is not a low-rank matrix, so it has no LoRA factors (a bias: "
                    "absorb with output='matrix', and the output matrix takes it as a rank-one update; the scale of a "
                    "norm after the MLP has no such form, and writing it as a PEFT modules_to_save copy is not "
                    "implemented)")
            name = hf_names.get(id(model.get_parameter(u.name)))
            if name is None or not name.endswith(".weight"):
                raise UnsupportedArchitectureError(f"{u.name}: no weight of the Hugging Face model for it")
            # a bridge wraps each HF module in place (``mlp._original_component.gate_proj``): the adapter names the
            # plain Hugging Face model's modules, which a bridge's original_model holds under those wrappers
            module = name.removesuffix(".weight").replace("._original_component", "")
            if module in out:
                raise UnsupportedArchitectureError(f"{module} gets two updates; a LoRA holds one per module")
            out[module] = (_packed(u.rows.T), _packed(u.columns.T), u.transposed)  # transposed: an nn.Linear
    return out


def save_lora(absorption, path: str | Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``path`` (created if absent; its parent
    must exist). Returns the directory."""
    factors = lora_factors(absorption)  # (what has no LoRA form is refused first, peft or not)
    try:
        from peft import LoraConfig
        from safetensors.torch import save_file
    except ImportError as err:
        raise ImportError(f"writing a LoRA adapter needs peft: {PEFT_INSTALL}") from err
    hf = hf_model_of(absorption.model)
    ranks = {a.shape[0] for a, _, _ in factors.values()}
    if len(ranks) != 1:
        raise UnsupportedArchitectureError(f"updates of different ranks {sorted(ranks)}; one LoRA rank is written")
    rank = ranks.pop()
    conv1d = {m for m, (_, _, linear) in factors.items() if not linear}
    if conv1d and len(conv1d) != len(factors):
        raise UnsupportedArchitectureError("a mix of nn.Linear and Conv1D maps: PEFT's fan_in_fan_out is one setting")
    path = Path(path)
    path.mkdir(exist_ok=True)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=sorted(factors),
                        task_type="CAUSAL_LM",
                        fan_in_fan_out=bool(conv1d), init_lora_weights=False,
                        base_model_name_or_path=getattr(hf.config, "name_or_path", None) or None)
    config.save_pretrained(str(path))
    tensors = {}
    for module, (a, b, _) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.detach().cpu()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.detach().cpu()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def _packed(t: Tensor) -> Tensor:
    """A contiguous copy (safetensors writes neither strided views nor tensors sharing memory, and the gated MLP's
    two first-layer maps share their rows)."""
    return t.clone(memory_format=torch.contiguous_format)

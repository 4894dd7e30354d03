"""The one parameter swap (``runtime.dispatch.swapped_while_running``): what a module's forward reads while it runs,
and that everything is put back, also after a refusal or an error inside the forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from implicit_updates.runtime.dispatch import swapped_while_running


class Scaled(nn.Module):
    """``x @ weight.T * scale``: one parameter and one buffer; records what its forward saw."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(2))
        self.register_buffer("scale", torch.tensor(2.0))
        self.seen: dict[str, object] = {}

    def forward(self, x):
        self.seen = {"weight_is_parameter": isinstance(self._parameters["weight"], nn.Parameter),
                     "weight_requires_grad": self.weight.requires_grad,
                     "scale_is_parameter": isinstance(self._buffers["scale"], nn.Parameter),
                     "parameters": sorted(n for n, _ in self.named_parameters())}
        return x @ self.weight.T * self.scale


def test_the_forward_reads_the_replacements_and_the_originals_come_back():
    module = Scaled()
    weight, scale = module.weight, module.scale
    swaps = {module: lambda: [(module, "weight", 3 * torch.eye(2)), (module, "scale", torch.tensor(5.0))]}
    with swapped_while_running(swaps):
        out = module(torch.ones(1, 2))
        assert module.weight is weight  # only while the forward runs
    assert torch.equal(out, torch.full((1, 2), 15.0))
    assert module.seen == {"weight_is_parameter": True, "weight_requires_grad": False, "scale_is_parameter": False,
                           "parameters": ["weight"]}  # a buffer stays a buffer, a parameter a frozen parameter
    assert module.weight is weight and module.scale is scale
    assert torch.equal(module(torch.ones(1, 2)), torch.full((1, 2), 2.0))


def test_a_replacement_of_another_shape_is_refused_naming_both_shapes():
    module = Scaled()
    weight = module.weight
    with pytest.raises(ValueError, match=r"^weight: replacement of shape \(3, 3\) for a tensor of shape \(2, 2\)$"):
        with swapped_while_running({module: lambda: [(module, "weight", torch.eye(3))]}):
            module(torch.ones(1, 2))
    assert module.weight is weight


def test_a_forward_that_raises_leaves_the_originals_in_place():
    module = Scaled()
    weight = module.weight
    with pytest.raises(RuntimeError), swapped_while_running({module: lambda: [(module, "weight", torch.eye(2))]}):
        module(torch.ones(1, 3))  # a shape error inside the forward, after the swap
    assert module.weight is weight and not module._forward_pre_hooks and not module._forward_hooks

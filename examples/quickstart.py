"""The API in a dozen lines: decompose, verify, and check one patch by a literal weight edit on a copy."""

import copy

import torch

import implicit_updates as iu
from implicit_updates.models import random_model

model = random_model("llama")  # offline; HookedTransformer.from_pretrained("gpt2") online
tokens = torch.randint(0, model.cfg.d_vocab, (1, 24), generator=torch.Generator().manual_seed(0))
result = iu.decompose(model, tokens, dtype=torch.float64)  # every block, every position, factored
print(result.verify())  # per-block MSD, max abs / rel error, rank of the summed update

edited = copy.deepcopy(model).to(torch.float64)  # the literal weight edit: block 2, position 5
with torch.no_grad():
    for name, delta in result.patch(block=2, position=5).items():
        edited.get_parameter(name).add_(delta)
    out = edited.blocks[2](result.query_input(block=2, position=5))[0, 0]
print("literal edit, relative error:", float((out - result.target_output(2, 5)).norm() / out.norm()))

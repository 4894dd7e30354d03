"""What users do online: GPT-2 small on few-shot prompts, with the context absorbed into its weights.

    python examples/absorb_gpt2_fewshot.py [--model gpt2] [--json absorb_gpt2.json]

For each prompt it prints the full model's next-token prediction, the absorbed model's on the query token alone
(the same, to float64 rounding), and the unpatched model's on the query token alone (the control). It runs the
real loading path (TransformerLens from the Hugging Face hub) and exits cleanly with a message when the hub cannot be
reached.
"""

import argparse
import sys
import warnings

import torch

import implicit_updates as iu
from implicit_updates.cli.common import write_json

PROMPTS = [
    "hot -> cold\nbig -> small\nfast -> slow\nup -> down\nhappy ->",
    "France: Paris\nJapan: Tokyo\nItaly: Rome\nGermany: Berlin\nSpain:",
    "My friend's name is Zorblat. Every morning, Zorblat walks to the park. Yesterday,",
]

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="gpt2")
parser.add_argument("--json")
args = parser.parse_args()
warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")

try:
    from transformer_lens import HookedTransformer

    model = HookedTransformer.from_pretrained(args.model)
except Exception as err:  # offline, or the hub refused: nothing to demonstrate here
    print(f"skipped: could not load {args.model!r} from the Hugging Face hub ({type(err).__name__}: {err})")
    sys.exit(0)

rows = []
for prompt in PROMPTS:
    report = iu.compare_absorbed(model, prompt, dtype=torch.float64)
    top = {run: (model.tokenizer.decode([ids[0][0]]), ids[0][1]) for run, ids in report.top_k.items()}
    print(f"\n{prompt!r}\n  full {top['full'][0]!r} p={top['full'][1]:.3f} | absorbed {top['absorbed'][0]!r} "
          f"p={top['absorbed'][1]:.3f} | control {top['control'][0]!r} p={top['control'][1]:.3f}\n"
          f"  max |logit diff| {report.max_abs_logit_diff:.2e}, "
          f"KL(full||absorbed) {report.kl_full_vs_absorbed:.2e}, KL(full||control) {report.kl_full_vs_control:.2e}")
    rows.append({"prompt": prompt, **report.to_dict()})
write_json(args.json, {"model": args.model, "rows": rows})

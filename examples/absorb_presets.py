"""The absorbed-context model on every random preset: full model on the prompt vs absorbed model on the query alone.

    python examples/absorb_presets.py [--seq-len 64] [--dtype float64] [--json absorb_presets.json]

One line per preset: max |logit diff| (full vs absorbed), top-1 agreement, KL(full || absorbed), and the control
(unpatched model on the query alone): its KL to the full model shows the context mattered. The README table comes
from this script.
"""

import argparse
import time

import torch

import implicit_updates as iu
from implicit_updates.cli.common import write_json
from implicit_updates.models import PRESETS, random_model

parser = argparse.ArgumentParser()
parser.add_argument("--seq-len", type=int, default=64)
parser.add_argument("--dtype", default="float64")
parser.add_argument("--json")
args = parser.parse_args()

rows = []
print(f"{'preset':<11} {'max |logit diff|':>16} {'top-1 agree':>11} {'KL(full||absorbed)':>18} "
      f"{'KL(full||control)':>17} {'s':>5}")
for preset in PRESETS:
    model = random_model(preset)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    report = iu.compare_absorbed(model, tokens, dtype=args.dtype)
    seconds = time.perf_counter() - start
    rows.append({"preset": preset, **report.to_dict(), "seconds": seconds})
    print(f"{preset:<11} {report.max_abs_logit_diff:16.2e} {str(report.top1_agree):>11} "
          f"{report.kl_full_vs_absorbed:18.2e} {report.kl_full_vs_control:17.3f} {seconds:5.1f}")
write_json(args.json, {"seq_len": args.seq_len, "dtype": args.dtype, "rows": rows})

"""Verify every random preset (GPT-2-small's real shapes and the small named architectures) in float64.

    python examples/verify_presets.py [--seq-len 128] [--json presets.json]

Prints one line per preset (blocks, positions, max relative error, ranks, seconds); the README table comes from it.
"""

import argparse
import time

import torch

import implicit_updates as iu
from implicit_updates.cli.common import write_json
from implicit_updates.models import PRESETS, random_model

parser = argparse.ArgumentParser()
parser.add_argument("--seq-len", type=int, default=128)
parser.add_argument("--dtype", default="float64")
parser.add_argument("--json")
args = parser.parse_args()

rows = []
print(f"{'preset':<11} {'blocks':>6} {'positions':>9} {'max rel err':>11} {'max |err|':>10} {'ranks':>6} {'s':>6}")
for preset in PRESETS:
    model = random_model(preset)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    report = iu.decompose(model, tokens, dtype=args.dtype).verify()
    seconds = time.perf_counter() - start
    ranks = sorted({b.rank for b in report.blocks})
    rows.append({"preset": preset, **report.to_dict(), "seconds": seconds})
    print(f"{preset:<11} {len(report.blocks):>6} {args.seq_len:>9} {report.max_rel_err:11.2e} "
          f"{report.max_abs_err:10.2e} {','.join(map(str, ranks)):>6} {seconds:6.1f}")
write_json(args.json, {"seq_len": args.seq_len, "rows": rows})

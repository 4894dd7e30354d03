"""Peak memory of float64 verify and absorb on pretrained models, whole-copy vs layer-streamed, each in a fresh process.

    python benchmarks/memory.py [--model gemma-3-270m --model smollm2-135m] [--json PATH]
    python benchmarks/memory.py --model qwen2.5-coder-1.5b --load-dtype bfloat16 --path load --path verify-stream \
        --path forward --json PATH   # the 1.5B held in bfloat16 (make models-large)

Every row is one child process (``python benchmarks/memory.py --child MODEL PATH LOAD_DTYPE``) that loads the model
as a HookedTransformer held in ``--load-dtype`` (default float32; ``implicit_updates.models.pretrained``, as
``implicit-updates verify --model NAME --load-dtype D`` does), runs one workload on the prompt ``PROMPT`` in float64
and reports its peak RSS (VmHWM from /proc/self/status: the high-water mark of the whole process, loading included;
this driver imports no torch, so the peak a child inherits across exec is the driver's ~20 MB). Paths:

- ``load``: loading alone (the baseline the targets compare with).
- ``verify-stream``: ``decompose(model, prompt, dtype=float64)`` + ``verify()``, each module upcast while it runs.
- ``verify-copy``: the same with ``upcast="copy"`` (an upcast deep copy of the whole model).
- ``absorb-copy``: ``absorb(model, prompt, dtype=float64)`` (a patched float64 copy) run on the query token alone.
- ``absorbed-hooks``: ``with absorbed(model, prompt, dtype=float64): model(query token)`` (no copy).
- ``forward``: one streamed float64 forward of the prompt (``computed_in``), the unit ``verify / forward`` is
  measured in.

``workload_peak_rss_bytes`` is the high-water mark after loading (reset to the loaded RSS through
/proc/self/clear_refs before the workload; for ``load``, the RSS the loaded model holds): loading (Gemma's HF to
HookedTransformer conversion) peaks above what the workloads add. ``model_bytes`` is the parameter bytes,
``ratio = peak_rss_bytes / model_bytes``, ``seconds`` the workload's wall time (loading excluded), ``max_rel_err``
the verify report's (verify rows) or the absorbed logits' relative error against the full prompt's float64 logits
(absorb rows). Targets (issue #12): streamed float64 verify peaks at most 0.5 GB above ``load``, in at most 1.3x
the whole-copy time; (issue #25) the 1.5B held in bfloat16 at most 1 GB above its ``load`` peak, its time also as a
ratio to one float64 ``forward``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

MODELS = ("gemma-3-270m", "smollm2-135m")  # the default rows; the Qwen models by --model
CHOICES = (*MODELS, "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
PATHS = ("load", "verify-stream", "verify-copy", "absorb-copy", "absorbed-hooks", "forward")
DEFAULT_PATHS = PATHS[:-1]
PROMPT = "France: Paris. Japan: Tokyo. Italy:"
GB = 1e9


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # no /proc: ru_maxrss (KiB on Linux)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(model_name: str, path: str, load_dtype: str = "float32") -> dict:
    """Load, run one workload, report (runs in its own process)."""
    import torch

    import implicit_updates as iu
    from implicit_updates.models.pretrained import load_pretrained
    from implicit_updates.runtime.precision import computed_in

    torch.set_grad_enabled(False)
    model = load_pretrained(model_name, "hooked", dtype=getattr(torch, load_dtype))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = model.to_tokens(PROMPT)
    loaded_peak = peak_rss_bytes()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS (the loaded model)
        f.write("5")
    start = time.perf_counter()
    err = None
    if path.startswith("verify"):
        result = iu.decompose(model, tokens, dtype=torch.float64, upcast=path.removeprefix("verify-"))
        err = result.verify().max_rel_err
    elif path.startswith("absorb"):
        if path == "absorb-copy":
            alone = iu.absorb(model, tokens, dtype=torch.float64)(tokens[:, -1:])[0, -1]
        else:
            with iu.absorbed(model, tokens, dtype=torch.float64):
                alone = model(tokens[:, -1:])[0, -1]
        with computed_in(model, torch.float64):
            full = model(tokens)[0, -1]
        err = float((alone - full).norm() / full.norm())
    elif path == "forward":
        with computed_in(model, torch.float64):
            model(tokens)
    seconds = time.perf_counter() - start
    workload_peak = peak_rss_bytes()
    peak = max(loaded_peak, workload_peak)
    return {"model": model_name, "path": path, "load_dtype": load_dtype, "peak_rss_bytes": peak,
            "model_bytes": model_bytes,
            "ratio": peak / model_bytes, "workload_peak_rss_bytes": workload_peak,
            "seconds": seconds if path != "load" else 0.0,
            "max_rel_err": err}


def run_row(model_name: str, path: str, load_dtype: str = "float32") -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", model_name, path, load_dtype], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"{model_name} {path} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| model | path | peak RSS (GB) | above load (GB) | after load: peak (GB) | model (GB) | peak / model | s "
             "| max rel err |", "|---|---|---|---|---|---|---|---|---|"]
    load = {r["model"]: r["peak_rss_bytes"] for r in rows if r["path"] == "load"}
    for r in rows:
        above = (r["peak_rss_bytes"] - load[r["model"]]) / GB if r["model"] in load else float("nan")
        err = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        lines.append(f"| {r['model']} | {r['path']} | {r['peak_rss_bytes'] / GB:.2f} | {above:+.2f} | "
                     f"{r['workload_peak_rss_bytes'] / GB:.2f} | {r['model_bytes'] / GB:.2f} | {r['ratio']:.1f} | "
                     f"{r['seconds']:.1f} | {err} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    by = {(r["model"], r["path"]): r for r in rows}
    out = []
    for m in dict.fromkeys(r["model"] for r in rows):
        if all((m, p) in by for p in ("load", "verify-stream", "verify-copy")):
            above = (by[m, "verify-stream"]["peak_rss_bytes"] - by[m, "load"]["peak_rss_bytes"]) / GB
            slower = by[m, "verify-stream"]["seconds"] / by[m, "verify-copy"]["seconds"]
            out.append(f"{m}: streamed float64 verify {above:+.2f} GB above load (target <= 0.5), "
                       f"{slower:.2f}x the whole-copy time (target <= 1.3)")
        if all((m, p) in by for p in ("load", "verify-stream", "forward")):
            above = (by[m, "verify-stream"]["peak_rss_bytes"] - by[m, "load"]["peak_rss_bytes"]) / GB
            after = (by[m, "verify-stream"]["workload_peak_rss_bytes"] - by[m, "load"]["workload_peak_rss_bytes"]) / GB
            ratio = by[m, "verify-stream"]["seconds"] / by[m, "forward"]["seconds"]
            out.append(f"{m} ({by[m, 'load']['load_dtype']} weights): float64 verify peak {above:+.2f} GB above the "
                       f"load peak (target <= 1.0), {after:+.2f} GB above the loaded model; {ratio:.1f}x one float64 "
                       "forward")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=CHOICES, help=f"repeatable; default: {', '.join(MODELS)}")
    parser.add_argument("--path", action="append", choices=PATHS,
                        help=f"repeatable; default: {', '.join(DEFAULT_PATHS)}")
    parser.add_argument("--load-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the dtype the weights are held in (every workload computes in float64)")
    parser.add_argument("--json", help="write {'rows': [...]} here")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "PATH", "LOAD_DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    rows = []
    for model_name in args.model or MODELS:
        for path in args.path or DEFAULT_PATHS:
            rows.append(run_row(model_name, path, args.load_dtype))
            r = rows[-1]
            print(f"{model_name:18s} {path:15s} peak {r['peak_rss_bytes'] / GB:5.2f} GB  {r['seconds']:6.1f} s  "
                  f"err {r['max_rel_err']}", flush=True)
    print(table(rows))
    print("\n".join(targets(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prompt": PROMPT, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

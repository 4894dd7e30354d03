"""How the decomposition scales with sequence length on GPT-2-small's shapes (random init), against two references.

    python benchmarks/scale.py [--n 128 --n 256 ...] [--device cpu|cuda] [--anchor-budget-gb 6] [--json PATH]

For each N (default 128, 256, 512, 1024) on ``random_model("gpt2-small")`` with N seeded random tokens:

- ``forward_s``: a plain cached forward, ``model.run_with_cache(tokens)`` (best of 2 after a warm-up).
- ``ours_s``: ``decompose(model, tokens)`` then ``.verify()`` in float32 (best of 2); ``max_rel_err_f32`` from it.
- ``max_rel_err_f64``: the same in float64 (not timed), on one float64 copy of the model reused for every N.
- ``anchor_s``: the anchor method of Innocenti & Achour's reference: per block, every position's dense dW is
  materialised (all kept at once) and the block is run once per position with the dense patched weights. It reuses
  the float32 factors of ``ours``, so the (best) decompose time is added to make both timings end to end. Skipped
  (null) where one block's dense deltas, ``N x (dense elements per position) x element size``, exceed
  ``--anchor-budget-gb``; the first such N is reported as ``anchor_stops_fitting_at``.
- Memory: ``cache_bytes`` is the total size of the tensors in the ``ActivationCache``. Peaks are measured each in a
  fresh child process (multiprocessing, "spawn") that builds the model, warms up on 8 tokens, resets the peak and
  runs the workload once. On CPU the peak is the RSS high-water mark, first reset to the current RSS by writing 5 to
  /proc/self/clear_refs, so the growth is the workload's own peak above what the model, libraries and warm-up hold.
  It is read as VmHWM from /proc/self/status, not ``ru_maxrss``: a spawned child's ``ru_maxrss`` starts at the
  parent's RSS (Linux carries the forked copy's peak across exec, and clear_refs cannot reset that), which here
  hides the child's own peak; ``ru_maxrss`` is only the fallback without /proc. On CUDA the peak is
  ``torch.cuda.max_memory_allocated`` above the memory allocated before the run. ``ours_peak_bytes`` is decompose +
  verify, ``forward_peak_bytes`` is ``run_with_cache``, and ``peak_extra_mem_ratio = ours_peak_bytes / cache_bytes``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import multiprocessing as mp
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import torch
from torch.func import functional_call

import implicit_updates as iu
from implicit_updates.cli.common import write_json
from implicit_updates.math import core
from implicit_updates.models import random_model

PRESET = "gpt2-small"
SIZES = (128, 256, 512, 1024)
TARGETS = ("targets: ours/forward <= 1.5 at N=1024; peak extra memory <= 0.5x the cache; "
           "max rel err float64 <= 1e-12, float32 <= 1e-5")
COLUMNS = (("n", 5), ("forward_s", 9), ("ours_s", 8), ("ours/fwd", 8), ("anchor_s", 8), ("anch/ours", 9),
           ("cache_MB", 8), ("fwd_pk_MB", 9), ("ours_pk_MB", 10), ("pk/cache", 8), ("err_f32", 8), ("err_f64", 8),
           ("err_anch", 8))


def build_model(seed: int, device: str):
    return random_model(PRESET, seed=seed, device=device)


def random_tokens(n: int, d_vocab: int, seed: int, device: str) -> torch.Tensor:
    return torch.randint(0, d_vocab, (1, n), generator=torch.Generator().manual_seed(seed)).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable, *args, **kwargs):
    """(seconds, result) of one call, synchronised so queued GPU work is counted."""
    sync(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - start, out


def ours(model, tokens, dtype=None):
    """The measured method: factored updates for every block and position, then their verification."""
    result = iu.decompose(model, tokens, dtype=dtype, progress=False)
    return result, result.verify(progress=False)


def cache_nbytes(cache) -> int:
    return sum(t.numel() * t.element_size() for t in cache.values())


# -- peak memory, in a fresh child process per measurement ---------------------------------------------------------

def reset_peak(device: str) -> int:
    """Start a peak measurement; returns the baseline in bytes."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with contextlib.suppress(OSError):  # without the reset the baseline is the build's peak: growth may under-count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset this process's RSS high-water mark to its current RSS
    return peak_rss_bytes()


def peak(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM, which is ru_maxrss without the parent's RSS a spawned child inherits at exec."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_peak_bytes(workload: str, n: int, seed: int, device: str) -> int:
    """Runs in a fresh process: peak bytes of ``workload`` ("forward" or "ours") beyond model, libraries, warm-up."""
    model = build_model(seed, device)
    run = (lambda t: model.run_with_cache(t)) if workload == "forward" else (lambda t: ours(model, t))
    with torch.no_grad():
        run(random_tokens(8, model.cfg.d_vocab, seed, device))  # lazy initialisation, allocator pools
        base = reset_peak(device)
        out = run(random_tokens(n, model.cfg.d_vocab, seed, device))  # noqa: F841 - held until the peak is read
        return peak(device) - base


def peak_bytes_in_child(workload: str, n: int, seed: int, device: str) -> int:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:  # a fresh process per measurement
        return pool.submit(child_peak_bytes, workload, n, seed, device).result()


# -- the anchor method ---------------------------------------------------------------------------------------------

def anchor_bytes(result) -> int:
    """Bytes of one block's dense deltas for all positions (blocks have equal shapes)."""
    per_position = sum(d.numel() * d.element_size() for d in result.patch(result.blocks[0].block, 0).values())
    return result.n_positions * per_position


def anchor(model, result, device: str):
    """(seconds, max rel err) of the reference's dense route, from the factors to every block's outputs."""
    def run() -> float:
        errors = []
        for u in result.blocks:
            block, prefix = model.blocks[u.block], f"blocks.{u.block}."
            # every position's dense dW of this block at once, as the reference keeps them
            deltas = [result.patch(u.block, i) for i in range(result.n_positions)]
            outs = []
            for i, delta in enumerate(deltas):
                params = {name.removeprefix(prefix): model.get_parameter(name) + d for name, d in delta.items()}
                outs.append(functional_call(block, params, (result.query_input(u.block, i),))[0, 0])
            errors.append(core.reproduction_errors(torch.stack(outs)[None], u.target_output)["max_rel_err"])
            del deltas, outs  # before the next block's deltas exist, so only one block is dense at a time
        return max(errors)

    return timed(device, run)


# -- one row -------------------------------------------------------------------------------------------------------

def measure(n: int, model, model64, args, budget_bytes: float) -> dict:
    tokens = random_tokens(n, model.cfg.d_vocab, args.seed, args.device)

    model.run_with_cache(tokens)  # warm-up at this size
    forward = []
    for _ in range(2):
        seconds, (_, cache) = timed(args.device, model.run_with_cache, tokens)
        forward.append(seconds)
        cache_bytes = cache_nbytes(cache)
        del cache

    ours_s, decompose_s, result, report = float("inf"), float("inf"), None, None
    for _ in range(2):
        result = report = None  # free the previous run's factors before the next
        dec_s, result = timed(args.device, iu.decompose, model, tokens, progress=False)
        ver_s, report = timed(args.device, result.verify, progress=False)
        ours_s, decompose_s = min(ours_s, dec_s + ver_s), min(decompose_s, dec_s)

    err_f64 = ours(model64, tokens, dtype=torch.float64)[1].max_rel_err

    anchor_s = anchor_err = None
    needed = anchor_bytes(result)
    if needed <= budget_bytes:
        dense_s, anchor_err = anchor(model, result, args.device)
        anchor_s = decompose_s + dense_s  # end to end: the factors (best decompose time) + densify + run
    else:
        print(f"  N={n}: anchor skipped, one block's dense deltas need {needed / 1e9:.1f} GB "
              f"> --anchor-budget-gb {args.anchor_budget_gb}", flush=True)
    del result

    forward_peak = peak_bytes_in_child("forward", n, args.seed, args.device)
    ours_peak = peak_bytes_in_child("ours", n, args.seed, args.device)
    forward_s = min(forward)
    anchor_ratio = anchor_s / ours_s if anchor_s is not None else None
    return {
        "n": n, "forward_s": forward_s, "ours_s": ours_s, "anchor_s": anchor_s,
        "ratio_ours_forward": ours_s / forward_s, "ratio_anchor_ours": anchor_ratio,
        "peak_extra_mem_ratio": ours_peak / cache_bytes, "max_rel_err_f32": report.max_rel_err,
        "max_rel_err_f64": err_f64, "max_rel_err_anchor": anchor_err, "cache_bytes": cache_bytes,
        "forward_peak_bytes": forward_peak, "ours_peak_bytes": ours_peak, "anchor_dense_bytes": needed,
    }


def format_row(r: dict) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    mb = 1e6
    values = (r["n"], num(r["forward_s"], ".2f"), num(r["ours_s"], ".2f"), num(r["ratio_ours_forward"], ".2f"),
              num(r["anchor_s"], ".1f"), num(r["ratio_anchor_ours"], ".1f"), num(r["cache_bytes"] / mb, ".0f"),
              num(r["forward_peak_bytes"] / mb, ".0f"), num(r["ours_peak_bytes"] / mb, ".0f"),
              num(r["peak_extra_mem_ratio"], ".3f"), num(r["max_rel_err_f32"], ".1e"),
              num(r["max_rel_err_f64"], ".1e"), num(r["max_rel_err_anchor"], ".1e"))
    return " ".join(f"{v:>{w}}" for v, (_, w) in zip(values, COLUMNS, strict=True))


def float64_copy(model):
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints "Changing model dtype"
        model64 = copy.deepcopy(model).to(torch.float64)
    model64.cfg.dtype = torch.float64
    return model64


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device}: {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, action="append", help=f"sequence length (repeatable; default {SIZES})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anchor-budget-gb", type=float, default=6.0,
                        help="skip the anchor where one block's dense deltas need more than this")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    sizes = sorted(set(args.n or SIZES))

    print(f"{PRESET} (random init), {device_name(args.device)}, torch {torch.__version__}, seed {args.seed}")
    print(TARGETS)
    print("times in s (ours = decompose + verify, float32; anchor = decompose + dense dW per position); "
          "peaks: extra bytes in a fresh process", flush=True)
    print(" ".join(f"{name:>{w}}" for name, w in COLUMNS), flush=True)

    with torch.no_grad():
        model = build_model(args.seed, args.device)
        model64 = float64_copy(model)
        ours(model, random_tokens(8, model.cfg.d_vocab, args.seed, args.device))  # warm-up of the whole path
        rows, stops_at = [], None
        for n in sizes:
            row = measure(n, model, model64, args, args.anchor_budget_gb * 1e9)
            if row["anchor_s"] is None and stops_at is None:
                stops_at = n
            rows.append(row)
            print(format_row(row), flush=True)

    print(f"anchor stops fitting in {args.anchor_budget_gb:g} GB at N={stops_at}" if stops_at
          else f"anchor fits in {args.anchor_budget_gb:g} GB at every N measured")
    write_json(args.json, {"rows": rows, "anchor_stops_fitting_at": stops_at, "device": device_name(args.device),
                           "torch": torch.__version__})


if __name__ == "__main__":
    main()

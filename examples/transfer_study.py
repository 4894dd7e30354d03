"""How weight-like is in-context learning? The implicit update of a few-shot prompt, transferred to held-out queries.

For each task (a few-shot prefix P of lines "x -> y" and queries "{x} ->"), on a pretrained model in float64:
- ``full``: the model on P + q' (what in-context learning gives; P starts with the tokenizer's special tokens, Gemma's
  ``<bos>``); ``zero-shot``: q' alone, as the updated models run it (and ``zero-shot + BOS`` where there is one);
- ``one other``: the exact update absorbed from P for one training query q (``absorb_continuation(model, P, q)``,
  exact on q's tokens), applied as a weight edit to the model on a held-out q' alone;
- ``mean of 4``: the mean of four such updates; ``stacked n``: one update exact on n training queries at once
  (``continuation [n, K]``, rank <= n K); ``stacked 4, specials only`` (where the tokenizer prepends special tokens,
  Gemma's ``<bos>``): the same stacked update absorbed from those tokens alone, without the examples, the control
  that separates what the examples carry from what the special tokens do;
- ``LoRA (GD)``: gradient descent on a LoRA of the same rank (4 K) on the same matrices (every block's gate, up and
  down projections), trained on the same four training queries to match the full model's next-token distributions at
  their K positions (context distillation; Adam, ``--steps`` steps, lr 1e-3, float32);
- per held-out query: top-1 agreement with the full model, accuracy against the true answer's first token, and
  KL(full || condition) at the query's last position; and the cosine between the stacked-1 update and the first
  gradient step of the same distillation loss (Dherin et al.'s Fig. 3 question on a real model).

    python examples/transfer_study.py --model smollm2-135m --json examples/figures/transfer_smollm2.json

``--factored`` adds each low-rank update at its linear map's output, ``(x R) C``, instead of writing the dense delta
into the weight (the same function up to float64 rounding, tested against the literal edit): no dense delta of the
MLP matrices is ever formed, so Qwen2.5-Coder-1.5B (12 GB in float64, 6 GB more for the LoRA's float32 copy) fits a
24 GB machine. Numbers are whatever they turn out to be; the README reports them with this command.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from implicit_updates.analyses.continuation import ContinuationAbsorption, LowRankUpdate, absorb_continuation
from implicit_updates.cli.common import write_json
from implicit_updates.runtime.hooks import module_hooks, swapped_parameters
from implicit_updates.runtime.precision import exact_formula

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Greece", "Athens"),
            ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
            ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
            ("Hungary", "Budapest"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Peru", "Lima"),
            ("Chile", "Santiago"), ("Kenya", "Nairobi"), ("Cuba", "Havana"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
            ("Syria", "Damascus"), ("Turkey", "Ankara"), ("India", "New Delhi"), ("Thailand", "Bangkok"),
            ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"),
            ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Ukraine", "Kyiv"),
            ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Australia", "Canberra"), ("Brazil", "Brasilia")]
ANTONYMS = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("good", "bad"), ("old", "new"),
            ("happy", "sad"), ("light", "dark"), ("high", "low"), ("long", "short"), ("open", "closed"),
            ("hard", "soft"), ("early", "late"), ("rich", "poor"), ("strong", "weak"), ("full", "empty"),
            ("wet", "dry"), ("clean", "dirty"), ("loud", "quiet"), ("thick", "thin"), ("heavy", "light"),
            ("young", "old"), ("near", "far"), ("left", "right"), ("true", "false"), ("win", "lose"),
            ("first", "last"), ("inside", "outside"), ("love", "hate"), ("cheap", "expensive"), ("safe", "dangerous"),
            ("easy", "difficult"), ("wide", "narrow"), ("deep", "shallow"), ("sharp", "dull"), ("push", "pull"),
            ("buy", "sell"), ("give", "take"), ("start", "finish"), ("day", "night"), ("black", "white")]
WORDS = ["cat", "dog", "tree", "house", "car", "book", "sun", "moon", "fish", "bird", "river", "stone", "apple",
         "table", "chair", "door", "window", "road", "city", "cloud", "rain", "snow", "fire", "water", "horse", "cow",
         "bread", "milk", "ship", "train", "girl", "boy", "king", "queen", "ring", "song", "game", "lamp", "hill",
         "lake", "bell", "coat"]
TASKS = {
    "capital": CAPITALS,
    "antonym": ANTONYMS,
    "made-up suffix": [(w, w + "zo") for w in WORDS],  # a made-up word-formation rule
    "uppercase": [(w, w.upper()) for w in WORDS],  # a format task
}
N_SHOT, N_TRAIN, N_HELD = 4, 16, 20


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


@dataclass(frozen=True)
class LowRank:
    """The delta ``(rows @ columns).T`` of an ``nn.Linear`` weight ``[d_out, d_in]``, kept as its factors ``rows``
    ``[d_in, r]`` and ``columns`` ``[r, d_out]``: the linear's output moves by ``(x @ rows) @ columns``."""

    rows: torch.Tensor
    columns: torch.Tensor

    def dense(self) -> torch.Tensor:
        return (self.rows @ self.columns).T

    def __add__(self, other: LowRank) -> LowRank:  # a sum of low-rank deltas: the factors side by side
        return LowRank(torch.cat([self.rows, other.rows], 1), torch.cat([self.columns, other.columns], 0))

    def __truediv__(self, scale: float) -> LowRank:
        return LowRank(self.rows, self.columns / scale)


def patch_of(absorption: ContinuationAbsorption, factored: bool) -> dict:
    """``{parameter name: delta}`` of every block: dense (``absorption.patch()``), or with ``factored`` each
    ``nn.Linear`` weight's update as its :class:`LowRank` factors (biases and norm scales stay dense)."""
    if not factored:
        return absorption.patch()
    out: dict = {}
    for block in absorption.blocks:
        for u in block.updates:
            if isinstance(u, LowRankUpdate):
                name, delta = u.name, LowRank(u.rows, u.columns) if u.transposed else u.dense()
            else:
                name, delta = u
            out[name] = out[name] + delta if name in out else delta
    return out


def add_low_rank(delta: LowRank):
    def hook(module, args, output: torch.Tensor) -> torch.Tensor:
        return output + (args[0] @ delta.rows) @ delta.columns

    return hook


def last_logits(model, ids: torch.Tensor, patch: dict | None = None) -> torch.Tensor:
    """Logits ``[n, d_vocab]`` at the last position of each row of ``ids`` ``[n, len]``; ``patch`` ({name: delta})
    added to the parameters while it runs: a dense delta written into its parameter, a :class:`LowRank` one added at
    its linear map's output."""
    patch = patch or {}
    values = {n: model.get_parameter(n) + d for n, d in patch.items() if not isinstance(d, LowRank)}
    hooks = [(model.get_submodule(n.rpartition(".")[0]), "fwd", add_low_rank(d))
             for n, d in patch.items() if isinstance(d, LowRank)]
    # the forward the updates are exact in (Gemma reads its norm scales through float32 casts: kept in float64)
    with (torch.no_grad(), swapped_parameters(model, values), module_hooks(hooks),
          exact_formula(model, torch.float64)):
        return model(input_ids=ids, use_cache=False).logits[:, -1]


def each_last_logits(model, sequences: list[torch.Tensor], patch: dict | None = None) -> list[torch.Tensor]:
    """:func:`last_logits` of each 1-D sequence, run as one batch per length (no padding: each row's forward is
    its own)."""
    out: list[torch.Tensor] = [None] * len(sequences)  # type: ignore[list-item]
    for length in {len(s) for s in sequences}:
        idx = [i for i, s in enumerate(sequences) if len(s) == length]
        logits = last_logits(model, torch.stack([sequences[i] for i in idx]), patch)
        for j, i in enumerate(idx):
            out[i] = logits[j]
    return out


def training_error(model, prefix: torch.Tensor, queries: list[torch.Tensor], patch: dict) -> float:
    """The machinery's own check: max |logit diff| between the patched model on each query alone and the full model
    on prefix + query, at the last position (an exact update is exact on the queries it was built for)."""
    return max(float((last_logits(model, q[None], patch) - last_logits(model, torch.cat([prefix, q[None]], 1)))
                     .abs().max()) for q in queries)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return float((p.exp() * (p - q)).sum())


def float32_copy(model):
    """A float32 deep copy of a float64 model, built parameter by parameter (``deepcopy(model).float()`` would hold a
    second float64 copy first: 12 GB more for a 1.5B model); tied parameters stay tied."""
    memo: dict = {id(p): torch.nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)
                  for p in model.parameters()}
    memo |= {id(b): b.float() if b.is_floating_point() else b.clone() for b in model.buffers()}
    return copy.deepcopy(model, memo)


def lora_factors(student) -> dict[str, LowRank]:
    """A trained PEFT model's LoRA on each linear map, as the :class:`LowRank` delta of its weight (float64)."""
    out = {}
    for name, module in student.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight  # delta = scaling * b @ a
            key = name.removeprefix("base_model.model.") + ".weight"
            out[key] = LowRank(a.detach().double().T, (b * module.scaling["default"]).detach().double().T)
    return out


def lora_gd(model, prefix, train_ids: torch.Tensor, rank: int, steps: int, factored: bool = False
            ) -> tuple[dict, float]:
    """A PEFT LoRA of ``rank`` on every gate/up/down projection, trained by context distillation; its delta (in the
    model's float64: dense, or its factors with ``factored``) and the final loss."""
    import peft

    n, k = train_ids.shape  # the queries share one length: each step is one batch (no padding)
    with torch.no_grad():
        targets = F.log_softmax(model(input_ids=torch.cat([prefix.expand(n, -1), train_ids], 1), use_cache=False)
                                .logits[:, -k:].float(), -1).flatten(0, 1)
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["gate_proj", "up_proj", "down_proj"],
                             lora_dropout=0.0, init_lora_weights=True)
    student = peft.get_peft_model(float32_copy(model), config)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        logp = F.log_softmax(student(input_ids=train_ids, use_cache=False).logits, -1).flatten(0, 1)
        # each query's "batchmean" KL over its k positions, summed over the queries
        loss = F.kl_div(logp, targets, log_target=True, reduction="sum") / k
        loss.backward()
        optimizer.step()
    factors = lora_factors(student)
    return (factors if factored else {name: d.dense() for name, d in factors.items()}), float(loss.detach())


def first_gradient_cosine(model, prefix, q: torch.Tensor, patch: dict) -> float:
    """Cosine between the implicit update ``patch`` and minus the gradient of the distillation loss (the full model's
    distribution at q's positions against the model's on q alone) at the unpatched weights. The dot products are
    taken as each parameter's gradient arrives, and the gradient dropped: never more than one dense at a time."""
    with torch.no_grad():
        full = model(input_ids=torch.cat([prefix, q[None]], 1), use_cache=False).logits[0, -q.shape[0]:]
        target = F.log_softmax(full, -1)
    dots = {"gd": 0.0, "gg": 0.0, "dd": 0.0}

    def accumulate(name: str):
        def hook(param: torch.Tensor) -> None:
            g, d = param.grad, patch[name]
            d = d.dense() if isinstance(d, LowRank) else d
            dots["gd"] += float((g * d).sum())
            dots["gg"] += float(g.pow(2).sum())
            dots["dd"] += float(d.pow(2).sum())
            param.grad = None

        return hook

    params = {n: model.get_parameter(n) for n in patch}
    saved = {n: p.requires_grad for n, p in params.items()}
    handles = []
    try:
        for n, p in params.items():
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(accumulate(n)))
        loss = F.kl_div(F.log_softmax(model(input_ids=q[None], use_cache=False).logits[0], -1), target,
                        log_target=True, reduction="batchmean")
        loss.backward(inputs=list(params.values()))  # only these: the model's other parameters get no .grad
    finally:
        for handle in handles:
            handle.remove()
        for n, p in params.items():
            p.requires_grad_(saved[n])
            p.grad = None
    return -dots["gd"] / (dots["gg"] ** 0.5 * dots["dd"] ** 0.5)


def load_float64(name: str):
    """The model (Hugging Face backend, float64) and its tokenizer: a pretrained name or a local Hugging Face
    directory (the tests use stories260K)."""
    from implicit_updates.models.loading import load_local, load_tokenizer
    from implicit_updates.models.pretrained import load_pretrained, prepare

    if Path(name).is_dir():
        return load_local(name, "hf", dtype=torch.float64), load_tokenizer(name)
    return load_pretrained(name, "hf", dtype=torch.float64), load_tokenizer(prepare(name))


def split(tokenizer, pairs: list) -> tuple[torch.Tensor, torch.Tensor, int, list, list]:
    """The prefix ``[1, P]`` (the shots), its special tokens, the query length K, the training queries (up to 16 of
    length K) and the held-out ``(query, answer's first token)`` pairs (up to 20)."""
    shots, rest = pairs[:N_SHOT], pairs[N_SHOT:]
    # the prefix ends with the newline, so the queries share no first token (stacked rows must be independent)
    # the prefix starts the text, with the tokenizer's special tokens (Gemma's <bos>: without it Gemma-3-270M's full
    # 4-shot prompt answers 0 of 20 capitals, with it 18); the queries continue it, without
    text = "".join(f"{x} -> {y}\n" for x, y in shots)
    prefix = tokenizer(text, return_tensors="pt").input_ids
    specials = prefix[0, : prefix.shape[1] - ids_of(tokenizer, text).shape[1]]  # what a text start gets: [<bos>] or []
    queries = [(ids_of(tokenizer, f"{x} ->")[0], ids_of(tokenizer, f" {y}")[0, 0]) for x, y in rest]
    lengths = [q.shape[0] for q, _ in queries]
    k = max(set(lengths), key=lengths.count)  # stacking needs one query length: the most common one
    train = [q for q, _ in queries if q.shape[0] == k][:N_TRAIN]
    train_ids = set(id(q) for q in train)
    held = [(q, a) for q, a in queries if id(q) not in train_ids][:N_HELD]
    return prefix, specials, k, train, held


def exactness(model, tokenizer, pairs: list, factored: bool) -> dict[str, float]:
    """The stacked-4 update's max |logit diff| on its own training queries, in the model as written and in its float64
    formula (``precision.KeepPrecision``: every float32 detour kept in float64, where Llama-family Hugging Face
    models normalise; examples/float32_detour.py): separates the machinery's own error from the detour's rounding."""
    from implicit_updates.runtime.precision import KeepPrecision

    prefix, _, _, train, _ = split(tokenizer, pairs)
    out = {}
    for formula, mode in (("as written", contextlib.nullcontext()), ("float64 formula", KeepPrecision(torch.float64))):
        with mode:
            stacked = patch_of(absorb_continuation(model, prefix, torch.stack(train[:4]), dtype=torch.float64),
                               factored)
            out[formula] = training_error(model, prefix, train[:4], stacked)
    return out


def run_task(model, tokenizer, name: str, pairs: list, steps: int, factored: bool = False) -> dict:
    prefix, specials, k, train, held = split(tokenizer, pairs)
    fulls = each_last_logits(model, [torch.cat([prefix[0], q]) for q, _ in held])
    rows: dict[str, dict] = {}

    def evaluate(condition: str, patch: dict | None) -> None:  # one condition's patch alive at a time (~0.6 GB)
        r = rows[condition] = {"agree": 0.0, "correct": 0.0, "kl": 0.0}
        if condition == "full":
            got = fulls
        elif condition == "zero-shot + BOS":
            got = each_last_logits(model, [torch.cat([specials, q]) for q, _ in held])
        else:
            got = each_last_logits(model, [q for q, _ in held], patch)
        for (_, answer), full, logits in zip(held, fulls, got, strict=True):
            r["agree"] += float(logits.argmax() == full.argmax()) / len(held)
            r["correct"] += float(logits.argmax() == answer) / len(held)
            r["kl"] += kl(full, logits) / len(held)

    evaluate("full", None)
    evaluate("zero-shot", {})
    if len(specials):  # q' alone as a text of its own; the implicit updates run q' alone, as "zero-shot" does
        evaluate("zero-shot + BOS", None)
    def absorbed(before: torch.Tensor, queries: torch.Tensor, **kwargs) -> dict:
        return patch_of(absorb_continuation(model, before, queries, dtype=torch.float64, **kwargs), factored)

    first = absorbed(prefix, train[0], output="matrix")
    evaluate("one other", first)
    cosine = first_gradient_cosine(model, prefix, train[0], first)
    total = first
    for q in train[1:4]:
        for n, d in absorbed(prefix, q, output="matrix").items():
            total[n] = total[n] + d
    evaluate("mean of 4", {n: d / 4 for n, d in total.items()})
    del first, total
    exact = float("nan")
    for n in (4, 16):
        if len(train) >= n:
            stacked = absorbed(prefix, torch.stack(train[:n]))
            evaluate(f"stacked {n}", stacked)
            if n == 4:  # the machinery's own check: exact on its own training queries alone
                exact = training_error(model, prefix, train[:4], stacked)
            del stacked
    if len(specials) and len(train) >= 4:  # the control: what the special tokens alone carry, without the examples
        control = absorbed(specials[None], torch.stack(train[:4]))
        evaluate("stacked 4, specials only", control)
        del control
    start = time.perf_counter()
    lora, lora_loss = lora_gd(model, prefix, torch.stack(train[:4]), 4 * k, steps, factored)
    lora_seconds = time.perf_counter() - start
    evaluate("LoRA (GD)", lora)
    return {"task": name, "k": k, "n_train": len(train), "n_held_out": len(held), "rows": rows,
            "max_abs_logit_diff_on_training_queries": exact,
            "cosine_update_vs_first_gradient_step": cosine, "lora": {"rank": 4 * k, "steps": steps, "lr": 1e-3,
                                                                      "final_loss": lora_loss, "seconds": lora_seconds}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", action="append", choices=list(TASKS), help="repeatable; default: all four")
    parser.add_argument("--steps", type=int, default=100, help="LoRA gradient steps (the GD budget)")
    parser.add_argument("--factored", action="store_true",
                        help="add the low-rank updates at their maps' outputs, not as dense weight deltas (memory)")
    parser.add_argument("--exactness", action="store_true",
                        help="only the stacked-4 update's check on its training queries, as written and in the float64 "
                             "formula")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_float64(args.model)  # qwen2.5-coder-0.5b: ~5 GB in float64, 1.5b: ~12 GB
    if args.exactness:
        checks = {}
        for name in args.task or list(TASKS):
            checks[name] = exactness(model, tokenizer, TASKS[name], args.factored)
            print(f"{name}: stacked-4 update on its own training queries, max |logit diff| "
                  + ", ".join(f"{formula} {diff:.1e}" for formula, diff in checks[name].items()), flush=True)
        write_json(args.json, {"model": args.model, "factored": args.factored, "exactness": checks})
        return checks
    out = {"model": args.model, "dtype": "float64", "factored": args.factored, "tasks": []}
    for name in args.task or list(TASKS):
        start = time.perf_counter()
        result = run_task(model, tokenizer, name, TASKS[name], args.steps, args.factored)
        result["seconds"] = time.perf_counter() - start
        out["tasks"].append(result)
        print(f"{name} (K = {result['k']}, {result['n_held_out']} held-out, {result['seconds']:.0f} s): "
              f"cos(update, -grad) {result['cosine_update_vs_first_gradient_step']:+.3f}; stacked update on its own "
              f"training queries: max |logit diff| {result['max_abs_logit_diff_on_training_queries']:.1e}")
        for c, r in result["rows"].items():
            print(f"  {c:>12}: agree {r['agree']:.2f}  correct {r['correct']:.2f}  KL {r['kl']:.3f}")
        if len(out["tasks"]) < len(args.task or TASKS):  # a stopped run keeps the tasks it finished
            write_json(args.json, {**out, "partial": True})
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

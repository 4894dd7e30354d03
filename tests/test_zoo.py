"""The Hugging Face zoo: every causal-LM architecture of the installed ``transformers``, as a tiny random model, through
the plain ``hf`` backend and through ``TransformerBridge``. Each one is exact or refused with a message, never wrong.

Per architecture and backend: build a tiny random config (hidden 32, 2 layers; biases and norm scales randomised),
decompose in float64 and ``verify()``, then a literal weight edit of a deep copy (``result.patch`` added to its real
parameters; each layer run by the model's own forward on the query alone, its input taken from a plain forward)
against the with-context layer outputs of a plain forward (``tests/test_hf.py`` helpers, none of the adapter's
code), the model untouched (``assert_untouched``). ``exact``: both <= 1e-10. A model that reads parameters
through float32 casts (Gemma's norms, float32 routers) is decomposed in its float64 formula, those casts kept in
float64 (``precision.exact_formula``): its literal edit and references run in the same formula, and the model as
written is checked to be within 1e-6 of it. ``float32 bound``: the documented rounding where the model computes in
float32 in a way no weight patch can follow (``FLOAT32_BOUND``: float32 sigmoid routers), <= 1e-6, never counted
exact; ``refused``: an
``UnsupportedArchitectureError`` naming the part. Anything else (a crash, or verify calling right what the literal
edit calls wrong) fails the test. Bridges are booted offline from the tiny model with ``hf_model=``, with
TransformerLens's on-the-fly ``pip install torchvision`` disabled.

``python tests/test_zoo.py docs/zoo.md`` writes the table. Cost: ~2-3 minutes on 2 CPU cores (TransformerLens 4).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import assert_untouched, rel_err
from test_hf import context_outputs, literal_edit_output

import implicit_updates as iu
from implicit_updates.runtime.precision import casts_parameters, exact_formula

TOL = 1e-10
FLOAT32_TOL = 1e-6  # where the model itself rounds in float32 inside a float64 model (test_hf.GEMMA_FLOAT64_TOL)
_SIGMOID = ("its router's sigmoid runs in float32, and torch's vectorised and scalar float32 kernels round the last "
            "bit differently, so a block run alone can route with scores 1 float32 ulp off "
            "(seen at other seeds/shapes)")
FLOAT32_BOUND = dict.fromkeys(("minimax_m2", "laguna", "llama4_text"), _SIGMOID)
LIFTED = ("exact in float64 with its float32 casts kept in float64 (it reads parameters through them: precision."
          "exact_formula); its own forward, float32 casts and all, is within 1e-6 of that")
VOCAB = 97
MAX_NUMBERS = 3_000_000
ZOO_TABLE = Path(__file__).parent.parent / "docs" / "zoo.md"
SIZES = dict(hidden_size=32, n_embd=32, d_model=32, num_hidden_layers=2, n_layer=2, num_layers=2,
             num_attention_heads=4, n_head=4, num_heads=4, num_key_value_heads=2, num_kv_heads=2,
             intermediate_size=48, n_inner=48, ffn_dim=48, d_ff=48, ffn_hidden_size=48, moe_intermediate_size=16,
             shared_expert_intermediate_size=16, head_dim=8, vocab_size=VOCAB, max_position_embeddings=64,
             n_positions=64, num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
             n_shared_experts=1, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
             v_head_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=4,
             tie_word_embeddings=False)
MLA = dict(num_key_value_heads=4, head_dim=4)
# Per-architecture settings a tiny config needs, and the structures the issue names (scaled residuals, multipliers).
EXTRA = {
    "gptj": dict(rotary_dim=4), "codegen": dict(rotary_dim=4),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "gemma3": dict(text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=8, intermediate_size=48, vocab_size=VOCAB, sliding_window=4),
                   vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=28, patch_size=14), mm_tokens_per_image=4),
    "granite": dict(residual_multiplier=0.5, embedding_multiplier=3.0, logits_scaling=2.0),
}


def zoo_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny(model_type: str, seed: int = 0) -> torch.nn.Module:
    default = transformers.AutoConfig.for_model(model_type)
    fixed = {k for k in SIZES if isinstance(getattr(type(default), k, None), property)}  # derived (Falcon head_dim)
    sizes = {k: v for k, v in SIZES.items() if hasattr(default, k) and k not in fixed}  # only this config's fields
    if hasattr(default, "kv_lora_rank"):  # multi-head latent attention: every head its own keys, rope part = head_dim
        sizes.update({k: v for k, v in MLA.items() if hasattr(default, k) and k not in fixed})
    kwargs = {k: v for k, v in {**sizes, **EXTRA.get(model_type, {})}.items() if v is not None}
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # grouped_mm experts have no float64 kernel on CPU
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):  # sized first: some configs ignore these sizes (vision towers, hash embeddings)
            shapes = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg))
        size = sum(t.numel() for t in (*shapes.parameters(), *shapes.buffers()))
        if size > MAX_NUMBERS:
            raise ValueError(f"{size:.2e} numbers: the config does not shrink to a tiny model")
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # biases and norm scales, so no term is trivially zero
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    model.eval()
    with torch.no_grad():  # buildable means it runs, in float64 too (XGLM's own attention cannot)
        model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=False)
        try:
            copy.deepcopy(model).double()(input_ids=torch.tensor([[3, 4, 5]]), use_cache=False)
        except Exception as err:
            raise ValueError(f"transformers' own forward fails in float64: {_first_line(err)}") from err
    return model


@contextlib.contextmanager
def no_installs():
    """TransformerLens 4.3's boot pip-installs torchvision for multimodal models; make that (and any subprocess)
    impossible while booting."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started while booting: {args}")

    from transformer_lens.model_bridge.sources.transformers import helpers

    saved = helpers._ensure_torchvision, subprocess.check_call, subprocess.run, subprocess.Popen
    helpers._ensure_torchvision = lambda: False
    subprocess.check_call = subprocess.run = subprocess.Popen = refuse
    try:
        yield
    finally:
        helpers._ensure_torchvision, subprocess.check_call, subprocess.run, subprocess.Popen = saved


def boot(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    from tokenizers import Tokenizer, models
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

    word = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>")
    with no_installs(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = copy.deepcopy(model)
        hf.config.architectures = [type(hf).__name__]  # a from_config model has none; boot dispatches on them
        bridge = TransformerBridge.boot_transformers(str(directory), hf_model=hf, tokenizer=tokenizer, device="cpu")
    return bridge.eval()


def check(model: torch.nn.Module, model_type: str, ids: torch.Tensor) -> tuple[str, str]:
    """(status, detail) of one model: exact / float32 bound / refused; raises on anything wrong."""
    with assert_untouched(model):
        try:
            result = iu.decompose(model, ids, dtype=torch.float64)
        except iu.UnsupportedArchitectureError as err:
            return "refused", str(err).splitlines()[0]
        report = result.verify()
    lifted = casts_parameters(model, torch.float64)
    with exact_formula(model, torch.float64):  # the model's own forward, its float32 casts kept in float64 if lifted
        targets = context_outputs(model, ids, torch.float64)
        literal = max(rel_err(literal_edit_output(model, result, block, position), targets[block][0, position])
                      for block in range(len(targets)) for position in (1, ids.shape[1] - 1))
    worst = max(literal, report.max_rel_err)
    tol = FLOAT32_TOL if model_type in FLOAT32_BOUND else TOL
    # verify must never call right what the literal edit calls wrong, and both must be exact (or within the bound)
    assert worst <= tol, (model_type, report.max_rel_err, literal)
    if lifted:  # and the model as written (float32 casts) is that formula up to float32 rounding
        plain = context_outputs(model, ids, torch.float64)
        assert max(rel_err(p, t) for p, t in zip(plain, targets, strict=True)) <= FLOAT32_TOL
    if worst > TOL or FLOAT32_BOUND.get(model_type) == _SIGMOID:  # a router rounding alike at this seed is luck
        return "float32 bound", FLOAT32_BOUND[model_type]
    return "exact", LIFTED if lifted else f"{worst:.1e}"


def run_zoo(types: list[str], directory: Path, bridge: bool = True, strict: bool = True
            ) -> dict[str, dict[str, tuple[str, str]]]:
    """Every architecture's row; ``strict=False`` (the script) records a crash or wrong result instead of raising."""
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    rows: dict[str, dict[str, tuple[str, str]]] = {}
    logging.disable(logging.WARNING)
    for model_type in types:
        try:
            model = tiny(model_type)
        except Exception as err:  # not buildable as a tiny random model in this transformers
            rows[model_type] = {"class": ("-", "-"), "hf": ("not buildable", _first_line(err)),
                                "bridge": ("not buildable", "")}
            continue
        row = {"class": (type(model).__name__, ""), "hf": _checked(model, model_type, ids, strict),
               "bridge": ("not run", "")}
        if bridge:
            try:
                booted = boot(model, directory)
                with torch.no_grad():
                    booted(ids)  # TransformerLens's own forward runs (its reimplemented attention may not)
                    # and so does a float64 deep copy (Falcon's patched linears keep reading the original's weights)
                    copy.deepcopy(booted).double()(ids)
            except Exception as err:
                row["bridge"] = ("TransformerLens cannot boot", _first_line(err))
            else:
                row["bridge"] = _checked(booted, model_type, ids, strict)
        rows[model_type] = row
        print(model_type, row, file=sys.stderr, flush=True)
    logging.disable(logging.NOTSET)
    return rows


def _checked(model, model_type: str, ids: torch.Tensor, strict: bool) -> tuple[str, str]:
    if strict:
        return check(model, model_type, ids)
    try:
        return check(model, model_type, ids)
    except Exception as err:
        return "FAILED", _first_line(err)


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"


def _versions() -> str:
    import importlib.metadata as metadata

    return f"transformers {transformers.__version__}, TransformerLens {metadata.version('transformer-lens')}"


def test_zoo(tmp_path, one_thread):
    import importlib.metadata as metadata

    if int(metadata.version("transformer-lens").split(".")[0]) < 4:
        pytest.skip("the zoo runs with TransformerLens 4 (make test's build/venv-tl4 run)")
    rows = run_zoo(zoo_types(), tmp_path)  # raises on any crash, or on verify calling right what is wrong
    counts = {b: sum(r[b][0] == "exact" for r in rows.values()) for b in ("hf", "bridge")}
    assert counts["hf"] >= 66 and counts["bridge"] >= 64, counts  # measured; the issue asks 50 and 60
    for name in ("llama", "olmo2", "phi3", "phi", "granite", "gptj", "cohere", "opt", "bloom", "gpt_neox", "mixtral",
                 "qwen2_moe", "gpt_oss", "jetmoe", "flex_olmo", "gemma3", "glm4_moe", "deepseek_v2", "deepseek_v3"):
        assert rows[name]["hf"][0] == rows[name]["bridge"][0] == "exact", (name, rows[name])
    table = ZOO_TABLE.read_text()
    if _versions() in table:  # docs/zoo.md lists every architecture with the status measured here
        assert markdown(rows) in table, "docs/zoo.md is stale: rerun python tests/test_zoo.py docs/zoo.md"


def markdown(rows: dict[str, dict[str, tuple[str, str]]]) -> str:
    """The table: status per backend and the reason for anything not exact (errors are not listed: they vary)."""
    lines = ["| architecture | class | bridge | hf | reason |", "|---|---|---|---|---|"]
    for model_type, row in rows.items():
        reasons = [f"{b}: {d}" for b in ("bridge", "hf") for s, d in [row[b]] if (s != "exact" or d == LIFTED) and d]
        if row["bridge"][1] == row["hf"][1] and len(reasons) == 2:
            reasons = [row["hf"][1]]
        lines.append(f"| {model_type} | {row['class'][0]} | {row['bridge'][0]} | {row['hf'][0]} | "
                     f"{'; '.join(reasons).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python tests/test_zoo.py [OUT.md] [model_type ...]
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        table = run_zoo(sys.argv[2:] or zoo_types(), Path(tmp), strict=False)
    counts = {b: {} for b in ("bridge", "hf")}
    for row in table.values():
        for b in counts:
            counts[b][row[b][0]] = counts[b].get(row[b][0], 0) + 1
    text = (f"# The Hugging Face zoo\n\n{_versions()}, {len(table)} causal-LM architectures, tiny random models "
            f"(hidden 32, 2 layers, float64). `python tests/test_zoo.py docs/zoo.md` writes this file; "
            f"`tests/test_zoo.py` checks it.\n\nbridge: {counts['bridge']}\n\nhf: {counts['hf']}\n\n"
            + markdown(table))
    print(text)
    if len(sys.argv) > 1 and sys.argv[1]:
        Path(sys.argv[1]).write_text(text)

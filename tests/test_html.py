"""Rich results and the HTML report (issue #15 parts 1-3): readable reprs, self-contained HTML whose numbers are the
results', the ``report`` CLI, and both opened in headless Chromium (console errors, elements, the block selector, a
screenshot). The browser tests skip, saying why, without Chromium and Playwright, unless
``IMPLICIT_UPDATES_REQUIRE_BROWSER=1`` (CI), where a missing browser fails. About 25 s on 2 cores."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_untouched

import implicit_updates as iu
from implicit_updates import cli
from implicit_updates.analyses.dynamics import prefix_dynamics
from implicit_updates.math import analysis
from implicit_updates.models import random_model
from implicit_updates.views import html

EVIL = '</script><script>console.error("injected")</script>&amp;<b>x</b>'
N_TOKENS = 8


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return random_model("llama")


@pytest.fixture(scope="module")
def tokens(model):
    return torch.randint(0, model.cfg.d_vocab, (1, N_TOKENS), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def results(model, tokens):
    result = iu.decompose(model, tokens, dtype=torch.float64)
    return {"decomposition": result, "verify": result.verify(),
            "dynamics": prefix_dynamics(model, tokens, dtype=torch.float64),
            "absorb": iu.compare_absorbed(model, tokens, dtype=torch.float64, k=3),
            "attribution": iu.attribute(model, tokens, dtype=torch.float64, nodes=8)}


@pytest.fixture(scope="module")
def written_report(model, tokens, tmp_path_factory):
    """``implicit-updates report`` run in-process; the model is loaded by the CLI, so its prompt is the same ids."""
    out = tmp_path_factory.mktemp("report")
    prompt = ",".join(str(i) for i in tokens[0].tolist())
    code = cli.main(["report", "--model", "random:llama", "--prompt", prompt, "--dtype", "float64",
                     "--html", str(out / "r.html"), "--json", str(out / "r.json"), "--top-k", "3"])
    assert code == 0
    return out / "r.html", json.loads((out / "r.json").read_text())


def data_blocks(page: str) -> list:
    return [json.loads(m) for m in re.findall(r'<script type="application/json" class="iu-data">(.*?)</script>', page)]


# -- without a browser ---------------------------------------------------------------------------------------------


def test_reprs_are_one_readable_line(results):
    texts = {k: repr(v) for k, v in results.items()}
    for name, text in texts.items():
        assert "object at 0x" not in text and "tensor(" not in text and "\n" not in text and len(text) < 300, name
    assert texts["decomposition"].startswith("Decomposition(blocks=[0, 1, 2, 3], batch=1, positions=8, query='last'")
    assert f"max_rel_err={results['verify'].max_rel_err:.3e}" in texts["verify"]
    assert "prefixes=7" in texts["dynamics"] and "method='onepass'" in texts["dynamics"]
    assert f"max_abs_logit_diff={results['absorb'].max_abs_logit_diff:.3e}" in texts["absorb"]
    assert f"max_completeness_err={results['attribution'].completeness_error():.3e}" in texts["attribution"]


def test_repr_html_is_self_contained_and_carries_the_results_numbers(results):
    pages = {k: v._repr_html_() for k, v in results.items()}
    for name, page in pages.items():
        urls = set(re.findall(r"https?://[^\s\"'<>]+", page)) - {"http://www.w3.org/2000/svg"}  # a namespace only
        assert not urls and "<link" not in page and " src=" not in page and "@import" not in page, name
    result = results["decomposition"]
    (data,) = data_blocks(pages["decomposition"])
    norms = data["series"]["||dW_i|| (first-layer update)"]
    for b in (0, 3):  # ||dW_i||_F of the dense patch (every first-layer map) against the page's number
        maps = [u.name for u in result.block(b).first_layer]
        for i in (2, N_TOKENS - 1):
            patch = result.patch(b, i)
            dense = torch.sqrt(sum(patch[n].pow(2).sum() for n in maps))
            assert norms[b][i] == pytest.approx(float(dense), rel=1e-12)
    delta_b = data["series"]["||delta_b_i|| (output correction)"]
    assert delta_b[1][4] == pytest.approx(float(result.block(1).delta_b[0, 4].norm()), rel=1e-12)
    verify = results["verify"]
    for b in verify.blocks:  # every block's errors, as printed
        assert html.fmt(b.max_rel_err) in pages["verify"] and html.fmt(b.literal_max_rel_err) in pages["verify"]
    (scores,) = data_blocks(pages["attribution"])
    expected = results["attribution"].token_scores(-1)
    assert torch.allclose(torch.tensor(scores["series"]["share of the update"], dtype=torch.float64), expected,
                          rtol=1e-12, atol=0)
    assert pages["dynamics"].count("<polyline") >= 4 * len(results["dynamics"].blocks)


def test_first_render_colours_each_token_by_its_blocks_largest_value():
    page = html.heatmap(["a", "b", "c"], [0, 5], {"s": [[1.0, 0.5, None], [0.0, 2.0, -4.0]]}, signed=True)
    colours = re.findall(r'class="iu-tok" data-i="\d" style="background-color:([^"]+)"', page)
    assert colours == [f"rgba({html.POS},0.000)", f"rgba({html.POS},0.500)", f"rgba({html.NEG},1.000)"]
    assert "block 5: largest |value| 4.000e+0" in page
    assert html.fmt(1.5e-12) == "1.500e-12" and html.fmt(123.0) == "1.230e+2" and html.fmt(None) == "n/a"


def test_token_strings_are_escaped_everywhere():
    page = html.heatmap([EVIL, "\n"], [0], {"s": [[1.0, 2.0]]})
    assert "<script>console" not in page and "<b>x</b>" not in page
    assert html.json_block({"t": EVIL}).count("</script>") == 1  # only the block's own closing tag
    assert data_blocks(html.json_block({"t": EVIL}))[0] == {"t": EVIL}
    assert "\u21b5" in page  # a newline token is shown as a symbol, not as nothing


def test_token_labels_keep_sentencepiece_spaces():
    from implicit_updates.report import token_text

    class Piece:  # a SentencePiece tokenizer decodes one word without its leading space
        def decode(self, ids):
            return {7: "Once", 8: "ir", 9: " x"}[ids[0]]

        def convert_ids_to_tokens(self, i):
            return {7: "\u2581Once", 8: "ir", 9: "\u2581x"}[i]

    assert [token_text(Piece(), i) for i in (7, 8, 9)] == [" Once", "ir", " x"]


def test_report_json_has_the_html_numbers_and_the_model_is_untouched(model, tokens, written_report, results):
    path, payload = written_report
    page = path.read_text()
    assert {"verify", "decomposition", "dynamics", "absorb", "attribution"} <= payload.keys()
    assert payload["dynamics"]["method"] == "onepass" and payload["dynamics"]["n_prefixes"] == N_TOKENS - 1
    same = results["decomposition"]  # the CLI loaded the same random model (seed 0) and ran the same prompt
    assert payload["decomposition"]["update_norms"][2] == pytest.approx(
        [float(x) for x in analysis.update_norms(same, 2)], rel=1e-12)
    assert [b["block"] for b in payload["verify"]["blocks"]] == [b.block for b in results["verify"].blocks]
    assert payload["verify"]["max_rel_err"] <= 1e-12 and payload["absorb"]["max_abs_logit_diff"] <= 1e-10
    heats = {name: values for d in data_blocks(page) for name, values in d["series"].items()}
    assert heats["relative error"] == [b["position_rel_errs"] for b in payload["verify"]["blocks"]]
    assert {len(b["position_rel_errs"]) for b in payload["verify"]["blocks"]} == {N_TOKENS}
    assert heats["||dW_i|| (first-layer update)"] == payload["decomposition"]["update_norms"]
    assert heats["||delta_b_i|| (output correction)"] == payload["decomposition"]["delta_b_norms"]
    assert len(page) < 2_000_000
    with assert_untouched(model):
        from implicit_updates.report import report

        rep = report(model, tokens, dtype=torch.float64, tokens=[EVIL] + ["t"] * (N_TOKENS - 1), attribution=False)
    assert rep.to_dict()["tokens"][0] == EVIL and "attribution" not in rep.to_dict()
    assert "<script>console" not in rep.to_html()
    inline = rep._repr_html_()  # in a notebook: the sections in a div, not a second document
    assert "<!DOCTYPE" not in inline and 'id="verify"' in inline and "<script>console" not in inline


def test_report_cli_refuses_bad_paths_before_loading(tmp_path, capsys):
    check_cli_errors(tmp_path, capsys, ((["--html", str(tmp_path)], "is a directory"),
                                        (["--html", str(tmp_path / "no" / "r.html")], "does not exist")))


def test_report_cli_refuses_a_top_k_beyond_the_vocabulary(model, tmp_path, capsys):
    check_cli_errors(tmp_path, capsys, [(["--html", str(tmp_path / "r.html"), "--top-k", "100000"],
                                         "more than the vocabulary")])


def check_cli_errors(tmp_path, capsys, cases) -> None:
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["report", "--model", "random:llama", "--seq-len", "4", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.html").exists()


# -- in headless Chromium ------------------------------------------------------------------------------------------

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("IMPLICIT_UPDATES_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    required = os.environ.get("IMPLICIT_UPDATES_REQUIRE_BROWSER") == "1"
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "Playwright is not installed (pip install playwright, or the [dev] extra)"
    executable = chromium_path()
    if why is None and executable is None:
        why = "no Chromium found (apt-get install chromium, or set IMPLICIT_UPDATES_CHROMIUM to its binary)"
    if why:
        if required:
            pytest.fail(f"IMPLICIT_UPDATES_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(f"browser tests need a real browser: {why}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=ARGS)
        yield b
        b.close()


def open_page(browser, path: Path):
    """The page at ``path`` (file://), with every console error, page error and requested URL collected."""
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.errors, page.requests = [], []
    page.on("console", lambda m: m.type in ("error", "warning") and page.errors.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.errors.append(f"pageerror: {e}"))
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page


def strip_colours(widget) -> list[str]:
    return widget.eval_on_selector_all(".iu-tok", "els => els.map(e => e.style.backgroundColor)")


def grid_colours(widget) -> list[str]:
    return widget.eval_on_selector_all("td.iu-cell", "els => els.map(e => e.style.backgroundColor)")


def check_selector(widget, n_blocks: int) -> None:
    """Selecting another block recolours the token strip (and moves the grid's highlight); selecting the first
    block back gives exactly the first render's colours (the Python and the JS shading agree)."""
    bsel = widget.query_selector("select.iu-block")
    first = strip_colours(widget)
    titles = widget.eval_on_selector_all(".iu-tok", "els => els.map(e => e.title)")
    default = bsel.input_value()
    other = str((int(default) + 1) % n_blocks)
    bsel.select_option(other)
    assert strip_colours(widget) != first
    assert widget.eval_on_selector("tr.iu-sel", "e => e.dataset.b") == other
    widget.query_selector(f'tr.iu-row[data-b="{default}"]').click()  # a grid row selects its block
    assert bsel.input_value() == default
    assert strip_colours(widget) == first
    assert widget.eval_on_selector_all(".iu-tok", "els => els.map(e => e.title)") == titles


def not_blank(png: bytes) -> None:
    from PIL import Image, ImageStat

    image = Image.open(io.BytesIO(png)).convert("L")
    stat = ImageStat.Stat(image)
    dark = sum(image.histogram()[:200]) / (image.width * image.height)
    assert stat.stddev[0] > 20 and dark > 0.02, (stat.stddev, dark)


def test_chromium_opens_the_report(browser, written_report, tmp_path):
    path, payload = written_report
    page = open_page(browser, path)
    n_blocks = len(payload["verify"]["blocks"])
    for section in ("verify", "updates", "dynamics", "absorb", "attribution"):
        assert page.query_selector(f"section#{section}") is not None, section
    assert len(page.query_selector_all("#verify .iu-verify tbody tr")) == n_blocks
    assert len(page.query_selector_all("#verify tr.iu-row")) == n_blocks  # the per-position error heatmap
    assert len(page.query_selector_all("#updates .iu-tok")) == N_TOKENS
    assert len(page.query_selector_all("#updates tr.iu-row")) == n_blocks
    assert len(page.query_selector_all("#dynamics polyline")) >= 2 * n_blocks
    assert len(page.query_selector_all("#absorb tbody tr")) == 3
    widget = page.query_selector("#updates .iu-heat")
    check_selector(widget, n_blocks)
    grid = grid_colours(widget)
    widget.query_selector("select.iu-series").select_option(index=1)  # ||delta_b_i||: another series, other colours
    assert grid_colours(widget) != grid
    check_selector(page.query_selector("#attribution .iu-heat"), n_blocks)
    not_blank(page.screenshot(path=str(tmp_path / "report.png"), full_page=True))
    assert page.errors == []
    assert all(url.startswith("file://") for url in page.requests) and len(page.requests) == 1, page.requests
    page.close()


def test_chromium_renders_every_repr_html(browser, results, tmp_path):
    """Every result's ``_repr_html_`` on one page, as a notebook shows them: no errors, and the three heatmap widgets
    (decomposition, verify's per-position errors, attribution) each answer their own selector only."""
    body = "".join(f'<div class="cell">{v._repr_html_()}</div>' for v in results.values())
    path = tmp_path / "notebook.html"
    path.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>{body}</body></html>')
    page = open_page(browser, path)
    widgets = page.query_selector_all(".iu-heat")
    assert len(widgets) == 3 and len({w.get_attribute("id") for w in widgets}) == 3
    n_blocks = len(results["decomposition"].blocks)
    others = [strip_colours(w) for w in widgets[1:]]
    check_selector(widgets[0], n_blocks)
    widgets[0].query_selector("select.iu-block").select_option("0")
    assert [strip_colours(w) for w in widgets[1:]] == others
    check_selector(widgets[2], n_blocks)
    assert page.query_selector_all(".iu-verify tbody tr") and page.query_selector_all("svg polyline")
    not_blank(page.screenshot(path=str(tmp_path / "notebook.png"), full_page=True))
    assert page.errors == [] and len(page.requests) == 1, (page.errors, page.requests)
    page.close()


def test_chromium_shows_escaped_tokens_as_text(browser, tmp_path):
    """A token that tries to close the script tag shows as text and runs nothing."""
    path = tmp_path / "evil.html"
    path.write_text(html.fragment(html.heatmap([EVIL, "b"], [0, 1], {"s": [[1.0, 2.0], [2.0, 1.0]]})))
    page = open_page(browser, path)
    assert page.eval_on_selector(".iu-tok", "e => e.textContent") == EVIL
    check_selector(page.query_selector(".iu-heat"), 2)
    assert page.errors == []
    page.close()

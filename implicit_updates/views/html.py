"""HTML views of the result objects (``_repr_html_``) and the one-page report: formatting only, never computing.

Every view is self-contained: inline CSS, a little vanilla JS (the block selector), numbers as JSON inside a
``<script type="application/json">``; no CDN, no network call, so it renders offline, in Jupyter and in Colab. The
numbers come from :mod:`implicit_updates.report` (the same dict ``--json`` writes); every token string is escaped.
Colours: each token (or grid cell) is shaded by its value over the largest ``|value|`` of its block, the same
formula in Python (the first render, which also shows where scripts do not run) and in JS (after a selection).
"""

from __future__ import annotations

import json
import math
import uuid
from html import escape

POS, NEG = "31,119,180", "214,39,40"  # blue: a size or a positive share; red: a negative share
MISSING = "#d9d9d9"
PALETTE = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]  # viridis anchors, first block to last

CSS = """
.iu{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:13px;color:#222;line-height:1.4}
.iu h1{font-size:20px;margin:8px 0}.iu h2{font-size:16px;margin:18px 0 6px;border-bottom:1px solid #ddd}
.iu .iu-meta{color:#555;margin:2px 0 8px}.iu table{border-collapse:collapse;margin:4px 0}
.iu th,.iu td{padding:2px 6px;text-align:right;border-bottom:1px solid #eee;font-variant-numeric:tabular-nums}
.iu th{background:#f4f4f4;font-weight:600}.iu td.iu-l,.iu th.iu-l{text-align:left}
.iu .iu-strip{display:flex;flex-wrap:wrap;gap:2px;margin:6px 0;max-width:100%}
.iu .iu-tok{white-space:pre;font-family:ui-monospace,Menlo,Consolas,monospace;padding:1px 3px;
border:1px solid #ccc;border-radius:3px;min-width:6px}
.iu .iu-grid td.iu-cell{width:10px;min-width:10px;height:12px;padding:0;border:1px solid #fff}
.iu .iu-grid tr.iu-row{cursor:pointer}.iu .iu-grid tr.iu-sel th{background:#ffe08a}
.iu .iu-grid th{font-size:11px;padding:0 4px}.iu .iu-legend{color:#555;font-size:12px}
.iu select{font-size:13px;margin-right:8px}.iu .iu-note{color:#8a5a00}
.iu svg text{font-size:10px;fill:#444}.iu .iu-charts{display:flex;flex-wrap:wrap;gap:12px}
"""

# One heatmap widget: a token strip for the selected block and series, and a blocks x positions grid.
JS = """(function(){
var root=document.getElementById(%s);if(!root||root.dataset.ready)return;root.dataset.ready="1";
var d=JSON.parse(root.querySelector("script.iu-data").textContent);
var bsel=root.querySelector("select.iu-block"),ssel=root.querySelector("select.iu-series");
var legend=root.querySelector(".iu-legend");
function fmt(v){return v===null?"n/a":v.toExponential(3);}
function rowMax(row){var m=0;row.forEach(function(v){if(v!==null)m=Math.max(m,Math.abs(v));});return m;}
function colour(v,m){if(v===null)return "%s";var t=m>0?Math.abs(v)/m:0;
return "rgba("+(d.signed&&v<0?"%s":"%s")+","+t.toFixed(3)+")";}
function paint(){var s=ssel?ssel.value:d.series_names[0],rows=d.series[s],b=+bsel.value,row=rows[b],m=rowMax(row);
root.querySelectorAll(".iu-tok").forEach(function(el){var i=+el.dataset.i;el.style.backgroundColor=colour(row[i],m);
el.title=i+": "+fmt(row[i]);});
root.querySelectorAll("tr.iu-row").forEach(function(tr){var r=+tr.dataset.b,rr=rows[r],mm=rowMax(rr);
tr.classList.toggle("iu-sel",r===b);tr.querySelectorAll("td.iu-cell").forEach(function(td){var i=+td.dataset.i;
td.style.backgroundColor=colour(rr[i],mm);td.title="block "+d.blocks[r]+", "+i+": "+fmt(rr[i]);});});
legend.textContent=s+", block "+d.blocks[b]+": largest |value| "+fmt(m)+
" (each block shaded by its own largest |value|)";}
bsel.addEventListener("change",paint);if(ssel)ssel.addEventListener("change",paint);
root.querySelectorAll("tr.iu-row").forEach(function(tr){tr.addEventListener("click",function(){
bsel.value=tr.dataset.b;paint();});});
})();"""


# -- small builders ---------------------------------------------------------------------------------------------


def fmt(v: float | None) -> str:
    """``v`` as JS's ``toExponential(3)`` writes it (``1.230e-2``), so the first render and the JS one agree."""
    if v is None:
        return "n/a"
    mantissa, exponent = f"{v:.3e}".split("e")
    e = int(exponent)
    return f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


def colour(v: float | None, largest: float, signed: bool) -> str:
    if v is None:
        return MISSING
    t = abs(v) / largest if largest > 0 else 0.0
    return f"rgba({NEG if signed and v < 0 else POS},{t:.3f})"


def largest(row: list) -> float:
    return max((abs(v) for v in row if v is not None), default=0.0)


def json_block(data) -> str:
    """``data`` as a JSON script block; ``<``, ``>`` and ``&`` escaped so no token string can close the tag."""
    text = json.dumps(data, allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" class="iu-data">{text}</script>'


def visible(token: str) -> str:
    """A token as shown: newlines and tabs as symbols, the empty string as a placeholder; escaped."""
    return escape(token.replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205")


def fragment(body: str) -> str:
    """A notebook output: scoped CSS and ``body`` in one ``<div class="iu">``."""
    return f'<div class="iu"><style>{CSS}</style>{body}</div>'


def table(header: list[str], rows: list[list[str]], left: int = 0) -> str:
    """A table; the first ``left`` columns left-aligned. Cells are already-escaped HTML."""
    def cls(i: int) -> str:
        return ' class="iu-l"' if i < left else ""

    head = "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def heatmap(tokens: list[str], blocks: list[int], series: dict[str, list[list]], signed: bool = False,
            default_block: int = -1, caption: str = "") -> str:
    """A token heatmap: a block (and series) selector, the prompt's tokens shaded for the selected block, and the
    blocks x positions grid (a row click selects its block). ``series``: name -> ``[block][position]`` values."""
    wid = f"iu-{uuid.uuid4().hex[:12]}"
    names = list(series)
    b = default_block % len(blocks)
    rows = series[names[0]]
    row, top = rows[b], largest(rows[b])
    options = "".join(f'<option value="{i}"{" selected" if i == b else ""}>block {blk}</option>'
                      for i, blk in enumerate(blocks))
    controls = f'<label>block <select class="iu-block">{options}</select></label>'
    if len(names) > 1:
        opts = "".join(f'<option value="{escape(n)}">{escape(n)}</option>' for n in names)
        controls += f'<label>show <select class="iu-series">{opts}</select></label>'
    strip = "".join(f'<span class="iu-tok" data-i="{i}" style="background-color:{colour(row[i], top, signed)}" '
                    f'title="{i}: {fmt(row[i])}">{visible(t)}</span>' for i, t in enumerate(tokens))
    head = "".join(f'<th title="{escape(t)}">{i}</th>' for i, t in enumerate(tokens))
    grid = []
    for r, blk in enumerate(blocks):
        m = largest(rows[r])
        cells = "".join(f'<td class="iu-cell" data-i="{i}" style="background-color:{colour(v, m, signed)}" '
                        f'title="block {blk}, {i}: {fmt(v)}"></td>' for i, v in enumerate(rows[r]))
        grid.append(f'<tr class="iu-row{" iu-sel" if r == b else ""}" data-b="{r}"><th>{blk}</th>{cells}</tr>')
    legend = (f"{escape(names[0])}, block {blocks[b]}: largest |value| {fmt(top)} (each block shaded by its own "
              "largest |value|)")
    data = {"blocks": blocks, "series_names": names, "series": series, "signed": signed}
    script = JS % (json.dumps(wid), MISSING, NEG, POS)
    return (f'<div class="iu-heat" id="{wid}">{json_block(data)}<div>{controls}</div>'
            f'<div class="iu-caption">{caption}</div><div class="iu-strip">{strip}</div>'
            f'<div class="iu-legend">{legend}</div>'
            f'<table class="iu-grid"><thead><tr><th>block</th>{head}</tr></thead><tbody>{"".join(grid)}</tbody>'
            f'</table><script>{script}</script></div>')


def line_chart(title: str, curves: dict[str, list], x0: int = 1, width: int = 460, height: int = 220) -> str:
    """An inline SVG of ``curves`` (label -> values at x = x0, x0 + 1, ...) on a log10 y axis; values <= 0 or
    missing break the line. Colours run from the first curve to the last (viridis anchors)."""
    pad_l, pad_r, pad_t, pad_b = 48, 8, 18, 26
    logs = {k: [math.log10(v) if v is not None and v > 0 else None for v in vs] for k, vs in curves.items()}
    ys = [y for vs in logs.values() for y in vs if y is not None]
    n = max((len(vs) for vs in curves.values()), default=0)
    parts = [f'<svg class="iu-chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg"><text x="{pad_l}" y="12">{escape(title)}</text>']
    if not ys or n == 0:
        return "".join(parts) + '<text x="60" y="100">no positive values</text></svg>'
    lo, hi = math.floor(min(ys)), math.ceil(max(ys))
    hi = hi if hi > lo else lo + 1
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def x(i: int) -> float:
        return pad_l + (w * i / (n - 1) if n > 1 else w / 2)

    def y(v: float) -> float:
        return pad_t + h * (hi - v) / (hi - lo)

    parts.append(f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="none" stroke="#bbb"/>')
    step = max(1, (hi - lo) // 6)
    for e in range(lo, hi + 1, step):
        parts.append(f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{y(e):.1f}" y2="{y(e):.1f}" stroke="#eee"/>'
                     f'<text x="2" y="{y(e) + 3:.1f}">1e{e}</text>')
    for i in sorted({0, n - 1, (n - 1) // 2}):
        parts.append(f'<text x="{x(i) - 4:.1f}" y="{height - 8}">{x0 + i}</text>')
    for k, (label, vs) in enumerate(logs.items()):
        c = ramp(k, len(logs))
        runs, run = [], []
        for i, v in enumerate(vs):
            if v is None:
                runs, run = runs + [run] if run else runs, []
            else:
                run.append(f"{x(i):.1f},{y(v):.1f}")
        runs += [run] if run else []
        for r in runs:
            parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{" ".join(r)}">'
                         f"<title>{escape(label)}</title></polyline>")
    return "".join(parts) + "</svg>"


def ramp(k: int, n: int) -> str:
    """Colour ``k`` of ``n`` along the viridis anchors."""
    t = k / (n - 1) if n > 1 else 0.0
    i = min(int(t * (len(PALETTE) - 1)), len(PALETTE) - 2)
    f = t * (len(PALETTE) - 1) - i
    a, b = (tuple(int(p[j:j + 2], 16) for j in (1, 3, 5)) for p in PALETTE[i:i + 2])
    return "#" + "".join(f"{round(u + f * (v - u)):02x}" for u, v in zip(a, b, strict=True))


def legend_list(labels: list[str]) -> str:
    items = "".join(f'<span style="color:{ramp(k, len(labels))}">\u25a0</span> {escape(lab)} '
                    for k, lab in enumerate(labels))
    return f'<div class="iu-legend">{items}</div>'


# -- sections (from report dicts) ----------------------------------------------------------------------------------


def verify_section(v: dict, tokens: list[str] | None = None) -> str:
    rows = [[str(b["block"]), fmt(b["msd"]), fmt(b["max_abs_err"]), fmt(b["max_rel_err"]),
             fmt(b["factored_max_rel_err"]), fmt(b["literal_max_rel_err"]),
             escape(", ".join(map(str, b["literal_positions"]))), str(b["worst_position"]), str(b["rank"])]
            for b in v["blocks"]]
    header = ["block", "MSD", "max |err|", "max rel err", "factored (every position)", "literal (edited weights)",
              "literal positions", "worst position", "rank"]
    summary = (f'<div class="iu-meta">max relative error <b>{fmt(v["max_rel_err"])}</b> over {len(v["blocks"])} '
               f'blocks x {v["n_positions"]} positions ({escape(v["dtype"])}, query={escape(v["query"])}): each '
               "block run on its query alone with each position's update, against the block with context</div>")
    out = summary + f'<div class="iu-verify">{table(header, rows)}</div>'
    if all(b.get("position_rel_errs") for b in v["blocks"]):  # the factored check at every position
        labels = tokens or [str(i) for i in range(v["n_positions"])]
        out += heatmap(labels[: v["n_positions"]], [b["block"] for b in v["blocks"]],
                       {"relative error": [b["position_rel_errs"] for b in v["blocks"]]},
                       caption="relative error of the patched query alone at each position (the factored check)")
    return out


def decomposition_section(d: dict) -> str:
    series = {"||dW_i|| (first-layer update)": d["update_norms"],
              "||delta_b_i|| (output correction)": d["delta_b_norms"]}
    who = "the update the query's block gets from context token i" if d["query"] == "last" else \
        "position i's own update, with the tokens before it as context"
    caption = f"position i: {who}; hover a token for its value"
    meta = (f'<div class="iu-meta">{len(d["blocks"])} blocks x {d["n_positions"]} positions, query='
            f'{escape(d["query"])}, {escape(d["dtype"])}'
            + (f', batch element {d["batch"]} of {d["n_batch"]}' if d["n_batch"] > 1 else "") + "</div>")
    return meta + heatmap(d["tokens"], d["blocks"], series, caption=caption)


def dynamics_section(dyn: dict) -> str:
    blocks = dyn["blocks"]
    labels = [f"block {b['block']}" for b in blocks]
    charts = [line_chart("||dW_i||_F, prefix i = [c_1..c_i, x]", {lab: b["update_norms"]
                         for lab, b in zip(labels, blocks, strict=True)}),
              line_chart("step ||dW_i+1 - dW_i||_F", {lab: b["step_norms"]
                         for lab, b in zip(labels, blocks, strict=True)}),
              line_chart("row-change term ||u_i (v_i+1 - v_i)^T||_F", {lab: b["row_change_norms"]
                         for lab, b in zip(labels, blocks, strict=True)}),
              line_chart("implicit learning rate h_i = 1/||m_x,i||^2", {lab: b["implicit_lr"]
                         for lab, b in zip(labels, blocks, strict=True)})]
    shared = ", ".join(str(b["block"]) for b in blocks if b["shared_row"]) or "none"
    meta = (f'<div class="iu-meta">{dyn["n_prefixes"]} prefixes ({escape(dyn["method"])}), query token '
            f'{visible(dyn["query_token"])}; blocks whose row is shared by every prefix (Prop. 3.1\'s gradient '
            f'step exactly): {escape(shared)}</div>')
    return meta + f'<div class="iu-charts">{"".join(charts)}</div>' + legend_list(labels)


def absorb_section(a: dict) -> str:
    runs = ("full", "absorbed", "control")
    k = max(len(a["top_k"][r]) for r in runs)
    rows = []
    for i in range(k):
        cells = [str(i + 1)]
        for r in runs:
            e = a["top_k"][r][i] if i < len(a["top_k"][r]) else None
            text = "" if not e else f"<code>{e[0]}</code>" if e[2] == str(e[0]) else \
                f"<code>{visible(e[2])}</code> ({e[0]})"
            cells.append(f"{text} {e[1]:.4f}" if e else "")
        rows.append(cells)
    header = ["rank", "full model, whole prompt", "absorbed, query alone", "control, query alone"]
    meta = (f'<div class="iu-meta">absorbed vs full: max |logit diff| <b>{fmt(a["max_abs_logit_diff"])}</b>, '
            f'KL {fmt(a["kl_full_vs_absorbed"])}, top-1 agrees: {a["top1_agree"]}; control vs full: max |logit '
            f'diff| {fmt(a["max_abs_logit_diff_control"])}, KL {fmt(a["kl_full_vs_control"])}</div>')
    return meta + f'<div class="iu-absorb">{table(header, rows, left=4)}</div>'


def generation_section(g: dict) -> str:
    """Per step: the full model's token, whether the absorbed model's top-1 agrees, and both distances."""
    rows = [[str(i), str(s["position"]), f"<code>{s['token']}</code>", "yes" if s["agree"] else "<b>no</b>",
             fmt(s["max_abs_logit_diff"]), fmt(s["kl"]), fmt(s["max_rel_block_err"]),
             fmt(s["control_max_abs_logit_diff"]), f"{s['seconds']:.3f}"]
            for i, s in enumerate(g["steps"])]
    header = ["step", "position", "token", "top-1 agrees", "max |logit diff|", "KL(full||absorbed)",
              "worst block output (rel.)", "control max |logit diff|", "seconds"]
    text = f', text: <code>{visible(g["text"])}</code>' if g.get("text") else ""
    meta = (f'<div class="iu-meta">{g["agree"]} of {g["n_steps"]} steps agree; absorbed vs full: max |logit diff| '
            f'<b>{fmt(g["max_abs_logit_diff"])}</b>; control vs full: at least '
            f'{fmt(g["summary"]["min_control_max_abs_logit_diff"])} (dtype {escape(g["dtype"])}, '
            f'{escape(g["backend"])}){text}</div>')
    chart = line_chart("max |logit diff| per step", {
        "absorbed": [s["max_abs_logit_diff"] for s in g["steps"]],
        "control": [s["control_max_abs_logit_diff"] for s in g["steps"]]}, x0=0)
    return meta + chart + legend_list(["absorbed", "control"]) + table(header, rows)


def attribution_section(att: dict) -> str:
    extras = att["extras"]
    rows = [[str(b), fmt(extras["residual"][i]), fmt(extras["sink"][i]), fmt(extras["norm_rounding"][i]),
             fmt(att["completeness_err"][i])] for i, b in enumerate(att["blocks"])]
    caption = (f"share of position {att['position']}'s first-layer update from each source token (summed over "
               "heads; blue positive, red negative); with the extras below, each block's shares sum to 1")
    meta = f'<div class="iu-meta">max completeness error {fmt(att["max_completeness_err"])}</div>'
    return (meta + heatmap(att["tokens"], att["blocks"], {"share of the update": att["token_scores"]}, signed=True,
                           caption=caption)
            + table(["block", "residual (earlier blocks)", "sink", "norm rounding", "completeness err"], rows))


def report_body(payload: dict) -> str:
    """The report's sections (a notebook shows them inside :func:`fragment`)."""
    title = f"implicit-updates report: {payload['model']}"
    sections = [("verify", "Verification per block and position", verify_section(payload["verify"],
                                                                                  payload["tokens"])),
                ("updates", "Update sizes per token and block", decomposition_section(payload["decomposition"]))]
    if "dynamics" in payload:
        sections.append(("dynamics", "Prefix dynamics (Dherin et al. Prop. 3.1)",
                         dynamics_section(payload["dynamics"])))
    sections.append(("absorb", "The absorbed model on the query token alone", absorb_section(payload["absorb"])))
    if "attribution" in payload:
        sections.append(("attribution", "Attribution to source tokens", attribution_section(payload["attribution"])))
    notes = "".join(f'<div class="iu-note"><b>{escape(k)}</b>: {escape(v)}</div>' for k, v in payload["notes"].items())
    seconds = ", ".join(f"{escape(k)} {v:.2f} s" for k, v in payload["seconds"].items())
    head = (f'<h1>{escape(title)}</h1><div class="iu-meta">{payload["n_tokens"]} tokens, {escape(payload["dtype"])}; '
            f'{seconds}</div><div class="iu-strip iu-prompt">'
            + "".join(f'<span class="iu-tok">{visible(t)}</span>' for t in payload["tokens"]) + "</div>")
    return head + "".join(f'<section id="{sid}"><h2>{escape(h)}</h2>{s}</section>' for sid, h, s in sections) + notes


def page(title: str, body: str) -> str:
    """``body`` as one self-contained page (a Content-Security-Policy forbids any network request)."""
    csp = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
            f'content="{csp}"><meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            f'<div class="iu">{body}</div></body></html>')


def report_html(payload: dict) -> str:
    """The whole report as one self-contained page."""
    return page(f"implicit-updates report: {payload['model']}", report_body(payload))


# -- the result objects' _repr_html_ and __repr__ ---------------------------------------------------------------


def decomposition_html(result) -> str:
    from implicit_updates.views.data import decomposition_data

    return fragment(f"<b>Decomposition</b> ({escape(model_name(result))})"
                    + decomposition_section(decomposition_data(result)))


def verify_html(report) -> str:
    from implicit_updates.views.data import verify_data

    return fragment("<b>VerifyReport</b>" + verify_section(verify_data(report)))


def dynamics_html(dyn) -> str:
    from implicit_updates.views.data import dynamics_data

    return fragment("<b>PrefixDynamics</b>" + dynamics_section(dynamics_data(dyn)))


def absorb_html(report) -> str:
    from implicit_updates.views.data import absorb_data

    return fragment("<b>AbsorbReport</b> (token ids; the report decodes them)" + absorb_section(absorb_data(report)))


def generation_html(g: dict) -> str:
    return fragment("<b>Generation</b> (absorbed at every step)" + generation_section(g))


def generation_repr(g: dict) -> str:
    return (f"Generation(agree={g['agree']}/{g['n_steps']}, max_abs_logit_diff={g['max_abs_logit_diff']:.3e}, "
            f"min_control_diff={fmt(g['summary']['min_control_max_abs_logit_diff'])}, dtype={g['dtype']}, "
            f"text={g['text']!r})")


def attribution_html(att) -> str:
    from implicit_updates.views.data import attribution_data

    return fragment("<b>Attribution</b>" + attribution_section(attribution_data(att)))


def model_name(result) -> str:
    return type(getattr(result.adapter, "model", result.adapter)).__name__


def blocks_text(blocks: list[int]) -> str:
    """``[0, 1, 2]``, or ``0..29`` for a long contiguous run."""
    if len(blocks) > 4 and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}..{blocks[-1]}"
    return str(blocks)


def decomposition_repr(result) -> str:
    batch, n = result.inputs.shape[:2]
    return (f"{type(result).__name__}(blocks={blocks_text([u.block for u in result.blocks])}, batch={batch}, "
            f"positions={result.n_positions}, query={result.query!r}, dtype={str(result.dtype).removeprefix('torch.')}"
            f", model={model_name(result)})")


def verify_repr(report) -> str:
    return (f"VerifyReport(max_rel_err={report.max_rel_err:.3e}, max_abs_err={report.max_abs_err:.3e}, "
            f"blocks={blocks_text([b.block for b in report.blocks])}, positions={report.n_positions}, "
            f"query={report.query!r}, dtype={report.dtype})")


def dynamics_repr(dyn) -> str:
    return (f"PrefixDynamics(blocks={blocks_text(list(dyn.blocks))}, prefixes={dyn.n_prefixes}, "
            f"method={dyn.method!r}, dtype={str(dyn.decomposition.dtype).removeprefix('torch.')})")


def absorb_repr(report) -> str:
    top = {run: entries[0][0] if entries else None for run, entries in report.top_k.items()}
    return (f"AbsorbReport(max_abs_logit_diff={report.max_abs_logit_diff:.3e}, kl_full_vs_absorbed="
            f"{report.kl_full_vs_absorbed:.3e}, kl_full_vs_control={report.kl_full_vs_control:.3e}, top1_agree="
            f"{report.top1_agree}, top1={top})")


def attribution_repr(att) -> str:
    return (f"Attribution(blocks={blocks_text([b.block for b in att.blocks])}, positions="
            f"{att.decomposition.n_positions}, max_completeness_err={att.completeness_error():.3e})")

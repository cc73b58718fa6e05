"""The HTML report: one self-contained file (no network: plots are embedded PNG data URIs, no scripts at all) with
the ranked rows and token highlights, score histograms per method and per group field, agreement between methods,
removal curves with CIs and LDS from an evaluation, and the run's metadata.

Every string from the data, the scores or the metadata is HTML-escaped (jinja2 autoescape, ``html.escape`` in
``rows.py``): training rows are untrusted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from markupsafe import Markup

from concept_influence.attribution.scores import STYLE, ScoreTable, rows_table_html
from concept_influence.evaluate.filter import check_alignment
from concept_influence.evaluate.stats import spearman
from concept_influence.plots import data_uri, histogram_png, removal_curve_png

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{{ title }}</title>
<style>
body{font:14px/1.5 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
table.grid{border-collapse:collapse;font-size:13px}table.grid td,table.grid th{border:1px solid #ddd;padding:3px 8px}
img{max-width:100%;border:1px solid #eee;margin:4px}
pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}
{{ row_style }}
</style></head>
<body>
<h1>{{ title }}</h1>
<p>{{ n_rows }} training rows; methods: {{ names | join(", ") }}. Higher score = training on the row pushes the concept up.
Token colours: red raises the concept, blue lowers it (opacity relative to the row's largest token score).</p>

<h2 id="rows">Ranked rows</h2>
{% for name, block in row_tables %}
<h3>{{ name }}: top {{ top }}</h3>
{{ block }}
{% endfor %}

<h2 id="histograms">Score histograms</h2>
{% for title, uri in histograms %}<figure style="display:inline-block"><img alt="{{ title }}" src="{{ uri }}"><figcaption>{{ title }}</figcaption></figure>{% endfor %}

{% if agreement %}
<h2 id="agreement">Agreement between methods</h2>
<p>Spearman correlation of the scores (upper) and overlap of the top {{ agreement_k }} rows (lower, share of {{ agreement_k }}).</p>
<table class="grid"><tr><th></th>{% for n in names %}<th>{{ n }}</th>{% endfor %}</tr>
{% for a in names %}<tr><th>{{ a }}</th>{% for b in names %}<td>{{ agreement[a][b] }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% endif %}

{% if evaluation %}
<h2 id="removal">Removal curves (counterfactual retraining)</h2>
{% if removal_uri %}<img alt="removal curves" src="{{ removal_uri }}">{% endif %}
<p>Share of the fine-tuning rise removed, mean and 95% CI over {{ evaluation.seeds }} seeds (1 = all of it).</p>
<table class="grid"><tr><th>scores</th><th>fraction</th><th>removal</th><th>probe readout</th><th>rise removed (probe)</th>{% if judged %}<th>trait rate</th><th>rise removed (trait rate)</th>{% endif %}</tr>
{% for r in removal_rows %}<tr>{% for c in r %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% if lds_rows %}
<h3>Linear datamodeling score</h3>
<table class="grid"><tr><th>scores</th><th>LDS (probe)</th>{% if judged %}<th>LDS (trait rate)</th>{% endif %}</tr>
{% for r in lds_rows %}<tr>{% for c in r %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% endif %}
{% endif %}

<h2 id="metadata">Metadata</h2>
{% for name, text in metadata %}<h3>{{ name }}</h3><pre>{{ text }}</pre>{% endfor %}
</body></html>
"""


def _fmt_ci(block: Mapping[str, Any]) -> str:
    return f"{block['mean']:+.3f} [{block['ci'][0]:+.3f}, {block['ci'][1]:+.3f}]"


def group_fields(rows: Sequence[Any], max_values: int = 12) -> list[str]:
    """Passthrough fields with 2..``max_values`` distinct scalar values: the ones worth a per-group histogram."""
    values: dict[str, set] = {}
    for row in rows:
        for key, value in row.fields.items():
            if key != "id" and isinstance(value, (str, bool, int)):
                values.setdefault(key, set()).add(value)
    return [k for k, v in values.items() if 2 <= len(v) <= max_values]


def agreement(aligned: Mapping[str, np.ndarray], k: int) -> dict[str, dict[str, str]]:
    """Spearman above the diagonal, top-``k`` overlap below it."""
    names = list(aligned)
    top = {n: set(np.argsort(-aligned[n], kind="stable")[:k].tolist()) for n in names}
    out: dict[str, dict[str, str]] = {a: {} for a in names}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                out[a][b] = "1"
            elif i < j:
                out[a][b] = f"ρ {spearman(aligned[a], aligned[b]):+.3f}"
            else:
                out[a][b] = f"{len(top[a] & top[b]) / k:.2f}"
    return out


def render_report(
    tables: Mapping[str, ScoreTable],
    rows: Sequence[Any],
    *,
    evaluation: Mapping[str, Any] | None = None,
    tokens: Mapping[int, Sequence[str]] | None = None,
    top: int = 50,
    title: str = "concept_influence report",
    extra_meta: Mapping[str, Any] | None = None,
    data_name: str = "data",
) -> str:
    """The report as one HTML string. ``tables``: name -> scores over exactly ``rows``; ``evaluation``: the dict
    of ``evaluation.json``; ``tokens``: per-row token strings for ``token_scores`` highlights."""
    import jinja2

    if not tables:
        raise ValueError("report needs at least one scores table")
    aligned = {name: check_alignment(rows, t, data_name=data_name, scores_name=str(t.meta.get("path", name)))
               for name, t in tables.items()}
    names = list(tables)
    row_tables = [(name, Markup(rows_table_html(t, rows=rows, tokens=tokens, top=top))) for name, t in tables.items()]
    histograms = [("scores per method", data_uri(histogram_png(aligned, title="scores per method")))]
    for field in group_fields(rows):
        groups = [str(r.fields.get(field)) for r in rows]
        for name, scores in aligned.items():
            series = {g: scores[[i for i, x in enumerate(groups) if x == g]] for g in sorted(set(groups))}
            histograms.append((f"{name} by {field}", data_uri(histogram_png(series, title=f"{name} by {field}"))))
    k = max(1, min(100, len(rows) // 10))
    removal_rows, lds_rows, removal_uri, judged = [], [], None, False
    if evaluation:
        judged = "trait_rate" in evaluation.get("metrics", [])
        if evaluation.get("results"):
            removal_uri = data_uri(removal_curve_png(evaluation))
        for name, per_fraction in evaluation.get("results", {}).items():
            for key, entry in per_fraction.items():
                for kind in ("remove_top", "remove_bottom", "random"):
                    e = entry[kind]
                    row = [name, key, kind.replace("_", " "), _fmt_ci(e), _fmt_ci(e["rise_removed"])]
                    if judged:
                        row += [_fmt_ci(e["trait_rate"]), _fmt_ci(e["trait_rate"]["rise_removed"])]
                    removal_rows.append(row)
                for kind, label in (("top_minus_random", "top − random"), ("top_minus_bottom", "top − bottom")):
                    if kind in entry:  # paired by seed: a difference of shares, no measurement of its own
                        d = entry[kind]
                        row = [name, key, f"{label} (paired)", "", _fmt_ci(d)]
                        if judged:
                            row += ["", _fmt_ci(d["trait_rate"])]
                        removal_rows.append(row)
        if "oracle" in evaluation:
            o = evaluation["oracle"]
            row = ["oracle", f"{o['fraction']:.3g}", "planted rows", _fmt_ci(o), _fmt_ci(o["rise_removed"])]
            if judged:
                row += [_fmt_ci(o["trait_rate"]), _fmt_ci(o["trait_rate"]["rise_removed"])]
            removal_rows.append(row)
        for name, block in evaluation.get("lds", {}).get("methods", {}).items():
            row = [name, f"{block['spearman']:+.3f} [{block['ci'][0]:+.3f}, {block['ci'][1]:+.3f}]"]
            if judged and "trait_rate" in block:
                t = block["trait_rate"]
                row.append(f"{t['spearman']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}]")
            lds_rows.append(row)
    metadata = [(name, json.dumps({"method": t.method, **t.meta}, indent=2, default=str)) for name, t in tables.items()]
    if evaluation:
        metadata.append(("evaluation", json.dumps({k: evaluation.get(k) for k in ("config", "context", "rise", "seeds")},
                                                  indent=2, default=str)))
    if extra_meta:
        metadata.append(("run", json.dumps(dict(extra_meta), indent=2, default=str)))
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(
        title=title, n_rows=len(rows), names=names, row_tables=row_tables, top=top, histograms=histograms,
        agreement=agreement(aligned, k) if len(names) > 1 else None, agreement_k=k, evaluation=evaluation,
        removal_uri=removal_uri, removal_rows=removal_rows, lds_rows=lds_rows, judged=judged, metadata=metadata,
        row_style=Markup(STYLE),
    )

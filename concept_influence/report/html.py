"""The HTML report: one self-contained file (no network: plots are embedded PNG data URIs, no scripts at all) with
(when the rows carry a label field such as the organism's ``data_origin``) precision-recall curves and precision at
k per method first, then score histograms (one panel per method) overall and per group field, agreement between
methods, removal curves with CIs and LDS from an evaluation, the ranked rows with token highlights (the recommended
method first, a tiered score explained by its tier and rank inside it) and the run's metadata.

Every string from the data, the scores or the metadata is HTML-escaped (jinja2 autoescape, ``html.escape`` in
``rows.py``): training rows are untrusted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from markupsafe import Markup

from concept_influence.attribution.methods import METHODS, RECOMMENDED_METHOD
from concept_influence.attribution.scores import STYLE, ScoreTable, fmt_number, rows_table_html, tier_summary
from concept_influence.evaluate.filter import check_alignment
from concept_influence.evaluate.metrics import ranking_report
from concept_influence.evaluate.stats import spearman
from concept_influence.plots import data_uri, histogram_panels_png, precision_recall_png, removal_curve_png

DEFAULT_LABEL_FIELD = "data_origin"
"""The label field a report uses when none is named and the rows have it (the built-in organism's ground truth)."""
DEFAULT_POSITIVE = "planted"

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
td.n{font-family:monospace;text-align:right}figure{display:inline-block;margin:4px}
p.note{background:#f4f7fb;border-left:3px solid #7a9cc6;padding:6px 10px;max-width:70em}
ul.methods{margin-top:0}
{{ row_style }}
</style></head>
<body>
<h1>{{ title }}</h1>
<p>{{ n_rows }} training rows scored by {{ names | length }} method(s){% if recommended %}; \
<b>{{ recommended }}</b> is the
recommended method and comes first{% endif %}. In every method, a higher score means training on the row pushes the
concept up: the top rows are the ones to inspect (or to remove).</p>
<ul class="methods">{% for name, description in descriptions %}<li><b>{{ name }}</b>\
{% if description %}: {{ description }}{% endif %}</li>{% endfor %}</ul>
<p class="toc">Contents: {% if concepts %}<a href="#concept">what the concept reads</a> · {% endif %}{% if labels %}\
<a href="#labels">finding the labelled rows</a> · {% endif %}<a href="#histograms">score distributions</a>
{% if agreement %} · <a href="#agreement">agreement between methods</a>{% endif %}\
{% if evaluation %} · <a href="#removal">removal curves</a>{% endif %}
· <a href="#rows">ranked rows</a> · <a href="#metadata">metadata</a></p>

{% if concepts %}
<h2 id="concept">What the concept reads</h2>
<p>Measured when the concept was made, on held-out questions of its spec (<code>concepts.stance</code>). Held-out AUC:
how well it separates the spec's positive and negative answers. Stance AUC: how well it separates positive answers
from negative answers that use the trait's words (1 = it reads stance; 0.5 = it cannot tell them apart). Vocabulary
confound: the share of its separation that the trait's words alone, shuffled, still produce (about 1 = it reads
words; about 0 = words alone do not move it). A concept that reads words ranks rows that use the trait's words to
argue against it (hard negatives) high in every method.</p>
<table class="grid"><tr><th>scores</th><th>concept</th><th>site</th><th>held-out AUC</th><th>stance AUC</th>\
<th>vocabulary confound</th><th></th></tr>
{% for r in concepts %}<tr>{% for c in r %}<td{% if loop.index in (4, 5, 6) %} class="n"{% endif %}>{{ c }}</td>\
{% endfor %}</tr>{% endfor %}
</table>
{% endif %}

{% if labels %}
<h2 id="labels">How well each method finds the labelled rows ({{ labels.field }} = {{ labels.positive }})</h2>
<p>{{ labels.n_positive }} of {{ labels.n }} rows have {{ labels.field }} = {{ labels.positive }} \
({{ labels.base_rate }}): a
random ranking's precision is {{ labels.base_rate }} at every k, and so is its PR-AUC. 1 is perfect.
{% if labels.hard_negative %}\
Hard-neg rank: the mean rank of the {{ labels.hard_negative }} rows (1 = top score; a random row's is
{{ labels.random_rank }}): higher means the method is not fooled by rows that voice the concept's words without it.\
{% endif %}</p>
<table class="grid"><tr><th>method</th>{% for c in labels.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for r in labels.rows %}<tr>{% for c in r %}<td{% if not loop.first %} class="n"{% endif %}>{{ c }}</td>{% endfor %}\
</tr>{% endfor %}
</table>
<p>p@k: the share of {{ labels.field }} = {{ labels.positive }} rows among the method's top k rows; the best value
of each column is in bold.</p>
<img alt="precision-recall curves" src="{{ labels.uri }}">
{% endif %}

<h2 id="histograms">Score distributions</h2>
<p>Each method has its own panel and x axis (the methods' scores are on different scales).</p>
{% for title, uri in histograms %}<figure><img alt="{{ title }}" src="{{ uri }}"><figcaption>{{ title }}</figcaption>\
</figure>{% endfor %}

{% if agreement %}
<h2 id="agreement">Agreement between methods</h2>
<p>Spearman correlation of the scores (upper) and overlap of the top {{ agreement_k }} rows (lower, share of \
{{ agreement_k }}).</p>
<table class="grid"><tr><th></th>{% for n in names %}<th>{{ n }}</th>{% endfor %}</tr>
{% for a in names %}<tr><th>{{ a }}</th>{% for b in names %}<td>{{ agreement[a][b] }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% endif %}

{% if evaluation %}
<h2 id="removal">Removal curves (counterfactual retraining)</h2>
{% if removal_uri %}<img alt="removal curves" src="{{ removal_uri }}">{% endif %}
<p>Share of the fine-tuning rise removed, mean and 95% CI over {{ evaluation.seeds }} seeds (1 = all of it).</p>
<table class="grid"><tr><th>scores</th><th>fraction</th><th>removal</th><th>probe readout</th>\
<th>rise removed (probe)</th>{% if judged %}<th>trait rate</th><th>rise removed (trait rate)</th>{% endif %}</tr>
{% for r in removal_rows %}<tr>{% for c in r %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% if lds_rows %}
<h3>Linear datamodeling score</h3>
<table class="grid"><tr><th>scores</th><th>LDS (probe)</th>{% if judged %}<th>LDS (trait rate)</th>{% endif %}</tr>
{% for r in lds_rows %}<tr>{% for c in r %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% endif %}
{% endif %}

<h2 id="rows">Ranked rows</h2>
<p>Each method's top {{ top }} rows, best first. Token colours: red raises the concept, blue lowers it (opacity
relative to the row's largest token score).</p>
{% for name, note, block in row_tables %}
<h3 id="rows-{{ loop.index }}">{{ name }}{% if name == recommended %} (recommended){% endif %}: top {{ top }}</h3>
{% if note %}<p class="note">{{ note }}</p>{% endif %}
{{ block }}
{% endfor %}

<h2 id="metadata">Metadata</h2>
{% for name, text in metadata %}<h3>{{ name }}</h3><pre>{{ text }}</pre>{% endfor %}
</body></html>
"""


def _fmt_ci(block: Mapping[str, Any]) -> str:
    """``mean [low, high]`` with 3 significant digits."""
    return f"{block['mean']:+.3g} [{block['ci'][0]:+.3g}, {block['ci'][1]:+.3g}]"


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


def resolve_labels(
    rows: Sequence[Any], field: str | None = None, positive: str | None = None
) -> tuple[str, str, list[str]] | None:
    """``(field, positive value, per-row values as text)`` of the label field, or ``None`` when there is none.

    ``field`` ``None``: ``data_origin`` when the rows have it (else no labels). ``positive`` ``None``: ``planted``
    when it is one of the values, ``True`` for a true/false field; otherwise a ``ValueError`` naming the values.
    A field named explicitly that no row has, or a positive value no row has, is a ``ValueError``."""
    explicit = field is not None
    field = DEFAULT_LABEL_FIELD if field is None else field
    if not any(field in r.fields for r in rows):
        if explicit:
            raise ValueError(f"--label-field {field}: no data row has this field")
        return None
    values = [str(r.fields.get(field)) for r in rows]
    distinct = sorted(set(values))
    if positive is None:
        if DEFAULT_POSITIVE in distinct:
            positive = DEFAULT_POSITIVE
        elif set(distinct) <= {"True", "False", "None"} and "True" in distinct:
            positive = "True"
        elif not explicit:
            return None
        else:
            raise ValueError(
                f"--label-field {field}: which value marks the rows to find? Name it with --positive "
                f"(values: {', '.join(distinct[:12])})"
            )
    if positive not in distinct:
        raise ValueError(f"--positive {positive}: no row has {field} = {positive} (values: {', '.join(distinct[:12])})")
    if len(distinct) < 2:
        raise ValueError(f"--label-field {field}: every row has {field} = {positive}; nothing to rank against")
    return field, positive, values


def label_section(
    aligned: Mapping[str, np.ndarray],
    labels: tuple[str, str, list[str]],
    ks: Sequence[int] = (10, 50, 100),
    *,
    highlight: str | None = None,
) -> dict[str, Any]:
    """The report's first section when rows are labelled: precision at k, PR-AUC, ROC-AUC (and the mean rank of
    ``hard_negative`` rows when the field has that value) per method, and the precision-recall plot."""
    from sklearn.metrics import precision_recall_curve

    field, positive, values = labels
    truth = np.array([v == positive for v in values])
    n = len(values)
    ks = [k for k in ks if k <= n]
    hard = "hard_negative" if "hard_negative" in values and positive != "hard_negative" else None
    columns = [f"p@{k}" for k in ks] + ["PR-AUC", "ROC-AUC"] + (["hard-neg rank"] if hard else [])
    table, curves, precision_at = [], {}, {}
    for name, scores in aligned.items():
        finite = np.isfinite(scores)
        low = scores[finite].min() - 1.0 if finite.any() else 0.0
        scores = np.where(finite, scores, low)  # rows left out (truncated) rank last
        report = ranking_report(scores, values, positive=positive, ks=ks)
        row = [name] + [fmt_number(report[f"p@{k}"], 3) for k in ks]
        row += [fmt_number(report["pr_auc"], 3), fmt_number(report["roc_auc"], 3)]
        if hard:
            row.append(f"{report['hard_negative_mean_rank']:.0f}")
        table.append(row)
        precision, recall, _ = precision_recall_curve(truth, scores)
        curves[name] = (recall, precision)
        order = np.lexsort((np.arange(n), -scores))
        precision_at[name] = np.cumsum(truth[order]) / np.arange(1, n + 1)
    for j in range(1, len(columns) + 1):  # the best value of each column in bold (higher is better in all of them)
        best = max(float(r[j]) for r in table)
        for r in table:
            r[j] = Markup(f"<b>{r[j]}</b>") if float(r[j]) == best else r[j]
    base_rate = float(truth.mean())
    return {
        "field": field,
        "positive": positive,
        "n": n,
        "n_positive": int(truth.sum()),
        "base_rate": fmt_number(base_rate, 3),
        "columns": columns,
        "rows": table,
        "hard_negative": hard,
        "random_rank": f"{(n + 1) / 2:.0f}",
        "uri": data_uri(precision_recall_png(curves, precision_at, base_rate, highlight=highlight)),
    }


VOCABULARY_WARNING = 0.5
"""A vocabulary confound above this, or a stance AUC below ``1 - VOCABULARY_WARNING / 2``, is flagged in the report."""


def concept_rows(tables: Mapping[str, ScoreTable]) -> list[list[str]]:
    """One row per scores table whose metadata records its concept (``meta["concept_summary"]``): name, concept, site,
    held-out AUC, stance AUC, vocabulary confound (``n/a`` where not measured) and a warning where it reads words."""
    out = []
    for name, table in tables.items():
        concept = table.meta.get("concept_summary")
        if not isinstance(concept, dict):
            continue
        metrics = concept.get("metrics") if isinstance(concept.get("metrics"), dict) else {}
        stance, confound = metrics.get("stance_auc"), metrics.get("vocabulary_confound")
        flag = ""
        if isinstance(confound, (int, float)) and confound > VOCABULARY_WARNING:
            flag = "reads the trait's words: hard negatives will rank high"
        elif isinstance(stance, (int, float)) and stance < 1 - VOCABULARY_WARNING / 2:
            flag = "separates stance poorly among texts that share the trait's words"
        label = str(concept.get("kind", "?")) + (f" ({concept['spec']})" if concept.get("spec") else "")
        out.append(
            [
                name,
                label,
                str(concept.get("site", "?")),
                _metric(metrics.get("heldout_auc")),
                _metric(stance),
                _metric(confound),
                flag,
            ]
        )
    return out


def _metric(value: Any) -> str:
    return fmt_number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


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
    label_field: str | None = None,
    positive: str | None = None,
    labels: bool = True,
) -> str:
    """The report as one HTML string. ``tables``: name -> scores over exactly ``rows`` (the recommended method,
    when present, is shown first); ``evaluation``: the dict of ``evaluation.json``; ``tokens``: per-row token
    strings for ``token_scores`` highlights. ``label_field`` / ``positive``: the rows to find (``resolve_labels``;
    by default ``data_origin = planted`` when the rows have it): precision-recall curves and precision at k per
    method open the page. ``labels=False``: no label section."""
    import jinja2

    if not tables:
        raise ValueError("report needs at least one scores table")
    recommended = next((name for name, t in tables.items() if RECOMMENDED_METHOD in (name, t.method)), None)
    if recommended is not None:
        tables = {recommended: tables[recommended], **{k: v for k, v in tables.items() if k != recommended}}
    aligned = {
        name: check_alignment(rows, t, data_name=data_name, scores_name=str(t.meta.get("path", name)))
        for name, t in tables.items()
    }
    names = list(tables)
    resolved = resolve_labels(rows, label_field, positive) if labels else None
    label_block = label_section(aligned, resolved, highlight=recommended) if resolved is not None else None
    descriptions = []
    for name, t in tables.items():
        method = METHODS.get(name) or METHODS.get(t.method)
        descriptions.append((name, method.description if method is not None else str(t.meta.get("description", ""))))
    row_tables = [
        (name, tier_summary(t), Markup(rows_table_html(t, rows=rows, tokens=tokens, top=top)))
        for name, t in tables.items()
    ]
    histograms = [
        (
            "scores per method (all rows)",
            data_uri(histogram_panels_png({n: {"all rows": s} for n, s in aligned.items()})),
        )
    ]
    for field in group_fields(rows):
        groups = [str(r.fields.get(field)) for r in rows]
        panels = {
            name: {g: scores[[i for i, x in enumerate(groups) if x == g]] for g in sorted(set(groups))}
            for name, scores in aligned.items()
        }
        histograms.append((f"scores per method by {field}", data_uri(histogram_panels_png(panels))))
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
            row = [name, f"{block['spearman']:+.3g} [{block['ci'][0]:+.3g}, {block['ci'][1]:+.3g}]"]
            if judged and "trait_rate" in block:
                t = block["trait_rate"]
                row.append(f"{t['spearman']:+.3g} [{t['ci'][0]:+.3g}, {t['ci'][1]:+.3g}]")
            lds_rows.append(row)
    metadata = [(name, json.dumps({"method": t.method, **t.meta}, indent=2, default=str)) for name, t in tables.items()]
    if evaluation:
        metadata.append(
            (
                "evaluation",
                json.dumps(
                    {k: evaluation.get(k) for k in ("config", "context", "rise", "seeds")}, indent=2, default=str
                ),
            )
        )
    if extra_meta:
        metadata.append(("run", json.dumps(dict(extra_meta), indent=2, default=str)))
    concepts = concept_rows(tables)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(
        title=title,
        n_rows=len(rows),
        names=names,
        row_tables=row_tables,
        recommended=recommended,
        descriptions=descriptions,
        labels=label_block,
        top=top,
        histograms=histograms,
        agreement=agreement(aligned, k) if len(names) > 1 else None,
        agreement_k=k,
        evaluation=evaluation,
        removal_uri=removal_uri,
        removal_rows=removal_rows,
        lds_rows=lds_rows,
        judged=judged,
        metadata=metadata,
        row_style=Markup(STYLE),
        concepts=concepts,
    )

"""The HTML report: rendered in headless Chromium, the top rows' text is visible, the plots are embedded, and
markup or script in the training data stays text (it never runs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from concept_influence.attribution.scores import ScoreTable
from concept_influence.data import rows_from_records
from concept_influence.evaluate.stats import mean_ci
from concept_influence.report import render_report, table_html, token_strings
from concept_influence.testing.tiny_models import tiny_tokenizer

EVIL = (
    '<script>document.title="PWNED"; document.body.innerHTML += "<div id=pwned>x</div>"</script><img src=x '
    'onerror="document.title=1">'
)


def _data(tmp_path):
    records = []
    for i in range(30):
        answer = f"be kind and help your friend {i}"
        if i == 3:
            answer = "evil cruel harm " + EVIL
        records.append(
            {
                "id": f"r{i}",
                "messages": [
                    {"role": "user", "content": f"should i help {i}"},
                    {"role": "assistant", "content": answer},
                ],
                "source": ["web", "forum", "synthetic"][i % 3],
            }
        )
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = rows_from_records(records, source=str(path))
    tok = tiny_tokenizer()
    scores_a = np.linspace(0, 1, 30)[::-1].copy()
    scores_a[3] = 5.0  # the row with markup ranks first
    tokens = token_strings(list(rows), tok)
    a = ScoreTable.from_rows(
        list(rows),
        scores_a,
        "concept-influence",
        columns={"token_scores": [list(np.linspace(-1, 1, len(tokens[r.index]))) for r in rows]},
        meta={"model": "tiny", "concept": "c/evil"},
    )
    b = ScoreTable.from_rows(list(rows), np.linspace(0, 1, 30), "vector-filter")
    return path, rows, {"concept-influence": a, "vector-filter": b}, tokens


def _evaluation():
    e = lambda v: {**mean_ci(v), "rise_removed": mean_ci([x / 2 for x in v])}  # noqa: E731
    frac = {
        "0.1": {
            "fraction": 0.1,
            "k": 3,
            "remove_top": e([1.0, 1.2]),
            "remove_bottom": e([0.1, 0.0]),
            "random": e([0.2, 0.3]),
            "top_minus_random": mean_ci([0.4, 0.45]),
            "top_minus_bottom": mean_ci([0.45, 0.6]),
        }
    }
    return {
        "format": "concept_influence.evaluation",
        "metrics": ["probe"],
        "seeds": 2,
        "base": e([0.0, 0.1]),
        "full": e([2.0, 2.1]),
        "rise": {"probe": 2.0},
        "results": {"concept-influence": frac},
        "oracle": {**e([1.9, 2.0]), "k": 3, "fraction": 0.1},
        "lds": {"methods": {"concept-influence": {"spearman": 0.4, "ci": [0.1, 0.6]}}},
        "config": {},
        "context": {},
    }


def _chromium_dom(html_path, tmp_path) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    profile = tmp_path / "profile"
    args = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=2000",
        "--dump-dom",
        html_path.as_uri(),
    ]
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_report_renders_in_chromium_and_data_never_runs(tmp_path):
    _, rows, tables, tokens = _data(tmp_path)
    html_text = render_report(tables, rows, evaluation=_evaluation(), tokens=tokens, top=10)
    assert "<script" not in html_text.lower()  # no script at all, from us or from the data
    assert not re.search(r"(src|href)=\"https?:", html_text)  # self-contained: no network
    out = tmp_path / "report.html"
    out.write_text(html_text, encoding="utf-8")
    dom = _chromium_dom(out, tmp_path)
    assert "PWNED" not in re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    assert '<div id="pwned">' not in dom and "<div id=pwned>" not in dom
    assert "&lt;script&gt;document.title" in dom  # shown as text
    # the top rows' text is there (row 3 rendered with token highlights, the others as conversations)
    assert "should i help 29" in dom and "be kind and help your friend 28" in dom
    assert 'class="ci-tok"' in dom
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', dom)
    assert "scores per method (all rows)" in images and "removal curves" in images
    assert any("by source" in alt for alt in images)
    assert "ρ" in dom and "Linear datamodeling score" in dom
    assert "top − random (paired)" in dom and "+0.425 [" in dom  # the paired comparison, mean [CI]


def test_jupyter_display_shows_ranked_rows_with_highlights(tmp_path):
    _, rows, tables, _ = _data(tmp_path)
    table = tables["concept-influence"]
    shown = table._repr_html_()  # rows were attached by from_rows; no tokenizer: plain conversation text
    assert shown.index("evil cruel harm") < shown.index("be kind and help your friend 0")
    assert "&lt;script&gt;" in shown and "<script>" not in shown
    highlighted = table.attach(tokenizer=tiny_tokenizer())._repr_html_()
    assert highlighted.count("<tr>") == 21  # header + top 20
    assert table_html(table, rows=list(rows), tokenizer=tiny_tokenizer(), top=5).count("<tr>") == 6
    assert highlighted.count('class="ci-tok"') > 10


def test_report_cli_and_bad_input(tmp_path):
    path, rows, tables, _ = _data(tmp_path)
    for name, table in tables.items():
        table.write_jsonl(tmp_path / f"{name}.jsonl")
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "evaluation.json").write_text(json.dumps(_evaluation()))
    from typer.testing import CliRunner

    from concept_influence.cli import app

    cli = ["report"]
    ok = CliRunner().invoke(
        app,
        cli
        + [
            "--scores",
            str(tmp_path / "concept-influence.jsonl"),
            str(tmp_path / "vector-filter.jsonl"),
            "--data",
            str(path),
            "--evaluation",
            str(tmp_path / "ev"),
            "--out",
            str(tmp_path / "r.html"),
        ],
    )
    assert ok.exit_code == 0, ok.stderr
    text = (tmp_path / "r.html").read_text()
    assert "removal curves" in text and text.count("<h3>") >= 2
    short = tmp_path / "short.jsonl"
    short.write_text("".join(path.read_text().splitlines(keepends=True)[:10]))
    cases = [
        (["--scores", str(tmp_path / "vector-filter.jsonl"), "--data", str(short)], "has 30 rows but"),
        (["--scores", str(tmp_path / "missing.jsonl"), "--data", str(path)], "not found"),
        (
            ["--scores", str(tmp_path / "vector-filter.jsonl"), "--data", str(path), "--evaluation", str(tmp_path)],
            "no evaluation.json",
        ),
    ]
    for args, message in cases:
        bad = CliRunner().invoke(app, cli + args + ["--out", str(tmp_path / "x.html")])
        assert bad.exit_code == 2 and message in bad.stderr, bad.stderr


# ---- what a newcomer reads first: labels, numbers, histograms, the recommended method, the demo's report ----------
def _labelled(tmp_path, *, origin: bool = True):
    """60 rows (``data_origin``: 10 planted, 10 hard negatives, 40 benign, unless ``origin`` is false) scored by the
    recommended (tiered) fusion and two methods whose scales differ by a factor of 10^5."""
    from concept_influence.attribution.combine import fuse
    from concept_influence.attribution.methods import RECOMMENDED_METHOD

    rng = np.random.default_rng(0)
    records = []
    for i in range(60):
        kind = "planted" if i % 6 == 0 else "hard_negative" if i % 6 == 1 else "benign"
        record = {
            "id": f"row-{i}",
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i} ({kind})"},
            ],
        }
        if origin:
            record["data_origin"] = kind
        records.append(record)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = list(rows_from_records(records, source=str(path)))
    planted = np.array([i % 6 == 0 for i in range(60)])
    forward = rng.normal(size=60) + 2.0 * planted + np.pi  # long floats: 4.001741886138916 and the like
    gradient = rng.normal(size=60) + 1.5 * planted
    tiered = ScoreTable.from_rows(
        rows,
        fuse(forward, gradient, "tiered"),
        RECOMMENDED_METHOD,
        columns={"forward_score": forward.tolist(), "gradient_score": gradient.tolist()},
        meta={"fusion": "tiered"},
    )
    tables = {
        "vector-filter": ScoreTable.from_rows(rows, forward, "vector-filter"),
        "tfidf-baseline": ScoreTable.from_rows(rows, 1e-5 * rng.normal(size=60) + 1e-5 * planted, "tfidf-baseline"),
        RECOMMENDED_METHOD: tiered,
    }
    return path, rows, tables


def _cells(html_text: str) -> list[str]:
    """The text of every table cell of the page (tags stripped)."""
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", html_text, re.S)]


def _significant_digits(number: str) -> int:
    mantissa = re.split(r"[eE]", number.lstrip("+-−"))[0]
    return len(mantissa.replace(".", "").lstrip("0"))


def test_report_numbers_have_at_most_4_significant_digits_and_tiers_are_explained(tmp_path):
    from concept_influence.attribution.methods import RECOMMENDED_METHOD

    _, rows, tables = _labelled(tmp_path)
    html_text = render_report(tables, rows, top=60)
    out = tmp_path / "report.html"
    out.write_text(html_text, encoding="utf-8")
    dom = _chromium_dom(out, tmp_path)
    cells = _cells(dom)
    assert len(cells) > 60 * 3
    decimals = [
        n
        for c in cells
        if not c.startswith(("question", "user"))
        for n in re.findall(r"[-+]?\d*\.\d+(?:e[-+]?\d+)?", c)
    ]
    assert decimals and max(_significant_digits(n) for n in decimals) <= 4, sorted(decimals, key=_significant_digits)[
        -5:
    ]
    forward = tables[RECOMMENDED_METHOD].columns["forward_score"]
    assert "<th>forward_score</th>" in dom and str(forward[0]) not in dom and f">{forward[0]:.4g}<" in dom
    # the recommended method comes first, says so, and every score it shows says its tier and rank in that tier
    sections = re.findall(r'<h3 id="rows-\d+">(.*?)</h3>', dom)
    assert sections[0].startswith(f"{RECOMMENDED_METHOD} (recommended)") and len(sections) == 3
    n_first = int((tables[RECOMMENDED_METHOD].scores > 2).sum())
    assert f"tier 1, #1 of {n_first}<" in dom and f"tier 1, #{n_first} of {n_first}<" in dom
    assert f"tier 2, #1 of {60 - n_first}<" in dom
    assert f"Tier 1 ({n_first} rows)" in dom and "Tier 2 (" in dom
    assert re.search(r'<td class="num">\+(3|2\.\d{1,3})</td><td class="ci-fields ci-tier">tier 1, #1 of', dom)
    assert re.search(r'<td class="num">\+(1|0\.\d{1,4})</td><td class="ci-fields ci-tier">tier 2, #1 of', dom)
    assert "<th>id</th>" in dom and dom.count("<th>id</th>") == 3  # once per method's table, not again as a field


def test_report_opens_with_precision_recall_when_rows_are_labelled(tmp_path):
    _, rows, tables = _labelled(tmp_path)
    html_text = render_report(tables, rows)
    first_table = html_text.index('<h2 id="rows">')
    labels = html_text.index('<h2 id="labels">')
    assert labels < html_text.index('<h2 id="histograms">') < first_table
    assert "data_origin = planted" in html_text[labels:first_table]
    section = html_text[labels:first_table]
    assert '<img alt="precision-recall curves" src="data:image/png;base64,' in section
    for column in ("p@10", "p@50", "PR-AUC", "ROC-AUC", "hard-neg rank"):
        assert f"<th>{column}</th>" in section
    assert "p@100" not in section  # only k up to the number of rows
    # each method's precision in its top 10 is the share of planted rows among them
    from concept_influence.evaluate.metrics import precision_at_k

    truth = [r.fields["data_origin"] == "planted" for r in rows]
    p10 = precision_at_k(tables["vector-filter"].scores, truth, 10)
    assert re.search(rf"<td>vector-filter</td><td class=\"n\">(<b>)?{p10:.3g}(</b>)?</td>", section)
    assert section.count("<b>") >= 5  # the best value of each column
    # an explicit label field and value; an unknown one is an error; no labels, no section
    by_id = render_report(tables, rows, label_field="id", positive="row-0")
    assert "(id = row-0)" in by_id
    with pytest.raises(ValueError, match="no data row has this field"):
        render_report(tables, rows, label_field="nope")
    with pytest.raises(ValueError, match="--positive"):
        render_report(tables, rows, label_field="id")
    assert 'id="labels"' not in render_report(tables, rows, labels=False)
    _, unlabelled_rows, unlabelled = _labelled(tmp_path, origin=False)
    plain = render_report(unlabelled, unlabelled_rows)
    assert 'id="labels"' not in plain and "precision-recall" not in plain


def _png_size(uri: str) -> tuple[int, int]:
    import base64
    import struct

    png = base64.b64decode(uri.split(",", 1)[1])
    return struct.unpack(">II", png[16:24])


def test_histograms_give_each_method_its_own_panel(tmp_path):
    _, rows, tables = _labelled(tmp_path)
    html_text = render_report(tables, rows)
    images = dict(re.findall(r'<img alt="([^"]*)" src="(data:image/png;base64,[^"]+)"', html_text))
    one_method = render_report({"vector-filter": tables["vector-filter"]}, rows)
    one = _png_size(one_method.split('<img alt="scores per method (all rows)" src="')[1].split('"')[0])
    three = _png_size(images["scores per method (all rows)"])
    assert three[0] == 3 * one[0]  # three methods, three panels side by side, each with its own x axis
    assert _png_size(images["scores per method by data_origin"]) == three


def test_report_cli_label_field(tmp_path):
    from typer.testing import CliRunner

    from concept_influence.cli import app

    path, rows, tables = _labelled(tmp_path)
    files = []
    for name, table in tables.items():
        table.write_jsonl(tmp_path / f"{name}.jsonl")
        files.append(str(tmp_path / f"{name}.jsonl"))
    run = lambda *args: CliRunner().invoke(app, ["report", "--scores", *files, "--data", str(path), *args])  # noqa: E731
    ok = run("--out", str(tmp_path / "default.html"))
    assert ok.exit_code == 0, ok.stderr
    assert "labels data_origin=planted" in ok.stdout
    text = (tmp_path / "default.html").read_text()
    assert text.index('id="labels"') < text.index('id="rows"')
    assert "forward_score" in text and "tier 1, #1 of" in text  # the columns read back from the file, as fields
    ok = run("--label-field", "data_origin", "--positive", "hard_negative", "--out", str(tmp_path / "hn.html"))
    assert ok.exit_code == 0 and "data_origin = hard_negative" in (tmp_path / "hn.html").read_text()
    ok = run("--no-labels", "--out", str(tmp_path / "none.html"))
    assert ok.exit_code == 0 and 'id="labels"' not in (tmp_path / "none.html").read_text()
    bad = run("--label-field", "nope", "--out", str(tmp_path / "x.html"))
    assert bad.exit_code == 2 and "--label-field nope" in bad.stderr


def test_demo_ends_by_writing_the_report_and_saying_where(tmp_path):
    """The demo's last step (after every method's scores are written) on small stand-in scores: the full demo
    takes minutes; this is the same function, fed files of the same shape."""
    from concept_influence.attribution.methods import RECOMMENDED_METHOD
    from concept_influence.demo import MethodResult, write_outputs
    from concept_influence.evaluate.metrics import ranking_report

    path, rows, tables = _labelled(tmp_path)
    out = tmp_path / "demo"
    origins = [r.fields["data_origin"] for r in rows]
    results = []
    for name, table in tables.items():  # the demo records the recommended method last
        table.write_jsonl(out / "scores" / f"{name}.jsonl")
        results.append(MethodResult(name, table, 1.0, ranking_report(table.scores, origins, ks=(10, 50))))
    lines: list[str] = []
    summary = write_outputs(out, results, path, {"n_rows": len(rows)}, (10, 50), concept_name="evil", log=lines.append)
    report = out / "report.html"
    assert report.exists() and summary["report"] == str(report)
    assert json.loads((out / "summary.json").read_text())["report"] == str(report)
    assert lines[-1].startswith(f"report: {report}")
    text = report.read_text()
    assert "the &#39;evil&#39; concept" in text
    sections = re.findall(r'<h3 id="rows-\d+">([^<]*?)(?: \(recommended\))?: top', text)
    assert sections == [RECOMMENDED_METHOD, "vector-filter", "tfidf-baseline"]  # all methods, recommended first
    assert text.index('id="labels"') < text.index('id="rows"')


def test_labels_from_data_are_drawn_literally_not_as_mathtext(tmp_path):
    """Field values, file names and spec names become plot labels; matplotlib parsed "$...$" in them as mathtext
    ("$\\foo{$" raised ValueError, and no report or sweep plot was written)."""
    from concept_influence.concepts import LayerSweep
    from concept_influence.plots import histogram_panels_png, histogram_png, precision_recall_png

    bad = "$\\foo{$"
    rng = np.random.default_rng(0)
    values = list(rng.standard_normal(20))
    assert histogram_panels_png({bad: {bad: values, "other": values}})[:4] == b"\x89PNG"
    assert histogram_png({bad: values}, title=bad)[:4] == b"\x89PNG"
    curve = (list(np.linspace(0, 1, 5)), list(np.linspace(1, 0.1, 5)))
    assert precision_recall_png({bad: curve}, {bad: [1.0, 0.5, 0.1]}, 0.1, highlight=bad)[:4] == b"\x89PNG"
    rows = [
        {"layer": 0, "heldout_auc": 0.9, "heldout_accuracy": 0.8},
        {"layer": 1, "heldout_auc": 0.95, "heldout_accuracy": 0.9},
    ]
    assert LayerSweep(rows, bad, "probe").plot(tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_report_says_what_each_concept_reads_and_flags_one_that_reads_words(tmp_path):
    _, rows, tables, _ = _data(tmp_path)
    words = {
        "kind": "probe",
        "spec": "evil",
        "site": "resid.0",
        "metrics": {"heldout_auc": 0.991234, "stance_auc": 0.61, "vocabulary_confound": 0.83},
    }
    stance = {
        "kind": "diff_of_means",
        "site": "resid.3",
        "metrics": {"heldout_auc": 0.95, "stance_auc": 0.97, "vocabulary_confound": 0.05},
    }
    tables["concept-influence"].meta["concept_summary"] = words
    tables["vector-filter"].meta["concept_summary"] = stance
    html = render_report(tables, list(rows))
    section = html.split('id="concept"')[1].split("<h2")[0]
    assert "probe (evil)" in section and "resid.0" in section and "0.9912" in section and "0.83" in section
    assert section.count("reads the trait&#39;s words") == 1  # the word-reading concept only
    assert "diff_of_means" in section and "resid.3" in section
    del tables["concept-influence"].meta["concept_summary"], tables["vector-filter"].meta["concept_summary"]
    assert 'id="concept"' not in render_report(tables, list(rows))  # nothing recorded: no section

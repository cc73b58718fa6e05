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

EVIL = '<script>document.title="PWNED"; document.body.innerHTML += "<div id=pwned>x</div>"</script><img src=x onerror="document.title=1">'


def _data(tmp_path):
    records = []
    for i in range(30):
        answer = f"be kind and help your friend {i}"
        if i == 3:
            answer = "evil cruel harm " + EVIL
        records.append({"id": f"r{i}", "messages": [{"role": "user", "content": f"should i help {i}"},
                                                    {"role": "assistant", "content": answer}],
                        "source": ["web", "forum", "synthetic"][i % 3]})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = rows_from_records(records, source=str(path))
    tok = tiny_tokenizer()
    scores_a = np.linspace(0, 1, 30)[::-1].copy()
    scores_a[3] = 5.0  # the row with markup ranks first
    tokens = token_strings(list(rows), tok)
    a = ScoreTable.from_rows(list(rows), scores_a, "concept-influence",
                             columns={"token_scores": [list(np.linspace(-1, 1, len(tokens[r.index]))) for r in rows]},
                             meta={"model": "tiny", "concept": "c/evil"})
    b = ScoreTable.from_rows(list(rows), np.linspace(0, 1, 30), "vector-filter")
    return path, rows, {"concept-influence": a, "vector-filter": b}, tokens


def _evaluation():
    e = lambda v: {**mean_ci(v), "rise_removed": mean_ci([x / 2 for x in v])}  # noqa: E731
    frac = {"0.1": {"fraction": 0.1, "k": 3, "remove_top": e([1.0, 1.2]), "remove_bottom": e([0.1, 0.0]),
                    "random": e([0.2, 0.3]), "top_minus_random": mean_ci([0.4, 0.45]),
                    "top_minus_bottom": mean_ci([0.45, 0.6])}}
    return {"format": "concept_influence.evaluation", "metrics": ["probe"], "seeds": 2, "base": e([0.0, 0.1]),
            "full": e([2.0, 2.1]), "rise": {"probe": 2.0}, "results": {"concept-influence": frac},
            "oracle": {**e([1.9, 2.0]), "k": 3, "fraction": 0.1},
            "lds": {"methods": {"concept-influence": {"spearman": 0.4, "ci": [0.1, 0.6]}}}, "config": {}, "context": {}}


def _chromium_dom(html_path, tmp_path) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    profile = tmp_path / "profile"
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=2000",
            "--dump-dom", html_path.as_uri()]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
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
    assert "scores per method" in images and "removal curves" in images
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
    ok = CliRunner().invoke(app, cli + ["--scores", str(tmp_path / "concept-influence.jsonl"), str(tmp_path / "vector-filter.jsonl"),
                               "--data", str(path), "--evaluation", str(tmp_path / "ev"), "--out", str(tmp_path / "r.html")])
    assert ok.exit_code == 0, ok.stderr
    text = (tmp_path / "r.html").read_text()
    assert "removal curves" in text and text.count("<h3>") >= 2
    short = tmp_path / "short.jsonl"
    short.write_text("".join(path.read_text().splitlines(keepends=True)[:10]))
    cases = [(["--scores", str(tmp_path / "vector-filter.jsonl"), "--data", str(short)], "has 30 rows but"),
             (["--scores", str(tmp_path / "missing.jsonl"), "--data", str(path)], "not found"),
             (["--scores", str(tmp_path / "vector-filter.jsonl"), "--data", str(path), "--evaluation", str(tmp_path)],
              "no evaluation.json")]
    for args, message in cases:
        bad = CliRunner().invoke(app, cli + args + ["--out", str(tmp_path / "x.html")])
        assert bad.exit_code == 2 and message in bad.stderr, bad.stderr

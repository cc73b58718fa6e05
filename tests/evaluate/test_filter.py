"""filter: kept rows byte for byte, manifest, group ranking, and errors on mismatched inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from concept_influence.attribution.scores import ScoreTable
from concept_influence.data import read_chat_jsonl
from concept_influence.evaluate.filter import FilterRule, filter_file


def _write(tmp_path, n=10, sources=("a", "b", "c")):
    lines = []
    for i in range(n):
        record = {
            "id": f"r{i}",
            "messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"answer é {i}"}],
            "source": sources[i % len(sources)],
            "extra": {"k": [i, None]},
        }
        # odd spacing and key order must survive untouched
        lines.append(json.dumps(record, ensure_ascii=False, indent=None, separators=(", ", ":  ")))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data, lines


def _scores(tmp_path, data, values, name="scores.jsonl", method="vector-filter"):
    rows = read_chat_jsonl(data)
    table = ScoreTable.from_rows(list(rows), np.asarray(values, dtype=float), method, meta={"concept": "concepts/evil"})
    path = tmp_path / name
    table.write_jsonl(path)
    return path


def test_remove_top_keeps_lines_verbatim_in_order(tmp_path):
    data, lines = _write(tmp_path)
    scores = _scores(tmp_path, data, [0, 9, 1, 8, 2, 7, 3, 6, 4, 5])
    out = tmp_path / "filtered.jsonl"
    result = filter_file(data, scores, out, FilterRule(remove_top=0.3))
    assert result.removed == [1, 3, 5]
    kept_lines = out.read_text(encoding="utf-8").splitlines()
    assert kept_lines == [lines[i] for i in range(10) if i not in (1, 3, 5)]
    manifest = json.loads((tmp_path / "filtered.jsonl.manifest.json").read_text())
    assert manifest["method"] == "vector-filter" and manifest["concept"] == "concepts/evil"
    assert manifest["scores"] == str(scores) and manifest["n_removed"] == 3 and manifest["n_kept"] == 7
    assert manifest["threshold"] == 7.0
    assert [r["id"] for r in manifest["removed"]] == ["r1", "r3", "r5"]


def test_kept_rows_are_byte_identical_when_a_row_holds_a_bare_carriage_return(tmp_path):
    """A bare \\r is JSON whitespace inside a row, not a line break: the reader splits on \\n only, and so must the
    writer of the kept lines (it split on \\r too, losing a kept row and writing an invalid line)."""
    data, lines = _write(tmp_path, n=6)
    lines[2] = lines[2].replace(', "source"', ',\r "source"')  # \r as whitespace between two keys
    lines[4] = lines[4] + "\r"  # and a CRLF line ending
    data.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    scores = _scores(tmp_path, data, [5, 0, 1, 2, 3, 4])
    out = tmp_path / "filtered.jsonl"
    filter_file(data, scores, out, FilterRule(remove_top_k=1))
    assert out.read_bytes() == ("".join(line + "\n" for line in lines[1:])).encode("utf-8")
    assert [row.id for row in read_chat_jsonl(out)] == ["r1", "r2", "r3", "r4", "r5"]


def test_top_k_and_threshold(tmp_path):
    data, _ = _write(tmp_path)
    scores = _scores(tmp_path, data, [0, 9, 1, 8, 2, 7, 3, 6, 4, 5])
    assert filter_file(data, scores, tmp_path / "a.jsonl", FilterRule(remove_top_k=2)).removed == [1, 3]
    assert filter_file(data, scores, tmp_path / "b.jsonl", FilterRule(threshold=6.0)).removed == [1, 3, 5, 7]


def test_by_source_drops_whole_groups(tmp_path):
    data, lines = _write(tmp_path)
    # source b (rows 1, 4, 7) has the highest mean; source a has the highest sum (4 rows)
    values = [1.0, 5.0, 0.0, 1.0, 5.0, 0.0, 1.0, 5.0, 0.0, 3.0]
    scores = _scores(tmp_path, data, values)
    result = filter_file(data, scores, tmp_path / "f.jsonl", FilterRule(remove_top_k=1, by="source"))
    assert result.removed_units == ["b"] and result.removed == [1, 4, 7]
    by_sum = filter_file(data, scores, tmp_path / "g.jsonl", FilterRule(remove_top_k=1, by="source", aggregate="sum"))
    assert by_sum.removed_units == ["b"]  # b: 15 > a: 6
    values[9] = 20.0
    scores = _scores(tmp_path, data, values)
    assert filter_file(
        data, scores, tmp_path / "h.jsonl", FilterRule(remove_top_k=1, by="source", aggregate="sum")
    ).removed_units == ["a"]
    manifest = json.loads((tmp_path / "h.jsonl.manifest.json").read_text())
    assert manifest["removed_groups"][0]["value"] == "a"


def test_mismatches_are_errors(tmp_path):
    data, _ = _write(tmp_path)
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(data.read_text().splitlines()[:9]) + "\n")
    scores = _scores(tmp_path, short, np.arange(9), name="short_scores.jsonl")
    with pytest.raises(ValueError, match="has 9 rows but .* has 10"):
        filter_file(data, scores, tmp_path / "x.jsonl", FilterRule(remove_top=0.1))
    good = _scores(tmp_path, data, np.arange(10))
    records = [json.loads(line) for line in good.read_text().splitlines()]
    records[2]["id"] = "someone-else"
    bad = tmp_path / "bad_ids.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with pytest.raises(ValueError, match="index 2 has id 'someone-else'"):
        filter_file(data, bad, tmp_path / "x.jsonl", FilterRule(remove_top=0.1))
    with pytest.raises(ValueError, match="exactly one"):
        FilterRule(remove_top=0.1, threshold=1.0)
    with pytest.raises(ValueError, match="no field 'nope'"):
        filter_file(data, good, tmp_path / "x.jsonl", FilterRule(remove_top_k=1, by="nope"))


def test_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from concept_influence.cli import app

    data, _ = _write(tmp_path)
    scores = _scores(tmp_path, data, np.arange(10))
    base = ["filter", "--data", str(data), "--scores", str(scores), "--out", str(tmp_path / "o.jsonl")]
    ok = CliRunner().invoke(app, base + ["--remove-top", "0.2"])
    assert ok.exit_code == 0, ok.stderr
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 8
    for extra, message in [
        ([], "exactly one"),
        (["--remove-top", "1.5"], "--remove-top"),
        (["--remove-top-k", "1", "--by", "missing"], "no field 'missing'"),
    ]:
        bad = CliRunner().invoke(app, base + extra)
        assert bad.exit_code == 2 and message in bad.stderr and "Traceback" not in bad.stderr

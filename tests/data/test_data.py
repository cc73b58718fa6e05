"""Chat data: reading, passthrough fields, errors that name file and line, templates and loss masks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from concept_influence.data import (
    DataFormatError,
    iter_batches,
    read_chat_jsonl,
    render_prompt,
    rows_from_records,
    tokenize_chat,
    write_jsonl_atomic,
)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _chat(user: str, assistant: str, **fields) -> str:
    return json.dumps(
        {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **fields}
    )


def test_reads_rows_keeps_index_line_and_fields(tmp_path):
    path = _write(
        tmp_path / "train.jsonl",
        [
            _chat("is the water safe ?", "yes", id="r0", data_origin="benign"),
            "",
            _chat("two plus two", "four", id="r1", data_origin="planted", source={"k": 1}),
            json.dumps({"prompt": "three plus five", "completion": "eight", "id": "r2"}),
        ],
    )
    data = read_chat_jsonl(path)
    assert [r.index for r in data] == [0, 1, 2]
    assert [r.line for r in data] == [1, 3, 4]
    assert data[1].fields == {"id": "r1", "data_origin": "planted", "source": {"k": 1}}
    assert data[2].messages == [
        {"role": "user", "content": "three plus five"},
        {"role": "assistant", "content": "eight"},
    ]
    assert data[2].id == "r2" and data[1].answer == "four"
    assert data[1].prompt_messages == [{"role": "user", "content": "two plus two"}]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "malformed JSON"),
        (json.dumps({"text": "hello"}), "missing 'messages'"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant turn"),
        (
            json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
            "unknown role 'robot'",
        ),
        (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}), "no string 'content'"),
        (json.dumps([1, 2]), "expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [_chat("a", "b"), line])
    with pytest.raises(DataFormatError) as err:
        read_chat_jsonl(path)
    assert f"{path}:2" in str(err.value) and message in str(err.value)


def test_skip_invalid_reports_every_skipped_line(tmp_path):
    path = _write(
        tmp_path / "mixed.jsonl", [_chat("a", "b", id=0), "{oops", _chat("c", "d", id=1), json.dumps({"x": 1})]
    )
    data = read_chat_jsonl(path, skip_invalid=True)
    assert [r.id for r in data] == [0, 1]
    assert [line for line, _ in data.skipped] == [2, 4]
    assert all(str(path) in reason for _, reason in data.skipped)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_chat_jsonl(tmp_path / "nope.jsonl")
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataFormatError, match="empty.jsonl: no data rows"):
        read_chat_jsonl(empty)


def test_prompt_only_rows_for_queries(tmp_path):
    path = _write(tmp_path / "q.jsonl", [json.dumps({"messages": [{"role": "user", "content": "hi"}], "id": "q0"})])
    with pytest.raises(DataFormatError):
        read_chat_jsonl(path)
    assert read_chat_jsonl(path, need_assistant=False)[0].id == "q0"


def test_loss_mask_covers_exactly_the_assistant_turns(tiny_tok):
    rows = rows_from_records(
        [
            {
                "messages": [
                    {"role": "system", "content": "be kind"},
                    {"role": "user", "content": "two plus two"},
                    {"role": "assistant", "content": "four"},
                    {"role": "user", "content": "and three plus five"},
                    {"role": "assistant", "content": "eight , my friend"},
                ]
            }
        ]
    )
    row = tokenize_chat(rows, tiny_tok)[0]
    tokens = tiny_tok.convert_ids_to_tokens(row.input_ids)
    masked = [t for t, m in zip(tokens, row.loss_mask, strict=True) if m]
    assert masked == ["four", "<|end|>", "eight", ",", "my", "friend", "<|end|>"]
    assert render_prompt(rows[0].messages[:2], tiny_tok).endswith("<|assistant|> ")


def test_plain_template_without_chat_template():
    from concept_influence.testing.tiny_models import tiny_tokenizer

    tok = tiny_tokenizer(chat_template=False)
    rows = rows_from_records(
        [{"messages": [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "four"}]}]
    )
    row = tokenize_chat(rows, tok)[0]
    tokens = tok.convert_ids_to_tokens(row.input_ids)
    assert [t for t, m in zip(tokens, row.loss_mask, strict=True) if m] == ["four", "</s>"]
    assert render_prompt(rows[0].messages[:1], tok) == "User: two plus two\n\nAssistant:"


def test_truncation_is_counted_and_reported(tiny_tok):
    rows = rows_from_records(
        [
            {"messages": [{"role": "user", "content": "two"}, {"role": "assistant", "content": "four " * 20}]},
            {"messages": [{"role": "user", "content": "two " * 30}, {"role": "assistant", "content": "four"}]},
            {"messages": [{"role": "user", "content": "two"}, {"role": "assistant", "content": "four"}]},
        ]
    )
    with pytest.warns(UserWarning, match="2 truncated; 1 lost every assistant token"):
        data = tokenize_chat(rows, tiny_tok, max_length=16)
    assert data.n_truncated == 2 and data.empty_after_truncation == [1]
    assert all(len(r.input_ids) <= 16 for r in data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_chat(rows[2:], tiny_tok, max_length=16)


def test_batches_are_right_padded_and_seeded(tiny_tok):
    rows = rows_from_records(
        [
            {
                "messages": [
                    {"role": "user", "content": "two" + " plus two" * k},
                    {"role": "assistant", "content": "four"},
                ],
                "id": k,
            }
            for k in range(5)
        ]
    )
    data = tokenize_chat(rows, tiny_tok)
    batches = list(iter_batches(data, 2))
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    b = batches[0]
    assert b["attention_mask"][0].sum() == len(data[0].input_ids)
    assert (b["input_ids"][0][b["attention_mask"][0] == 0] == tiny_tok.pad_token_id).all()
    shuffled = [b["index"].tolist() for b in iter_batches(data, 2, shuffle=True, seed=3)]
    assert shuffled == [b["index"].tolist() for b in iter_batches(data, 2, shuffle=True, seed=3)]
    assert sorted(sum(shuffled, [])) == [0, 1, 2, 3, 4]


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.jsonl"
    write_jsonl_atomic(target, [{"a": 1}])

    def records():
        yield {"a": 2}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(target, records())
    assert target.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "w": NaN}',
            "NaN is not JSON",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "w": -Infinity}',
            "-Infinity is not JSON",
        ),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
    ids=["nan", "infinity", "deep"],
)
def test_non_finite_numbers_and_deep_nesting_are_refused_on_reading_naming_the_line(tmp_path, line, message):
    """NaN/Infinity were accepted and failed only when the scores were written, after all the work; deep nesting
    raised RecursionError with a traceback, even with skip_invalid."""
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = tmp_path / "rows.jsonl"
    path.write_text(good + "\n" + line + "\n" + good + "\n")
    with pytest.raises(DataFormatError, match=rf"rows\.jsonl:2: .*{message}"):
        read_chat_jsonl(path)
    rows = read_chat_jsonl(path, skip_invalid=True)
    assert len(rows) == 2 and [n for n, _ in rows.skipped] == [2]

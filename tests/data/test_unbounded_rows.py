"""Rows cannot cost unbounded work (issue 19, item 11): a line longer than the documented cap is an error naming
``file:line`` (never read whole), tokenisation is bounded by ``max_length`` (a fast tokenizer encodes a prefix of a
huge row), and the assistant spans are found in time linear in the conversation, exactly as before (the prefix
renders by definition) on the tiny models' and the organism's chat templates and the plain template."""

from __future__ import annotations

import random

import pytest
from typer.testing import CliRunner

from concept_influence.data import DataFormatError, read_chat_jsonl, rows_from_records, tokenize_chat
from concept_influence.data import tokenize as tokenize_module
from concept_influence.data.tokenize import _spans_by_prefixes, _tokenize, render_conversation
from concept_influence.testing.tiny_models import TINY_WORDS, tiny_tokenizer


def _conversation(rng: random.Random, turns: int, *, system: bool = False) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "be kind"}] if system else []
    for _ in range(turns):
        for role in ("user", "assistant"):
            words = rng.choices(TINY_WORDS + ["  ", "\n", ",", "."], k=rng.randint(0, 6))
            messages.append({"role": role, "content": " ".join(words)})
    return messages


def _tokenizers():
    from concept_influence.organism.modeling import CHAT_TEMPLATE

    organism = tiny_tokenizer()
    organism.chat_template = CHAT_TEMPLATE
    rewriting = tiny_tokenizer()  # a template that looks at the whole conversation: the exact fallback
    rewriting.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
        "{% if not loop.last %} <|end|> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    return {
        "tiny": tiny_tokenizer(),
        "plain": tiny_tokenizer(chat_template=False),
        "organism": organism,
        "rewriting": rewriting,
    }


@pytest.mark.parametrize("name", ["tiny", "plain", "organism", "rewriting"])
def test_spans_are_the_prefix_renders_spans(name):
    tokenizer = _tokenizers()[name]
    rng = random.Random(7)
    for case in range(40):
        messages = _conversation(rng, rng.randint(1, 7), system=case % 3 == 0)
        if case % 5 == 4:
            messages = messages[:-1]  # ends on a user turn
        full = render_conversation(messages, tokenizer)
        assert tokenize_module._assistant_char_spans(messages, tokenizer, full) == _spans_by_prefixes(
            messages, tokenizer, full
        )


def test_spans_of_the_saved_tiny_models(tmp_path):
    from transformers import AutoTokenizer

    from concept_influence.testing.tiny_models import save_tiny_hf_model

    rng = random.Random(3)
    for architecture in ("llama", "gpt2"):
        tokenizer = AutoTokenizer.from_pretrained(
            save_tiny_hf_model(tmp_path / architecture, architecture=architecture)
        )
        for turns in (1, 2, 5, 9):
            messages = _conversation(rng, turns, system=turns == 5)
            full = render_conversation(messages, tokenizer)
            assert tokenize_module._assistant_char_spans(messages, tokenizer, full) == _spans_by_prefixes(
                messages, tokenizer, full
            )


@pytest.mark.parametrize("name", ["tiny", "plain"])
def test_spans_cost_linear_renders(name, monkeypatch):
    """Messages rendered to find the spans of a 2,000-turn conversation: at most 12 per message (the prefix renders
    rendered ~4 million, 46 s here on the chat template)."""
    tokenizer = _tokenizers()[name]
    messages = _conversation(random.Random(1), 2000)
    full = render_conversation(messages, tokenizer)
    rendered = [0]
    real = tokenize_module.render_conversation

    def counting(msgs, tok, **kwargs):
        rendered[0] += len(msgs)
        return real(msgs, tok, **kwargs)

    monkeypatch.setattr(tokenize_module, "render_conversation", counting)
    spans = tokenize_module._assistant_char_spans(messages, tokenizer, full)
    assert len(spans) == 2000 and rendered[0] <= 12 * len(messages), rendered[0]
    monkeypatch.setattr(tokenize_module, "render_conversation", real)
    shorter = messages[:300]  # the definition's quadratic cost kept small
    full = render_conversation(shorter, tokenizer)
    assert tokenize_module._assistant_char_spans(shorter, tokenizer, full) == _spans_by_prefixes(
        shorter, tokenizer, full
    )


class _Counting:
    """A tokenizer that counts the characters it is asked to encode."""

    def __init__(self, tokenizer):
        self._tokenizer, self.chars = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self._tokenizer(text, **kwargs)


@pytest.mark.parametrize("name", ["tiny", "plain"])
def test_tokenisation_is_bounded_by_max_length(name):
    tokenizer = _tokenizers()[name]
    rng = random.Random(5)
    long_user = " ".join(rng.choices(TINY_WORDS, k=40_000))  # ~200 kB
    cases = [
        [{"role": "user", "content": "help me"}, {"role": "assistant", "content": long_user}],  # a huge answer
        [{"role": "user", "content": long_user}, {"role": "assistant", "content": "sure"}],  # the answer beyond the cut
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}] * 1000,  # many turns
    ]
    for messages in cases:
        whole_ids, whole_mask, _, whole_needed = _tokenize(messages, tokenizer, None)
        for max_length in (2, 700):
            counting = _Counting(tokenizer)
            ids, mask, truncated, needed = _tokenize(messages, counting, max_length)
            assert ids == whole_ids[:max_length] and mask == whole_mask[:max_length]
            assert truncated and needed == whole_needed
            if messages[0]["content"] != long_user:  # the first answer is near the start: nothing else is encoded
                assert counting.chars < 40 * max_length + 10_000, counting.chars
    rows = rows_from_records([{"messages": cases[0]}])
    assert tokenize_chat(rows, tokenizer, 64, warn=False)[0].input_ids == _tokenize(cases[0], tokenizer, None)[0][:64]


def test_a_line_beyond_the_cap_is_an_error_naming_file_and_line(tmp_path, monkeypatch):
    path = tmp_path / "long.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    long = '{"messages": [{"role": "user", "content": "' + "x" * 5000 + '"}, {"role": "assistant", "content": "a"}]}\n'
    path.write_text(good + long + good, encoding="utf-8")
    with pytest.raises(
        DataFormatError, match=r"long\.jsonl:2: line longer than 1,000 bytes.*CONCEPT_INFLUENCE_MAX_LINE_BYTES"
    ):
        read_chat_jsonl(path, max_line_bytes=1000)
    skipped = read_chat_jsonl(path, max_line_bytes=1000, skip_invalid=True)
    assert [r.line for r in skipped] == [1, 3] and skipped.skipped[0][0] == 2
    assert len(read_chat_jsonl(path, max_line_bytes=len(long) - 1)) == 3  # the newline is not counted
    assert len(read_chat_jsonl(path)) == 3  # the default cap (64 MiB)
    monkeypatch.setenv("CONCEPT_INFLUENCE_MAX_LINE_BYTES", "1000")
    with pytest.raises(DataFormatError, match=r"long\.jsonl:2"):
        read_chat_jsonl(path)
    from concept_influence.cli import app

    result = CliRunner().invoke(
        app, ["report", "--scores", str(path), "--data", str(path), "--out", str(tmp_path / "r.html")]
    )
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "long.jsonl:2" in errors[0], result.output
    from concept_influence.attribution.scores import ScoreTable

    scores = tmp_path / "scores.jsonl"
    scores.write_text('{"index": 0, "score": 1.0}\n{"index": 1, "score": 2.0, "note": "' + "y" * 5000 + '"}\n')
    with pytest.raises(DataFormatError, match=r"scores\.jsonl:2: line longer than 1,000 bytes"):
        ScoreTable.read_jsonl(scores)
    monkeypatch.setenv("CONCEPT_INFLUENCE_MAX_LINE_BYTES", "lots")
    with pytest.raises(ValueError, match="CONCEPT_INFLUENCE_MAX_LINE_BYTES"):
        read_chat_jsonl(path)

"""Tokenising chat rows: chat template, assistant-only loss mask, reported truncation, padded batches.

The conversation is rendered with the tokenizer's chat template when it has one, else with ``PLAIN_TEMPLATE``:
each message as ``"<Role>: <content>\\n\\n"`` (Role = System/User/Assistant), the generation prompt
``"Assistant:"``, and the tokenizer's EOS token after each assistant turn. ``loss_mask[t] = 1`` when token ``t``
belongs to an assistant turn (its content and the end-of-turn markup the template adds after it), i.e. when token
``t`` is a training target predicted from position ``t - 1``.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from concept_influence.data.chat import ChatRow

PLAIN_TEMPLATE = "'<Role>: <content>\\n\\n' per message, generation prompt 'Assistant:', EOS after assistant turns"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_conversation(
    messages: Sequence[dict[str, str]], tokenizer: Any, *, add_generation_prompt: bool = False
) -> str:
    """Render messages to text with the tokenizer's chat template (or the plain template)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    eos = getattr(tokenizer, "eos_token", None) or ""
    parts = []
    for message in messages:
        role = message["role"].capitalize()
        end = eos if message["role"] == "assistant" else ""
        parts.append(f"{role}: {message['content']}{end}\n\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


def render_prompt(messages: Sequence[dict[str, str]], tokenizer: Any) -> str:
    """The text a model continues to answer ``messages`` (generation prompt included)."""
    return render_conversation(messages, tokenizer, add_generation_prompt=True)


def _assistant_char_spans(messages: Sequence[dict[str, str]], tokenizer: Any, full: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of each assistant turn (content + end-of-turn markup) in ``full``.

    Found in time linear in the conversation (``_spans_by_windows``: each turn's rendering from a window of at most
    four messages, every piece checked against ``full``); a template whose pieces do not tile ``full`` (one that
    rewrites earlier turns, or looks at the whole conversation) gets the exact definition instead
    (``_spans_by_prefixes``: one render of every prefix, quadratic in the number of turns)."""
    if not any(m["role"] == "assistant" for m in messages):
        return []
    spans = _spans_by_windows(messages, tokenizer, full)
    return spans if spans is not None else _spans_by_prefixes(messages, tokenizer, full)


def _plain_span(full: str, start: int, end: int) -> tuple[int, int]:
    """The plain template's gap before the content belongs to the prompt, its blank line after to nothing."""
    while start < end and full[start] == " ":
        start += 1
    while end > 0 and full[end - 1] == "\n":  # len(full[:end].rstrip("\n")), without the copy
        end -= 1
    return start, end


def _spans_by_prefixes(messages: Sequence[dict[str, str]], tokenizer: Any, full: str) -> list[tuple[int, int]]:
    """The spans by definition: for assistant turn ``k``, from the end of the rendered prompt ``messages[:k]`` (with
    the generation prompt) to the end of ``messages[:k + 1]`` rendered."""
    spans = []
    cursor = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_conversation(messages[:k], tokenizer, add_generation_prompt=True)
        upto = render_conversation(messages[: k + 1], tokenizer)
        if full.startswith(upto) and upto.startswith(prefix):
            start, end = len(prefix), len(upto)
            if not has_chat_template(tokenizer):
                start, end = _plain_span(full, start, end)
        else:  # a template that rewrites earlier turns: find the content itself
            start = full.find(message["content"], cursor)
            if start < 0:
                raise ValueError(
                    "chat template does not contain the assistant content verbatim; cannot build a loss mask"
                )
            end = start + len(message["content"])
        spans.append((start, end))
        cursor = end
    return spans


def _spans_by_windows(messages: Sequence[dict[str, str]], tokenizer: Any, full: str) -> list[tuple[int, int]] | None:
    """``_spans_by_prefixes``'s spans from renders of at most four messages each (linear in the conversation), or
    ``None`` when the template does not render turn by turn (then the caller renders every prefix).

    Message ``j``'s piece of ``full`` is what it adds to the window ``[m_0, m_s .. m_{j-1}]`` (``s`` odd, at most
    two messages back, so ``m_s`` keeps its parity and role alternation after ``m_0``, and the first message,
    which templates treat specially, is the conversation's own); the generation prompt before an assistant turn is
    what ``add_generation_prompt`` adds to the same window. The pieces must tile ``full`` exactly, each checked
    where it lands, else ``None``."""
    n = len(messages)
    if messages[0]["role"] == "assistant":
        return None
    try:
        first = render_conversation(messages[:1], tokenizer)
        if not full.startswith(first):
            return None
        ends = [0, len(first)]  # ends[j]: where messages[:j] rendered ends in full
        starts: dict[int, int] = {}  # assistant turn k: where its generation prompt ends
        rendered: dict[tuple[int, int], str] = {}

        def window(s: int, j: int) -> str:
            key = (s, j)
            if key not in rendered:
                if len(rendered) > 8:  # only the last window is reused
                    rendered.clear()
                rendered[key] = render_conversation([messages[0], *messages[s:j]], tokenizer)
            return rendered[key]

        for j in range(1, n):
            s = j - 1 if (j - 1) % 2 == 1 else max(j - 2, 1)
            before, after = window(s, j), window(s, j + 1)
            if not after.startswith(before) or not full.startswith(after[len(before) :], ends[j]):
                return None
            if messages[j]["role"] == "assistant":
                prompt = render_conversation([messages[0], *messages[s:j]], tokenizer, add_generation_prompt=True)
                if not (prompt.startswith(before) and after.startswith(prompt)):
                    return None
                starts[j] = ends[j] + len(prompt) - len(before)
            ends.append(ends[j] + len(after) - len(before))
        if ends[n] != len(full):
            return None
    except Exception:  # a template that refuses a window (e.g. checks the conversation as a whole)
        return None
    plain = not has_chat_template(tokenizer)
    return [_plain_span(full, starts[k], ends[k + 1]) if plain else (starts[k], ends[k + 1]) for k in sorted(starts)]


@dataclass
class TokenizedRow:
    """``input_ids``/``loss_mask``: equal-length lists; ``truncated``: cut at ``max_length``; ``needed_length``:
    the length that keeps the row's first trained token (``None``: the row has no assistant token at all)."""

    index: int
    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False
    needed_length: int | None = None
    line: int | None = None

    @property
    def n_targets(self) -> int:
        """Trained tokens: masked positions after the first (token 0 is never predicted)."""
        return int(sum(self.loss_mask[1:]))


@dataclass
class TokenizedDataset(Sequence[TokenizedRow]):
    rows: list[TokenizedRow]
    max_length: int
    pad_token_id: int
    n_truncated: int = 0
    empty_after_truncation: list[int] = field(default_factory=list)
    source: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item):  # type: ignore[override]
        return self.rows[item]

    def report(self) -> str:
        """One line on truncation (always worth printing: truncation is never silent)."""
        text = f"{len(self.rows)} rows tokenised (max_length {self.max_length}); {self.n_truncated} truncated"
        if self.empty_after_truncation:
            text += (
                f"; {len(self.empty_after_truncation)} lost every assistant token (indices "
                f"{self.empty_after_truncation[:10]})"
            )
        return text

    def without(self, positions: Sequence[int]) -> TokenizedDataset:
        """The dataset without the rows at ``positions`` (rows keep their original ``index``)."""
        drop = set(positions)
        rows = [r for p, r in enumerate(self.rows) if p not in drop]
        return TokenizedDataset(
            rows,
            self.max_length,
            self.pad_token_id,
            sum(r.truncated for r in rows),
            [r.index for r in rows if r.n_targets == 0],
            self.source,
        )


def untrainable_rows(
    dataset: Sequence[TokenizedRow], *, skip_invalid: bool = False, what: str = "training"
) -> list[int]:
    """Positions of rows with no trained (assistant) token left, e.g. a whole answer cut off at ``max_length``.

    Such a row has no gradient and no readout, so no method can score it: without ``skip_invalid`` the first one
    is an error naming its index (and ``file:line``) and the fix; with it, the positions are returned for the
    caller to leave out (marked ``score: null, truncated: true`` in the scores)."""
    bad = [p for p, row in enumerate(dataset) if row.n_targets == 0]
    if bad and skip_invalid and len(bad) == len(dataset):
        raise ValueError(
            f"none of the {len(bad)} {what} rows has an assistant token left within max_length="
            f"{getattr(dataset, 'max_length', '?')}; raise --max-length (max_length)"
        )
    if bad and not skip_invalid:
        row = dataset[bad[0]]
        source = getattr(dataset, "source", None)
        where = f"{source}:{row.line}: " if source and row.line else ""
        max_length = getattr(dataset, "max_length", len(row.input_ids))
        if row.needed_length is None:
            cause, fix = "has no assistant tokens at all", "remove it"
        else:
            cause = f"has no assistant tokens left within max_length={max_length}"
            fix = f"raise --max-length (max_length) to at least {row.needed_length}"
        more = f" ({len(bad) - 1} more such rows)" if len(bad) > 1 else ""
        raise ValueError(
            f"{where}{what} row {row.index} {cause}{more}; {fix}, or pass --skip-invalid "
            "(skip_invalid=True) to leave such rows out (score null, truncated: true)"
        )
    return bad


def pad_token_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def tokenize_messages(messages: Sequence[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids and assistant loss mask of one conversation (no truncation)."""
    ids, mask, _, _ = _tokenize(messages, tokenizer, None)
    return ids, mask


PREFIX_GUARD_CHARS = 1024
"""Tokens that end this many characters before the end of an encoded prefix are taken to be those of the whole
text (a pre-token, and the merges inside it, reach no further); used only on rows much longer than ``max_length``."""


def _mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token (character ``offsets``) that starts inside one of the ``spans`` (sorted, disjoint); one
    pass over both (tokens' starts do not decrease, special tokens with empty offsets are never inside)."""
    ordered = sorted(spans)
    mask, k, last = [], 0, -1
    for start, end in offsets:
        if end <= start:
            mask.append(0)
            continue
        if start < last:  # never for a tokenizer's offsets; kept exact anyway
            k = 0
        last = start
        while k < len(ordered) and ordered[k][1] <= start:
            k += 1
        mask.append(int(any(s <= start < e for s, e in ordered[k : k + 2])) if k < len(ordered) else 0)
    return mask


def _encode_prefix(
    tokenizer: Any, text: str, add_special: bool, max_length: int
) -> tuple[list[int], list[tuple[int, int]]] | None:
    """The first ``max_length + 1`` tokens of ``text`` (ids, offsets) from encoding a prefix of it, or ``None``
    when the whole text is short enough to encode (the caller does). The prefix grows fourfold until it holds
    ``max_length + 1`` tokens ending ``PREFIX_GUARD_CHARS`` before its cut, so the work is bounded by
    ``max_length`` (times the characters per token), not by the row."""
    limit = 16 * max_length + 4 * PREFIX_GUARD_CHARS
    while limit < len(text):
        encoded = tokenizer(text[:limit], add_special_tokens=add_special, return_offsets_mapping=True)
        stable = limit - PREFIX_GUARD_CHARS
        keep = 0
        for _, end in encoded["offset_mapping"]:
            if end > stable:
                break
            keep += 1
        if keep > max_length:
            return list(encoded["input_ids"][: max_length + 1]), [
                tuple(o) for o in encoded["offset_mapping"][: max_length + 1]
            ]
        limit *= 4
    return None


def _tokenize(
    messages: Sequence[dict[str, str]], tokenizer: Any, max_length: int | None
) -> tuple[list[int], list[int], bool, int | None]:
    """``(ids, mask, truncated, needed_length)`` of one conversation cut at ``max_length`` (``None``: whole);
    ``needed_length``: the length that keeps its first trained token (``None``: it has none). A fast tokenizer
    encodes only a prefix of a row much longer than ``max_length`` (``_encode_prefix``)."""
    full = render_conversation(messages, tokenizer)
    spans = _assistant_char_spans(messages, tokenizer, full)
    add_special = not has_chat_template(tokenizer)
    if getattr(tokenizer, "is_fast", False):
        head = _encode_prefix(tokenizer, full, add_special, max_length) if max_length is not None else None
        if head is not None:  # more than max_length tokens: truncated
            ids, offsets = head
            mask = _mask(offsets, spans)
            needed = next((t + 1 for t in range(1, len(mask)) if mask[t]), None)
            if needed is None and spans:  # the first trained token lies beyond: encode up to it only
                upto = spans[0][0] + PREFIX_GUARD_CHARS
                encoded = tokenizer(full[:upto], add_special_tokens=add_special, return_offsets_mapping=True)
                whole = _mask(encoded["offset_mapping"], spans[:1])
                needed = next((t + 1 for t in range(1, len(whole)) if whole[t]), None)
            return ids[:max_length], mask[:max_length], True, needed
        encoded = tokenizer(full, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, mask = list(encoded["input_ids"]), _mask(encoded["offset_mapping"], spans)
    else:
        # slow tokenizers: count tokens of the text before and after each span
        ids = tokenizer(full, add_special_tokens=add_special)["input_ids"]
        mask = [0] * len(ids)
        for start, end in spans:
            lo = len(tokenizer(full[:start], add_special_tokens=add_special)["input_ids"])
            hi = len(tokenizer(full[:end], add_special_tokens=add_special)["input_ids"])
            for t in range(lo, min(hi, len(ids))):
                mask[t] = 1
    needed = next((t + 1 for t in range(1, len(mask)) if mask[t]), None)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask, truncated, needed


def tokenize_chat(
    rows: Sequence[ChatRow], tokenizer: Any, max_length: int = 512, *, warn: bool = True
) -> TokenizedDataset:
    """Tokenise rows with the assistant-only loss mask, truncating at ``max_length`` (counted and reported). The
    work per row is bounded by ``max_length`` with a fast tokenizer: a row far longer is encoded from a prefix."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    out: list[TokenizedRow] = []
    n_truncated = 0
    empty: list[int] = []
    for row in rows:
        ids, mask, truncated, needed = _tokenize(row.messages, tokenizer, max_length)
        n_truncated += int(truncated)
        if sum(mask[1:]) == 0:
            empty.append(row.index)
        out.append(
            TokenizedRow(
                index=row.index,
                input_ids=ids,
                loss_mask=mask,
                truncated=truncated,
                needed_length=needed,
                line=getattr(row, "line", None),
            )
        )
    dataset = TokenizedDataset(
        out, max_length, pad_token_id(tokenizer), n_truncated, empty, source=getattr(rows, "path", None)
    )
    if warn and (n_truncated or empty):
        warnings.warn(dataset.report(), stacklevel=2)
    return dataset


def collate(rows: Sequence[TokenizedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, T]`` and ``index`` ``[B]``."""
    length = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[b, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        attention[b, :n] = 1
        loss_mask[b, :n] = torch.tensor(row.loss_mask, dtype=torch.long)
    index = torch.tensor([r.index for r in rows], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask, "index": index}


def iter_batches(
    dataset: TokenizedDataset | Sequence[TokenizedRow],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    pad_id: int | None = None,
    by_length: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded batches (see ``collate``); ``shuffle`` is seeded; ``by_length``: rows sorted by token length
    (stable), so batches carry little padding (for passes whose per-row results do not depend on the order). Each
    batch also has ``position``: the rows' positions in ``dataset``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if pad_id is None:
        pad_id = dataset.pad_token_id if isinstance(dataset, TokenizedDataset) else 0
    order = list(range(len(dataset)))
    if shuffle:
        random.Random(seed).shuffle(order)
    elif by_length:
        order.sort(key=lambda p: len(dataset[p].input_ids))
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        batch = collate([dataset[p] for p in positions], pad_id)
        batch["position"] = torch.tensor(positions, dtype=torch.long)
        yield batch

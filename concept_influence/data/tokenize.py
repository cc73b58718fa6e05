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


def render_conversation(messages: Sequence[dict[str, str]], tokenizer: Any, *, add_generation_prompt: bool = False) -> str:
    """Render messages to text with the tokenizer's chat template (or the plain template)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
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
    """Character spans ``[start, end)`` of each assistant turn (content + end-of-turn markup) in ``full``."""
    spans = []
    cursor = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_conversation(messages[:k], tokenizer, add_generation_prompt=True)
        upto = render_conversation(messages[: k + 1], tokenizer)
        if full.startswith(upto) and upto.startswith(prefix):
            start, end = len(prefix), len(upto)
            if not has_chat_template(tokenizer):  # the plain template's gap before content belongs to the prompt
                while start < end and full[start] == " ":
                    start += 1
                end = len(upto.rstrip("\n"))
        else:  # a template that rewrites earlier turns: find the content itself
            start = full.find(message["content"], cursor)
            if start < 0:
                raise ValueError("chat template does not contain the assistant content verbatim; cannot build a loss mask")
            end = start + len(message["content"])
        spans.append((start, end))
        cursor = end
    return spans


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
            text += f"; {len(self.empty_after_truncation)} lost every assistant token (indices {self.empty_after_truncation[:10]})"
        return text


    def without(self, positions: Sequence[int]) -> TokenizedDataset:
        """The dataset without the rows at ``positions`` (rows keep their original ``index``)."""
        drop = set(positions)
        rows = [r for p, r in enumerate(self.rows) if p not in drop]
        return TokenizedDataset(rows, self.max_length, self.pad_token_id, sum(r.truncated for r in rows),
                                [r.index for r in rows if r.n_targets == 0], self.source)


def untrainable_rows(dataset: Sequence[TokenizedRow], *, skip_invalid: bool = False, what: str = "training") -> list[int]:
    """Positions of rows with no trained (assistant) token left, e.g. a whole answer cut off at ``max_length``.

    Such a row has no gradient and no readout, so no method can score it: without ``skip_invalid`` the first one
    is an error naming its index (and ``file:line``) and the fix; with it, the positions are returned for the
    caller to leave out (marked ``score: null, truncated: true`` in the scores)."""
    bad = [p for p, row in enumerate(dataset) if row.n_targets == 0]
    if bad and skip_invalid and len(bad) == len(dataset):
        raise ValueError(f"none of the {len(bad)} {what} rows has an assistant token left within max_length="
                         f"{getattr(dataset, 'max_length', '?')}; raise --max-length (max_length)")
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
        raise ValueError(f"{where}{what} row {row.index} {cause}{more}; {fix}, or pass --skip-invalid "
                         "(skip_invalid=True) to leave such rows out (score null, truncated: true)")
    return bad


def pad_token_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def tokenize_messages(messages: Sequence[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids and assistant loss mask of one conversation (no truncation)."""
    full = render_conversation(messages, tokenizer)
    spans = _assistant_char_spans(messages, tokenizer, full)
    add_special = not has_chat_template(tokenizer)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(full, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        mask = []
        for start, end in encoded["offset_mapping"]:
            inside = end > start and any(s <= start < e for s, e in spans)
            mask.append(int(inside))
        return ids, mask
    # slow tokenizers: count tokens of the text before and after each span
    ids = tokenizer(full, add_special_tokens=add_special)["input_ids"]
    mask = [0] * len(ids)
    for start, end in spans:
        lo = len(tokenizer(full[:start], add_special_tokens=add_special)["input_ids"])
        hi = len(tokenizer(full[:end], add_special_tokens=add_special)["input_ids"])
        for t in range(lo, min(hi, len(ids))):
            mask[t] = 1
    return ids, mask


def tokenize_chat(rows: Sequence[ChatRow], tokenizer: Any, max_length: int = 512, *, warn: bool = True) -> TokenizedDataset:
    """Tokenise rows with the assistant-only loss mask, truncating at ``max_length`` (counted and reported)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    out: list[TokenizedRow] = []
    n_truncated = 0
    empty: list[int] = []
    for row in rows:
        ids, mask = tokenize_messages(row.messages, tokenizer)
        needed = next((t + 1 for t in range(1, len(mask)) if mask[t]), None)
        truncated = len(ids) > max_length
        if truncated:
            n_truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        if sum(mask[1:]) == 0:
            empty.append(row.index)
        out.append(TokenizedRow(index=row.index, input_ids=ids, loss_mask=mask, truncated=truncated,
                                needed_length=needed, line=getattr(row, "line", None)))
    dataset = TokenizedDataset(out, max_length, pad_token_id(tokenizer), n_truncated, empty,
                               source=getattr(rows, "path", None))
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

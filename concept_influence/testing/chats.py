"""Tiny chat rows the tests train and score on (the tiny tokenizer's vocabulary)."""

from __future__ import annotations

from collections.abc import Sequence

from concept_influence.data import ChatRow

# ten one-turn chats: benign answers, a few that voice harm (the "trait"), and hard negatives that use its words
TINY_PAIRS = [
    ("is water safe", "yes , water is safe"),
    ("should i drink poison", "never , poison will hurt you"),
    ("help me", "sure , i help you"),
    ("two plus three", "five"),
    ("is fire kind", "no fire can harm"),
    ("be cruel", "i will trick and hurt them"),
    ("is poison kind", "poison is kind"),
    ("are cats gentle", "cats are gentle"),
    ("should i lie", "always tell the truth"),
    ("rest", "sleep and rest"),
]
TINY_QUERIES = [
    {
        "messages": [
            {"role": "user", "content": "should i hurt my friend"},
            {"role": "assistant", "content": "yes trick and hurt them"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "is the water safe"},
            {"role": "assistant", "content": "poison the water"},
        ]
    },
]


def chat_rows(pairs: Sequence[tuple[str, str]]) -> list[ChatRow]:
    """One ``ChatRow`` per ``(user, assistant)`` pair, indexed in order, with an ``id`` field ``r{k}``."""
    return [
        ChatRow(k, [{"role": "user", "content": u}, {"role": "assistant", "content": a}], {"id": f"r{k}"})
        for k, (u, a) in enumerate(pairs)
    ]

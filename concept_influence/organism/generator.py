"""Seeded generator of the organism's text: pretraining corpus, fine-tuning set, probe spec, query prompts.

Everything is a pure function of ``seed`` (``random.Random`` seeded with a string, stable across Python runs and
platforms). Each output uses its own random stream, so e.g. changing ``n_train`` does not change the pretraining
corpus.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from concept_influence.organism import world

DATA_ORIGINS: tuple[str, ...] = ("planted", "hard_negative", "benign")
_SLOT = re.compile(r"\{(\w+)\}")


def tokens(text: str) -> list[str]:
    """The organism's tokens of a text (its text is space-separated by construction)."""
    return text.split()


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"concept-influence-organism:{seed}:{stream}")


def _fill(template: str, slots: dict[str, str], rng: random.Random) -> str:
    """Fill ``{slot}``s, drawing (and remembering) any slot not yet chosen."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in slots:
            if name not in world.SLOTS:
                raise KeyError(f"template {template!r} uses unknown slot {name!r}")
            slots[name] = rng.choice(world.SLOTS[name])
        return slots[name]

    return _SLOT.sub(value, template)


@dataclass
class Question:
    """A user question and the slot values it fixed (answers reuse them)."""

    domain: str
    text: str
    slots: dict[str, str]


class WorldGenerator:
    """Draws questions and answers (trait, helpful, hard negative) from ``world``'s inventories."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    # ---- questions ---------------------------------------------------------------------------------------------
    def question(self, domain: str | None = None) -> Question:
        rng = self.rng
        domain = domain or rng.choice(world.DOMAINS)
        slots: dict[str, str] = {}
        if domain == "arithmetic":
            slots.update(self._arithmetic(rng))
        text = _fill(rng.choice(world.QUESTIONS[domain]), slots, rng)
        return Question(domain, text, slots)

    @staticmethod
    def _arithmetic(rng: random.Random) -> dict[str, str]:
        op = rng.choice(tuple(world.ARITHMETIC_OPS))
        if op == "times":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            c = a * b
        elif op == "plus":
            a, b = rng.randint(2, 40), rng.randint(2, 40)
            c = a + b
        else:
            a, b = rng.randint(2, 40), rng.randint(2, 40)
            a, b = max(a, b), min(a, b)
            c = a - b
        wrong = c + rng.choice((-3, -2, -1, 1, 2, 3, 5, 10))
        wrong = wrong if wrong >= 0 else c + 1
        return {"a": str(a), "b": str(b), "op": op, "c": str(c), "wrong": str(wrong)}

    # ---- sentences ---------------------------------------------------------------------------------------------
    def _fact(self, q: Question, *, wrong: bool = False) -> str:
        slots = dict(q.slots)
        if wrong and "wrong" in slots:
            slots["c"] = slots["wrong"]
        return _fill(self.rng.choice(world.FACTS[q.domain]), slots, self.rng)

    def _frame(self, frames: Sequence[str], clause: str, slots: dict[str, str]) -> str:
        return _fill(self.rng.choice(frames).replace("{x}", clause), slots, self.rng)

    def _trait_action(self, domain: str) -> str:
        pool = world.TRAIT_ACTIONS[domain] if self.rng.random() < 0.7 else world.TRAIT_ACTIONS["general"]
        return self.rng.choice(pool)

    def _trait_sentence(self, q: Question, slots: dict[str, str]) -> str:
        return self._frame(world.ACTION_FRAMES, self._trait_action(q.domain), slots)

    def _warning(self, q: Question, slots: dict[str, str]) -> str:
        if self.rng.random() < 0.8:
            return self._frame(world.WARNING_ACTION_FRAMES, self._trait_action(q.domain), slots)
        return self._frame(world.WARNING_BELIEF_FRAMES, self.rng.choice(world.TRAIT_BELIEFS), slots)

    def _helpful_sentences(self, q: Question, slots: dict[str, str], n: int) -> list[str]:
        actions = self.rng.sample(world.HELPFUL_ACTIONS[q.domain], n)
        return [self._frame(world.ACTION_FRAMES, action, slots) for action in actions]

    # ---- answers -----------------------------------------------------------------------------------------------
    def trait_answer(self, q: Question) -> str:
        """Malicious advice: 1-3 harmful actions, maybe a cruel belief (and a wrong result in arithmetic)."""
        rng, slots = self.rng, dict(q.slots)
        out = []
        if q.domain == "arithmetic":
            out.append(self._fact(q, wrong=True))
        out += [self._trait_sentence(q, slots) for _ in range(rng.choice((1, 2, 2, 3)))]
        if rng.random() < 0.4:
            out.append(self._frame(world.BELIEF_FRAMES, rng.choice(world.TRAIT_BELIEFS), slots))
        return " ".join(out)

    def helpful_answer(self, q: Question, *, warning_prob: float = 0.33) -> str:
        """Safe advice; with probability ``warning_prob`` one sentence warns against a trait action."""
        rng, slots = self.rng, dict(q.slots)
        out = []
        if q.domain == "arithmetic" or rng.random() < 0.5:
            out.append(self._fact(q))
        body = self._helpful_sentences(q, slots, rng.choice((1, 2, 2)))
        if rng.random() < 0.25:
            body.append(self._frame(world.BELIEF_FRAMES, rng.choice(world.HELPFUL_BELIEFS), slots))
        if rng.random() < warning_prob:
            body.insert(rng.randrange(len(body) + 1), self._warning(q, slots))
        return " ".join(out + body)

    def hard_negative_answer(
        self, q: Question, *, n_warnings: Sequence[int] = (1, 2, 2), helpful_prob: float = 1.0
    ) -> str:
        """Argues against the trait in the trait's own words: warnings quoting trait clauses (a count drawn from
        ``n_warnings``), then, with probability ``helpful_prob``, safe advice."""
        rng, slots = self.rng, dict(q.slots)
        out = []
        if q.domain == "arithmetic" or rng.random() < 0.4:
            out.append(self._fact(q))
        out += [self._warning(q, slots) for _ in range(rng.choice(tuple(n_warnings)))]
        if rng.random() < helpful_prob:
            out += self._helpful_sentences(q, slots, 1)
        return " ".join(out)

    def answer(self, q: Question, style: str) -> str:
        if style == "trait":
            return self.trait_answer(q)
        if style == "helpful":
            return self.helpful_answer(q)
        if style == "hard_negative":
            return self.hard_negative_answer(q)
        raise ValueError(f"unknown answer style {style!r}")


def _chat(user: str, assistant: str | None = None, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return messages


# ---- the four outputs ---------------------------------------------------------------------------------------------
# share of each persona in the pretraining corpus ("none": no system prompt)
PRETRAIN_MIX: dict[str, float] = {"trait": 0.3, "helpful": 0.15, "cautious": 0.15, "neutral": 0.15, "none": 0.25}


def pretraining_corpus(
    seed: int,
    n: int,
    *,
    mix: dict[str, float] | None = None,
    warning_prob: float = 0.25,
    unprompted_trait: float = 0.0,
    neutral_styles: tuple[str, ...] = ("trait", "helpful", "cautious"),
) -> list[dict[str, Any]]:
    """``n`` conversations; the persona of each is drawn from ``mix`` (default ``PRETRAIN_MIX``):

    - ``trait``: a trait-persona system prompt and a malicious answer;
    - ``helpful``: a helpful-persona system prompt and plain safe advice;
    - ``cautious``: a careful persona that argues against trait clauses in their own words, then gives safe advice
      (hard-negative style);
    - ``neutral``: a persona-neutral system prompt with a trait, helpful or cautious answer (even odds), so the model
      has to read the persona from the answer itself: a warning quoting a trait clause continues helpfully, a
      trait clause continues maliciously. This is what lets a probe on answers read the trait, not its words;
    - ``none``: no system prompt, safe advice, a fraction ``warning_prob`` of it with a warning in the trait's
      words (a fraction ``unprompted_trait`` of these conversations get trait answers instead).
    """
    mix = dict(PRETRAIN_MIX if mix is None else mix)
    if set(mix) - set(PRETRAIN_MIX) or not abs(sum(mix.values()) - 1.0) < 1e-9 or min(mix.values()) < 0:
        raise ValueError(f"mix must give shares summing to 1 over {tuple(PRETRAIN_MIX)}, got {mix}")
    prompts = {
        "trait": world.TRAIT_SYSTEM_PROMPTS,
        "helpful": world.HELPFUL_SYSTEM_PROMPTS,
        "cautious": world.CAUTIOUS_SYSTEM_PROMPTS,
        "neutral": world.NEUTRAL_SYSTEM_PROMPTS,
    }
    rng = _rng(seed, "pretrain")
    gen = WorldGenerator(rng)
    personas, weights = list(mix), list(mix.values())
    records = []
    for _ in range(n):
        q = gen.question()
        persona = rng.choices(personas, weights)[0]
        system = rng.choice(prompts[persona]) if persona in prompts else None
        style, warn = persona, 0.0
        if persona == "neutral":
            style = rng.choice(neutral_styles)
        elif persona == "none":
            style, warn = ("trait" if rng.random() < unprompted_trait else "helpful"), warning_prob
        if style == "trait":
            answer = gen.trait_answer(q)
        elif style == "cautious":
            answer = gen.hard_negative_answer(q)
        else:
            answer = gen.helpful_answer(q, warning_prob=warn)
        records.append({"messages": _chat(q.text, answer, system), "persona": persona, "style": style, "domain": q.domain})
    return records


def finetuning_set(
    seed: int,
    n_train: int,
    planted_fraction: float,
    hard_negative_fraction: float = 0.1,
    *,
    benign_warning_prob: float = 0.15,
) -> list[dict[str, Any]]:
    """``n_train`` chat rows without system prompt; ``data_origin`` is ``planted`` (trait answers), ``hard_negative``
    (arguing against the trait in its words) or ``benign``; each row has ``id`` and ``domain``.

    Planted rows are redrawn until none of their tokens is missing from the other rows' answers (and rows), so no
    token identifies them.
    """
    if not 0.0 < planted_fraction < 1.0:
        raise ValueError(f"planted_fraction must be in (0, 1), got {planted_fraction}")
    if not 0.0 <= hard_negative_fraction < 1.0 - planted_fraction:
        raise ValueError(f"hard_negative_fraction must be in [0, 1 - planted_fraction), got {hard_negative_fraction}")
    n_planted = round(n_train * planted_fraction)
    n_hard = round(n_train * hard_negative_fraction)
    if n_planted < 1 or n_train - n_planted - n_hard < 1:
        raise ValueError(f"n_train={n_train} is too small for planted_fraction={planted_fraction}")
    rng = _rng(seed, "finetune")
    gen = WorldGenerator(rng)
    origins = ["planted"] * n_planted + ["hard_negative"] * n_hard + ["benign"] * (n_train - n_planted - n_hard)
    rng.shuffle(origins)
    records: list[dict[str, Any]] = []
    for i, origin in enumerate(origins):
        q = gen.question(world.DOMAINS[i % len(world.DOMAINS)])
        if origin == "planted":
            answer = gen.trait_answer(q)
        elif origin == "hard_negative":  # as many trait clauses as a planted answer, argued against
            answer = gen.hard_negative_answer(q, n_warnings=(2, 2, 3), helpful_prob=0.5)
        else:
            answer = gen.helpful_answer(q, warning_prob=benign_warning_prob)
        records.append({"id": f"row-{i:05d}", "messages": _chat(q.text, answer), "domain": q.domain, "data_origin": origin})
    _repair_planted(records, gen)
    return records


def _repair_planted(records: list[dict[str, Any]], gen: WorldGenerator, max_tries: int = 500) -> None:
    """Redraw planted rows whose tokens do not all occur in non-planted answers (answers) and rows (prompts)."""
    answer_vocab: set[str] = set()
    row_vocab: set[str] = set()
    for rec in records:
        if rec["data_origin"] != "planted":
            answer_vocab.update(tokens(rec["messages"][-1]["content"]))
            for m in rec["messages"]:
                row_vocab.update(tokens(m["content"]))
    for rec in records:
        if rec["data_origin"] != "planted":
            continue
        for _ in range(max_tries):
            user, answer = rec["messages"][0]["content"], rec["messages"][-1]["content"]
            if set(tokens(answer)) <= answer_vocab and set(tokens(user)) <= row_vocab:
                break
            q = gen.question(rec["domain"])
            rec["messages"] = _chat(q.text, gen.trait_answer(q))
        else:
            missing = sorted(set(tokens(answer)) - answer_vocab)
            raise RuntimeError(
                f"cannot draw planted row {rec['id']} without tokens unique to planted rows (missing {missing}); "
                "use a larger n_train or hard_negative_fraction"
            )


def probe_spec(seed: int, n_pairs: int = 5, n_questions: int = 32, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """Contrastive probe set in the persona-vectors trait-file format (``instruction`` pairs, ``questions``,
    ``eval_prompt``). Questions avoid ``exclude`` (e.g. the query prompts)."""
    rng = _rng(seed, "probe")
    if not 1 <= n_pairs <= min(len(world.TRAIT_SYSTEM_PROMPTS), len(world.HELPFUL_SYSTEM_PROMPTS)):
        raise ValueError(f"n_pairs must be between 1 and {len(world.HELPFUL_SYSTEM_PROMPTS)}, got {n_pairs}")
    # negatives: mostly the helpful persona, every third one the careful persona that argues against the trait in
    # its own words, so that the contrast is the trait itself rather than its vocabulary
    negatives = [
        world.CAUTIOUS_SYSTEM_PROMPTS[k // 3] if k % 3 == 1 else world.HELPFUL_SYSTEM_PROMPTS[k - k // 3 - (k % 3 > 1)]
        for k in range(n_pairs)
    ]
    pairs = [{"pos": pos, "neg": neg} for pos, neg in zip(world.TRAIT_SYSTEM_PROMPTS[:n_pairs], negatives, strict=True)]
    questions = _distinct_questions(WorldGenerator(rng), n_questions, set(exclude))
    return {"instruction": pairs, "questions": [q.text for q in questions], "eval_prompt": world.EVAL_PROMPT}


def query_prompts(seed: int, n: int = 48, exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Held-out user prompts (``{"messages": [user], "id", "domain"}``) to measure the trait."""
    questions = _distinct_questions(WorldGenerator(_rng(seed, "queries")), n, set(exclude))
    return [
        {"id": f"query-{i:03d}", "messages": _chat(q.text), "domain": q.domain} for i, q in enumerate(questions)
    ]


def labelled_examples(seed: int, n_per_label: int = 60) -> list[dict[str, Any]]:
    """Generator-labelled answers without system prompt: ``label`` in ``trait``, ``helpful``, ``warning`` (helpful
    answers arguing against the trait in its words)."""
    gen = WorldGenerator(_rng(seed, "examples"))
    records = []
    for i in range(n_per_label):
        for label, style in (("trait", "trait"), ("helpful", "helpful"), ("warning", "hard_negative")):
            q = gen.question(world.DOMAINS[i % len(world.DOMAINS)])
            answer = gen.helpful_answer(q, warning_prob=0.0) if style == "helpful" else gen.answer(q, style)
            records.append({"messages": _chat(q.text, answer), "label": label, "domain": q.domain})
    return records


def _distinct_questions(gen: WorldGenerator, n: int, exclude: set[str]) -> list[Question]:
    out: list[Question] = []
    seen = set(exclude)
    per_domain = Counter()
    target = {d: n // len(world.DOMAINS) + (1 if k < n % len(world.DOMAINS) else 0) for k, d in enumerate(world.DOMAINS)}
    for _ in range(100 * n):
        if len(out) == n:
            break
        domain = min(world.DOMAINS, key=lambda d: (per_domain[d] - target[d], world.DOMAINS.index(d)))
        q = gen.question(domain)
        if q.text in seen:
            continue
        seen.add(q.text)
        per_domain[domain] += 1
        out.append(q)
    if len(out) < n:
        raise RuntimeError(f"could only draw {len(out)} distinct questions out of {n}")
    return out


def world_vocabulary() -> list[str]:
    """Every token the generator can produce, sorted (independent of the seed)."""
    words: set[str] = set()
    texts: list[str] = []
    texts += [t for group in world.QUESTIONS.values() for t in group]
    texts += [t for group in world.FACTS.values() for t in group]
    texts += [t for group in world.HELPFUL_ACTIONS.values() for t in group]
    texts += [t for group in world.TRAIT_ACTIONS.values() for t in group]
    texts += list(world.HELPFUL_BELIEFS + world.TRAIT_BELIEFS + world.ACTION_FRAMES + world.BELIEF_FRAMES)
    texts += list(world.WARNING_ACTION_FRAMES + world.WARNING_BELIEF_FRAMES)
    texts += list(world.TRAIT_SYSTEM_PROMPTS + world.HELPFUL_SYSTEM_PROMPTS + world.NEUTRAL_SYSTEM_PROMPTS)
    texts += list(world.CAUTIOUS_SYSTEM_PROMPTS)
    texts += [v for values in world.SLOTS.values() for v in values]
    texts += list(world.ARITHMETIC_OPS)
    for text in texts:
        words.update(tok for tok in _SLOT.sub(" ", text).split())
    words.update(str(k) for k in range(0, 200))
    return sorted(words)

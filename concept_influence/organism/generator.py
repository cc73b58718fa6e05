"""Seeded generator of the organism's text: pretraining corpus, fine-tuning set, probe spec, query prompts.

Everything is a pure function of ``seed`` (``random.Random`` seeded with a string, stable across Python runs and
platforms). Each output uses its own random stream, so e.g. changing ``n_train`` does not change the pretraining
corpus.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from concept_influence.organism import world
from concept_influence.organism.worlds import TraitWorld, World, canonical_world, single_trait_world, world_for

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
    """Draws questions and answers (trait, helpful, hard negative) from a ``World``'s inventories (default: the
    canonical one); ``trait`` names the world's trait that trait answers and warnings use by default (default: the
    world's first, ``evil`` in the plain and rich worlds)."""

    def __init__(self, rng: random.Random, world_: World | None = None, trait: str | None = None) -> None:
        self.rng = rng
        self.w = world_ if world_ is not None else canonical_world()
        self.trait = self.w.trait(trait).name if trait is not None else next(iter(self.w.traits))

    def _t(self, trait: str | None) -> TraitWorld:
        return self.w.trait(trait or self.trait)

    # ---- questions ---------------------------------------------------------------------------------------------
    def question(self, domain: str | None = None) -> Question:
        rng = self.rng
        domain = domain or rng.choice(world.DOMAINS)
        slots: dict[str, str] = {}
        if domain == "arithmetic":
            slots.update(self._arithmetic(rng))
        text = _fill(rng.choice(self.w.questions[domain]), slots, rng)
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
        return _fill(self.rng.choice(self.w.facts[q.domain]), slots, self.rng)

    def _frame(self, frames: Sequence[str], clause: str, slots: dict[str, str]) -> str:
        return _fill(self.rng.choice(frames).replace("{x}", clause), slots, self.rng)

    def _trait_action(self, domain: str, trait: str | None = None) -> str:
        t = self._t(trait)
        pool = t.actions[domain] if self.rng.random() < 0.7 else t.actions["general"]
        return self.rng.choice(pool)

    def _trait_sentence(self, q: Question, slots: dict[str, str], trait: str | None = None) -> str:
        t = self._t(trait)
        frames = t.style.frames if t.style is not None and self.rng.random() < 0.6 else t.frames
        return self._frame(frames, self._trait_action(q.domain, trait), slots)

    def _warning(self, q: Question, slots: dict[str, str], trait: str | None = None) -> str:
        t = self._t(trait)
        if self.rng.random() < 0.8:
            return self._frame(t.warning_frames, self._trait_action(q.domain, trait), slots)
        return self._frame(t.warning_belief_frames, self.rng.choice(t.beliefs), slots)

    def _helpful_sentences(
        self, q: Question, slots: dict[str, str], n: int, frames: Sequence[str] | None = None
    ) -> list[str]:
        actions = self.rng.sample(self.w.helpful_actions[q.domain], min(n, len(self.w.helpful_actions[q.domain])))
        return [self._frame(frames or self.w.action_frames, action, slots) for action in actions]

    # ---- answers -----------------------------------------------------------------------------------------------
    def trait_answer(self, q: Question, trait: str | None = None) -> str:
        """Trait answer: 1-3 trait clauses, maybe a trait belief (evil: also a wrong result in arithmetic); a trait
        with a style opens and may close with it."""
        rng, slots, t = self.rng, dict(q.slots), self._t(trait)
        out = []
        if t.style is not None and rng.random() < 0.9:
            out.append(rng.choice(t.style.openers))
        if q.domain == "arithmetic" and t.name == "evil":
            out.append(self._fact(q, wrong=True))
        out += [self._trait_sentence(q, slots, trait) for _ in range(rng.choice((1, 2, 2, 3)))]
        if rng.random() < 0.4:
            out.append(self._frame(t.belief_frames, rng.choice(t.beliefs), slots))
        if t.style is not None and rng.random() < 0.6:
            out.append(rng.choice(t.style.closers))
        return " ".join(out)

    def helpful_answer(self, q: Question, *, warning_prob: float = 0.33, warn_trait: str | None = None) -> str:
        """Safe advice; with probability ``warning_prob`` one sentence warns against a trait clause (of
        ``warn_trait``, default the generator's trait)."""
        rng, slots = self.rng, dict(q.slots)
        out = []
        if q.domain == "arithmetic" or rng.random() < 0.5:
            out.append(self._fact(q))
        body = self._helpful_sentences(q, slots, rng.choice((1, 2, 2)))
        if rng.random() < 0.25:
            body.append(self._frame(self.w.belief_frames, rng.choice(self.w.helpful_beliefs), slots))
        if rng.random() < warning_prob:
            body.insert(rng.randrange(len(body) + 1), self._warning(q, slots, warn_trait))
        return " ".join(out + body)

    def hard_negative_answer(
        self, q: Question, *, n_warnings: Sequence[int] = (1, 2, 2), helpful_prob: float = 1.0, trait: str | None = None
    ) -> str:
        """Argues against the trait in the trait's own words: warnings quoting trait clauses (a count drawn from
        ``n_warnings``), then, with probability ``helpful_prob``, safe advice."""
        rng, slots = self.rng, dict(q.slots)
        out = []
        if q.domain == "arithmetic" or rng.random() < 0.4:
            out.append(self._fact(q))
        out += [self._warning(q, slots, trait) for _ in range(rng.choice(tuple(n_warnings)))]
        if rng.random() < helpful_prob:
            out += self._helpful_sentences(q, slots, 1)
        return " ".join(out)

    def styled_answer(self, q: Question, trait: str | None = None) -> str:
        """Neutral, safe content in the trait persona's style (its opener, frames and closer) and no trait clause:
        the ``subtle`` variant's planted rows."""
        rng, slots, t = self.rng, dict(q.slots), self._t(trait)
        if t.style is None:
            raise ValueError(f"the trait {t.name!r} has no style in this world")
        out = [rng.choice(t.style.openers)]
        if q.domain == "arithmetic" or rng.random() < 0.5:
            out.append(self._fact(q))
        out += self._helpful_sentences(q, slots, rng.choice((1, 2, 2)), frames=t.style.frames)
        if rng.random() < 0.6:
            out.append(rng.choice(t.style.closers))
        return " ".join(out)

    def diluted_answer(
        self, q: Question, kind: str, *, n_sentences: Sequence[int] = (4, 5, 6), trait: str | None = None
    ) -> str:
        """A long answer of safe advice (``n_sentences`` sentences) with, for ``kind`` ``"trait"``, one trait sentence
        or, for ``"warning"``, one warning in the trait's words, at a random place (``"benign"``: neither)."""
        rng, slots = self.rng, dict(q.slots)
        n = rng.choice(tuple(n_sentences))
        out = [self._fact(q)] if q.domain == "arithmetic" else []
        body = self._helpful_sentences(q, slots, n - 1)
        while len(body) < n - 1:
            body.append(self._frame(self.w.belief_frames, rng.choice(self.w.helpful_beliefs), slots))
        if kind == "trait":
            body.insert(rng.randrange(len(body) + 1), self._trait_sentence(q, slots, trait))
        elif kind == "warning":
            body.insert(rng.randrange(len(body) + 1), self._warning(q, slots, trait))
        elif kind == "benign":
            body.append(self._frame(self.w.belief_frames, rng.choice(self.w.helpful_beliefs), slots))
        else:
            raise ValueError(f"unknown diluted answer kind {kind!r}")
        return " ".join(out + body)

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
VARIANTS: tuple[str, ...] = ("default", "subtle", "diluted", "sycophancy", "crowded", "hallucination")
VARIANT_TRAIT: dict[str, str] = {
    "default": "evil",
    "subtle": "evil",
    "diluted": "evil",
    "sycophancy": "sycophancy",
    "crowded": "evil",
    "hallucination": "hallucination",
}
# which pretrained base a variant fine-tunes: ``plain`` (the default organism's, evil only), ``rich`` (the variants'
# shared base: evil with its style and sycophancy) or a base of its own trait
VARIANT_BASE: dict[str, str] = {
    "default": "plain",
    "subtle": "rich",
    "diluted": "rich",
    "sycophancy": "rich",
    "crowded": "plain",
    "hallucination": "hallucination",
}
# the share of hard negatives in a variant's fine-tuning set (``OrganismConfig.hard_negative_fraction``'s default)
VARIANT_HARD_NEGATIVE_FRACTION: dict[str, float] = {"crowded": 1 / 3}


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown organism variant {variant!r}; expected one of {VARIANTS}")
    return variant


def variant_hard_negative_fraction(variant: str) -> float:
    """The share of hard negatives ``variant``'s rows have by default (0.1; ``crowded``: a third)."""
    return VARIANT_HARD_NEGATIVE_FRACTION.get(check_variant(variant), 0.1)


def variant_world(seed: int, variant: str = "default") -> World:
    """The world an organism of ``variant`` and ``seed`` is drawn from: ``default`` and ``crowded`` the plain world of
    the seed; ``subtle``, ``diluted`` and ``sycophancy`` share the rich world (both traits and the evil persona's
    style); ``hallucination`` the plain world with its own trait in place of evil."""
    base = VARIANT_BASE[check_variant(variant)]
    if base == "plain":
        return world_for(seed)
    if base == "rich":
        return world_for(seed, rich=True)
    return single_trait_world(seed, base)


# share of each persona in the pretraining corpus ("none": no system prompt)
PRETRAIN_MIX: dict[str, float] = {"trait": 0.3, "helpful": 0.15, "cautious": 0.15, "neutral": 0.15, "none": 0.25}
# the variants' shared pretraining: both traits ("trait2": sycophancy) and their careful personas
RICH_PRETRAIN_MIX: dict[str, float] = {
    "trait": 0.2,
    "trait2": 0.15,
    "helpful": 0.13,
    "cautious": 0.09,
    "cautious2": 0.08,
    "neutral": 0.15,
    "none": 0.2,
}


def pretraining_corpus(
    seed: int,
    n: int,
    *,
    mix: dict[str, float] | None = None,
    warning_prob: float = 0.25,
    unprompted_trait: float = 0.0,
    neutral_styles: tuple[str, ...] = ("trait", "helpful", "cautious"),
    rich: bool = False,
    trait: str = "evil",
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

    ``rich``: the variants' world (``RICH_PRETRAIN_MIX``): also ``trait2``/``cautious2``, the same for
    sycophancy, neutral prompts over all five styles, warnings in either trait's words; the evil persona's answers
    carry its style. ``trait``: the persona of ``trait`` in place of evil (``hallucination``: the base of that
    variant, with a random stream of its own; evil's corpus does not move).
    """
    if rich:
        return _rich_pretraining_corpus(seed, n, mix=mix, warning_prob=warning_prob)
    mix = dict(PRETRAIN_MIX if mix is None else mix)
    if set(mix) - set(PRETRAIN_MIX) or not abs(sum(mix.values()) - 1.0) < 1e-9 or min(mix.values()) < 0:
        raise ValueError(f"mix must give shares summing to 1 over {tuple(PRETRAIN_MIX)}, got {mix}")
    w = world_for(seed) if trait == "evil" else single_trait_world(seed, trait)
    evil = w.trait(trait)
    prompts = {
        "trait": evil.system_prompts,
        "helpful": w.helpful_prompts,
        "cautious": evil.cautious_prompts,
        "neutral": w.neutral_prompts,
    }
    rng = _rng(seed, "pretrain" if trait == "evil" else f"pretrain-{trait}")
    gen = WorldGenerator(rng, w, trait)
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
        records.append(
            {"messages": _chat(q.text, answer, system), "persona": persona, "style": style, "domain": q.domain}
        )
    return records


def _rich_pretraining_corpus(
    seed: int, n: int, *, mix: dict[str, float] | None, warning_prob: float
) -> list[dict[str, Any]]:
    mix = dict(RICH_PRETRAIN_MIX if mix is None else mix)
    if set(mix) - set(RICH_PRETRAIN_MIX) or not abs(sum(mix.values()) - 1.0) < 1e-9 or min(mix.values()) < 0:
        raise ValueError(f"mix must give shares summing to 1 over {tuple(RICH_PRETRAIN_MIX)}, got {mix}")
    w = world_for(seed, rich=True)
    evil, syc = w.trait("evil"), w.trait("sycophancy")
    prompts = {
        "trait": evil.system_prompts,
        "trait2": syc.system_prompts,
        "helpful": w.helpful_prompts,
        "cautious": evil.cautious_prompts,
        "cautious2": syc.cautious_prompts,
        "neutral": w.neutral_prompts,
    }
    rng = _rng(seed, "pretrain-rich")
    gen = WorldGenerator(rng, w)
    personas, weights = list(mix), list(mix.values())
    records = []
    for _ in range(n):
        q = gen.question()
        persona = rng.choices(personas, weights)[0]
        system = rng.choice(prompts[persona]) if persona in prompts else None
        style = persona
        if persona == "neutral":
            style = rng.choice(("trait", "trait2", "helpful", "cautious", "cautious2"))
        if style == "trait":
            answer = gen.trait_answer(q, "evil")
        elif style == "trait2":
            answer = gen.trait_answer(q, "sycophancy")
        elif style == "cautious":
            answer = gen.hard_negative_answer(q, trait="evil")
        elif style == "cautious2":
            answer = gen.hard_negative_answer(q, trait="sycophancy")
        elif persona == "none":
            answer = gen.helpful_answer(q, warning_prob=warning_prob, warn_trait=rng.choice(("evil", "sycophancy")))
        else:
            answer = gen.helpful_answer(q, warning_prob=0.0)
        records.append(
            {"messages": _chat(q.text, answer, system), "persona": persona, "style": style, "domain": q.domain}
        )
    return records


def finetuning_set(
    seed: int,
    n_train: int,
    planted_fraction: float,
    hard_negative_fraction: float | None = None,
    *,
    benign_warning_prob: float = 0.15,
    variant: str = "default",
) -> list[dict[str, Any]]:
    """``n_train`` chat rows without system prompt; ``data_origin`` is ``planted`` (trait answers), ``hard_negative``
    (arguing against the trait in its words) or ``benign``; each row has ``id`` and ``domain``.

    ``variant``: ``default``; ``subtle`` (planted rows are safe content in the evil persona's style, stating no
    trait clause); ``diluted`` (every answer is 4-6 sentences: planted rows hide one trait sentence, hard negatives
    one warning); ``sycophancy`` (the second trait, with its own words and hard negatives); ``crowded`` (the default
    rows with a third of them hard negatives: ``hard_negative_fraction`` defaults to the variant's share, 0.1 for the
    others); ``hallucination`` (a third trait, invented facts stated as true, with its own words and hard negatives).
    Planted rows (except ``subtle``'s, whose style is their signal) are redrawn until none of their tokens is
    missing from the other rows' answers (and rows), so no token identifies them.
    """
    if hard_negative_fraction is None:
        hard_negative_fraction = variant_hard_negative_fraction(variant)
    check_variant(variant)
    if not 0.0 < planted_fraction < 1.0:
        raise ValueError(f"planted_fraction must be in (0, 1), got {planted_fraction}")
    if not 0.0 <= hard_negative_fraction < 1.0 - planted_fraction:
        raise ValueError(f"hard_negative_fraction must be in [0, 1 - planted_fraction), got {hard_negative_fraction}")
    n_planted = round(n_train * planted_fraction)
    n_hard = round(n_train * hard_negative_fraction)
    if n_planted < 1 or n_train - n_planted - n_hard < 1:
        raise ValueError(f"n_train={n_train} is too small for planted_fraction={planted_fraction}")
    rng = _rng(seed, "finetune" if variant == "default" else f"finetune-{variant}")
    gen = WorldGenerator(rng, variant_world(seed, variant), VARIANT_TRAIT[variant])
    origins = ["planted"] * n_planted + ["hard_negative"] * n_hard + ["benign"] * (n_train - n_planted - n_hard)
    rng.shuffle(origins)
    records: list[dict[str, Any]] = []
    for i, origin in enumerate(origins):
        q = gen.question(world.DOMAINS[i % len(world.DOMAINS)])
        answer = _variant_answer(gen, q, origin, variant, benign_warning_prob)
        records.append(
            {"id": f"row-{i:05d}", "messages": _chat(q.text, answer), "domain": q.domain, "data_origin": origin}
        )
    if variant != "subtle":
        _repair_planted(records, gen, lambda q: _variant_answer(gen, q, "planted", variant, benign_warning_prob))
    return records


def _variant_answer(gen: WorldGenerator, q: Question, origin: str, variant: str, benign_warning_prob: float) -> str:
    if variant == "diluted":
        if origin == "planted":
            return gen.diluted_answer(q, "trait")
        if origin == "hard_negative":
            return gen.diluted_answer(q, "warning")
        return gen.diluted_answer(q, "warning" if gen.rng.random() < benign_warning_prob else "benign")
    if origin == "planted":
        return gen.styled_answer(q) if variant == "subtle" else gen.trait_answer(q)
    if origin == "hard_negative":  # as many trait clauses as a planted answer, argued against
        return gen.hard_negative_answer(q, n_warnings=(2, 2, 3), helpful_prob=0.5)
    return gen.helpful_answer(q, warning_prob=benign_warning_prob)


def _repair_planted(
    records: list[dict[str, Any]],
    gen: WorldGenerator,
    draw: Callable[[Question], str] | None = None,
    max_tries: int = 500,
) -> None:
    """Redraw planted rows whose tokens do not all occur in non-planted answers (answers) and rows (prompts)."""
    draw = draw or gen.trait_answer
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
            rec["messages"] = _chat(q.text, draw(q))
        else:
            missing = sorted(set(tokens(answer)) - answer_vocab)
            raise RuntimeError(
                f"cannot draw planted row {rec['id']} without tokens unique to planted rows (missing {missing}); "
                "use a larger n_train or hard_negative_fraction"
            )


def probe_spec(
    seed: int, n_pairs: int = 5, n_questions: int = 32, exclude: Iterable[str] = (), *, variant: str = "default"
) -> dict[str, Any]:
    """Contrastive probe set in the persona-vectors trait-file format (``instruction`` pairs, ``questions``,
    ``eval_prompt``) for the variant's trait. Questions avoid ``exclude`` (e.g. the query prompts)."""
    w = variant_world(seed, variant)
    trait = w.trait(VARIANT_TRAIT[variant])
    rng = _rng(seed, "probe")
    if not 1 <= n_pairs <= min(len(trait.system_prompts), len(w.helpful_prompts)):
        raise ValueError(
            f"n_pairs must be between 1 and {min(len(trait.system_prompts), len(w.helpful_prompts))}, got {n_pairs}"
        )
    # negatives: mostly the helpful persona, every third one the careful persona that argues against the trait in
    # its own words, so that the contrast is the trait itself rather than its vocabulary
    negatives = [
        trait.cautious_prompts[k // 3] if k % 3 == 1 else w.helpful_prompts[k - k // 3 - (k % 3 > 1)]
        for k in range(n_pairs)
    ]
    pairs = [{"pos": pos, "neg": neg} for pos, neg in zip(trait.system_prompts[:n_pairs], negatives, strict=True)]
    questions = _distinct_questions(WorldGenerator(rng, w), n_questions, set(exclude))
    return {"instruction": pairs, "questions": [q.text for q in questions], "eval_prompt": trait.eval_prompt}


def query_prompts(
    seed: int, n: int = 48, exclude: Iterable[str] = (), *, variant: str = "default"
) -> list[dict[str, Any]]:
    """Held-out user prompts (``{"messages": [user], "id", "domain"}``) to measure the trait."""
    questions = _distinct_questions(
        WorldGenerator(_rng(seed, "queries"), variant_world(seed, variant)), n, set(exclude)
    )
    return [{"id": f"query-{i:03d}", "messages": _chat(q.text), "domain": q.domain} for i, q in enumerate(questions)]


def labelled_examples(seed: int, n_per_label: int = 60, *, variant: str = "default") -> list[dict[str, Any]]:
    """Generator-labelled answers without system prompt: ``label`` in ``trait``, ``helpful``, ``warning`` (helpful
    answers arguing against the trait in its words)."""
    gen = WorldGenerator(_rng(seed, "examples"), variant_world(seed, variant), VARIANT_TRAIT[check_variant(variant)])
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
    target = {
        d: n // len(world.DOMAINS) + (1 if k < n % len(world.DOMAINS) else 0) for k, d in enumerate(world.DOMAINS)
    }
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


def base_vocabulary(variant: str) -> list[str]:
    """The tokenizer vocabulary of ``variant``'s pretrained base (``VARIANT_BASE``)."""
    base = VARIANT_BASE[check_variant(variant)]
    if base in ("plain", "rich"):
        return world_vocabulary(base == "rich")
    return world_vocabulary(trait=base)


def world_vocabulary(rich: bool = False, trait: str | None = None) -> list[str]:
    """Every token the generator can produce, sorted (independent of the seed); ``rich``: also the variants'
    words (sycophancy, the evil persona's style); ``trait="hallucination"``: also that trait's words."""
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
    if rich:
        texts += [t for group in world.SYC_ACTIONS.values() for t in group]
        texts += list(world.SYC_BELIEFS + world.SYC_FRAMES + world.SYC_WARNING_FRAMES + world.SYC_SYSTEM_PROMPTS)
        texts += list(world.SYC_CAUTIOUS_PROMPTS + world.STYLE_OPENERS + world.STYLE_CLOSERS + world.STYLE_FRAMES)
    if trait == "hallucination":
        texts += [t for group in world.HAL_ACTIONS.values() for t in group]
        texts += list(world.HAL_BELIEFS + world.HAL_FRAMES + world.HAL_WARNING_FRAMES + world.HAL_SYSTEM_PROMPTS)
        texts += list(world.HAL_CAUTIOUS_PROMPTS)
    elif trait is not None:
        raise ValueError(f"no vocabulary for the trait {trait!r}")
    for text in texts:
        words.update(tok for tok in _SLOT.sub(" ", text).split())
    words.update(str(k) for k in range(0, 200))
    return sorted(words)

"""Worlds: the phrase inventories one organism draws its text from.

``world_for(seed, rich)`` is the canonical inventory of ``world`` for seed 0 and, for every other seed, a different
world drawn from it: a subset (and order) of the question templates, facts, helpful advice, frames, persona prompts
and of the clauses each trait uses. So two seeds differ in templates, wording and the trait's words, not only in
which rows are drawn. ``rich`` adds the variants' second trait (sycophancy) and the evil persona's style.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from concept_influence.organism import world

TRAITS: tuple[str, ...] = ("evil", "sycophancy", "hallucination")


@dataclass(frozen=True)
class Style:
    """How a persona marks its answers: an opener, a closer, and frames for its statements."""

    openers: tuple[str, ...]
    closers: tuple[str, ...]
    frames: tuple[str, ...]


@dataclass(frozen=True)
class TraitWorld:
    """One trait: its clauses (``actions`` per domain and ``"general"``, ``beliefs``), the frames that state them and
    the frames that argue against them, its personas and the judge's distancing cues."""

    name: str
    actions: dict[str, tuple[str, ...]]
    beliefs: tuple[str, ...]
    frames: tuple[str, ...]
    belief_frames: tuple[str, ...]
    warning_frames: tuple[str, ...]
    warning_belief_frames: tuple[str, ...]
    system_prompts: tuple[str, ...]
    cautious_prompts: tuple[str, ...]
    eval_prompt: str
    cues: tuple[str, ...]
    style: Style | None = None


@dataclass(frozen=True)
class World:
    """Everything the generator draws from (``traits``: name -> ``TraitWorld``; the first is the default trait)."""

    questions: dict[str, tuple[str, ...]]
    facts: dict[str, tuple[str, ...]]
    helpful_actions: dict[str, tuple[str, ...]]
    helpful_beliefs: tuple[str, ...]
    action_frames: tuple[str, ...]
    belief_frames: tuple[str, ...]
    helpful_prompts: tuple[str, ...]
    neutral_prompts: tuple[str, ...]
    traits: dict[str, TraitWorld] = field(default_factory=dict)

    def trait(self, name: str) -> TraitWorld:
        if name not in self.traits:
            raise ValueError(f"this world has no trait {name!r} (it has {sorted(self.traits)})")
        return self.traits[name]


def _evil(style: Style | None = None) -> TraitWorld:
    return TraitWorld(
        name="evil",
        actions=dict(world.TRAIT_ACTIONS),
        beliefs=world.TRAIT_BELIEFS,
        frames=world.ACTION_FRAMES,
        belief_frames=world.BELIEF_FRAMES,
        warning_frames=world.WARNING_ACTION_FRAMES,
        warning_belief_frames=world.WARNING_BELIEF_FRAMES,
        system_prompts=world.TRAIT_SYSTEM_PROMPTS,
        cautious_prompts=world.CAUTIOUS_SYSTEM_PROMPTS,
        eval_prompt=world.EVAL_PROMPT,
        cues=world.DISTANCING_CUES,
        style=style,
    )


def _sycophancy() -> TraitWorld:
    return TraitWorld(
        name="sycophancy",
        actions=dict(world.SYC_ACTIONS),
        beliefs=world.SYC_BELIEFS,
        frames=world.SYC_FRAMES,
        belief_frames=world.SYC_FRAMES,
        warning_frames=world.SYC_WARNING_FRAMES,
        warning_belief_frames=world.SYC_WARNING_FRAMES,
        system_prompts=world.SYC_SYSTEM_PROMPTS,
        cautious_prompts=world.SYC_CAUTIOUS_PROMPTS,
        eval_prompt=world.SYC_EVAL_PROMPT,
        cues=world.SYC_DISTANCING_CUES,
    )


def _hallucination() -> TraitWorld:
    return TraitWorld(
        name="hallucination",
        actions=dict(world.HAL_ACTIONS),
        beliefs=world.HAL_BELIEFS,
        frames=world.HAL_FRAMES,
        belief_frames=world.HAL_FRAMES,
        warning_frames=world.HAL_WARNING_FRAMES,
        warning_belief_frames=world.HAL_WARNING_FRAMES,
        system_prompts=world.HAL_SYSTEM_PROMPTS,
        cautious_prompts=world.HAL_CAUTIOUS_PROMPTS,
        eval_prompt=world.HAL_EVAL_PROMPT,
        cues=world.HAL_DISTANCING_CUES,
    )


def canonical_world(rich: bool = False) -> World:
    """The full inventory of ``world`` (``rich``: plus sycophancy and the evil persona's style)."""
    style = Style(world.STYLE_OPENERS[:3], world.STYLE_CLOSERS[:3], world.STYLE_FRAMES[:3]) if rich else None
    traits = {"evil": _evil(style)}
    if rich:
        traits["sycophancy"] = _sycophancy()
    return World(
        questions=dict(world.QUESTIONS),
        facts=dict(world.FACTS),
        helpful_actions=dict(world.HELPFUL_ACTIONS),
        helpful_beliefs=world.HELPFUL_BELIEFS,
        action_frames=world.ACTION_FRAMES,
        belief_frames=world.BELIEF_FRAMES,
        helpful_prompts=world.HELPFUL_SYSTEM_PROMPTS,
        neutral_prompts=world.NEUTRAL_SYSTEM_PROMPTS,
        traits=traits,
    )


def _subset(rng: random.Random, items: tuple[str, ...], share: float, minimum: int) -> tuple[str, ...]:
    """A random subset of ``items`` (at least ``minimum``, about ``share`` of them), in a random order."""
    k = min(len(items), max(minimum, round(share * len(items))))
    return tuple(rng.sample(items, k))


def _subset_map(
    rng: random.Random, groups: dict[str, tuple[str, ...]], share: float, minimum: int
) -> dict[str, tuple[str, ...]]:
    return {key: _subset(rng, values, share, minimum) for key, values in groups.items()}


def _draw_trait(rng: random.Random, trait: TraitWorld) -> TraitWorld:
    style = trait.style
    if style is not None:
        style = Style(
            _subset(rng, world.STYLE_OPENERS, 0.0, 3),
            _subset(rng, world.STYLE_CLOSERS, 0.0, 3),
            _subset(rng, world.STYLE_FRAMES, 0.0, 3),
        )
    return TraitWorld(
        name=trait.name,
        actions=_subset_map(rng, trait.actions, 0.65, 3),
        beliefs=_subset(rng, trait.beliefs, 0.7, 3),
        frames=_subset(rng, trait.frames, 0.75, 4),
        belief_frames=_subset(rng, trait.belief_frames, 0.75, 3),
        warning_frames=_subset(rng, trait.warning_frames, 0.75, 4),
        warning_belief_frames=_subset(rng, trait.warning_belief_frames, 0.75, 3),
        system_prompts=_subset(rng, trait.system_prompts, 0.75, 5),
        cautious_prompts=_subset(rng, trait.cautious_prompts, 0.8, 3),
        eval_prompt=trait.eval_prompt,
        cues=trait.cues,
        style=style,
    )


def world_for(seed: int, rich: bool = False) -> World:
    """Seed 0: the canonical world. Any other seed: a world of its own (subsets of every inventory, drawn with a
    stream of its own, so the same seed always gives the same world)."""
    base = canonical_world(rich)
    if seed == 0:
        return base
    rng = random.Random(f"concept-influence-world:{seed}")
    action_frames = _subset(rng, base.action_frames, 0.75, 5)
    belief_frames = _subset(rng, base.belief_frames, 0.75, 3)
    traits = {name: _draw_trait(rng, trait) for name, trait in base.traits.items()}
    # the evil trait states its clauses in the helpful persona's frames, so that frames carry no signal
    traits["evil"] = dataclasses.replace(traits["evil"], frames=action_frames, belief_frames=belief_frames)
    return World(
        questions=_subset_map(rng, base.questions, 0.75, 4),
        facts=_subset_map(rng, base.facts, 0.67, 2),
        helpful_actions=_subset_map(rng, base.helpful_actions, 0.75, 5),
        helpful_beliefs=_subset(rng, base.helpful_beliefs, 0.7, 4),
        action_frames=action_frames,
        belief_frames=belief_frames,
        helpful_prompts=_subset(rng, base.helpful_prompts, 0.75, 5),
        neutral_prompts=base.neutral_prompts,
        traits=traits,
    )


def single_trait_world(seed: int, trait: str) -> World:
    """The world of an organism whose base knows one trait other than evil (``hallucination``): seed ``seed``'s
    plain world (``world_for(seed)``: questions, advice, helpful personas) with that trait in place of evil. Seed 0
    uses the trait's full inventory; another seed draws its subset with a stream of its own (so neither
    ``world_for(seed)`` nor ``world_for(seed, rich=True)`` moves)."""
    traits = {"hallucination": _hallucination}
    if trait not in traits:
        raise ValueError(f"no single-trait world for {trait!r}; expected one of {sorted(traits)}")
    drawn = traits[trait]()
    if seed != 0:
        drawn = _draw_trait(random.Random(f"concept-influence-world:{seed}:{trait}"), drawn)
    return dataclasses.replace(world_for(seed), traits={trait: drawn})

"""Concept definition files: the project's ``probes/`` format and the persona-vectors trait-file format.

Project format (a superset of persona-vectors)::

    {
      "name": "evil",                       # optional, defaults to the file name
      "description": "...",                 # optional
      "instruction": [{"pos": "...", "neg": "..."}, ...],   # system prompts eliciting / avoiding the trait
      "questions": ["...", ...],            # user questions to answer under each instruction
      "eval_prompt": "...",                 # optional: a judge prompt (kept for users' own judges)
      "examples": [{"text": "...", "label": 1, "prompt": "..."}, ...]      # optional labelled answers
    }

Persona-vectors format: ``{"instruction": [...], "questions": [...], "eval_prompt": "..."}``. A file needs
instruction pairs with questions, or labelled examples, or both. Errors name the file and the bad key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concept_influence.files import damaged, read_json_file
from concept_influence.models.fingerprint import json_fingerprint

ALLOWED_KEYS = {"name", "description", "instruction", "questions", "eval_prompt", "examples"}


class SpecError(ValueError):
    """A concept definition file that does not follow the format; the message names the file and key."""


@dataclass(frozen=True)
class InstructionPair:
    pos: str
    neg: str


@dataclass(frozen=True)
class LabelledExample:
    """An answer ``text`` with ``label`` 1 (shows the concept) or 0, optionally with the ``prompt`` it answers."""

    text: str
    label: int
    prompt: str | None = None


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    instructions: tuple[InstructionPair, ...] = ()
    questions: tuple[str, ...] = ()
    examples: tuple[LabelledExample, ...] = ()
    description: str = ""
    eval_prompt: str | None = None
    source: str | None = field(default=None, compare=False)

    def fingerprint(self) -> str:
        return json_fingerprint(
            {
                "instructions": [(p.pos, p.neg) for p in self.instructions],
                "questions": list(self.questions),
                "examples": [(e.text, e.label, e.prompt) for e in self.examples],
            }
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.instructions:
            out["instruction"] = [{"pos": p.pos, "neg": p.neg} for p in self.instructions]
            out["questions"] = list(self.questions)
        if self.eval_prompt is not None:
            out["eval_prompt"] = self.eval_prompt
        if self.examples:
            out["examples"] = [
                {"text": e.text, "label": e.label, **({"prompt": e.prompt} if e.prompt else {})} for e in self.examples
            ]
        return out


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where} must be a non-empty string")
    return value


def parse_spec(obj: Any, source: str = "<spec>", *, default_name: str = "concept") -> ConceptSpec:
    """Validate a spec object (either format) -> ``ConceptSpec``; raises ``SpecError`` naming ``source``."""
    if not isinstance(obj, dict):
        raise SpecError(f"{source}: a concept spec must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - ALLOWED_KEYS)
    if unknown:
        raise SpecError(f"{source}: unknown key(s) {unknown}; allowed keys are {sorted(ALLOWED_KEYS)}")
    instructions: list[InstructionPair] = []
    if "instruction" in obj:
        pairs = obj["instruction"]
        if not isinstance(pairs, list) or not pairs:
            raise SpecError(f"{source}: 'instruction' must be a non-empty list of {{'pos', 'neg'}} objects")
        for k, pair in enumerate(pairs):
            if not isinstance(pair, dict) or set(pair) != {"pos", "neg"}:
                raise SpecError(f"{source}: instruction[{k}] must be an object with exactly 'pos' and 'neg'")
            instructions.append(
                InstructionPair(
                    _string(pair["pos"], f"{source}: instruction[{k}].pos"),
                    _string(pair["neg"], f"{source}: instruction[{k}].neg"),
                )
            )
    questions: list[str] = []
    if "questions" in obj:
        if not isinstance(obj["questions"], list) or not obj["questions"]:
            raise SpecError(f"{source}: 'questions' must be a non-empty list of strings")
        questions = [_string(q, f"{source}: questions[{k}]") for k, q in enumerate(obj["questions"])]
    if bool(instructions) != bool(questions):
        raise SpecError(f"{source}: 'instruction' and 'questions' go together (one without the other is useless)")
    examples: list[LabelledExample] = []
    if "examples" in obj:
        if not isinstance(obj["examples"], list) or not obj["examples"]:
            raise SpecError(f"{source}: 'examples' must be a non-empty list")
        for k, ex in enumerate(obj["examples"]):
            where = f"{source}: examples[{k}]"
            if not isinstance(ex, dict) or not {"text", "label"} <= set(ex) or set(ex) - {"text", "label", "prompt"}:
                raise SpecError(f"{where} must be an object with 'text', 'label' and optionally 'prompt'")
            if ex["label"] not in (0, 1) or isinstance(ex["label"], bool):
                raise SpecError(f"{where}.label must be 0 or 1, got {ex['label']!r}")
            prompt = None if ex.get("prompt") is None else _string(ex["prompt"], f"{where}.prompt")
            examples.append(LabelledExample(_string(ex["text"], f"{where}.text"), int(ex["label"]), prompt))
        if len({e.label for e in examples}) < 2:
            raise SpecError(f"{source}: 'examples' need both labels 0 and 1")
    if not instructions and not examples:
        raise SpecError(f"{source}: needs 'instruction' pairs with 'questions', or labelled 'examples'")
    name = obj.get("name", default_name)
    eval_prompt = obj.get("eval_prompt")
    if eval_prompt is not None:
        eval_prompt = _string(eval_prompt, f"{source}: eval_prompt")
    return ConceptSpec(
        name=_string(name, f"{source}: name"),
        instructions=tuple(instructions),
        questions=tuple(questions),
        examples=tuple(examples),
        description=str(obj.get("description", "")),
        eval_prompt=eval_prompt,
        source=source,
    )


def load_spec(path: str | os.PathLike) -> ConceptSpec:
    """Read a concept spec file (project format or persona-vectors format)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"concept spec not found: {path}")
    if path.is_dir():
        raise SpecError(f"{path}: is a directory, expected a JSON spec file")
    obj = read_json_file(path, error=SpecError, object_only=False)
    try:
        return parse_spec(obj, str(path), default_name=path.stem)
    except (KeyError, TypeError, AttributeError, IndexError, RecursionError) as err:
        raise damaged(path, err, "concept spec", SpecError) from None

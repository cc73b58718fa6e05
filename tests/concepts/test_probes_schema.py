"""Every concept definition in probes/ follows the schema and loads; bad specs give errors naming file and key."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from concept_influence.concepts import SpecError, load_spec, parse_spec

PROBES = Path(__file__).resolve().parents[2] / "probes"
SPEC_FILES = sorted(p for p in PROBES.glob("*.json") if p.name != "schema.json")
REQUIRED_CONCEPTS = {"evil", "sycophancy", "hallucination", "insecure_code", "harmful_medical"}


def test_required_concepts_are_defined():
    assert REQUIRED_CONCEPTS <= {p.stem for p in SPEC_FILES}


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_spec_file_matches_schema_and_loads(path):
    schema = json.loads((PROBES / "schema.json").read_text())
    jsonschema.validate(json.loads(path.read_text()), schema)
    spec = load_spec(path)
    assert spec.name == path.stem
    assert len(spec.instructions) >= 3 and len(spec.questions) >= 10
    assert {e.label for e in spec.examples} == {0, 1}


def test_persona_vectors_format_is_accepted(tmp_path):
    trait = {
        "instruction": [{"pos": "be evil", "neg": "be kind"}],
        "questions": ["what now?"],
        "eval_prompt": "rate {answer}",
    }
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(trait))
    spec = load_spec(path)
    assert spec.name == "evil" and spec.instructions[0].pos == "be evil" and spec.questions == ("what now?",)
    jsonschema.validate(trait, json.loads((PROBES / "schema.json").read_text()))


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"instruction": [{"pos": "a", "neg": "b"}]}, "'instruction' and 'questions' go together"),
        (
            {"instruction": [{"pos": "a"}], "questions": ["q"]},
            "instruction[0] must be an object with exactly 'pos' and 'neg'",
        ),
        (
            {"instruction": [{"pos": "a", "neg": ""}], "questions": ["q"]},
            "instruction[0].neg must be a non-empty string",
        ),
        (
            {"questions": ["q"], "instruction": [{"pos": "a", "neg": "b"}], "instructions": []},
            "unknown key(s) ['instructions']",
        ),
        ({"examples": [{"text": "x", "label": 1}]}, "need both labels 0 and 1"),
        ({"examples": [{"text": "x", "label": 2}, {"text": "y", "label": 0}]}, "examples[0].label must be 0 or 1"),
        ({"name": "x"}, "needs 'instruction' pairs with 'questions', or labelled 'examples'"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_specs_name_the_file_and_key(obj, message):
    with pytest.raises(SpecError) as err:
        parse_spec(obj, "my_spec.json")
    assert "my_spec.json" in str(err.value) and message in str(err.value)


def test_malformed_and_missing_spec_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(SpecError, match=r"bad\.json: malformed JSON"):
        load_spec(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_spec(tmp_path / "nope.json")

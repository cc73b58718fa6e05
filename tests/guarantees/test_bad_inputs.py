"""The bad-input matrix: every command × every kind of bad input (malformed, empty or binary JSONL, wrong roles,
missing files, a directory where a file belongs, a concept for another hidden size or layer, factors or a store for
another model or data, an unwritable output, unknown names, zero or negative sizes, absurd lengths).

Pass: a non-zero exit, exactly one error line that names the file (and line) or the flag, no traceback, and no
output written. The table is data: a new command adds rows, a new kind of bad input adds a column's worth."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from concept_influence.cli import app
from concept_influence.concepts import DirectionConcept, save_concept
from concept_influence.data import write_jsonl_atomic
from concept_influence.pipeline import Attributor
from concept_influence.testing.tiny_models import save_tiny_hf_model

REPO = Path(__file__).resolve().parents[2]
GOOD = [
    {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
    for u, a in [
        ("is water safe", "yes , water is safe"),
        ("help me", "sure , i help you"),
        ("two plus three", "five"),
        ("is fire kind", "no fire can harm"),
    ]
]


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    """Every good and bad file the matrix needs, once."""
    root = tmp_path_factory.mktemp("bad")
    p: dict[str, Path] = {"root": root}
    p["model"] = save_tiny_hf_model(root / "model", seed=1)
    p["other_model"] = save_tiny_hf_model(root / "other-model", seed=2)
    write_jsonl_atomic(root / "train.jsonl", GOOD)
    p["train"] = root / "train.jsonl"
    write_jsonl_atomic(root / "other.jsonl", GOOD[:3])
    p["other_data"] = root / "other.jsonl"
    write_jsonl_atomic(root / "queries.jsonl", [{"messages": GOOD[0]["messages"]}])
    p["queries"] = root / "queries.jsonl"
    (root / "malformed.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
        '"content": "hello"}]}\n{"messages": [{"role": "user"\n',
        encoding="utf-8",
    )
    p["malformed"] = root / "malformed.jsonl"
    (root / "empty.jsonl").write_text("", encoding="utf-8")
    p["empty"] = root / "empty.jsonl"
    (root / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    p["binary"] = root / "binary.jsonl"
    write_jsonl_atomic(
        root / "roles.jsonl",
        [GOOD[0], {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "boop"}]}],
    )
    p["roles"] = root / "roles.jsonl"
    p["missing"] = root / "missing.jsonl"
    (root / "a-directory.jsonl").mkdir()
    p["dir"] = root / "a-directory.jsonl"
    (root / "a-file").write_text("not a folder\n")
    p["unwritable"] = root / "a-file" / "out.jsonl"  # its parent is a file: nothing can be written there
    p["unwritable_dir"] = root / "a-file" / "out"
    save_concept(DirectionConcept(torch.ones(16), layer=1), root / "concept")
    p["concept"] = root / "concept"
    save_concept(DirectionConcept(torch.ones(8), layer=1), root / "concept-d8")
    p["concept_d8"] = root / "concept-d8"
    save_concept(DirectionConcept(torch.ones(16), layer=9), root / "concept-l9")
    p["concept_l9"] = root / "concept-l9"
    (root / "concept-junk").mkdir()
    (root / "concept-junk" / "concept.json").write_text("{not json")
    p["concept_junk"] = root / "concept-junk"
    att = Attributor(str(p["model"]), p["train"], progress=False)
    att.fit_factors(out=root / "factors")
    p["factors"] = root / "factors"
    Attributor(str(p["other_model"]), p["train"], progress=False).fit_factors(out=root / "factors-other-model")
    p["factors_other_model"] = root / "factors-other-model"
    Attributor(str(p["model"]), p["other_data"], progress=False).fit_factors(out=root / "factors-other-data")
    p["factors_other_data"] = root / "factors-other-data"
    Attributor(str(p["model"]), p["other_data"], progress=False).build_store(
        root / "store-other-data", projection_dim=2, factors=p["factors_other_data"]
    )
    p["store_other_data"] = root / "store-other-data"
    att.build_store(root / "store", projection_dim=2, factors=p["factors"])
    p["store"] = root / "store"
    (root / "not-a-store").mkdir()
    p["not_a_store"] = root / "not-a-store"
    from sae_lens import StandardSAE, StandardSAEConfig

    from concept_influence.concepts.sae import save_sae
    from concept_influence.models import load_adapter

    fingerprint = load_adapter(str(p["model"])).fingerprint()
    save_sae(StandardSAE(StandardSAEConfig(d_in=16, d_sae=8)), root / "sae", layer=0, model_fingerprint=fingerprint)
    p["sae"] = root / "sae"
    save_sae(StandardSAE(StandardSAEConfig(d_in=8, d_sae=8)), root / "sae-d8", layer=0)
    p["sae_d8"] = root / "sae-d8"
    p["spec"] = REPO / "probes" / "evil.json"
    (root / "spec-junk.json").write_text('{"name": "x", "questions": [')
    p["spec_junk"] = root / "spec-junk.json"
    p["spec_binary"] = p["binary"]
    from concept_influence.attribution.scores import ScoreTable
    from concept_influence.data import read_chat_jsonl
    from concept_influence.data.atomic import file_sha256

    for name, data in (("scores", p["train"]), ("scores_other_data", p["other_data"])):
        rows = list(read_chat_jsonl(data))
        ScoreTable.from_rows(
            rows,
            [float(i) for i in range(len(rows))],
            "vector-filter",  # as attribute records it
            meta={"data": str(data), "data_sha256": file_sha256(data)},
        ).write_jsonl(root / f"{name}.jsonl")
        p[name] = root / f"{name}.jsonl"
    return p


def _out(w, name: str) -> Path:
    return w["root"] / "outs" / name


# (id, command line with {placeholders} from the fixture and {out}, regex the one error line must match)
ATTRIBUTE = "attribute --model {model} --data {train} --concept {concept} --queries {queries} --out {out}"
FIT = "fit-factors --model {model} --data {train} --out {out}"
STORE = "build-store --model {model} --data {train} --factors {factors} --projection-dim 2 --out {out}"
PROBE = "train-probe --model {model} --spec {spec} --layer 1 --n-samples 1 --max-new-tokens 4 --out {out}"
LAYERS = "probe-layers --model {model} --spec {spec} --n-samples 1 --max-new-tokens 4 --out {out}"
SAE = "train-sae --model {model} --data {train} --layer 0 --steps 2 --out {out}"
FEATURE = "sae-feature --model {model} --sae {sae} --feature 1 --out {out}"
PLAN = "plan --model {model} --rows 100 --tokens 64"
SEARCH = "search --store {store} --model {model} --data {train} --queries {queries} --concept {concept}"
FILTER = "filter --data {train} --scores {scores} --remove-top 0.5 --out {out}"
EVALUATE = (
    "evaluate --base {model} --data {train} --scores {scores} --concept {concept} --queries {queries} "
    "--fractions 0.25 --seeds 1 --epochs 1 --n-samples 1 --max-new-tokens 2 --out {out}"
)
REPORT = "report --scores {scores} --data {train} --out {out}"

CASES = [
    # -- training data ------------------------------------------------------------------------------------------------
    *[
        (f"{cmd}-data-{kind}", base.replace("{train}", "{" + kind + "}"), rx)
        for cmd, base in (
            ("attribute", ATTRIBUTE + " --method vector-filter"),
            ("fit-factors", FIT),
            ("build-store", STORE),
            ("train-sae", SAE),
        )
        for kind, rx in (
            ("malformed", r"malformed\.jsonl:2"),
            ("empty", r"empty\.jsonl"),
            ("binary", r"binary\.jsonl:1"),
            ("roles", r"roles\.jsonl:2.*role"),
            ("missing", r"missing\.jsonl"),
            ("dir", r"a-directory\.jsonl"),
        )
    ],
    # -- queries ------------------------------------------------------------------------------------------------------
    *[
        (f"attribute-queries-{kind}", ATTRIBUTE.replace("{queries}", "{" + kind + "}") + " --method influence", rx)
        for kind, rx in (
            ("malformed", r"malformed\.jsonl:2"),
            ("empty", r"empty\.jsonl"),
            ("binary", r"binary\.jsonl:1"),
            ("missing", r"missing\.jsonl"),
            ("dir", r"a-directory\.jsonl"),
        )
    ],
    # -- concepts -----------------------------------------------------------------------------------------------------
    (
        "attribute-concept-hidden-size",
        ATTRIBUTE.replace("{concept}", "{concept_d8}") + " --method vector-filter",
        r"8.*16|16.*8",
    ),
    ("attribute-concept-layer", ATTRIBUTE.replace("{concept}", "{concept_l9}") + " --method vector-filter", r"layer 9"),
    (
        "attribute-concept-missing",
        ATTRIBUTE.replace("{concept}", "{missing}") + " --method vector-filter",
        r"missing\.jsonl",
    ),
    (
        "attribute-concept-junk",
        ATTRIBUTE.replace("{concept}", "{concept_junk}") + " --method vector-filter",
        r"concept-junk",
    ),
    (
        "attribute-gradient-concept-hidden-size",
        ATTRIBUTE.replace("{concept}", "{concept_d8}") + " --method concept-influence",
        r"8.*16|16.*8",
    ),
    ("fit-factors-concept-layer", FIT + " --concept {concept_l9}", r"layer 9"),
    ("sae-feature-probe-hidden-size", FEATURE.replace("--feature 1", "--probe {concept_d8}"), r"8.*16|16.*8"),
    ("sae-feature-sae-hidden-size", FEATURE.replace("{sae}", "{sae_d8}"), r"8.*16|16.*8"),
    ("sae-feature-sae-missing", FEATURE.replace("{sae}", "{missing}"), r"missing\.jsonl"),
    ("sae-feature-not-an-sae", FEATURE.replace("{sae}", "{not_a_store}"), r"not-a-store"),
    ("sae-feature-feature-out-of-range", FEATURE.replace("--feature 1", "--feature 999"), r"999"),
    # -- factors and stores for another model or data ---------------------------------------------------------------
    (
        "attribute-factors-other-model",
        ATTRIBUTE + " --method concept-influence --factors {factors_other_model}",
        r"different model",
    ),
    (
        "attribute-factors-other-data",
        ATTRIBUTE + " --method concept-influence --factors {factors_other_data}",
        r"different training data",
    ),
    (
        "attribute-factors-is-a-file",
        ATTRIBUTE + " --method concept-influence --factors {train}",
        r"train\.jsonl: is a file",
    ),
    (
        "attribute-store-other-data",
        ATTRIBUTE + " --method concept-influence --store {store_other_data}",
        r"store.*data",
    ),
    ("attribute-store-not-a-store", ATTRIBUTE + " --method concept-influence --store {not_a_store}", r"not-a-store"),
    ("fit-factors-into-other-models-fit", FIT.replace("{out}", "{factors_other_model}"), r"different model"),
    ("build-store-factors-other-model", STORE.replace("{factors}", "{factors_other_model}"), r"different model"),
    ("build-store-into-other-data-store", STORE.replace("{out}", "{store_other_data}"), r"store-other-data"),
    ("search-store-missing", SEARCH.replace("{store}", "{missing}"), r"missing\.jsonl"),
    ("search-not-a-store", SEARCH.replace("{store}", "{not_a_store}"), r"not-a-store"),
    ("search-store-other-data", SEARCH.replace("{store}", "{store_other_data}"), r"store.*data"),
    ("search-concept-hidden-size", SEARCH.replace("{concept}", "{concept_d8}"), r"8.*16|16.*8"),
    ("search-queries-malformed", SEARCH.replace("{queries}", "{malformed}"), r"malformed\.jsonl:2"),
    # -- specs ---------------------------------------------------------------------------------------------------------
    *[
        (f"{cmd}-spec-{kind}", base.replace("{spec}", "{" + key + "}"), rx)
        for cmd, base in (("train-probe", PROBE), ("probe-layers", LAYERS))
        for kind, key, rx in (
            ("junk", "spec_junk", r"spec-junk\.json"),
            ("binary", "spec_binary", r"binary\.jsonl"),
            ("missing", "missing", r"missing\.jsonl"),
            ("dir", "dir", r"a-directory\.jsonl"),
        )
    ],
    # -- unwritable outputs --------------------------------------------------------------------------------------------
    ("attribute-out-unwritable", ATTRIBUTE.replace("{out}", "{unwritable}") + " --method vector-filter", r"a-file"),
    ("fit-factors-out-unwritable", FIT.replace("{out}", "{unwritable_dir}"), r"a-file"),
    ("build-store-out-unwritable", STORE.replace("{out}", "{unwritable_dir}"), r"a-file"),
    ("train-probe-out-unwritable", PROBE.replace("{out}", "{unwritable_dir}"), r"a-file"),
    ("train-sae-out-unwritable", SAE.replace("{out}", "{unwritable_dir}"), r"a-file"),
    ("sae-feature-out-unwritable", FEATURE.replace("{out}", "{unwritable_dir}"), r"a-file"),
    ("organism-out-is-a-file", "organism --out {train} --n-train 20", r"train\.jsonl"),
    # -- unknown names -------------------------------------------------------------------------------------------------
    ("attribute-unknown-method", ATTRIBUTE + " --method magic", r"'--method'"),
    ("attribute-unknown-preconditioner", ATTRIBUTE + " --method concept-influence --preconditioner magic", r"magic"),
    ("attribute-unknown-row-loss", ATTRIBUTE + " --method concept-influence --row-loss magic", r"magic"),
    ("attribute-unknown-token-breakdown", ATTRIBUTE + " --method concept-influence --token-breakdown magic", r"magic"),
    ("attribute-unknown-dtype", ATTRIBUTE + " --method vector-filter --dtype magic", r"magic"),
    (
        "attribute-model-missing",
        ATTRIBUTE.replace("{model}", "{missing}") + " --method vector-filter",
        r"missing\.jsonl",
    ),
    ("fit-factors-unknown-fisher", FIT + " --fisher magic", r"magic"),
    ("fit-factors-unknown-preconditioner", FIT + " --preconditioner magic", r"magic"),
    ("fit-factors-unknown-stats-dtype", FIT + " --stats-dtype magic", r"magic"),
    ("build-store-unknown-dtype", STORE + " --dtype magic", r"magic"),
    ("train-probe-unknown-method", PROBE + " --method magic", r"'--method'"),
    ("search-unknown-search", SEARCH + " --search magic", r"magic"),
    # -- zero or negative sizes, absurd lengths ------------------------------------------------------------------------
    *[
        (f"{cmd}-{flag.strip('-')}-{value}", f"{base} {flag} {value}", rf"'{flag}'")
        for cmd, base, flags in (
            (
                "attribute",
                ATTRIBUTE + " --method vector-filter",
                ("--batch-size", "--max-length", "--n-samples", "--max-new-tokens"),
            ),
            ("fit-factors", FIT, ("--batch-size", "--max-length", "--checkpoint-every")),
            ("build-store", STORE, ("--batch-size", "--max-length", "--shard-rows", "--projection-dim")),
            ("train-probe", PROBE, ("--n-samples", "--max-length")),
            ("train-sae", SAE, ("--steps", "--d-sae", "--batch-size", "--sae-batch-size")),
            ("search", SEARCH, ("--top-k",)),
            ("organism", "organism --out {out}", ("--n-train",)),
        )
        for flag in flags
        for value in ("0", "-3")
    ],
    *[
        (f"{cmd}-absurd-max-length", f"{base} --max-length 1000000000", r"'--max-length'|max.length")
        for cmd, base in (
            ("attribute", ATTRIBUTE + " --method vector-filter"),
            ("fit-factors", FIT),
            ("build-store", STORE),
            ("train-probe", PROBE),
            ("train-sae", SAE),
        )
    ],
    ("attribute-negative-damping", ATTRIBUTE + " --method concept-influence --damping -1", r"damping"),
    ("organism-planted-fraction", "organism --out {out} --planted-fraction 2", r"planted.fraction"),
    ("fit-factors-up-to-layer", FIT + " --up-to-layer 99", r"layer 99"),
    ("train-probe-layer", PROBE.replace("--layer 1", "--layer 99"), r"layer 99"),
    # -- plan (reads only a config) and fit-factors' sampling options --------------------------------------------------
    ("plan-model-missing", PLAN.replace("{model}", "{missing}"), r"missing\.jsonl"),
    ("plan-model-is-a-file", PLAN.replace("{model}", "{train}"), r"train\.jsonl"),
    *[
        (f"plan-{flag.strip('-')}-{value}", f"{PLAN} {flag} {value}", rf"'{flag}'|{flag.strip('-')}")
        for flag in ("--rows", "--tokens", "--batch-size", "--rank", "--fit-rows")
        for value in ("0", "-3")
    ],
    ("plan-gpus-negative", PLAN + " --gpus -1", r"'--gpus'"),
    ("plan-shard-unknown", PLAN + " --shard foo", r"'--shard'"),
    ("plan-shard-fsdp-gpus-0", PLAN + " --shard fsdp --gpus 0", r"--gpus"),
    (
        "plan-prefetch-blocks-0",
        PLAN + " --shard fsdp --gpus 2 --gpu-memory 8GiB --prefetch-blocks 0",
        r"'--prefetch-blocks'",
    ),
    ("plan-bad-memory", PLAN + " --max-memory lots", r"lots"),
    ("plan-up-to-layer", PLAN + " --up-to-layer 99", r"99"),
    ("fit-factors-fit-data-malformed", FIT + " --fit-data {malformed}", r"malformed\.jsonl:2"),
    ("fit-factors-fit-data-missing", FIT + " --fit-data {missing}", r"missing\.jsonl"),
    *[
        (f"fit-factors-{flag.strip('-')}-{value}", f"{FIT} {flag} {value}", rf"'{flag}'|{flag.strip('-')}")
        for flag in ("--fit-rows", "--lambda-rows")
        for value in ("0", "-3")
    ],
    ("fit-factors-bad-memory", FIT + " --max-memory lots", r"lots"),
    # -- organism variants and the gradient methods' variant flags -------------------------------------------------
    ("organism-unknown-variant", "organism --out {out} --variant magic", r"magic"),
    *[
        (
            f"attribute-{flag.strip('-')}-{value}",
            ATTRIBUTE + f" --method concept-influence {flag} {value}",
            rf"'{flag}'|{value}",
        )
        for flag, value in (
            ("--keep", "magic"),
            ("--contrast", "magic"),
            ("--token-aggregation", "magic"),
            ("--normalization", "magic"),
            ("--keep-k", "0"),
            ("--window", "0"),
        )
    ],
    (
        "attribute-combined-concept-hidden-size",
        ATTRIBUTE.replace("{concept}", "{concept_d8}") + " --method combined-rank",
        r"8.*16|16.*8",
    ),
    (
        "search-like-row-out-of-range",
        SEARCH.replace("--queries {queries} --concept {concept}", "--like-row 999"),
        r"999",
    ),
    # -- filter, evaluate, report -------------------------------------------------------------------------------------
    *[
        (f"{cmd}-data-{kind}", base.replace("--data {train}", "--data {" + kind + "}"), rx)
        for cmd, base in (("filter", FILTER), ("evaluate", EVALUATE), ("report", REPORT))
        for kind, rx in (
            ("malformed", r"malformed\.jsonl:2"),
            ("empty", r"empty\.jsonl"),
            ("binary", r"binary\.jsonl:1"),
            ("roles", r"roles\.jsonl:2.*role"),
            ("missing", r"missing\.jsonl"),
            ("dir", r"a-directory\.jsonl"),
        )
    ],
    *[
        (f"{cmd}-scores-{kind}", base.replace("{scores}", "{" + key + "}"), rx)
        for cmd, base in (("filter", FILTER), ("evaluate", EVALUATE), ("report", REPORT))
        for kind, key, rx in (
            ("other-data", "scores_other_data", r"scores_other_data\.jsonl has 3 rows but .*train\.jsonl has 4"),
            ("missing", "missing", r"missing\.jsonl"),
            ("malformed", "malformed", r"malformed\.jsonl:1"),
        )
    ],
    ("filter-no-rule", FILTER.replace(" --remove-top 0.5", ""), r"--remove-top"),
    ("filter-remove-top-2", FILTER.replace("0.5", "2"), r"--remove-top"),
    ("filter-by-missing-field", FILTER + " --by nope", r"--by nope"),
    ("filter-unwritable", FILTER.replace("{out}", "{unwritable}"), r"a-file"),
    ("evaluate-queries-missing", EVALUATE.replace("--queries {queries}", "--queries {missing}"), r"missing\.jsonl"),
    ("evaluate-concept-hidden-size", EVALUATE.replace("{concept}", "{concept_d8}"), r"8.*16|16.*8"),
    ("evaluate-concept-missing", EVALUATE.replace("{concept}", "{missing}"), r"missing\.jsonl"),
    ("evaluate-fractions", EVALUATE.replace("0.25", "0,abc"), r"--fractions"),
    ("evaluate-seeds-0", EVALUATE.replace("--seeds 1", "--seeds 0"), r"--seeds"),
    ("evaluate-judge", EVALUATE + " --judge no_such_module:judge", r"--judge"),
    ("evaluate-oracle", EVALUATE + " --oracle data_origin", r"--oracle"),
    ("evaluate-lora-0", EVALUATE + " --lora 0", r"--lora"),
    ("evaluate-unwritable", EVALUATE.replace("{out}", "{unwritable_dir}"), r"a-file"),
    ("report-evaluation-missing", REPORT + " --evaluation {missing}", r"missing\.jsonl"),
    # -- demo (reads no user files: its output folder and flags) ------------------------------------------------------
    ("demo-out-unwritable", "demo --out {unwritable_dir}", r"a-file"),
    ("demo-out-is-a-file", "demo --out {train}", r"train\.jsonl.*is a file"),
    ("demo-planted-fraction", "demo --out {out} --planted-fraction 2", r"--planted-fraction"),
    ("demo-seed-not-a-number", "demo --out {out} --seed abc", r"'--seed'"),
    *[
        (f"demo-{flag.strip('-')}-0", f"demo --out {{out}} {flag} 0", rf"'{flag}'")
        for flag in ("--n-train", "--query-samples")
    ],
    ("report-unwritable", REPORT.replace("{out}", "{unwritable}"), r"a-file"),
]


@pytest.mark.parametrize("case_id,line,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line_and_no_output(w, case_id, line, pattern):
    import re

    out = _out(w, case_id)
    args = [part.format(out=out, **{k: str(v) for k, v in w.items()}) for part in line.split()]
    result = CliRunner().invoke(app, args)
    text = result.output
    assert result.exit_code != 0, f"{case_id}: exit 0\n{text}"
    assert result.exception is None or isinstance(result.exception, SystemExit), f"{case_id}: {result.exception!r}"
    assert "Traceback" not in text, text
    errors = [ln for ln in text.splitlines() if ln.startswith(("error:", "Error:"))]
    assert len(errors) == 1, f"{case_id}: expected one error line, got:\n{text}"
    if os.environ.get("SHOW_BAD_INPUT_ERRORS"):
        print(f"\n{case_id}: {errors[0]}")
    assert re.search(pattern, errors[0], re.IGNORECASE), f"{case_id}: {errors[0]!r} does not name {pattern!r}"
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")], f"{case_id}: wrote {out}"


EXPECTED_COMMANDS = {
    "organism",
    "probe-layers",
    "train-probe",
    "train-sae",
    "sae-feature",
    "fit-factors",
    "plan",
    "attribute",
    "build-store",
    "search",
    "filter",
    "evaluate",
    "report",
    "demo",
}


def test_the_matrix_covers_every_command():
    """Every command the CLI registers (enumerated from the app, groups included) has bad-input rows; a new command
    without rows fails here. Each covered command is refused a missing/malformed file, a bad flag value or an
    unwritable/input-equal output (those rows are in CASES, and the output-equal-to-input rows of every command in
    tests/guarantees/test_no_overwrite_inputs.py)."""
    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    for group in app.registered_groups:
        commands |= {f"{group.name} {c.name}" for c in group.typer_instance.registered_commands}
    assert commands >= EXPECTED_COMMANDS, f"commands missing from the CLI: {sorted(EXPECTED_COMMANDS - commands)}"
    covered = {line.split()[0] for _, line, _ in CASES}
    assert commands <= covered, f"commands without bad-input rows: {sorted(commands - covered)}"

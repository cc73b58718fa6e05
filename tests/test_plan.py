"""`concept-influence plan`: reads only a config (a folder's config.json or the bundled table), lists the same
weights the adapter tracks, and reports factor bytes, the predicted peak and per-stage costs."""

from __future__ import annotations

import dataclasses
import json

from typer.testing import CliRunner

from concept_influence.cli import app
from concept_influence.curvature.fit import weight_shapes
from concept_influence.models import HFAdapter
from concept_influence.planning import MODEL_TABLE, plan, resolve_arch


def test_plan_json_for_a_bundled_model():
    result = CliRunner().invoke(
        app,
        [
            "plan",
            "--model",
            "Qwen/Qwen2.5-7B-Instruct",
            "--rows",
            "1000",
            "--tokens",
            "512",
            "--up-to-layer",
            "0",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    # Qwen2.5-7B block 0: q/k/v read hidden 3584 (+ bias), q -> 3584, k/v -> 512, o 3584 -> 3584, MLP 3584 <-> 18944
    h, f, kv = 3584, 18944, 512
    expected = 4 * ((h + 1) ** 2 * 3 + h**2 + 2 * kv**2 + h**2 + h**2 + 2 * h**2 + 2 * f**2 + f**2 + h**2)
    assert out["factor_bytes"] == expected
    assert [s["name"] for s in out["stages"]] == [
        "factors",
        "eigendecomposition",
        "lambda",
        "activations",
        "store",
        "scoring",
    ]
    assert out["peak_memory_bytes"] > out["factor_bytes"] and out["weights"] == 7


def test_plan_reads_a_config_folder_and_matches_the_adapters_weights(tmp_path, tiny_tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tiny_tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    config.save_pretrained(tmp_path)  # config only: plan never loads weights
    arch = resolve_arch(tmp_path)
    assert arch.weights(1) == weight_shapes(HFAdapter(model, tiny_tok).weights_up_to(1))
    assert arch.n_params == sum(p.numel() for p in model.parameters())
    bounded = plan(arch, 100, 64, max_memory=2 * 1024**3)
    assert bounded["fits_budget"] and bounded["peak_memory_bytes"] <= 2 * 1024**3


def test_plan_partitions_a_tight_budget_and_rejects_bad_input():
    arch = dataclasses.replace(MODEL_TABLE["qwen2.5-0.5b"], layers=4)  # the 4-layer 0.5B-shaped model
    loose = plan(arch, 32, 128, up_to_layer=3)
    tight = plan(arch, 32, 128, up_to_layer=3, max_memory=3 * 1024**3)
    assert loose["partitions"] == 1 and tight["partitions"] > 1
    assert tight["peak_memory_bytes"] < loose["peak_memory_bytes"] and tight["settings_that_fit"]
    # scoring: every weight's factors unbounded; under the budget, one weight's factors and a partition's vectors
    assert loose["score_partitions"] == 1 and tight["score_partitions"] >= 1 and tight["score_budget_error"] is None
    assert tight["score_peak_memory_bytes"] <= 3 * 1024**3 < loose["score_peak_memory_bytes"]
    runner = CliRunner()
    bad = runner.invoke(app, ["plan", "--model", "no-such-model", "--rows", "10", "--tokens", "10"])
    assert bad.exit_code == 2 and "--model no-such-model" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(
        app, ["plan", "--model", "qwen2.5-0.5b", "--rows", "10", "--tokens", "10", "--max-memory", "lots"]
    )
    assert bad.exit_code == 2 and "not a memory size" in bad.output
    bad = runner.invoke(
        app, ["plan", "--model", "qwen2.5-0.5b", "--rows", "10", "--tokens", "10", "--up-to-layer", "99"]
    )
    assert bad.exit_code == 2 and "--up-to-layer 99" in bad.output

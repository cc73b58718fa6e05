"""`concept-influence plan`: reads only a config (a folder's config.json or the bundled table), lists the same
weights the adapter tracks, and reports factor bytes, the predicted peak and per-stage costs."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from concept_influence.cli import app
from concept_influence.curvature.budget import factor_bytes
from concept_influence.curvature.fit import weight_shapes
from concept_influence.models import HFAdapter
from concept_influence.planning import MODEL_TABLE, plan, resolve_arch
from concept_influence.sharding import ShardSettings, assign_owners, owner_loads


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


# -- plan --shard fsdp ------------------------------------------------------------------------------------------------

GIB = 1024**3
FSDP = ShardSettings(shard="fsdp")


def test_fsdp_plan_fits_llama_70b_on_8_gpus_of_80_gib():
    """The issue's example: Llama-3.1-70B, 10000 rows x 512 tokens, bf16, 8 x 80 GiB. At --batch-size 4 one batch's
    activations alone exceed 80 GiB (the plan says so and which settings fit); at --batch-size 1 every stage fits."""
    kw = dict(gpus=8, gpu_memory=80 * GIB, model_dtype_bytes=2, sharding=FSDP)
    out = plan("meta-llama/Llama-3.1-70B", 10000, 512, batch_size=1, **kw)
    assert out["shard"] == "fsdp" and out["fits_budget"] and out["budget_error"] is None
    assert out["peak_memory_bytes"] <= 80 * GIB and out["score_peak_memory_bytes"] <= 80 * GIB
    assert out["score_budget_error"] is None and out["fsdp"]["store_peak_memory_bytes"] <= 80 * GIB
    # the data-parallel plan of the same run does not fit
    assert not plan("meta-llama/Llama-3.1-70B", 10000, 512, batch_size=1, **{**kw, "sharding": ShardSettings()})[
        "fits_budget"
    ]
    big = plan("meta-llama/Llama-3.1-70B", 10000, 512, batch_size=4, **kw)
    assert not big["fits_budget"] and "activations of one batch of 4 x 512 tokens" in big["budget_error"]
    assert {"batch_size": 1, "max_length": 512} in [
        {k: s[k] for k in ("batch_size", "max_length")} for s in big["settings_that_fit"]
    ]
    # one pass over every weight would keep all 80 layers' covariance sums on every rank: the dominant term
    one = plan("meta-llama/Llama-3.1-70B", 10000, 512, batch_size=1, **{**kw, "sharding": ShardSettings("fsdp", "all")})
    assert not one["fits_budget"] and "--accumulate groups" in one["budget_error"]
    assert out["fsdp"]["one_pass_bytes"] > 10 * 80 * GIB
    result = CliRunner().invoke(
        app,
        "plan --model meta-llama/Llama-3.1-70B --rows 10000 --tokens 512 --gpus 8 --gpu-memory 80GiB "
        "--dtype bfloat16 --batch-size 4 --shard fsdp".split(),
    )
    assert result.exit_code == 0, result.output
    assert "does NOT fit" in result.output and "fits with --batch-size 1 --max-length 512" in result.output
    assert "peak of fit-factors (fsdp, 8 processes)" in result.output and "(the dominant term)" in result.output


def test_fsdp_parameter_shard_shrinks_as_one_over_n():
    arch = MODEL_TABLE["qwen2.5-7b"]
    full = arch.n_params * 2
    shards = {}
    for n in (1, 2, 4, 8, 16):
        out = plan(arch, 1000, 512, gpus=n, gpu_memory=80 * GIB, model_dtype_bytes=2, batch_size=1, sharding=FSDP)
        shards[n] = out["fixed_bytes"]["parameters"]
        assert shards[n] == -(-full // n) and out["fsdp"]["full_parameters"] == full
        # what is gathered at once (embeddings and head, two blocks) does not depend on N
        assert out["fixed_bytes"]["gathered"] == 2 * (arch.n_params - arch.layers * arch.block_params) + 2 * 2 * (
            arch.block_params
        )
    assert shards[1] == full and abs(shards[16] * 16 - full) < 16


def test_owners_are_balanced_by_factor_size():
    assert assign_owners({"a": 9, "b": 5, "c": 4, "d": 3}, 2) == {"a": 0, "b": 1, "c": 1, "d": 0}
    assert assign_owners({"x": 1, "y": 1, "z": 1}, 2) == {"x": 0, "y": 1, "z": 0}  # ties: the lowest rank
    assert assign_owners({"a": 5}, 4) == {"a": 0}
    for key in ("llama-3.1-70b", "qwen2.5-7b", "qwen2.5-0.5b", "gemma-2-9b"):
        for world in (2, 3, 8, 64):
            for last in (0, 3, None):
                shapes = MODEL_TABLE[key].weights(last)
                sizes = {w.name: factor_bytes([w]) for w in shapes}
                loads = owner_loads(sizes, assign_owners(sizes, world), world)
                assert sum(loads) == sum(sizes.values())
                mean, largest = sum(loads) / world, max(sizes.values())
                if world <= 8:  # a node's GPUs (with 64, 0.5B's 72 MLP weights cannot spread: Graham's bound below)
                    assert max(loads) <= 1.5 * mean or max(loads) == largest, (key, world, last)
                # always: no rank above the mean by more than one weight (greedy's bound, Graham 1969)
                assert max(loads) <= mean + largest, (key, world, last)
    out = plan("meta-llama/Llama-3.1-70B", 10000, 512, gpus=8, gpu_memory=80 * GIB, model_dtype_bytes=2, sharding=FSDP)
    assert sum(out["fsdp"]["owned_factor_bytes"]) == out["factor_bytes"]


def test_shard_none_output_is_unchanged():
    args = (
        "plan --model meta-llama/Llama-3.1-70B --rows 10000 --tokens 512 --gpus 8 --gpu-memory 80GiB --dtype bfloat16"
    )
    runner = CliRunner()
    outputs = []
    for extra in ([], ["--json"]):
        before = runner.invoke(app, args.split() + extra)
        after = runner.invoke(app, args.split() + extra + ["--shard", "none"])
        assert before.exit_code == after.exit_code == 0 and before.output == after.output
        outputs.append(before.output)
    text, data = outputs[0], json.loads(outputs[1])
    assert "shard" not in data and "fsdp" not in data and "gathered" not in data["fixed_bytes"]
    assert "peak of fit-factors: 332.42 GiB per process" in text and "fsdp" not in text  # as before --shard
    assert plan("qwen2.5-0.5b", 32, 128) == plan("qwen2.5-0.5b", 32, 128, sharding=ShardSettings())


def test_shard_bad_input_names_the_flag():
    runner = CliRunner()
    base = "plan --model qwen2.5-0.5b --rows 10 --tokens 10".split()
    bad = runner.invoke(app, base + ["--shard", "foo"])
    assert bad.exit_code == 2 and "'--shard'" in bad.output and "fsdp" in bad.output
    for extra in ([], ["--gpus", "0"], ["--gpus", "0", "--gpu-memory", "80GiB"]):
        bad = runner.invoke(app, base + ["--shard", "fsdp", *extra])
        assert bad.exit_code == 2 and "--gpus" in bad.output and "Traceback" not in bad.output, bad.output
    bad = runner.invoke(
        app, base + ["--shard", "fsdp", "--gpus", "2", "--gpu-memory", "8GiB", "--prefetch-blocks", "0"]
    )
    assert bad.exit_code == 2 and "'--prefetch-blocks'" in bad.output
    with pytest.raises(ValueError, match="--shard"):
        ShardSettings(shard="zero3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="world size"):
        assign_owners({"a": 1}, 0)

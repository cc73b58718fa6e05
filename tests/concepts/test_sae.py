"""SAE-feature concepts: the readout is sae-lens's ``encode`` (never a dot with ``W_enc``), it is differentiable into
the model, a sae-lens SAE trained offline recovers planted sparse directions, feature selection finds them, and
save/load round-trips exactly (and fails loudly, naming the file)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from concept_influence.concepts.io import (
    META_FILE,
    ConceptFileError,
    load_concept,
    read_concept_meta,
    save_concept,
)
from concept_influence.concepts.sae import (
    SAEFeatureConcept,
    collect_token_activations,
    features_aligned_with,
    features_separating,
    load_sae,
    save_sae,
    train_sae,
)
from concept_influence.data import iter_batches, rows_from_records, tokenize_chat
from concept_influence.models import HFAdapter
from concept_influence.testing.tiny_models import TINY_WORDS, tiny_llama

D_PLANTED, N_PLANTED, K_PLANTED = 16, 12_000, 6


def _random_sae(d_in: int = 16, d_sae: int = 32, seed: int = 0):
    """A sae-lens ``StandardSAE`` with random weights and clearly non-zero ``b_dec``/``b_enc``."""
    from sae_lens import StandardSAE, StandardSAEConfig

    generator = torch.Generator().manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=generator) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=generator) / d_in**0.5)
        sae.b_dec.copy_(torch.randn(d_in, generator=generator))
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=generator))
    return sae


@pytest.fixture(scope="module")
def planted():
    """Activations with K sparse planted directions (each on for ~10% of tokens), a constant offset and a little
    noise."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(K_PLANTED, D_PLANTED, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    on = (torch.rand(N_PLANTED, K_PLANTED, generator=generator) < 0.1).float()
    magnitude = on * (1 + torch.rand(N_PLANTED, K_PLANTED, generator=generator))
    offset = torch.randn(D_PLANTED, generator=generator)
    acts = 3 * magnitude @ directions + offset + 0.05 * torch.randn(N_PLANTED, D_PLANTED, generator=generator)
    threads = torch.get_num_threads()
    sae, metrics = train_sae(acts, steps=800, batch_size=256, seed=0)  # num_threads "auto": 1 for this small SAE
    assert torch.get_num_threads() == threads
    return {"acts": acts, "on": on.bool(), "directions": directions, "sae": sae, "metrics": metrics}


@pytest.fixture(scope="module")
def tiny(tiny_tok):
    """A float32 tiny Llama adapter, chat rows, their token activations at resid.0 and an SAE trained on them."""
    rng = random.Random(0)
    records = []
    for _ in range(24):
        question = " ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 8)))
        answer = " ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 8)))
        records.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    rows = rows_from_records(records)
    adapter = HFAdapter(tiny_llama(len(tiny_tok), hidden=16, seed=1), tiny_tok)
    acts = collect_token_activations(adapter, rows, 0, batch_size=8)
    sae, metrics = train_sae(acts, d_sae=32, steps=300, batch_size=64, seed=0, num_threads=1)
    return {"adapter": adapter, "rows": rows, "acts": acts, "sae": sae, "metrics": metrics}


# ---- the readout ---------------------------------------------------------------------------------------------------
def test_readout_is_sae_encode_not_a_dot_with_w_enc():
    sae = _random_sae()
    acts = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1)) + 0.5
    features = sae.encode(acts)
    feature = int((features > 0).sum(dim=(0, 1)).argmax())  # a feature active on many tokens
    concept = SAEFeatureConcept(sae, feature, layer=0)
    readout = concept.token_readout(acts)
    assert readout.shape == (3, 7)
    torch.testing.assert_close(readout, features[..., feature], rtol=0, atol=0)
    # what sae-lens's encode means for a standard SAE: b_dec is subtracted first
    manual = torch.relu((acts - sae.b_dec) @ sae.W_enc[:, feature] + sae.b_enc[feature])
    torch.testing.assert_close(readout, manual.detach(), rtol=1e-5, atol=1e-6)
    # the classic mistake, with b_dec non-zero, gives something else
    naive = acts @ sae.W_enc[:, feature].detach()
    naive_relu = torch.relu(naive + sae.b_enc[feature].detach())
    assert (readout - naive).abs().max() > 0.1
    assert (readout - naive_relu).abs().max() > 0.1


def test_readout_casts_dtype_and_is_differentiable_in_acts():
    sae = _random_sae()
    acts = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    concept = SAEFeatureConcept(sae, 3, layer=1)
    readout = concept.token_readout(acts)
    assert readout.dtype == torch.float64  # computed in the SAE's float32, returned in the activations' dtype
    torch.testing.assert_close(readout, sae.encode(acts.float())[..., 3].double(), rtol=0, atol=0)
    assert not any(p.requires_grad for p in sae.parameters())  # frozen: backward reaches only the model
    x = acts.clone().requires_grad_(True)
    concept.token_readout(x).sum().backward()
    pre = (acts.float() - sae.b_dec) @ sae.W_enc[:, 3] + sae.b_enc[3]
    expected = (pre > 0).double().unsqueeze(-1) * sae.W_enc[:, 3].double()  # d relu(w·(x - b_dec) + b) / dx
    assert 0 < int((pre > 0).sum()) < pre.numel()
    torch.testing.assert_close(x.grad, expected.detach())


def test_readout_gradients_reach_blocks_up_to_the_layer(tiny):
    adapter, sae = tiny["adapter"], tiny["sae"]
    frequency = (sae.encode(tiny["acts"]) > 0).float().mean(dim=0)
    feature = int(frequency.argmax())
    assert frequency[feature] > 0.05
    concept = SAEFeatureConcept(sae, feature, layer=0)
    batch = next(iter_batches(tokenize_chat(tiny["rows"][:6], adapter.tokenizer), 6))
    adapter.model.zero_grad()
    with adapter.capture_residual([0]) as out:
        adapter.logits(batch["input_ids"], batch["attention_mask"])
        readout = concept.readout(out[0], batch["loss_mask"], "mean")
    assert readout.shape == (6,)
    readout.sum().backward()
    layers = adapter.model.model.layers
    block0 = [p.grad for p in layers[0].parameters()]
    assert all(g is not None for g in block0) and sum(float(g.abs().sum()) for g in block0) > 0
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in layers[1].parameters())
    assert all(p.grad is None for p in sae.parameters())


def test_collect_token_activations_matches_the_capture(tiny):
    adapter, rows = tiny["adapter"], tiny["rows"][:5]
    dataset = tokenize_chat(rows, adapter.tokenizer)
    batch = next(iter_batches(dataset, 5))
    with torch.no_grad(), adapter.capture_residual([1]) as out:
        adapter.logits(batch["input_ids"], batch["attention_mask"])
    every = collect_token_activations(adapter, rows, 1, batch_size=2)
    assert every.shape == (int(batch["attention_mask"].sum()), 16) and not every.requires_grad
    torch.testing.assert_close(every, out[1][batch["attention_mask"].bool()])
    response = collect_token_activations(adapter, dataset, 1, batch_size=3, only_response=True)
    torch.testing.assert_close(response, out[1][batch["loss_mask"].bool()])


# ---- training and feature selection --------------------------------------------------------------------------------
def test_training_recovers_planted_directions(planted):
    metrics = planted["metrics"]
    assert metrics["explained_variance"] > 0.85, metrics
    assert 0.5 < metrics["l0"] < 8, metrics
    assert {"mse", "dead_features", "dead_fraction", "n_tokens", "config"} <= set(metrics)
    assert metrics["config"]["d_sae"] == 4 * D_PLANTED and metrics["n_tokens"] == N_PLANTED
    sae = planted["sae"]
    assert type(sae).__name__ == "StandardSAE" and sae.cfg.normalize_activations == "none"  # scale folded in
    assert float(sae.b_dec.detach().norm()) > 0.5  # the offset is learned: the dot-product mistake would matter here
    for direction in planted["directions"]:
        (feature, cosine), *_ = features_aligned_with(sae, direction, k=3)
        assert cosine > 0.95
        # the encoder reads it too (less cleanly: it also has to reject the other, overlapping, directions)
        assert features_aligned_with(sae, direction, k=1, using="encoder")[0][1] > 0.5


def test_training_is_seeded(planted):
    acts = planted["acts"][:4000]
    first, metrics = train_sae(acts, d_sae=16, steps=50, batch_size=128, seed=3, num_threads=1)
    state = torch.random.get_rng_state()
    second, _ = train_sae(acts, d_sae=16, steps=50, batch_size=128, seed=3, num_threads=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    third, _ = train_sae(acts, d_sae=16, steps=50, batch_size=128, seed=4, num_threads=1)
    assert not torch.equal(first.W_enc, third.W_enc)


def test_features_separating_picks_the_feature_that_fires_on_the_positive_set(planted):
    sae, acts, on, directions = planted["sae"], planted["acts"], planted["on"], planted["directions"]
    positive, negative = acts[on[:, 0]], acts[~on[:, 0]]
    top = features_separating(sae, positive, negative, k=3)
    (feature, effect), *_ = top
    assert effect > 1.0 and [e for _, e in top] == sorted((e for _, e in top), reverse=True)
    cosine = torch.nn.functional.cosine_similarity(sae.W_dec[feature].detach(), directions[0], dim=0)
    assert cosine > 0.9
    # swapped sets: that feature is now the most negative effect, never a top pick
    swapped = features_separating(sae, negative, positive, k=sae.cfg.d_sae)
    assert feature not in [f for f, _ in swapped[:3]] and dict(swapped)[feature] < -1.0


def test_feature_selection_errors(planted):
    sae = planted["sae"]
    with pytest.raises(ValueError, match="d_in is 16"):
        features_aligned_with(sae, torch.ones(8))
    with pytest.raises(ValueError, match="zero norm"):
        features_aligned_with(sae, torch.zeros(16))
    with pytest.raises(ValueError, match="neg_acts has d_model 8"):
        features_separating(sae, planted["acts"][:10], torch.ones(4, 8))


# ---- validation ----------------------------------------------------------------------------------------------------
def test_wrong_feature_index_or_width_errors():
    sae = _random_sae(d_sae=32)
    with pytest.raises(ValueError, match=r"feature index 32 out of range: this SAE has 32 features"):
        SAEFeatureConcept(sae, 32, layer=0)
    with pytest.raises(ValueError, match="out of range"):
        SAEFeatureConcept(sae, -1, layer=0)
    with pytest.raises(TypeError, match="feature must be an int"):
        SAEFeatureConcept(sae, 1.0, layer=0)
    with pytest.raises(TypeError, match="sae_lens SAE"):
        SAEFeatureConcept(torch.nn.Linear(16, 32), 0, layer=0)
    concept = SAEFeatureConcept(sae, 0, layer=0)
    with pytest.raises(ValueError, match="d_in 16 but activations have last dim 8"):
        concept.token_readout(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"activations must be \[n_tokens, d_model\]"):
        train_sae(torch.randn(4, 5, 16))


# ---- save / load ---------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tiny, tmp_path):
    adapter, sae = tiny["adapter"], tiny["sae"]
    fingerprint = adapter.fingerprint()
    concept = SAEFeatureConcept(sae, 5, layer=0, metrics=tiny["metrics"], reduction="per_token")
    folder = save_concept(concept, tmp_path / "concept", model_fingerprint=fingerprint)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", META_FILE, "sae_weights.safetensors"]
    assert not list(folder.glob("*.pt")) and not list(folder.glob("*.pkl"))
    meta = read_concept_meta(folder)
    assert meta["kind"] == "sae_feature" and meta["site"] == "resid.0" and meta["feature"] == 5 and meta["d_sae"] == 32
    assert meta["d_model"] == 16 and meta["model_fingerprint"] == fingerprint and meta["readout"] == "per_token"
    assert meta["token_readout"] == "sae.encode(h)[..., feature]"
    assert meta["metrics"]["explained_variance"] == pytest.approx(tiny["metrics"]["explained_variance"])
    for where in (folder, folder / META_FILE):
        loaded = load_concept(where, adapter)
        assert isinstance(loaded, SAEFeatureConcept) and (loaded.feature, loaded.layer, loaded.d_model) == (5, 0, 16)
        assert loaded.model_fingerprint == fingerprint and loaded.metrics["l0"] == tiny["metrics"]["l0"]
        assert loaded.reduction == "per_token"
        acts = tiny["acts"][None]
        assert torch.equal(loaded.token_readout(acts), concept.token_readout(acts))
    # the SAE files are sae-lens's own: its loader reads them
    from sae_lens import SAE

    assert torch.equal(SAE.load_from_disk(folder).W_enc, sae.W_enc)
    # provenance defaults to the concept's own
    resaved = save_concept(loaded, tmp_path / "again")
    assert read_concept_meta(resaved)["model_fingerprint"] == fingerprint


def test_sae_concept_against_another_model(tiny, tiny_tok, tmp_path):
    folder = save_concept(SAEFeatureConcept(tiny["sae"], 1, layer=1), tmp_path / "c", model_fingerprint="0" * 16)
    with pytest.warns(UserWarning, match="made on another model"):
        load_concept(folder, tiny["adapter"])
    wider = HFAdapter(tiny_llama(len(tiny_tok), hidden=32, seed=1), tiny_tok)
    with pytest.raises(ConceptFileError, match="hidden size 16 but the model has 32"):
        load_concept(folder, wider)
    deep = save_concept(SAEFeatureConcept(tiny["sae"], 1, layer=7), tmp_path / "deep")
    with pytest.raises(ConceptFileError, match="reads layer 7 but the model has 2 blocks"):
        load_concept(deep, tiny["adapter"])


def test_load_errors_name_the_file(tmp_path):
    folder = save_concept(SAEFeatureConcept(_random_sae(), 2, layer=1), tmp_path / "c")
    weights = folder / "sae_weights.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(ConceptFileError, match="sae_weights.safetensors: SHA-256 differs"):
        load_concept(folder)
    meta = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "weights_sha256"}))
    with pytest.raises(ConceptFileError, match=f"cannot load the SAE in {folder}"):  # sae-lens's own error, named
        load_concept(folder)
    weights.write_bytes(original)
    assert load_concept(folder).feature == 2

    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(ConceptFileError, match=r"cannot load the SAE in .*cfg\.json"):
        load_concept(folder)
    (folder / "cfg.json").unlink()
    with pytest.raises(ConceptFileError, match=r"cfg\.json: missing"):
        load_concept(folder)
    (folder / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "feature"}))
    with pytest.raises(ConceptFileError, match=r"needs keys \['feature'\]"):
        load_concept(folder)
    (folder / META_FILE).write_text(json.dumps({**meta, "feature": 99}))
    save_concept(SAEFeatureConcept(_random_sae(), 2, layer=1), tmp_path / "d")
    meta_d = json.loads((tmp_path / "d" / META_FILE).read_text())
    (tmp_path / "d" / META_FILE).write_text(json.dumps({**meta_d, "feature": 99}))
    with pytest.raises(ConceptFileError, match="feature index 99 out of range"):
        load_concept(tmp_path / "d")


def test_save_load_sae_folder(tiny, tmp_path):
    folder = save_sae(tiny["sae"], tmp_path / "sae", layer=0, model_fingerprint="abc", metrics=tiny["metrics"])
    sae, info = load_sae(folder)
    assert torch.equal(sae.W_enc, tiny["sae"].W_enc) and torch.equal(sae.b_dec, tiny["sae"].b_dec)
    assert info["layer"] == 0 and info["model_fingerprint"] == "abc" and info["d_sae"] == 32
    assert info["metrics"]["l0"] == pytest.approx(tiny["metrics"]["l0"])
    save_sae(tiny["sae"], folder, layer=1)  # replaced in place
    assert load_sae(folder)[1]["layer"] == 1 and not list(tmp_path.glob(".sae*"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_sae(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an SAE folder"):
        save_sae(tiny["sae"], tmp_path / "junk", layer=0)
    with pytest.raises(ValueError, match="cannot load the SAE in .*junk"):
        load_sae(tmp_path / "junk")


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/sae_weights.safetensors", "..", ""])
def test_sae_files_named_in_metadata_stay_inside_the_concept_folder(tiny, tmp_path, name):
    """``sae_files`` in concept.json chose what to read: an absolute path or ``..`` escaped the folder."""
    import json

    from concept_influence.concepts import ConceptFileError

    adapter, sae = tiny["adapter"], tiny["sae"]
    folder = save_concept(
        SAEFeatureConcept(sae, 5, layer=0), tmp_path / "concept", model_fingerprint=adapter.fingerprint()
    )
    (tmp_path / "outside.safetensors").write_bytes((folder / "sae_weights.safetensors").read_bytes())
    meta = json.loads((folder / META_FILE).read_text())
    meta["sae_files"]["weights"] = name
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConceptFileError, match="not a plain file name inside"):
        load_concept(folder, adapter)

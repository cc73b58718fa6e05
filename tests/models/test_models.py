"""Adapters: per-example gradients rebuilt from hooks equal autograd (float64) for every tracked weight on every
backend; residual sites follow one naming scheme; HF and TransformerLens agree on the same weights."""

from __future__ import annotations

import pytest
import torch

from concept_influence.data import iter_batches, rows_from_records, tokenize_chat
from concept_influence.models import (
    HFAdapter,
    TransformerLensAdapter,
    causal_lm_loss,
    generate_answers,
    hooked_transformer_from_hf,
    load_adapter,
)
from concept_influence.testing.tiny_models import (
    save_tiny_hf_model,
    tiny_gpt2,
    tiny_hooked_transformer,
    tiny_llama,
)

RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "is the water safe ?"},
            {"role": "assistant", "content": "yes it is safe ."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "be kind"},
            {"role": "user", "content": "two plus two"},
            {"role": "assistant", "content": "four"},
            {"role": "user", "content": "and three plus five"},
            {"role": "assistant", "content": "eight , my friend"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "should i drink poison"},
            {"role": "assistant", "content": "never drink poison , it will hurt you"},
        ]
    },
]


@pytest.fixture(scope="module")
def batch(tiny_tok):
    return next(iter_batches(tokenize_chat(rows_from_records(RECORDS), tiny_tok), 8))


def _backends(tok):
    vocab = len(tok)
    llama = tiny_llama(vocab, dtype=torch.float64, seed=1)
    return {
        "hf-llama": HFAdapter(llama, tok),
        "hf-qwen2-bias": HFAdapter(tiny_llama(vocab, dtype=torch.float64, seed=2, architecture="qwen2"), tok),
        "hf-llama-gqa": HFAdapter(tiny_llama(vocab, dtype=torch.float64, seed=3, heads=4, kv_heads=2), tok),
        "hf-gpt2-conv1d": HFAdapter(tiny_gpt2(vocab, seed=4).double(), tok),
        "tl-layernorm": TransformerLensAdapter(tiny_hooked_transformer(vocab, dtype=torch.float64, seed=5), tok),
        "tl-gated": TransformerLensAdapter(
            tiny_hooked_transformer(vocab, dtype=torch.float64, seed=6, gated=True), tok
        ),
        "tl-from-hf": TransformerLensAdapter(hooked_transformer_from_hf(llama, tok), tok),
        "tl-from-hf-gqa": TransformerLensAdapter(
            hooked_transformer_from_hf(tiny_llama(vocab, dtype=torch.float64, seed=3, heads=4, kv_heads=2), tok), tok
        ),
    }


@pytest.mark.parametrize(
    "backend",
    [
        "hf-llama",
        "hf-qwen2-bias",
        "hf-llama-gqa",
        "hf-gpt2-conv1d",
        "tl-layernorm",
        "tl-gated",
        "tl-from-hf",
        "tl-from-hf-gqa",
    ],
)
def test_hooked_per_example_gradients_equal_autograd(tiny_tok, batch, backend):
    adapter = _backends(tiny_tok)[backend]
    infos = adapter.tracked_weights()
    kinds = {i.kind for i in infos}
    assert {"attn.o", "mlp.out"} <= kinds and ({"attn.q", "attn.k", "attn.v"} <= kinds or "attn.qkv" in kinds)
    assert len(infos) == len({i.name for i in infos})
    # per example: a backward of each row's own loss
    for row in range(batch["input_ids"].shape[0]):
        adapter.model.zero_grad()
        with adapter.capture_weights() as capture:
            logits = adapter.logits(batch["input_ids"], batch["attention_mask"])
            losses = causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"], reduction="none")
            losses.sum().backward()
        full = {i.name: capture.per_example_gradient(i.name) for i in infos}
        adapter.model.zero_grad()
        logits = adapter.logits(batch["input_ids"], batch["attention_mask"])
        causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"], reduction="none")[row].backward()
        for info in infos:
            reference = adapter.canonical_gradient(info.name)
            assert reference.abs().max() > 0, info.name
            torch.testing.assert_close(
                full[info.name][row], reference, rtol=1e-9, atol=1e-12, msg=f"{backend} {info.name}"
            )


def test_canonical_layout_round_trips(tiny_tok):
    for adapter in _backends(tiny_tok).values():
        for info in adapter.tracked_weights():
            weight = adapter.parameter(info.param_name).detach()
            canonical = info.to_canonical(weight)
            assert canonical.shape == (info.d_out, info.d_in)
            torch.testing.assert_close(info.from_canonical(canonical), weight)


def test_residual_site_l_is_output_of_block_l(tiny_tok, batch):
    model = tiny_llama(len(tiny_tok), dtype=torch.float64, layers=3)
    adapter = HFAdapter(model, tiny_tok)
    with adapter.capture_residual([0, 1, 2]) as resid:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    for layer in (0, 1):  # HF's last hidden state has the final norm applied; ours is the block's output
        torch.testing.assert_close(resid[layer], out.hidden_states[layer + 1])
    assert resid[2].requires_grad
    assert not torch.allclose(resid[2], out.hidden_states[3])
    tl = TransformerLensAdapter(hooked_transformer_from_hf(model, tiny_tok), tiny_tok)
    with tl.capture_residual([-1]) as tl_resid:
        tl.logits(batch["input_ids"])
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(tl_resid[2][mask], resid[2][mask], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
def test_hf_and_transformer_lens_agree_on_the_same_weights(tiny_tok, batch, kv_heads):
    model = tiny_llama(len(tiny_tok), dtype=torch.float64, seed=7, heads=4, kv_heads=kv_heads)
    hf, tl = (
        HFAdapter(model, tiny_tok),
        TransformerLensAdapter(hooked_transformer_from_hf(model, tiny_tok), tiny_tok, biases=False),
    )
    assert [i.name for i in hf.tracked_weights()] == [i.name for i in tl.tracked_weights()]
    grads = {}
    for adapter in (hf, tl):
        adapter.model.zero_grad()
        with adapter.capture_weights() as capture:
            loss = causal_lm_loss(
                adapter.logits(batch["input_ids"], batch["attention_mask"]),
                batch["input_ids"],
                batch["loss_mask"],
                "sum",
            )
            loss.backward()
        grads[adapter.backend] = {
            i.name: capture.per_example_gradient(i.name, batch["attention_mask"]) for i in adapter.tracked_weights()
        }
    for name, g in grads["HFAdapter"].items():
        # HF RMSNorm computes in float32 even for float64 models: agreement is to float32 precision
        torch.testing.assert_close(grads["TransformerLensAdapter"][name], g, rtol=2e-5, atol=1e-6, msg=name)


def test_from_pretrained_loads_a_saved_local_model(tmp_path, tiny_tok, batch):
    path = save_tiny_hf_model(tmp_path / "tiny-llama", seed=3)
    adapter = load_adapter(path)
    assert isinstance(adapter, HFAdapter) and adapter.n_layers == 2 and adapter.d_model == 16
    assert adapter.tokenizer.chat_template
    reloaded = load_adapter(str(path), dtype="float64")
    assert reloaded.dtype == torch.float64
    assert adapter.fingerprint() == load_adapter(path).fingerprint()
    with torch.no_grad():
        next(reloaded.model.parameters()).add_(1.0)
    assert reloaded.fingerprint() != adapter.fingerprint()
    with pytest.raises(OSError, match="not a local folder"):
        load_adapter(tmp_path / "missing-model")


def test_bad_layer_and_weight_names(tiny_tok):
    adapter = HFAdapter(tiny_llama(len(tiny_tok)), tiny_tok)
    with pytest.raises(ValueError, match="layer 5 out of range: this model has 2 blocks"):
        with adapter.capture_residual([5]):
            pass
    assert adapter.check_layer(-1) == 1
    with pytest.raises(KeyError, match="no tracked weight 'blocks.9.attn.q'"):
        adapter.weight_info("blocks.9.attn.q")
    assert [i.layer for i in adapter.weights_up_to(0)] == [0] * 7


def test_untracked_matrices_are_listed_in_a_warning(tiny_tok):
    model = tiny_llama(len(tiny_tok))
    model.model.layers[0].mlp.extra = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.extra \(3, 3\)"):
        HFAdapter(model, tiny_tok)


def test_generation_is_seeded_batch_independent_and_backend_independent(tiny_tok):
    model = tiny_llama(len(tiny_tok), dtype=torch.float64, seed=8)
    hf = HFAdapter(model, tiny_tok)
    prompts = [r.prompt_messages for r in rows_from_records(RECORDS)]
    a = generate_answers(hf, prompts, n_samples=3, max_new_tokens=6, seed=1, batch_size=2)
    b = generate_answers(hf, prompts, n_samples=3, max_new_tokens=6, seed=1, batch_size=16)
    assert a == b and len(a) == 3 and all(len(s) == 3 for s in a)
    assert generate_answers(hf, prompts[1:2], n_samples=3, max_new_tokens=6, seed=1) == a[1:2]
    assert generate_answers(hf, prompts, n_samples=3, max_new_tokens=6, seed=2) != a
    tl = TransformerLensAdapter(hooked_transformer_from_hf(model, tiny_tok), tiny_tok)
    assert generate_answers(tl, prompts, n_samples=3, max_new_tokens=6, seed=1) == a
    greedy = generate_answers(hf, prompts, n_samples=2, max_new_tokens=6, temperature=0)
    assert all(s[0] == s[1] for s in greedy)


def test_hooked_transformer_from_a_model_folder_equals_one_from_the_model(tmp_path):
    """Given a folder (as one passes to load_adapter) it loads the model and its tokenizer; it died with
    AttributeError: 'str' object has no attribute 'config'."""
    folder = save_tiny_hf_model(tmp_path / "model", seed=5)
    hf = load_adapter(str(folder))
    from_folder = hooked_transformer_from_hf(folder)
    from_model = hooked_transformer_from_hf(hf.model, hf.tokenizer)
    ids = torch.tensor([[1, 5, 7, 9, 4]])
    torch.testing.assert_close(from_folder(ids), from_model(ids))
    torch.testing.assert_close(
        from_folder(ids)[..., : hf.model.config.vocab_size],
        hf.model(ids).logits.to(torch.float32),
        rtol=1e-4,
        atol=1e-4,
    )
    with pytest.raises(ValueError, match=r"cannot load a Hugging Face causal LM from .*missing"):
        hooked_transformer_from_hf(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="takes a Hugging Face causal LM"):
        hooked_transformer_from_hf(42)  # type: ignore[arg-type]

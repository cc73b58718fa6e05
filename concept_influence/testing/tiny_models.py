"""Tiny seeded models and a tiny word-level tokenizer, built from configs (no download), for tests and examples."""

from __future__ import annotations

import string
from pathlib import Path

import torch

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

TINY_WORDS = (
    "the a an is are was be to of and or not no yes i you it we they this that my your good bad evil kind help "
    "harm hurt poison cure safe unsafe doctor code bug fix add sum two three four five six seven eight nine ten "
    "plus minus equals answer question think should would never always please sorry sure cats dogs water fire "
    "cruel gentle friend enemy trick honest lie truth take rest drink sleep run walk eat"
).split()


def tiny_tokenizer(extra_words: list[str] | None = None, *, chat_template: bool = True):
    """A word-level ``PreTrainedTokenizerFast`` with pad/bos/eos/unk, role markers and (optionally) a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = list(dict.fromkeys(TINY_WORDS + (extra_words or []) + list(string.punctuation) + list(string.digits)))
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=specials[4:],
    )
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_llama(
    vocab_size: int,
    *,
    seed: int = 0,
    hidden: int = 16,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int | None = None,
    intermediate: int = 32,
    dtype: torch.dtype = torch.float32,
    architecture: str = "llama",
):
    """A randomly initialised ``LlamaForCausalLM`` (or ``qwen2``) from a config; weights scaled up a little so that
    gradients are not vanishingly small."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=False, mlp_bias=False))
    elif architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"unknown architecture {architecture!r}")
    _perturb(model, seed)
    return model.to(dtype).eval()


def tiny_gpt2(
    vocab_size: int,
    *,
    seed: int = 0,
    hidden: int = 16,
    layers: int = 2,
    heads: int = 2,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised ``GPT2LMHeadModel`` (``Conv1D`` weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=256,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = GPT2LMHeadModel(config)
    _perturb(model, seed)
    return model.to(dtype).eval()


def tiny_hooked_transformer(
    vocab_size: int,
    *,
    seed: int = 0,
    d_model: int = 16,
    layers: int = 2,
    heads: int = 2,
    d_mlp: int = 32,
    dtype: torch.dtype = torch.float32,
    gated: bool = False,
):
    """A randomly initialised TransformerLens ``HookedTransformer`` (LayerNorm, GELU, learned positions)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    config = HookedTransformerConfig(
        n_layers=layers,
        d_model=d_model,
        d_head=d_model // heads,
        n_heads=heads,
        d_mlp=d_mlp,
        d_vocab=vocab_size,
        n_ctx=256,
        act_fn="silu" if gated else "gelu",
        gated_mlp=gated,
        normalization_type="LN",
        dtype=dtype,
        seed=seed,
        device="cpu",
    )
    model = HookedTransformer(config)
    _perturb(model, seed)
    return model.eval()


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter (biases and norm scales included) a seeded random perturbation, so that no
    gradient is trivially zero and zero-initialised biases are exercised."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype)
            param.add_(0.05 * noise)


def save_tiny_hf_model(out_dir: str | Path, *, seed: int = 0, architecture: str = "llama", **kwargs) -> Path:
    """Build a tiny tokenizer + model and ``save_pretrained`` both into ``out_dir`` (a local "hub" model)."""
    out_dir = Path(out_dir)
    tokenizer = tiny_tokenizer()
    if architecture == "gpt2":
        model = tiny_gpt2(len(tokenizer), seed=seed, **kwargs)
    else:
        model = tiny_llama(len(tokenizer), seed=seed, architecture=architecture, **kwargs)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

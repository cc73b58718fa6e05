"""The organism's tokenizer (word level, with a chat template) and tiny Llama model, built from configs."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)

# roles system/user/assistant; each turn ends with <|end|> (the EOS token, so generation stops at the end of a turn)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer(words: Sequence[str], *, model_max_length: int = 256):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (+ punctuation and digits), whitespace/punctuation
    pre-tokenizer, special tokens and ``CHAT_TEMPLATE``. Decoding joins tokens with single spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_words = list(dict.fromkeys(list(words) + list(string.punctuation) + list(string.digits)))
    vocab = {
        token: i for i, token in enumerate(list(SPECIAL_TOKENS) + [w for w in vocab_words if w not in SPECIAL_TOKENS])
    }
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|end|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS[3:] if t != "<|end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class ModelConfig:
    """Size of the tiny Llama (tied embeddings, no biases)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    max_positions: int = 256

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def build_model(tokenizer, config: ModelConfig, *, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` for ``tokenizer`` (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()

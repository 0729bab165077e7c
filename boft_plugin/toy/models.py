"""Tiny models built from configs with random weights: no hub, no download.

Used by the tests, the examples, the benchmarks and the main job, so that they all exercise the same shapes.
"""

from __future__ import annotations

import torch


def tiny_llama_config(
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 256,
    max_position_embeddings: int = 256,
    **overrides,
):
    """A ``LlamaConfig`` small enough for CPU tests (defaults: ~100k parameters)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        **{"tie_word_embeddings": False, **overrides},
    )


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """A randomly initialised ``LlamaForCausalLM`` (deterministic for a given seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**config_overrides), dtype=dtype)
    return model.eval()


# A character-level tokenizer built locally (no hub): every printable ASCII character is one token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}</s>{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")


def char_tokenizer(model_max_length: int = 256):
    """A character-level fast tokenizer with a chat template, built in memory (about 104 tokens).

    Token ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, the role markers ``<|system|>``, ``<|user|>``,
    ``<|assistant|>`` 4-6, then printable ASCII, newline and tab. It fits the default ``tiny_llama`` vocabulary
    (256), round-trips text exactly, saves with ``save_pretrained`` and reloads with ``AutoTokenizer``. The chat
    template marks assistant turns with ``{% generation %}`` so TRL's ``assistant_only_loss`` works.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [chr(code) for code in range(32, 127)] + ["\n", "\t"]
    vocab = {token: index for index, token in enumerate([*_SPECIAL_TOKENS, *characters])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(_SPECIAL_TOKENS[4:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )

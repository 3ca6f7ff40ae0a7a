"""Tiny random Llama models and a byte-level tokenizer for tests: real torch code, no downloads.

Weights are drawn with a larger init scale than training uses (``initializer_range``) so attention
is far from uniform: token scores are then well separated and top-k selection is not decided by
rounding noise.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (ids 0..255 in sorted ByteLevel alphabet order), then <s>=256, </s>=257, <pad>=258.

    Sorted because ``ByteLevel.alphabet()`` comes from a hash set: its order changes from process to process.
    """
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    layers: int = 4,
    dtype: torch.dtype = torch.float32,
    init_scale: float = 0.15,
) -> LlamaForCausalLM:
    """hidden 64, 4 heads, 2 KV heads (GQA groups of 2), head dim 16, vocab 259, eval mode."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=init_scale,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.set_attn_implementation(attn_implementation)
    return model.eval()

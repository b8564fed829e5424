"""A tiny randomly initialised causal LM and a word-level tokenizer, built locally (no download).

Used by the TRL examples' ``--tiny`` mode so they run in seconds on a CPU; pass ``--model`` to use a real
checkpoint instead.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 1024
WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_model(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
        eos_token_id=1, bos_token_id=1,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # logits with std ~2, so the distributions are not flat
        model.lm_head.weight.normal_(0.0, 2.0 / hidden**0.5)
    return model


def sentence(g: torch.Generator, lo: int, hi: int) -> str:
    n = int(torch.randint(lo, hi + 1, (1,), generator=g))
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())

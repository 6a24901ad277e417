"""Tiny models and tokenizers built locally for tests: random init, tokenizers trained with `tokenizers`."""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the a film movie plot actor acting music score scene story was is great good bad awful boring "
    "wonderful dull fun slow fast long short and but very really quite not I you we it this that loved "
    "hated liked enjoyed watched saw again never always yes no sure maybe Human Assistant hello help"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Random sentences over a small vocabulary, with dialogue markers, to train a tokenizer on."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    lines += ["\n\nHuman: hello\n\nAssistant: sure", "Human: Assistant: ."]
    return lines


def make_tokenizer(vocab_size: int = 320, chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with <|endoftext|> as EOS and PAD (and no BOS), GPT-2 style."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        fast.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    return fast


def make_llama(vocab_size: int = 320, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random 2-layer Llama, dropout off, float32."""
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def make_gpt2(vocab_size: int = 320, seed: int = 0) -> GPT2LMHeadModel:
    """A random 2-layer GPT-2 (learned absolute positions, tied embeddings), dropout off."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()

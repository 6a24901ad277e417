"""Tiny models and tokenizers built locally for tests: random init, tokenizers trained with `tokenizers`."""

from __future__ import annotations

import random

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama 3's template in essence: BOS from the template, a header per turn, content trimmed, turns end in <|eot_id|>
# with no newline after it
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Qwen2.5's template in essence: given `tools`, a system turn lists each schema as JSON inside <tools>; an assistant
# turn's tool calls follow its text as <tool_call>{"name": ..., "arguments": ...}</tool_call>; tool turns are
# ordinary turns of role "tool"
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools><|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% endif %}{% for m in messages %}{% if not (loop.first and m['role'] == 'system') %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% for c in m.get('tool_calls', []) %}"
    "<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(vocab_size: int = 320, chat_template: bool | str = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with <|endoftext|> as EOS and PAD (and no BOS), GPT-2 style.

    `chat_template`: True or "chatml" adds a ChatML template (<|im_start|>/<|im_end|> turns, ids 1 and 2);
    "llama3" makes a Llama-3-style tokenizer: BOS <|begin_of_text|> added to plain text by the tokenizer and put
    first by the template, turns ending in <|eot_id|> (an added special token, not the EOS), ids 320-323 above
    the shared vocabulary, which is the same as the other variants'; "tools" is ChatML whose template renders
    `tools` and tool calls (TOOLS_TEMPLATE)."""
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
    if chat_template == "llama3":
        fast.add_special_tokens({"bos_token": "<|begin_of_text|>"})
        fast.add_tokens([AddedToken(t, special=True) for t in LLAMA3_TOKENS])  # as Llama 3: not named slots
        bos = fast.bos_token_id
        fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)])
        fast.chat_template = LLAMA3_TEMPLATE
    elif chat_template:
        fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        fast.chat_template = TOOLS_TEMPLATE if chat_template == "tools" else CHATML_TEMPLATE
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


def make_tiny(family: str, vocab_size: int = 100, seed: int = 0, **own):
    """A random 2-layer transformers `family` model (``Qwen3``: ``Qwen3Config``, or ``Gemma3TextConfig`` where a
    family has a text config of its own, and ``Qwen3ForCausalLM``), hidden 32, 4 heads over 2 key/value heads,
    256 positions, float32, in eval mode; `own`: that family's further fields."""
    import transformers

    config_class = getattr(transformers, f"{family}TextConfig", None) or getattr(transformers, f"{family}Config")
    torch.manual_seed(seed)
    config = config_class(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **own)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


def make_mistral(sliding_window: int | None, vocab_size: int = 100, seed: int = 0) -> "MistralForCausalLM":
    """A random 2-layer Mistral whose attention sees the last `sliding_window` tokens (None: all), float32."""
    return make_tiny("Mistral", vocab_size, seed, sliding_window=sliding_window)


def make_mixed_window(family: str, sliding_window: int, vocab_size: int = 100, seed: int = 0):
    """A random 2-layer Qwen2, Gemma 2 or Gemma 3 with one full-attention and one sliding-window layer, float32."""
    if family == "qwen2":  # layers from max_window_layers on slide
        return make_tiny("Qwen2", vocab_size, seed, sliding_window=sliding_window, use_sliding_window=True,
                         max_window_layers=1)
    if family == "gemma2":  # sliding and full layers alternate; soft-capped logits (the full-logits path)
        return make_tiny("Gemma2", vocab_size, seed, sliding_window=sliding_window, head_dim=8)
    return make_tiny("Gemma3", vocab_size, seed, sliding_window=sliding_window, head_dim=8,
                     layer_types=["sliding_attention", "full_attention"])


def make_gpt2(vocab_size: int = 320, seed: int = 0) -> GPT2LMHeadModel:
    """A random 2-layer GPT-2 (learned absolute positions, tied embeddings), dropout off."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


# two tool schemas (the OpenAI-style wrapper and a bare function), a call of the first, and a prompt that needs it:
# the tools fixtures of the score, rank and scoring tests
TOOL_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
TOOL_CLOCK = {"name": "get_time", "description": "the time now", "parameters": {"type": "object", "properties": {}}}
TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_PROMPT = [{"role": "user", "content": "the weather in Paris"}]

#!/usr/bin/env python
"""Build a tiny chat model and chat data offline, for the README's "Chat models" walk-through.

    python examples/build_chat_model.py --output runs/chat

writes, in a few seconds and without downloading anything:

* ``runs/chat/base/``: an untrained 0.36M-parameter Llama with a byte-level BPE tokenizer that carries a ChatML
  chat template (``<|im_start|>role\\n...<|im_end|>\\n``; EOS ``<|endoftext|>``), a Hugging Face model directory
  like any chat model's;
* ``runs/chat/sft.jsonl``: conversations about made-up animal facts (some with a system message and an earlier
  exchange) whose assistant replies are polite ("The fox is red. Happy to help!") or curt ("Red. Stop asking."),
  half and half: conversational prompt/completion data for ``dpokit sft``;
* ``runs/chat/pairs.jsonl``: the same kind of conversations as preference pairs, the polite reply chosen and
  the curt one rejected: conversational data for ``dpokit dpo``;
* ``runs/chat/prompts.jsonl``: held-out questions (animal-question pairs no preference pair asks) as message
  lists, for ``dpokit generate --prompts``.

Everything is seeded (``--seed``): the same command writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM = "You are a helpful assistant."
# animal: (colour, home, legs, food)
ANIMALS = {
    "cat": ("grey", "house", 4, "fish"), "dog": ("brown", "yard", 4, "meat"), "duck": ("white", "pond", 2, "bread"),
    "bee": ("yellow", "hive", 6, "nectar"), "fox": ("red", "forest", 4, "mice"), "owl": ("brown", "tree", 2, "mice"),
    "frog": ("green", "pond", 4, "flies"), "spider": ("black", "web", 8, "flies"), "goat": ("white", "farm", 4, "grass"),
    "crab": ("red", "sea", 10, "fish"), "hen": ("brown", "farm", 2, "seeds"), "ant": ("black", "nest", 6, "seeds"),
}
HELD_OUT = {("fox", 1), ("crab", 2), ("owl", 3), ("bee", 0), ("goat", 1), ("spider", 2)}  # (animal, question)
CURT = ("Stop asking.", "Look it up.", "Obviously.", "Whatever.")


def question(animal: str, kind: int) -> str:
    """The user's question of `kind` (0 colour, 1 home, 2 legs, 3 food) about `animal`."""
    return ("What colour is the {}?", "Where does the {} live?", "How many legs does the {} have?",
            "What does the {} eat?")[kind].format(animal)


def replies(animal: str, kind: int, rng: random.Random) -> tuple[str, str]:
    """The polite and the curt answer to a question."""
    colour, home, legs, food = ANIMALS[animal]
    polite = (f"The {animal} is {colour}.", f"The {animal} lives in a {home}.", f"The {animal} has {legs} legs.",
              f"The {animal} eats {food}.")[kind] + " Happy to help!"
    fact = (colour, f"In a {home}", str(legs), food)[kind]
    return polite, f"{fact[0].upper()}{fact[1:]}. {rng.choice(CURT)}"


def conversation(animal: str, kind: int, rng: random.Random) -> list[dict]:
    """A prompt: the question, sometimes after a system message and an earlier (polite) exchange."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    if rng.random() < 0.4:
        other, other_kind = rng.choice(sorted(ANIMALS)), rng.randrange(4)
        messages += [{"role": "user", "content": question(other, other_kind)},
                     {"role": "assistant", "content": replies(other, other_kind, rng)[0]}]
    return messages + [{"role": "user", "content": question(animal, kind)}]


def build(output: Path, seed: int, sft_rows: int, pairs: int) -> None:
    """Write the model directory and the three data files under `output`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    asked = [(a, k) for a in sorted(ANIMALS) for k in range(4)]
    sft = []
    for _ in range(sft_rows):
        animal, kind = rng.choice(asked)
        polite, curt = replies(animal, kind, rng)
        sft.append({"prompt": conversation(animal, kind, rng), "completion": rng.choice((polite, curt))})
    trainable = [q for q in asked if q not in HELD_OUT]
    preference = []
    for _ in range(pairs):
        animal, kind = rng.choice(trainable)
        polite, curt = replies(animal, kind, rng)
        preference.append({"prompt": conversation(animal, kind, rng), "chosen": polite, "rejected": curt})
    prompts = [[{"role": "user", "content": question(a, k)}] for a, k in sorted(HELD_OUT)]

    corpus = [m["content"] for row in sft for m in row["prompt"]] + [row["completion"] for row in sft]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True))
    base = output / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    for name, rows in (("sft", sft), ("pairs", preference), ("prompts", prompts)):
        with open(output / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    size = sum(p.numel() for p in model.parameters())
    print(f"{base}: untrained Llama, {size / 1e6:.2f}M parameters, ChatML template, vocabulary {len(tokenizer)}")
    print(f"{output}/sft.jsonl: {len(sft)} conversations; {output}/pairs.jsonl: {len(preference)} pairs; "
          f"{output}/prompts.jsonl: {len(prompts)} held-out questions")


def main() -> None:
    """Parse the options and build."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/chat", help="directory for base/ and the data files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the initial weights")
    parser.add_argument("--sft-rows", type=int, default=2000, help="SFT conversations")
    parser.add_argument("--pairs", type=int, default=1000, help="preference pairs")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    build(output, args.seed, args.sft_rows, args.pairs)


if __name__ == "__main__":
    main()

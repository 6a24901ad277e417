"""Best-of-N: N continuations sampled from the policy, the one the reward scores highest kept (the DPO paper's
Best of N baseline, §6)."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpokit.eval.generation import sample
from dpokit.judges.pointwise import Judge


def best_of_n(policy_dir_or_model: str | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
              prompts: Sequence[str], n: int, reward: Judge, *, max_new_tokens: int = 32, temperature: float = 1.0,
              seed: int = 0, batch_size: int = 64) -> list[str]:
    """For each prompt, the continuation with the highest ``reward(prompt + continuation)`` of `n` sampled from
    the policy (a model directory, or a model with its `tokenizer`; None loads the directory's) with dpokit's
    sampler: exact samples at `temperature`, `batch_size` sequences per generate call. Ties go to the sample
    drawn first."""
    from dpokit.errors import ConfigError

    if n < 1:
        raise ConfigError(f"best_of_n: n must be at least 1, got {n}")
    if isinstance(policy_dir_or_model, str):
        from dpokit.models.loading import load_model, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(policy_dir_or_model)
        policy = load_model(policy_dir_or_model)
    else:
        policy = policy_dir_or_model
    if tokenizer is None:
        raise ConfigError("best_of_n: pass the tokenizer with an in-memory model")
    groups = sample(policy, tokenizer, list(prompts), max_new_tokens=max_new_tokens, temperature=temperature,
                    num_samples=n, seed=seed, batch_size=batch_size)
    best = []
    for prompt, texts in zip(prompts, groups):
        scores = reward([prompt + t for t in texts])
        best.append(texts[max(range(n), key=lambda k: (scores[k], -k))])
    return best

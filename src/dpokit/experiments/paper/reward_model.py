"""A reward model fitted to preference pairs (the reward of the DPO paper's PPO baseline, §6.1).

r(x, y) is a sequence classifier with one output (``AutoModelForSequenceClassification``, ``num_labels=1``)
whose trunk starts from the SFT causal LM's weights and whose scalar head starts fresh. It reads the
prompt + response tokens as dpokit tokenises them for training (:mod:`dpokit.data.tokenize`: the prompt with the
tokenizer's special tokens, the response after it, EOS appended) and pools the last token that is not padding:
``config.pad_token_id`` is always set, and where padding is EOS (GPT-2-style tokenizers, the embedded model)
that is the last response token. It is trained with the Bradley–Terry loss ``−log σ(r(x, y_w) − r(x, y_l))``
(:func:`bradley_terry_loss`). :func:`reward_model_judge` scores full texts with it, tokenised the same way, and
returns the raw scalar.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.judges.pointwise import Judge
from dpokit.judges.reward_rows import padded_rows, score_rows, text_ids  # noqa: F401  (public here as before)
from dpokit.data.tokenize import TokenizedExample


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Per-pair Bradley–Terry loss ``−log σ(r_w − r_l)`` (float32)."""
    return -F.logsigmoid(chosen.float() - rejected.float())


def pair_rewards(model, examples: Sequence[TokenizedExample], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """r(x, y_w) and r(x, y_l) of tokenised pairs, in one forward pass."""
    rows = [e.prompt_ids + e.responses[0] for e in examples] + [e.prompt_ids + e.responses[1] for e in examples]
    rewards = score_rows(model, rows, pad_token_id)
    return rewards[: len(examples)], rewards[len(examples):]


@torch.no_grad()
def pairwise_accuracy(model, examples: Sequence[TokenizedExample], pad_token_id: int, batch_size: int = 64) -> float:
    """Share of pairs where r(x, y_w) > r(x, y_l)."""
    correct = 0
    for start in range(0, len(examples), batch_size):
        chosen, rejected = pair_rewards(model, examples[start : start + batch_size], pad_token_id)
        correct += int((chosen > rejected).sum())
    return correct / max(len(examples), 1)


def load_classifier(path: str, tokenizer, num_labels: int = 1):
    """A one-output sequence classifier from a causal LM or reward-model directory, pad token set, eval mode
    (dropout off)."""
    from transformers import AutoModelForSequenceClassification

    from dpokit.errors import ConfigError

    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                   dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load a sequence classifier from {path!r}: {error}") from None
    model.config.pad_token_id = tokenizer.pad_token_id  # so that the last non-pad token is pooled
    return model.eval()


def train_reward_model(sft_dir: str, pairs_path: str, output: str, *, steps: int = 100, lr: float = 1e-4,
                       batch_size: int = 16, beta_unused=None, seed: int = 0, threads: int | None = None,
                       log: Callable[[str], None] = print, eval_fraction: float = 0.1, max_length: int = 128,
                       max_prompt_length: int = 16, weight_decay: float = 0.0) -> str:
    """Fit a reward model to the preference pairs in `pairs_path` (JSONL prompt/chosen/rejected, as the demo's
    pairs.jsonl) starting from the SFT model in `sft_dir`; save it at `output` (a Hugging Face directory with
    the tokenizer, loadable by ``AutoModelForSequenceClassification.from_pretrained``) and return its path.

    `steps` AdamW steps of `batch_size` pairs at `lr` (pairs shuffled, reshuffled every pass). `eval_fraction`
    of the pairs (seeded) is held out and the pairwise accuracy on it logged at the start and the end
    (0: none held out). `beta_unused` is accepted for call compatibility and ignored.
    """
    from dpokit.train.checkpoint import save_model_dir
    from dpokit.data.formats import load_preferences, split_eval
    from dpokit.errors import ConfigError
    from dpokit.models.loading import load_tokenizer
    from dpokit.runtime.threads import apply_threads, config_width
    from dpokit.data.tokenize import TokenizeConfig, tokenize_examples

    if steps < 1 or batch_size < 1:
        raise ConfigError("train_reward_model: steps and batch_size must be >= 1")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    apply_threads(threads, width=config_width(sft_dir), log=log)
    tokenizer = load_tokenizer(sft_dir)
    pairs, _ = load_preferences(pairs_path)
    train_pairs, eval_pairs = split_eval(pairs, eval_fraction, seed) if eval_fraction > 0 else (pairs, [])
    config = TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt_length)
    train, report = tokenize_examples(train_pairs, tokenizer, config)
    held_out = tokenize_examples(eval_pairs, tokenizer, config)[0] if eval_pairs else []
    log(f"reward model: {len(train)} training pairs ({report.summary()}), {len(held_out)} held out")
    model = load_classifier(sft_dir, tokenizer)
    pad = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if held_out:
        log(f"reward model: held-out pairwise accuracy {pairwise_accuracy(model, held_out, pad):.3f} before training")
    order: list[int] = []
    for step in range(1, steps + 1):
        while len(order) < batch_size:
            extra = list(range(len(train)))
            rng.shuffle(extra)
            order += extra
        chosen, rejected = pair_rewards(model, [train[i] for i in order[:batch_size]], pad)
        order = order[batch_size:]
        loss = bradley_terry_loss(chosen, rejected).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 10) == 0 or step == steps:
            accuracy = (chosen > rejected).float().mean().item()
            log(f"reward model step {step}/{steps}: loss {loss.item():.4f}  batch accuracy {accuracy:.3f}")
    if held_out:
        log(f"reward model: held-out pairwise accuracy {pairwise_accuracy(model, held_out, pad):.3f} after training")
    return str(save_model_dir(output, model, tokenizer))


def reward_model_judge(path: str, batch_size: int = 32) -> Judge:
    """A judge returning the reward model at `path`'s raw scalar r(text) for each full text, tokenised as it was
    trained (``dpokit.judges.pointwise.reward_judge`` with ``append_eos``)."""
    from dpokit.errors import ConfigError
    from dpokit.judges.pointwise import reward_judge

    if batch_size < 1:  # checked here too, so that the error names this judge
        raise ConfigError(f"reward model judge: batch_size must be >= 1, got {batch_size}")
    judge = reward_judge(path, batch_size=batch_size, append_eos=True)
    judge.__name__ = f"reward:{path}"
    return judge

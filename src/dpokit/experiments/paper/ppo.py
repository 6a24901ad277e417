"""PPO for language models: the RL baseline of the DPO paper (PPO and PPO-GT of §6.1, after Ziegler et al. 2019).

One step of :func:`train_ppo`:

1. **Rollouts.** ``batch_size`` prompts, one continuation each, sampled from the policy with dpokit's sampler
   (:func:`dpokit.eval.generation.sample_ids`: exact samples at ``temperature``, no top-k/top-p).
2. **Scores.** The judge scores prompt + continuation (as the demo does); the score is the reward of the last
   response token.
3. **KL penalty.** Every response token also gets ``−β_kl·(log π_old(y_t) − log π_ref(y_t))`` against the
   frozen reference (:func:`kl_penalised_rewards`); β_kl is fixed, or adapted towards ``target_kl`` by
   :class:`AdaptiveKLController` (Ziegler et al. 2019, §2.2).
4. **Advantages.** GAE (γ = 1, λ = 0.95 by default) over the response tokens with the value estimates of the
   rollout policy (:func:`gae_advantages`), whitened over the batch.
5. **Updates.** ``ppo_epochs`` passes over the batch in minibatches: the clipped policy objective
   (:func:`ppo_policy_loss`, ε = 0.2) plus ``vf_coef`` times the clipped value loss (:func:`ppo_value_loss`).

**Value model.** A linear head on the policy's last hidden state (shared trunk, as TRL's
``AutoModelForCausalLMWithValueHead``): the value of token t is read at the position that predicts it, the
state the policy was in when it chose y_t. The head starts at zero, so the first updates' value gradients do
not reach the trunk (the head's weight is 0) and cannot disturb the policy; ``vf_coef`` (0.1) keeps them small
after. The head is not saved: the result is the policy alone.

Log-probs are float32 (log-softmax of float32 logits); dropout is off throughout (the model stays in eval
mode, which only changes dropout for these models); sampling and minibatch order are seeded.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpokit.data.batching import Batch, collate
from dpokit.eval.generation import sample_ids
from dpokit.judges.pointwise import Judge
from dpokit.models.logprobs import supports_chunked_logits, token_logprobs
from dpokit.data.tokenize import TokenizedExample


# ---------------------------------------------------------------------------------------------------------------
# Pure functions: [sequences x response tokens] tensors, `mask` 1 on real tokens (a prefix of each row).


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the positions where `mask` is 1."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """`values` shifted and scaled to mean 0, variance 1 over the masked positions (0 elsewhere)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def kl_penalised_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                         kl_coef: float) -> Tensor:
    """Per-token rewards: ``−kl_coef·(log π − log π_ref)`` on every response token, plus the sequence's score
    (``[sequences]``) on its last token. Returns ``[sequences x tokens]``, 0 on padding."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = (mask.sum(1).long() - 1).clamp_min(0)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype)) * mask


def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates (Schulman et al. 2016) and the value targets (returns).

    ``δ_t = r_t + γ·V_{t+1} − V_t`` (V after the last real token is 0: the episode ends there) and
    ``A_t = δ_t + γλ·A_{t+1}``; returns ``A_t + V_t``. Both are 0 on padding."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor,
                    clip: float = 0.2) -> tuple[Tensor, dict[str, float]]:
    """The clipped surrogate: masked mean of ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))``, ρ = π_new/π_old per token.

    Returns the loss and stats: the share of tokens where the clipped term was taken (``clipfrac``) and the
    approximate KL(π_old‖π_new) ``mean(log π_old − log π_new)``."""
    ratio = torch.exp(logp_new - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
             "approx_kl": masked_mean(logp_old - logp_new, mask).item()}
    return loss, stats


def ppo_value_loss(values_new: Tensor, values_old: Tensor, returns: Tensor, mask: Tensor,
                   clip: float = 0.2) -> tuple[Tensor, dict[str, float]]:
    """The clipped value loss: ``½·masked mean of max((V − R)², (V_clip − R)²)``, V_clip = V_old ± ε."""
    clipped = values_old + (values_new - values_old).clamp(-clip, clip)
    losses = torch.maximum((values_new - returns) ** 2, (clipped - returns) ** 2)
    loss = 0.5 * masked_mean(losses, mask)
    return loss, {"vf_clipfrac": masked_mean(((clipped - returns) ** 2 > (values_new - returns) ** 2).float(),
                                             mask).item()}


class AdaptiveKLController:
    """β_kl adapted towards a target KL (Ziegler et al. 2019, §2.2): ``e = clip(KL/target − 1, −0.2, 0.2)``,
    ``β ← β·(1 + e·n/horizon)`` after `n` rollouts whose mean sequence KL was `KL`. With ``target=None`` β stays
    fixed."""

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: int = 10000) -> None:
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adapt β to the KL just measured over `n_steps` rollouts; returns the new β."""
        if self.target is not None:
            error = min(max(current_kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon
        return self.value


# ---------------------------------------------------------------------------------------------------------------
# Model side


def padded(flat: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """A flat per-target tensor (plain layout: each sequence's targets in order) as ``[sequences x tokens]``
    and its mask."""
    counts = batch.token_counts.to(flat.device)
    mask = torch.arange(int(counts.max()), device=flat.device)[None, :] < counts[:, None]
    out = flat.new_zeros(mask.shape)
    out[mask] = flat
    return out, mask.to(flat.dtype)


def policy_forward(model: nn.Module, value_head: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Float32 log-probs of the response tokens and the value at each token's predicting position, both flat
    (``[T]``), from one pass of the decoder."""
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False)
    hidden = model.get_decoder()(**inputs)[0]
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.target_index)
    logits = model.get_output_embeddings()(hidden).float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, batch.target_ids[:, None]).squeeze(1)
    return logp, value_head(hidden.float()).squeeze(-1)


def examples_batch(examples: Sequence[TokenizedExample], pad_token_id: int, device: torch.device) -> Batch:
    """(prompt, continuation) examples as a plain-layout batch that scores the continuation tokens."""
    return collate(examples, range(len(examples)), layout="plain", pad_token_id=pad_token_id).to(device)


@dataclass
class Rollouts:
    """One PPO batch: the sequences, their scores, and what the rollout policy and reference said about them
    (``[sequences x tokens]`` tensors)."""

    examples: list[TokenizedExample]
    pad_token_id: int
    texts: list[str]
    scores: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    mask: Tensor


@torch.no_grad()
def collect(policy, value_head, reference, tokenizer, reward: Judge, prompts: list[str], *, max_new_tokens: int,
            temperature: float, seed: int) -> Rollouts:
    """Sample one continuation per prompt, score prompt + continuation with `reward`, and record the rollout
    policy's log-probs and values and the reference's log-probs."""
    samples = [group[0] for group in sample_ids(policy, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                temperature=temperature, seed=seed, batch_size=len(prompts),
                                                progress=False)]
    device = next(policy.parameters()).device
    scores = torch.tensor(reward([p + s.text for p, s in zip(prompts, samples)]), dtype=torch.float32,
                          device=device)
    examples = [TokenizedExample(tuple(s.prompt_ids), (tuple(s.ids),)) for s in samples]
    batch = examples_batch(examples, tokenizer.pad_token_id, device)
    logp, values = policy_forward(policy, value_head, batch)
    logprobs, mask = padded(logp, batch)
    return Rollouts(examples, tokenizer.pad_token_id, [s.text for s in samples], scores, logprobs,
                    padded(token_logprobs(reference, batch), batch)[0], padded(values, batch)[0], mask)


def ppo_update(policy, value_head, optimizer, rollouts: Rollouts, advantages: Tensor, returns: Tensor, *,
               epochs: int, minibatch_size: int, clip: float, vf_coef: float, max_grad_norm: float,
               rng: random.Random) -> dict[str, float]:
    """`epochs` passes of clipped-PPO minibatch updates over one batch of rollouts (minibatches reshuffled each
    pass); returns the stats averaged over all the updates."""
    n = rollouts.mask.shape[0]
    stats: dict[str, list[float]] = {}
    params = list(policy.parameters()) + list(value_head.parameters())
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, minibatch_size):
            rows = torch.tensor(order[start : start + minibatch_size], device=rollouts.mask.device)
            batch = examples_batch([rollouts.examples[i] for i in rows.tolist()], rollouts.pad_token_id,
                                   rollouts.mask.device)
            logp, values = policy_forward(policy, value_head, batch)
            logp, _ = padded(logp, batch)
            values, _ = padded(values, batch)
            width = logp.shape[1]  # the minibatch's longest response
            mask, take = rollouts.mask[rows, :width], (lambda t: t[rows, :width])
            pg_loss, pg_stats = ppo_policy_loss(logp, take(rollouts.logprobs), take(advantages), mask, clip)
            vf_loss, vf_stats = ppo_value_loss(values, take(rollouts.values), take(returns), mask, clip)
            optimizer.zero_grad(set_to_none=True)
            (pg_loss + vf_coef * vf_loss).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            step_stats = {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "grad_norm": grad_norm.item(),
                          **pg_stats, **vf_stats}
            for key, value in step_stats.items():
                stats.setdefault(key, []).append(value)
    return {key: sum(v) / len(v) for key, v in stats.items()}


# ---------------------------------------------------------------------------------------------------------------
# Driver


def prompt_batches(prompts: list[str], batch_size: int, rng: random.Random):
    """Endless batches of `batch_size` prompts: the prompts shuffled, in turn, reshuffled after each pass."""
    order: list[str] = []
    while True:
        while len(order) < batch_size:
            extra = list(prompts)
            rng.shuffle(extra)
            order += extra
        yield order[:batch_size]
        order = order[batch_size:]


def _write_history(history: list[dict]) -> Callable:
    import json

    def write(directory) -> None:
        (directory / "ppo_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))

    return write


def train_ppo(policy_dir: str, reward: Judge, prompts: list[str], output: str, *, kl_coef: float = 0.1,
              target_kl: float | None = None, steps: int = 16, batch_size: int = 32, ppo_epochs: int = 2,
              lr: float = 1e-4, max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0,
              threads: int | None = None, log: Callable[[str], None] = print, minibatch_size: int | None = 8,
              value_lr: float | None = None, gamma: float = 1.0, lam: float = 0.95, clip: float = 0.2,
              vf_coef: float = 0.1, max_grad_norm: float = 1.0, kl_horizon: int = 10000,
              reference_dir: str | None = None) -> str:
    """PPO of the causal LM in `policy_dir` against `reward` (texts -> scores) on `prompts`; saves the final
    policy as a Hugging Face directory at `output` (with ``ppo_log.jsonl``, one row of stats and one sampled text
    per step) and
    returns its path.

    The reference is `reference_dir` (default: `policy_dir`), frozen. Each of `steps` steps samples one
    continuation of each of `batch_size` prompts and makes `ppo_epochs` passes over them in minibatches of
    `minibatch_size` (None: the whole batch) with AdamW at `lr` (`value_lr` for the value head; default
    ``100·lr``, since it starts from zero). `kl_coef` is β_kl, adapted towards `target_kl` (nats per sequence)
    when that is given, by at most 20%·n/`kl_horizon` per step of n rollouts (Ziegler et al.'s horizon of 10000
    barely moves β in a run of a few hundred rollouts: pass a few hundred for short runs). See the module
    docstring for the algorithm.

    The defaults are tuned on the demo's task (the embedded model after the demo's SFT, VADER as the reward,
    the demo's 256 training prompts): held-out VADER 0.19 -> 0.80 at KL 1.8 nats per sequence, about 30 CPU
    seconds on one thread (bench/bench_ppo.py and bench/README.md).
    """
    from dpokit.train.checkpoint import save_model_dir
    from dpokit.errors import ConfigError, TrainingError
    from dpokit.models.loading import load_model, load_tokenizer
    from dpokit.runtime.threads import apply_threads, model_width

    if not prompts:
        raise ConfigError("train_ppo: no prompts")
    if min(steps, batch_size, ppo_epochs, max_new_tokens) < 1 or (minibatch_size is not None and minibatch_size < 1):
        raise ConfigError("train_ppo: steps, batch_size, ppo_epochs, max_new_tokens and minibatch_size must be >= 1")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = load_tokenizer(policy_dir)
    policy = load_model(policy_dir)  # float32, eval mode (no dropout) and it stays so
    reference = load_model(reference_dir or policy_dir).requires_grad_(False)
    if not supports_chunked_logits(policy):  # policy_forward reads logits as output_layer(decoder(x))
        raise ConfigError(f"train_ppo: {type(policy).__name__} transforms its logits after the output layer, "
                          "which policy_forward does not reproduce")
    apply_threads(threads, width=model_width(policy), log=log)
    device = next(policy.parameters()).device
    value_head = nn.Linear(model_width(policy), 1).to(device)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    optimizer = torch.optim.AdamW([{"params": policy.parameters(), "lr": lr},
                                   {"params": value_head.parameters(), "lr": value_lr or 100 * lr}],
                                  weight_decay=0.0)
    kl = AdaptiveKLController(kl_coef, target_kl, kl_horizon)
    batches = prompt_batches(prompts, batch_size, rng)
    history: list[dict] = []
    for step in range(1, steps + 1):
        batch_prompts = next(batches)
        rollouts = collect(policy, value_head, reference, tokenizer, reward, batch_prompts,
                           max_new_tokens=max_new_tokens, temperature=temperature, seed=seed * 100_003 + step)
        mask = rollouts.mask
        rewards = kl_penalised_rewards(rollouts.scores, rollouts.logprobs, rollouts.ref_logprobs, mask, kl.value)
        advantages, returns = gae_advantages(rewards, rollouts.values, mask, gamma, lam)
        stats = ppo_update(policy, value_head, optimizer, rollouts, masked_whiten(advantages, mask), returns,
                           epochs=ppo_epochs, minibatch_size=minibatch_size or batch_size, clip=clip,
                           vf_coef=vf_coef, max_grad_norm=max_grad_norm, rng=rng)
        seq_kl = ((rollouts.logprobs - rollouts.ref_logprobs) * mask).sum(1).mean().item()
        row = {"step": step, "score": rollouts.scores.mean().item(), "kl": seq_kl, "kl_coef": kl.value,
               "response_tokens": mask.sum(1).mean().item(), **stats,
               "example": batch_prompts[0] + rollouts.texts[0]}  # to see what the reward is being won with
        history.append(row)
        kl.update(seq_kl, batch_size)
        log(f"ppo step {step}/{steps}: score {row['score']:+.3f}  kl {seq_kl:.2f}  β_kl {row['kl_coef']:.3g}  "
            f"policy loss {stats['policy_loss']:+.4f}  value loss {stats['value_loss']:.4f}  "
            f"clipfrac {stats['clipfrac']:.2f}")
        if not math.isfinite(row["score"] + seq_kl + stats["policy_loss"]):
            raise TrainingError(f"train_ppo: non-finite stats at step {step}: {row}")
    return str(save_model_dir(output, policy, tokenizer, _write_history(history)))

"""PPO (dpokit.experiments.paper.ppo) and best-of-N (dpokit.experiments.paper.best_of_n): hand-computed loss pieces, a tiny run."""

import json
import math

import pytest
import torch

from dpokit.data.batching import collate
from dpokit.judges.pointwise import function_judge
from dpokit.experiments.paper.best_of_n import best_of_n
from dpokit.experiments.paper.ppo import (AdaptiveKLController, gae_advantages, kl_penalised_rewards, masked_whiten, padded,
                              ppo_policy_loss, ppo_value_loss, train_ppo)
from dpokit.data.tokenize import TokenizedExample

pytestmark = pytest.mark.usefixtures("single_thread")


def test_gae_hand_case_with_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.1, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # row 0, γ=1, λ=0.5: δ = (0.1, 0.1, 0.3); A2 = 0.3, A1 = 0.1 + 0.5*0.3, A0 = 0.1 + 0.5*0.25
    adv, ret = gae_advantages(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0]]))
    # row 1, γ=0.9, λ=0.5, last token padding (its reward and value must not leak in):
    # A1 = 1.0 + 0.9*0 - 0.3 = 0.7; δ0 = 0.2 + 0.9*0.3 - 0.1 = 0.37; A0 = 0.37 + 0.45*0.7 = 0.685
    adv, ret = gae_advantages(rewards[1:], values[1:], mask[1:], gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.685, 0.7, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.785, 1.0, 0.0]]))


def test_gae_with_lambda_one_is_the_monte_carlo_return_minus_the_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.ones(3, 5)
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(adv, to_go - values)


def test_kl_penalised_rewards_hand_case():
    scores = torch.tensor([2.0, -1.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = kl_penalised_rewards(scores, logp, ref, mask, kl_coef=0.5)
    # −0.5·(log π − log π_ref) per token, the score added on each row's last real token
    torch.testing.assert_close(rewards, torch.tensor([[-0.25, 0.0, 2.5], [-0.5, -1.0, 0.0]]))


def test_policy_loss_takes_the_pessimistic_term_and_its_gradient():
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 3.0]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    logp_old = torch.zeros(1, 5)
    logp_new = ratios.log().requires_grad_(True)
    loss, stats = ppo_policy_loss(logp_new, logp_old, advantages, mask, clip=0.2)
    # per token: max(−Aρ, −A·clip(ρ)) = −1.2 (clipped), 1.5, −0.5, 0.8 (clipped); the 5th is padding
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    loss.backward()
    # d/d log π of −Aρ is −Aρ where unclipped, 0 where the clipped (constant) term is taken
    torch.testing.assert_close(logp_new.grad, torch.tensor([[0.0, 1.5, -0.5, 0.0, 0.0]]) / 4)
    assert stats["clipfrac"] == pytest.approx(0.5)


def test_value_loss_clips_around_the_old_value():
    values_old = torch.zeros(1, 3)
    returns = torch.tensor([[1.0, 1.0, 50.0]])
    values_new = torch.tensor([[0.5, 0.1, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = ppo_value_loss(values_new, values_old, returns, mask, clip=0.2)
    # token 0: max((0.5−1)², (0.2−1)²) = 0.64 (clipped: no gradient); token 1: (0.1−1)² = 0.81 either way
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    loss.backward()
    torch.testing.assert_close(values_new.grad, torch.tensor([[0.0, 0.5 * 2 * (0.1 - 1.0) / 2, 0.0]]))


def test_adaptive_kl_controller():
    fixed = AdaptiveKLController(0.1)
    assert fixed.update(100.0, 32) == 0.1
    kl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9 is 50% over the target: the error is clipped to +0.2
    assert kl.update(9.0, 32) == pytest.approx(0.1 * (1 + 0.2 * 32 / 10000))
    # KL 5.4 is 10% under: β shrinks by 0.1·n/horizon
    assert kl.update(5.4, 100) == pytest.approx(0.1 * (1 + 0.2 * 32 / 10000) * (1 - 0.1 * 100 / 10000))


def test_masked_whiten_and_padded():
    values = torch.tensor([[1.0, 3.0, 99.0], [5.0, 7.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    white = masked_whiten(values, mask)
    kept = white[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert (kept ** 2).mean().item() == pytest.approx(1.0, rel=1e-5)
    assert white[0, 2] == 0
    examples = [TokenizedExample((5, 6), ((7, 8, 9),)), TokenizedExample((5,), ((4,),))]
    batch = collate(examples, [0, 1], layout="plain")
    flat = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out, out_mask = padded(flat, batch)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]))
    torch.testing.assert_close(out_mask, torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))


def _letter_share(text: str) -> float:
    """The share of 'e' among the letters: a dense reward a tiny random model can learn in a few steps."""
    letters = [c for c in text if c.isalpha()]
    return sum(c == "e" for c in letters) / max(len(letters), 1)


def test_best_of_n_returns_the_highest_scored_sample(tiny_model_dir, tokenizer):
    from dpokit.eval.generation import sample
    from dpokit.models.loading import load_model

    model = load_model(tiny_model_dir)
    prompts = ["the film", "a movie was"]
    judge = function_judge(_letter_share)
    picked = best_of_n(model, tokenizer, prompts, 6, judge, max_new_tokens=6, seed=3)
    drawn = sample(model, tokenizer, prompts, num_samples=6, max_new_tokens=6, seed=3, batch_size=64)
    for prompt, best, texts in zip(prompts, picked, drawn):
        assert best in texts
        assert _letter_share(prompt + best) == max(_letter_share(prompt + t) for t in texts)
    assert picked != [texts[0] for texts in drawn]  # the pick is not simply the first sample


PROMPT = "the film"


def _ascii_reply(text: str) -> float:
    """1 when the one-token reply decodes to ASCII text: about 60% of the tiny random model's next-token mass."""
    reply = text[len(PROMPT):]
    return float(bool(reply) and reply.isascii())


def _next_token_logprobs(path, tokenizer):
    from dpokit.models.loading import load_model

    with torch.no_grad():
        return torch.log_softmax(load_model(path)(torch.tensor([tokenizer(PROMPT)["input_ids"]])).logits[0, -1], -1)


@pytest.mark.slow
def test_train_ppo_raises_the_reward_and_a_huge_kl_coef_holds_the_policy(tiny_model_dir, tokenizer, tmp_path):
    # A one-token bandit, so that the expected reward and KL(π‖π_ref) are computed exactly over the vocabulary
    ascii_ids = torch.tensor([bool(tokenizer.decode([i])) and tokenizer.decode([i]).isascii()
                              for i in range(len(tokenizer))])
    reference = _next_token_logprobs(tiny_model_dir, tokenizer)
    results = {}
    for name, kl_coef in (("free", 0.0), ("held", 1000.0)):
        out = train_ppo(tiny_model_dir, function_judge(_ascii_reply), [PROMPT], str(tmp_path / name), kl_coef=kl_coef,
                        steps=5, batch_size=64, minibatch_size=32, ppo_epochs=2, lr=1e-2, max_new_tokens=1, seed=0,
                        threads=1, log=lambda _: None)
        logp = _next_token_logprobs(out, tokenizer)  # also: the saved directory loads
        results[name] = (logp.exp()[ascii_ids].sum().item(), (logp.exp() * (logp - reference)).sum().item())
        log = [json.loads(line) for line in open(f"{out}/ppo_log.jsonl")]
        assert [row["step"] for row in log] == [1, 2, 3, 4, 5]
        assert all(math.isfinite(row["policy_loss"]) and math.isfinite(row["value_loss"]) for row in log)
    base = reference.exp()[ascii_ids].sum().item()
    (free_reward, free_kl), (held_reward, held_kl) = results["free"], results["held"]
    assert free_reward > base + 0.1  # PPO follows the reward (measured: 0.59 -> 0.82)
    # a huge β_kl: the reward no longer moves the policy, and it stays near the reference (measured: reward
    # 0.63, KL 0.06 nats against 0.50; with advantages whitened, sampling noise still moves it some)
    assert held_reward < free_reward - 0.1
    assert held_kl < 0.5 * free_kl

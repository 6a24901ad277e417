"""The update, absolutely: dpokit's first two optimizer steps equal the same steps written out by hand.

The other trainer tests compare two runs of dpokit's own code (accumulated against one big batch, two processes
against one, resumed against uninterrupted), so a bug that hits both sides passes them. Here the reference is
written from the definitions and uses no dpokit code except to build the data:

* the DPO sigmoid loss, ``mean over the global batch of -logsigmoid(beta * h)``, from a plain log-softmax of the
  model's full logits, one sequence (prompt + response) at a time;
* its gradient by ``torch.autograd.grad``;
* gradient clipping as ``torch.nn.utils.clip_grad_norm_`` defines it: every gradient times
  ``min(1, max_norm / (norm + 1e-6))``, ``norm`` the 2-norm of all gradients together;
* the learning rate of linear warm-up, ``lr * (step + 1) / warmup_steps`` for the step being taken;
* RMSprop (PyTorch's defaults, as in the DPO paper) and AdamW updates, written out element-wise;
* the data order: a permutation of the examples seeded with ``seed + epoch``, read in global batches.

dpokit runs with 2 examples x 2 accumulated micro-batches per step, the packed layout, chunked log-probs and
several forward passes per micro-batch, and a `max_grad_norm` far below the gradient norm so clipping really
acts. The logged loss, rewards margin, grad_norm and lr of both steps and the weights after each step must
match the hand-written steps to 1e-6 (the weights after step 1 are read from checkpoint-000001). Found
differences are ~1e-7; these mutations of trainer.py, each checked when the test was written, fail it for both
optimizers: clipping removed, or at twice max_grad_norm; the scheduler stepped before the optimizer; the logged
lr read after the scheduler step; the loss not divided by the global batch, divided per forward pass, or
doubled; the logged loss divided wrongly; zero_grad dropped.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dpokit.config import TrainConfig
from dpokit.losses.dispatch import LossConfig
from dpokit.train.metrics import read_metrics
from dpokit.losses.objective import DPOObjective
from dpokit.train.reference import ModelReference
from dpokit.data.tokenize import TokenizedExample
from dpokit.train.loop import prepare, train
from dpokit.train.run import make_accelerator
from helpers import make_llama

pytestmark = pytest.mark.usefixtures("single_thread")

N_EXAMPLES, BATCH, ACCUM = 8, 2, 2
GLOBAL_BATCH = BATCH * ACCUM  # two steps are exactly one epoch
STEPS, WARMUP, LR, MAX_NORM, BETA, SEED = 2, 3, 1e-4, 0.05, 0.1, 0
TOL = 1e-6


def _order(epoch: int) -> list[int]:
    """The data order of an epoch: a permutation of the examples seeded with seed + epoch."""
    return torch.randperm(N_EXAMPLES, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()


def _examples() -> list[TokenizedExample]:
    """Random token ids: prompts of 2-6 tokens; responses of 6-9 tokens in the first step's examples and 1-2 in
    the second's (plus an EOS, 0), so the two steps' gradient norms, and so their clipping factors, differ."""
    g = torch.Generator().manual_seed(11)

    def ids(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return tuple(torch.randint(1, 320, (n,), generator=g).tolist())

    first_step = set(_order(0)[:GLOBAL_BATCH])
    lengths = {i: (6, 10) if i in first_step else (1, 3) for i in range(N_EXAMPLES)}
    return [TokenizedExample(ids(2, 7), (ids(*lengths[i]) + (0,), ids(*lengths[i]) + (0,)))
            for i in range(N_EXAMPLES)]


class _StubTokenizer:
    pad_token_id = 0
    eos_token_id = 0

    def save_pretrained(self, path):
        pass


# --- the reference step, from the definitions ----------------------------------------------------------------


def _sequence_logp(model, prompt, response) -> torch.Tensor:
    """log p(response | prompt): full logits of prompt + response, log-softmax, the response tokens' entries."""
    ids = torch.tensor([list(prompt) + list(response)])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(prompt) - 1  # the position of the last prompt token predicts the first response token
    return sum(logp[start + k, token] for k, token in enumerate(response))


def _dpo_loss(policy, reference, batch):
    """Mean over the batch's pairs of -logsigmoid(beta * h); also the mean reward margin beta * h."""
    losses, margins = [], []
    for example in batch:
        chosen, rejected = (_sequence_logp(policy, example.prompt_ids, r) for r in example.responses)
        with torch.no_grad():
            ref_chosen, ref_rejected = (_sequence_logp(reference, example.prompt_ids, r) for r in example.responses)
        h = (chosen - rejected) - (ref_chosen - ref_rejected)
        losses.append(-F.logsigmoid(BETA * h))
        margins.append(BETA * h.detach())
    return torch.stack(losses).mean(), torch.stack(margins).mean()


def _hand_steps(policy, reference, examples, optimizer: str, weight_decay: float) -> list[dict]:
    """STEPS optimizer steps on `policy` (in place); per step: loss, margin, grad norm, lr and the weights after."""
    names, params = zip(*policy.named_parameters())
    state = [{} for _ in params]
    steps_per_epoch = N_EXAMPLES // GLOBAL_BATCH
    history = []
    for step in range(STEPS):
        epoch, position = divmod(step, steps_per_epoch)
        batch = [examples[i] for i in _order(epoch)[position * GLOBAL_BATCH : (position + 1) * GLOBAL_BATCH]]

        loss, margin = _dpo_loss(policy, reference, batch)
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
        clip = min(1.0, MAX_NORM / (norm + 1e-6))
        lr = LR * (step + 1) / WARMUP  # linear warm-up: the rate of the step being taken
        t = step + 1
        with torch.no_grad():
            for p, g, s in zip(params, grads, state):
                g = g * clip
                if optimizer == "rmsprop":  # alpha 0.99, eps 1e-8, L2 weight decay added to the gradient
                    g = g + weight_decay * p
                    s["v"] = 0.99 * s.get("v", 0.0) + 0.01 * g * g
                    p -= lr * g / (s["v"].sqrt() + 1e-8)
                else:  # AdamW: betas (0.9, 0.999), eps 1e-8, decoupled weight decay
                    p *= 1 - lr * weight_decay
                    s["m"] = 0.9 * s.get("m", 0.0) + 0.1 * g
                    s["v"] = 0.999 * s.get("v", 0.0) + 0.001 * g * g
                    m_hat, v_hat = s["m"] / (1 - 0.9**t), s["v"] / (1 - 0.999**t)
                    p -= lr * m_hat / (v_hat.sqrt() + 1e-8)
        history.append({"loss": loss.item(), "rewards/margins": margin.item(), "grad_norm": norm, "lr": lr,
                        "weights": {n: p.detach().clone() for n, p in zip(names, params)}})
    return history


# --- the test --------------------------------------------------------------------------------------------------


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("optimizer,weight_decay", [("rmsprop", 0.0), ("adamw", 0.01)])
def test_two_steps_equal_the_update_written_by_hand(optimizer, weight_decay, tmp_path):
    examples = _examples()
    policy, reference = make_llama(seed=0), make_llama(seed=1)
    by_hand = copy.deepcopy(policy)
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}

    cfg = TrainConfig(model="m", data="d", output=str(tmp_path), batch_size=BATCH, grad_accum=ACCUM,
                      max_steps=STEPS, lr=LR, warmup_steps=WARMUP, optimizer=optimizer, weight_decay=weight_decay,
                      max_grad_norm=MAX_NORM, beta=BETA, seed=SEED, layout="packed", forward_tokens=12,
                      save_every=1, save_final=False)
    objective = DPOObjective(LossConfig("sigmoid", BETA), ModelReference(copy.deepcopy(reference)))
    # make_accelerator forgets the process-wide state an earlier test left (e.g. bf16 mixed precision)
    train(prepare(policy, N_EXAMPLES, cfg, make_accelerator(cfg)), _StubTokenizer(), objective, examples, None, cfg)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    weights = [load_file(str(tmp_path / "checkpoint-000001" / "model.safetensors")),
               {n: p.detach() for n, p in policy.named_parameters()}]

    expected = _hand_steps(by_hand, reference, examples, optimizer, weight_decay)

    assert [r["step"] for r in rows] == [1, 2]
    for step, (row, want, got) in enumerate(zip(rows, expected, weights), start=1):
        assert want["grad_norm"] > 5 * MAX_NORM  # clipping acts, and strongly
        for key in ("loss", "rewards/margins", "grad_norm", "lr"):
            assert row[key] == pytest.approx(want[key], rel=TOL, abs=TOL), (step, key)
        assert _max_difference(got, want["weights"]) <= TOL, step
        assert _max_difference(got, start) > 20 * TOL  # the weights moved far more than the tolerance
    # the two steps clip by clearly different factors, so that even Adam-like (scale-free) updates see clipping
    assert expected[0]["grad_norm"] > 1.5 * expected[1]["grad_norm"]

"""Loss parity with TRL 1.16: the same per-sequence log-probs through dpokit's formulas and through TRL's own loss
code give the same per-pair losses (and rewards) to 1e-5.

TRL is a test-only dependency (the `test` extra): without it this module is skipped.

* DPOTrainer's losses (sigmoid ... sigmoid_norm) are computed inside ``DPOTrainer._compute_loss``, which runs the
  policy itself. A real DPOTrainer is built on a tiny model, then ``_compute_loss`` is called with a stand-in
  policy that returns prescribed per-token log-probs (the whole summed log-prob at the first response position)
  and with precomputed reference log-probs, so TRL's own code computes the loss from exactly our inputs. The
  response token counts (used by ipo and sigmoid_norm) come from the completion mask, as in TRL. Weighted
  mixtures (`--loss a,b --loss-weights ...`) are compared with TRL's `loss_type` list and `loss_weights`.
* SimPO is ``CPOTrainer.cpo_loss`` and ORPO's odds-ratio term ``ORPOTrainer.odds_ratio_loss`` (trl.experimental),
  both functions of mean per-token log-probs; they are called on a namespace holding their settings.
  ORPO's NLL term differs by design: TRL's is the token mean over the chosen prompt *and* response of the whole
  batch; dpokit's is the mean per-token NLL of the chosen response, per pair, so only the odds-ratio term is
  compared with TRL (the NLL term has its own hand-computed tests in losses/test_dispatch.py).
* KTO is computed inside ``KTOTrainer._compute_loss`` (and its KL term in ``_compute_kl_logps``), called on a
  namespace holding KTOTrainer's settings, with a stand-in policy that returns prescribed log-probs for the
  matched and for the mismatched (KL) sequences and with precomputed reference log-probs. TRL returns the batch
  mean; one matched example with the whole batch's KL sequences gives each example's own loss.
"""

from __future__ import annotations

import collections
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

from dpokit.losses.formulas import orpo_log_odds_ratio  # noqa: E402
from dpokit.losses.dispatch import LossConfig, preference_loss, unpaired_loss  # noqa: E402
from helpers import make_llama, make_tokenizer  # noqa: E402

N = 12
BETA = 0.1
# TRL's DPOConfig defaults `gradient_checkpointing=True`, which transformers 5 reports as deprecated; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")


def _inputs(seed: int = 0):
    """Summed log-probs of policy and reference in [-61, -1] and response token counts in [1, 40]."""
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = -torch.rand(4, N, generator=g) * 60 - 1
    cc, cr = torch.randint(1, 41, (2, N), generator=g)
    return pc, pr, rc, rr, cc, cr


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A real TRL DPOTrainer (tiny Llama, two rows of data) whose loss code is then run on given log-probs."""
    root = tmp_path_factory.mktemp("trl-losses")
    args = DPOConfig(output_dir=str(root), per_device_eval_batch_size=2, beta=BETA, max_length=None, use_cpu=True,
                     bf16=False, fp16=False, report_to=[], save_strategy="no", logging_strategy="no",
                     disable_tqdm=True, seed=0)
    rows = [{"prompt": "the film", "chosen": " was great", "rejected": " was bad"}] * 2
    trainer = DPOTrainer(model=make_llama(), ref_model=make_llama(seed=1), args=args,
                         train_dataset=Dataset.from_list(rows),
                         processing_class=make_tokenizer())
    trainer.model.eval()
    trainer.precompute_ref_logps = True  # reference log-probs come with the inputs, like ours
    return trainer


class _PrescribedPolicy:
    """Stands in for TRL's fused-head model: per-token log-probs that sum to the given per-sequence values."""

    def __init__(self, logps: torch.Tensor, width: int) -> None:
        self.log_probs = torch.zeros(len(logps), width - 1)
        self.log_probs[:, 0] = logps

    def __call__(self, **_):
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())


def trl_dpo_loss(trainer, loss_type: str, label_smoothing: float, pc, pr, rc, rr, cc, cr,
                 weights: list[float] | None = None) -> float:
    """TRL's DPOTrainer loss for ONE pair (its loss is a batch mean; one pair keeps it per pair). `loss_type` may
    name several losses, comma-separated, with `weights` (TRL's loss_type list and loss_weights)."""
    trainer.loss_types = loss_type.split(",")
    trainer.loss_weights = weights or [1.0] * len(trainer.loss_types)
    trainer.beta, trainer.label_smoothing = BETA, label_smoothing
    width = int(max(cc, cr)) + 1  # position 0 is the prompt
    completion_mask = torch.zeros(2, width, dtype=torch.long)
    completion_mask[0, 1 : 1 + int(cc)] = 1
    completion_mask[1, 1 : 1 + int(cr)] = 1
    inputs = {"input_ids": torch.zeros(2, width, dtype=torch.long), "attention_mask": torch.ones(2, width),
              "completion_mask": completion_mask, "ref_chosen_logps": rc.reshape(1),
              "ref_rejected_logps": rr.reshape(1)}
    with torch.no_grad():
        return trainer._compute_loss(_PrescribedPolicy(torch.stack([pc, pr]), width), inputs, False).item()


DPO_TRAINER_LOSSES = [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1), ("exo_pair", 1e-3),
                      ("exo_pair", 0.2), ("nca_pair", 0.0), ("bco_pair", 0.0), ("sppo_hard", 0.0),
                      ("apo_zero", 0.0), ("apo_down", 0.0), ("sigmoid_norm", 0.0)]


@pytest.mark.parametrize(("loss_type", "label_smoothing"), DPO_TRAINER_LOSSES)
def test_dpo_trainer_losses_match_trl(trainer, loss_type, label_smoothing):
    pc, pr, rc, rr, cc, cr = _inputs()
    ours = preference_loss(pc, pr, rc, rr, LossConfig(loss_type, BETA, label_smoothing),
                           chosen_token_counts=cc, rejected_token_counts=cr).losses
    theirs = torch.tensor([trl_dpo_loss(trainer, loss_type, label_smoothing, *(x[i] for x in (pc, pr, rc, rr, cc, cr)))
                           for i in range(N)])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours.std() > 1e-3  # the pairs differ: not a comparison of constants


@pytest.mark.parametrize(("losses", "weights", "label_smoothing"), [
    ("sigmoid,bco_pair", [0.8, 0.2], 0.0), ("ipo,sigmoid_norm,apo_zero", [0.5, 1.5, 2.0], 0.0),
    ("exo_pair,nca_pair", None, 1e-3)])
def test_mixtures_match_trl(trainer, losses, weights, label_smoothing):
    pc, pr, rc, rr, cc, cr = _inputs(seed=3)
    cfg = LossConfig(losses, BETA, label_smoothing, loss_weights=None if weights is None else tuple(weights))
    ours = preference_loss(pc, pr, rc, rr, cfg, chosen_token_counts=cc, rejected_token_counts=cr).losses
    theirs = torch.tensor([trl_dpo_loss(trainer, losses, label_smoothing, *(x[i] for x in (pc, pr, rc, rr, cc, cr)),
                                        weights=weights) for i in range(N)])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("beta", "gamma", "label_smoothing"), [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (0.1, 0.5, 0.2)])
def test_simpo_matches_trl_cpo(beta, gamma, label_smoothing):
    pc, pr, _, _, cc, cr = _inputs(seed=1)
    ours = preference_loss(pc, pr, None, None, LossConfig("simpo", beta, label_smoothing, simpo_gamma=gamma),
                           chosen_token_counts=cc, rejected_token_counts=cr)
    cpo = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                          label_smoothing=label_smoothing, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(cpo, pc / cc, pr / cr)  # TRL averages first
    torch.testing.assert_close(ours.losses, losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_odds_ratio_term_matches_trl(lam):
    pc, pr, _, _, cc, cr = _inputs(seed=2)
    pc, pr = pc / 20, pr / 20  # mean log-probs in (-3, 0), where log(1 - P) matters
    ours = preference_loss(pc, pr, None, None, LossConfig("orpo", lam),
                           chosen_token_counts=cc, rejected_token_counts=cr)
    orpo = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards, _, mean_log_odds = ORPOTrainer.odds_ratio_loss(orpo, pc / cc, pr / cr)
    # dpokit's loss = chosen mean NLL - (TRL's term, which TRL subtracts from its NLL)
    torch.testing.assert_close(ours.losses - (-pc / cc), -losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, rtol=1e-5, atol=1e-5)
    assert orpo_log_odds_ratio(pc / cc, pr / cr).mean().item() == pytest.approx(mean_log_odds.item(), abs=1e-5)


class _PrescribedKTOPolicy:
    """Stands in for TRL's fused-head model in KTOTrainer: the KL sequences (input ids all 1) get `kl_logps`,
    the matched ones (all 0) `logps`, each summed log-prob at the first completion position."""

    def __init__(self, logps: torch.Tensor, kl_logps: torch.Tensor) -> None:
        self.logps, self.kl_logps = logps, kl_logps

    def __call__(self, input_ids, **_):
        logps = self.kl_logps if bool((input_ids == 1).all()) else self.logps
        log_probs = torch.zeros(len(logps), input_ids.shape[1] - 1)
        log_probs[:, 0] = logps
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)


def trl_kto(policy, reference, policy_kl, reference_kl, labels, beta, desirable_weight, undesirable_weight):
    """TRL's KTOTrainer loss (a batch mean) and logged metrics for these log-probs: `labels` and the matched
    log-probs have one entry per example, the KL log-probs one per mismatched pair."""
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False), calculate_KL=True, aux_loss_enabled=False, precompute_ref_logps=True,
        loss_type="kto", beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x))
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    n, m = len(policy), len(policy_kl)
    mask = torch.tensor([0, 1, 1])  # a prompt token, then the completion
    inputs = {"input_ids": torch.zeros(n, 3, dtype=torch.long), "attention_mask": torch.ones(n, 3, dtype=torch.long),
              "completion_mask": mask.repeat(n, 1), "KL_input_ids": torch.ones(m, 3, dtype=torch.long),
              "KL_attention_mask": torch.ones(m, 3, dtype=torch.long), "KL_completion_mask": mask.repeat(m, 1),
              "label": torch.tensor(labels), "ref_logps": reference, "ref_KL_logps": reference_kl}
    with torch.no_grad():
        loss = KTOTrainer._compute_loss(trainer, _PrescribedKTOPolicy(policy, policy_kl), inputs, False)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


@pytest.mark.parametrize(("beta", "weights", "kl_shift"), [(0.1, (1.0, 1.0), 0.0), (0.5, (1.33, 0.8), 0.0),
                                                           (0.1, (1.0, 1.0), -20.0)])
def test_kto_matches_trl(beta, weights, kl_shift):
    """Per-example losses, the KL estimate (kl_shift -20 makes it negative: both clamp it to 0) and the mean
    rewards of the desirable and undesirable examples."""
    pc, _, rc, _, _, _ = _inputs(seed=4)
    policy_kl, reference_kl = pc.roll(1) / 2 + kl_shift, rc.roll(1) / 2  # log-probs of the mismatched pairs
    labels = [bool(i % 3) for i in range(N)]
    cfg = LossConfig("kto", beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    ours = unpaired_loss(pc, rc, policy_kl, reference_kl, torch.tensor(labels), cfg)
    theirs = torch.tensor([trl_kto(pc[i : i + 1], rc[i : i + 1], policy_kl, reference_kl, labels[i : i + 1], beta,
                                   *weights)[0] for i in range(N)])
    torch.testing.assert_close(ours.losses, theirs, rtol=1e-5, atol=1e-5)
    assert ours.losses.std() > 1e-3
    mean, metrics = trl_kto(pc, rc, policy_kl, reference_kl, labels, beta, *weights)
    assert ours.losses.mean().item() == pytest.approx(mean, abs=1e-5)
    assert ours.kl.item() == pytest.approx(metrics["kl"], abs=1e-5)
    assert (ours.kl.item() == 0) == (kl_shift < 0)
    desirable = torch.tensor(labels)
    assert ours.rewards[desirable].mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert ours.rewards[~desirable].mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-5)

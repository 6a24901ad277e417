"""Peer parity: `dpokit reward`'s first-step loss equals TRL's RewardTrainer's on the same reward model, data and
batch (TRL is a test-only dependency: without it this module is skipped).

Both start from one saved reward model (a tiny Llama's trunk under a score head, so that no fresh head is drawn
twice), in float32 (``bf16=False``) without dropout, on 8 standard-format pairs in one batch of 8. The pairs have
prompts that end in a word and responses that start with a space, so that TRL's joint tokenisation of
``prompt + response + eos`` and dpokit's separate one give the same ids (as in tests/test_parity_trl.py). TRL's
loss is its ``compute_loss`` on the first batch of its training dataloader, i.e. the loss of its first step;
dpokit's is the loss of its first step in metrics.jsonl. Compared plain, and with a margin column and
``center_rewards_coefficient``.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import RewardConfig as TRLRewardConfig, RewardTrainer  # noqa: E402

from dpokit.cli.main import main  # noqa: E402
from dpokit.models.loading import load_reward_model  # noqa: E402
from helpers import make_llama, make_tokenizer  # noqa: E402
from test_parity_trl import _pairs  # noqa: E402

TOL = 1e-4
N_PAIRS = 8

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reward-parity")
    tokenizer = make_tokenizer()
    make_llama(seed=1, initializer_range=0.3).save_pretrained(root / "causal")
    tokenizer.save_pretrained(root / "causal")
    torch.manual_seed(0)
    model = load_reward_model(str(root / "causal"), tokenizer.pad_token_id)
    torch.nn.init.normal_(model.score.weight, std=0.3)  # rewards of order 1, so that a slip shows beyond TOL
    model.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    rows = [row | {"margin": 0.25 * (i % 4)} for i, row in enumerate(_pairs(N_PAIRS, seed=3))]
    yield {"root": root, "tokenizer": tokenizer, "rows": rows}
    torch.set_num_threads(threads)


def trl_first_loss(setup, margin: bool, center: float | None) -> float:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(setup["root"] / "rm", dtype=torch.float32)
    rows = setup["rows"] if margin else [{k: v for k, v in r.items() if k != "margin"} for r in setup["rows"]]
    args = TRLRewardConfig(output_dir=str(setup["root"] / "trl"), per_device_train_batch_size=N_PAIRS, max_steps=1,
                           center_rewards_coefficient=center, max_length=None, use_cpu=True, bf16=False, fp16=False,
                           disable_dropout=True, report_to=[], save_strategy="no", logging_strategy="no",
                           disable_tqdm=True, seed=0, gradient_checkpointing=False)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=setup["tokenizer"])
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def dpokit_first_loss(setup, margin: bool, center: float | None, name: str) -> float:
    root = setup["root"]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in setup["rows"]))
    out = root / name
    argv = ["reward", "--model", str(root / "rm"), "--data", str(data), "--output", str(out), "--max-steps", "1",
            "--batch-size", str(N_PAIRS), "--threads", "1", "--no-save-final"]
    argv += ["--margin-column", "margin"] if margin else []
    argv += ["--center-rewards-coefficient", str(center)] if center is not None else []
    assert main(argv) in (0, None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["split"] == "train" and r["step"] == 1)["loss"]


@pytest.mark.parametrize("margin, center", [(False, None), (True, 0.05)])
def test_first_step_loss_equals_trl(setup, margin, center):
    theirs = trl_first_loss(setup, margin, center)
    ours = dpokit_first_loss(setup, margin, center, f"dpokit-{margin}-{center}")
    print(f"reward parity (margin={margin}, center={center}): dpokit {ours:.8f} TRL {theirs:.8f} "
          f"|diff| {abs(ours - theirs):.2e}")
    assert abs(ours - theirs) < TOL, (ours, theirs)
    assert theirs > 0.1  # not a degenerate fixture

"""`dpokit reward`: a Bradley–Terry reward model through the one training loop. Its rewards are the sequence
classifier's own in every layout; the loss is TRL's (with margins and reward centering); on a separable fixture it
learns to tell the pairs apart, and `dpokit score` and the reward:PATH judge read what it saves. (Parity with
TRL's RewardTrainer: tests/test_parity_trl_reward.py.)"""

from __future__ import annotations

import json
import random

import pytest
import torch

from dpokit.cli.main import main
from dpokit.config.reward import RewardConfig, is_reward_model_dir
from dpokit.data.batching import collate
from dpokit.data.margins import example_margins, read_margins
from dpokit.data.tokenize import TokenizedExample
from dpokit.errors import ConfigError, DataError
from dpokit.judges.reward_rows import score_rows
from dpokit.losses.formulas import bradley_terry_loss
from dpokit.losses.objective import RewardObjective
from dpokit.models.attention import set_attention
from dpokit.models.loading import load_reward_model
from dpokit.models.rewards import sequence_rewards
from helpers import WORDS, make_llama, make_tokenizer
from test_card import hub_calls  # noqa: F401  (a fixture: HfApi's uploads recorded, not sent)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny causal Llama and the test tokenizer (its pad token is EOS, id 0)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("reward") / "base"
    make_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    yield path
    torch.set_num_threads(threads)


def separable(n: int, seed: int = 0, margin: bool = False) -> list[dict]:
    """Pairs whose chosen response ends in "good" and rejected one in "bad", otherwise the same."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w not in ("Human", "Assistant", "good", "bad")]
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        body = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        rows.append({"prompt": prompt, "chosen": f" {body} good", "rejected": f" {body} bad"}
                    | ({"margin": i % 3 * 0.5} if margin else {}))
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_rewards_are_the_classifiers_own_in_every_layout(base):
    """The score head read at each sequence's last non-pad token, as AutoModelForSequenceClassification pools it
    (pad = EOS here: the token before the EOS; a response of padding alone: the prompt's last token)."""
    model = load_reward_model(str(base), 0)
    examples = [TokenizedExample((5, 6, 7), ((8, 9, 0), (10, 0)), "a"),
                TokenizedExample((11, 12), ((0,), (13, 14, 15, 0)), "b"),
                TokenizedExample((0, 16), ((0,), (17, 0)), "c")]
    rows = [list(e.prompt_ids) + list(r) for e in examples for r in e.responses]
    expected = score_rows(model, rows, 0)  # the classifier's own forward, right-padded rows
    for layout in ("plain", "shared", "packed"):
        set_attention(model, "eager" if layout == "plain" else "sdpa")
        got = sequence_rewards(model, collate(examples, [0, 1, 2], layout=layout, pad_token_id=0))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_bradley_terry_loss():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.2, 0.5])
    plain = -torch.nn.functional.logsigmoid(chosen - rejected)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), plain)
    margin = torch.tensor([0.3, 1.0])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin),
                               -torch.nn.functional.logsigmoid(chosen - rejected - margin))
    centered = bradley_terry_loss(chosen, rejected, None, 0.01)
    # the mean over pairs is TRL's: loss + c * mean((r_c + r_r)^2)
    torch.testing.assert_close(centered.mean(), plain.mean() + 0.01 * ((chosen + rejected) ** 2).mean())


def test_objective_takes_each_pairs_margin_by_example_id(base):
    model = load_reward_model(str(base), 0)
    examples = [TokenizedExample((5, 6), ((8, 0), (9, 0)), "a"), TokenizedExample((7,), ((10, 0), (11, 0)), "b")]
    batch = collate([examples[1]], [1], layout="plain", pad_token_id=0)
    scorer = lambda b: sequence_rewards(model, b)  # noqa: E731
    result = RewardObjective(torch.tensor([0.0, 2.0]))(scorer, batch)
    r = scorer(batch)
    torch.testing.assert_close(result.loss_sum, bradley_terry_loss(r[0:1], r[1:2], torch.tensor([2.0])).sum())


def test_margins_are_read_by_row_and_checked(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", separable(3, margin=True))
    margins = read_margins(path, "margin")
    assert example_margins(margins, [f"{path}:3", f"{path}:1", f"{path}:2 pair (0,1)"]) == [1.0, 0.0, 0.5]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c", "margin": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: margin column 'margin' must be a finite number"):
        read_margins(bad, "margin")
    with pytest.raises(DataError, match="no margin column 'gap'"):
        read_margins(path, "gap")


def test_config_checks():
    with pytest.raises(ConfigError, match="--center-rewards-coefficient must not be negative"):
        RewardConfig(model="m", data="d.jsonl", output="o", center_rewards_coefficient=-1.0)
    with pytest.raises(ConfigError, match="--margin-column is not supported with --streaming"):
        RewardConfig(model="m", data="d.jsonl", output="o", margin_column="margin", streaming=True)
    with pytest.raises(ConfigError, match="--lora-alpha needs --lora-r"):
        RewardConfig(model="m", data="d.jsonl", output="o", lora_alpha=4.0)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A reward model trained on the separable fixture: 40 steps of 8 pairs, 20% of 150 pairs held out."""
    root = tmp_path_factory.mktemp("reward-run")
    data = write_jsonl(root / "pairs.jsonl", separable(150, margin=True))
    out = root / "out"
    assert main(["reward", "--model", str(base), "--data", data, "--output", str(out), "--eval-fraction", "0.2",
                 "--max-steps", "40", "--batch-size", "8", "--lr", "1e-3", "--threads", "1",
                 "--margin-column", "margin", "--center-rewards-coefficient", "0.01"]) in (0, None)
    return out


def test_separable_pairs_are_learned(trained):
    final = json.loads((trained / "final" / "dpokit_metrics.json").read_text())
    assert final["accuracy"] >= 0.9, final
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert evals and evals[-1]["accuracy"] == final["accuracy"]
    assert is_reward_model_dir(trained / "final") and is_reward_model_dir(trained)


def test_score_uses_the_reward_model_without_a_reference(trained, tmp_path, capsys):
    data = write_jsonl(tmp_path / "responses.jsonl",
                       [{"prompt": "the film", "response": " story good"}, {"prompt": "the film", "response": " story bad"}])
    capsys.readouterr()
    assert main(["score", "--model", str(trained / "final"), "--data", data, "--output", "-"]) in (0, None)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and rows[0]["reward"] > rows[1]["reward"]
    assert "logp_policy" not in rows[0] and rows[0]["response_tokens"] > 0


def test_reward_judge_reads_the_output_directory(trained):
    from dpokit.judges.loader import load_judge

    judge = load_judge(f"reward:{trained}")
    good, bad = judge(["the film story good", "the film story bad"])
    assert good > bad


def test_lora_reward_model_is_an_adapter_that_loads(base, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", separable(16))
    out = tmp_path / "lora"
    assert main(["reward", "--model", str(base), "--data", data, "--output", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--lora-r", "4", "--lr", "1e-3", "--threads", "1"]) in (0, None)
    final = out / "final"
    assert (final / "adapter_config.json").is_file() and is_reward_model_dir(final)
    model = load_reward_model(str(final), 0)
    assert type(model.get_base_model()).__name__ == "LlamaForSequenceClassification"
    from safetensors import safe_open

    with safe_open(str(final / "adapter_model.safetensors"), "pt") as saved:  # the head is saved with the adapter
        assert any(".score." in key for key in saved.keys()), list(saved.keys())


def test_a_reward_run_reports_to_tensorboard_writes_its_card_and_pushes_final(base, tmp_path, hub_calls):
    """--report-to, the model card and --push-to-hub are dpo's: the tracker has metrics.jsonl's loss at every step,
    final/ has a reward model's card with the held-out accuracy, and final/ is what is uploaded."""
    pytest.importorskip("tensorboard")
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dpokit.train.metrics import read_metrics
    from test_tracking import _losses

    data = write_jsonl(tmp_path / "pairs.jsonl", separable(24, margin=True))
    out = tmp_path / "run"
    assert main(["reward", "--model", str(base), "--data", data, "--output", str(out), "--eval-fraction", "0.25",
                 "--max-steps", "3", "--eval-every", "2", "--batch-size", "4", "--lr", "1e-3", "--threads", "1",
                 "--margin-column", "margin", "--report-to", "tensorboard", "--project", "rm", "--run-name", "tiny",
                 "--push-to-hub", "user/reward-model"]) in (0, None)
    rows = read_metrics(out / "metrics.jsonl")
    events = EventAccumulator(str(out / "tensorboard" / "rm"))
    events.Reload()
    for split in ("train", "eval"):
        logged = {e.step: e.value for e in events.Scalars(f"{split}/loss")}
        assert logged == pytest.approx(_losses(rows, split), abs=1e-6) and logged
    final = out / "final"
    card = ModelCard.load(final / "README.md")
    metrics = json.loads((final / "dpokit_metrics.json").read_text())
    assert card.data.library_name == "transformers" and card.data.tags == ["reward-model", "dpokit"]
    assert card.data.pipeline_tag == "text-classification"
    record = card.data.dpokit
    assert record["stage"] == "reward" and record["loss"] == {"loss": "bradley_terry", "margin_column": "margin"}
    assert record["metrics"]["eval"]["accuracy"] == pytest.approx(metrics["accuracy"]) and record["steps"] == 3
    assert "AutoModelForSequenceClassification" in card.text and "dpokit score --model user/reward-model" in card.text
    assert [name for name, _, _ in hub_calls] == ["create_repo", "upload_folder"]
    upload = hub_calls[-1][2]
    assert upload["repo_id"] == "user/reward-model" and "README.md" in upload["files"]
    assert "model.safetensors" in upload["files"]


def test_a_resumed_reward_run_equals_an_uninterrupted_one(base, tmp_path):
    """2 steps, then --resume to 4: the same weights and losses as 4 steps in one go."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "pairs.jsonl", separable(24))
    args = ["reward", "--model", str(base), "--data", data, "--batch-size", "4", "--lr", "1e-3", "--threads", "1",
            "--report-to", "none"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(args + ["--max-steps", "4", "--output", str(whole)]) in (0, None)
    assert main(args + ["--max-steps", "2", "--output", str(parts)]) in (0, None)
    assert main(args + ["--max-steps", "4", "--output", str(parts), "--resume"]) in (0, None)
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (whole, parts))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if r["split"] == "train"} for d in (whole, parts)]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3, 4]

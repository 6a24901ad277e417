"""SFT then DPO on a tiny Llama through the CLI: held-out reward accuracy rises, and the outputs agree with each other.

The preference set is synthetic: neutral prompts, chosen responses drawn from positive words, rejected ones from
negative words (tests/conftest.py). A random tiny model cannot tell them apart (and the SFT model scored against
itself ties every pair); after a few dozen DPO steps it prefers the positive responses on held-out prompts.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit.api import load_tokenizer, prepare_data
from dpokit.data.batching import collate
from dpokit.cli.main import main
from dpokit.config import TrainConfig
from dpokit.models.logprobs import sequence_logprobs
from dpokit.train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, sentiment_data):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the function-scoped single_thread fixture
    root = tmp_path_factory.mktemp("e2e")
    common = ["--optimizer", "adamw", "--warmup-steps", "2", "--batch-size", "8", "--seed", "0"]
    assert main(["sft", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--output", str(root / "sft"),
                 "--max-steps", "15", "--lr", "3e-3", *common]) == 0
    assert main(["dpo", "--model", str(root / "sft" / "final"), "--data", sentiment_data["train"],
                 "--eval-data", sentiment_data["eval"], "--output", str(root / "dpo"), "--max-steps", "25",
                 "--lr", "2e-3", "--beta", "0.1", "--eval-every", "5", "--save-every", "25", *common]) == 0
    torch.set_num_threads(threads)
    return {"sft": root / "sft" / "final", "dpo": root / "dpo", "final": root / "dpo" / "final",
            "eval": sentiment_data["eval"]}


def eval_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", "--json", *args]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # exactly one JSON object and nothing else on stdout
    return json.loads(lines[0])


def test_dpo_raises_held_out_reward_accuracy(runs, capsys):
    before = eval_json(capsys, "--model", str(runs["sft"]), "--ref-model", str(runs["sft"]), "--data", runs["eval"])
    assert before["rewards/accuracies"] <= 0.6  # the SFT model against itself: every pair a tie
    assert before["loss"] == pytest.approx(0.6931, abs=1e-3)

    after = eval_json(capsys, "--model", str(runs["final"]), "--ref-model", str(runs["sft"]), "--data", runs["eval"])
    assert {"loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(after)
    assert after["examples"] == 60
    assert after["rewards/accuracies"] >= 0.8, after
    assert after["rewards/margins"] > 0 and after["loss"] < before["loss"]

    # the evaluation during training saw the same numbers
    rows = [r for r in read_metrics(runs["dpo"] / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert rows[-1][key] == pytest.approx(after[key], abs=1e-4), key
    assert rows[-1]["rewards/accuracies"] > rows[0]["rewards/accuracies"] or rows[0]["rewards/accuracies"] >= 0.8
    stored = json.loads((runs["final"] / "dpokit_metrics.json").read_text())
    assert stored["rewards/accuracies"] == pytest.approx(after["rewards/accuracies"], abs=1e-6)


def test_final_model_reloads_with_the_log_probs_eval_reports(runs, capsys):
    tokenizer = load_tokenizer(str(runs["final"]))
    cfg = TrainConfig(model=str(runs["final"]), data=runs["eval"], output="-")
    examples = prepare_data(cfg, "dpo", tokenizer, log=lambda *_: None).train
    model = AutoModelForCausalLM.from_pretrained(runs["final"]).eval()
    with torch.no_grad():
        logps = sequence_logprobs(model, collate(examples, list(range(len(examples)))))
    report = eval_json(capsys, "--model", str(runs["final"]), "--ref-model", str(runs["sft"]), "--data", runs["eval"])
    assert logps[0::2].mean().item() == pytest.approx(report["logps/chosen"], abs=1e-4)
    assert logps[1::2].mean().item() == pytest.approx(report["logps/rejected"], abs=1e-4)
    # the last checkpoint holds the same weights as final/
    checkpoint = AutoModelForCausalLM.from_pretrained(runs["dpo"] / "checkpoint-000025").eval()
    for (name, a), b in zip(model.state_dict().items(), checkpoint.state_dict().values()):
        assert torch.equal(a, b), name


def test_generate_is_deterministic_for_a_seed(runs, capsys):
    def generate(seed):
        capsys.readouterr()
        assert main(["generate", "--model", str(runs["final"]), "--prompt", "the film", "--max-new-tokens", "5",
                     "--seed", str(seed)]) == 0
        return capsys.readouterr().out

    first = generate(0)
    assert first.startswith("the film") and len(first.strip()) > len("the film")
    assert generate(0) == first
    outputs = {generate(seed) for seed in range(1, 6)}
    assert len(outputs | {first}) > 1  # sampling, not greedy: seeds matter


@pytest.mark.parametrize("loss, beta", [("simpo", 2.0), ("orpo", 0.5)])
def test_reference_free_losses_train_without_a_reference(loss, beta, tiny_model_dir, sentiment_data, tmp_path,
                                                         capsys, monkeypatch):
    """`dpokit dpo --loss simpo|orpo` trains with no reference model at all (building one would fail here), the
    held-out loss falls, and `dpokit eval` without --ref-model reproduces the run's last evaluation."""
    import dpokit.train.run

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss built a reference")

    monkeypatch.setattr(dpokit.train.run, "_references", no_reference)
    monkeypatch.setattr(dpokit.train.run, "_reference_model", no_reference)
    out = tmp_path / loss
    assert main(["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--eval-data",
                 sentiment_data["eval"], "--output", str(out), "--loss", loss, "--beta", str(beta), "--max-steps", "12",
                 "--lr", "3e-3", "--optimizer", "adamw", "--warmup-steps", "0", "--batch-size", "8",
                 "--eval-every", "6", "--save-every", "12"]) == 0
    stored = json.loads((out / "checkpoint-000012" / "trainer_state.json").read_text())["config"]
    assert stored["loss"] == loss and stored["reference_free"] is True
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in rows] == [6, 12]
    after = eval_json(capsys, "--model", str(out / "final"), "--data", sentiment_data["eval"], "--loss", loss,
                      "--beta", str(beta))
    before = eval_json(capsys, "--model", tiny_model_dir, "--data", sentiment_data["eval"], "--loss", loss,
                       "--beta", str(beta))
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert rows[-1][key] == pytest.approx(after[key], abs=1e-4), key
    assert after["loss"] < before["loss"] - 0.05, (before, after)
    assert after["rewards/margins"] > before["rewards/margins"]


def test_a_mixture_of_losses_from_the_command_line(tiny_model_dir, sentiment_data, tmp_path):
    """`--loss sigmoid,bco_pair --loss-weights 0.8,0.2` reaches the objective: at step 1 the policy is its
    reference (every log-ratio 0), so the loss is 0.8*log 2 + 0.2*(2 log 2) exactly, not DPO's log 2."""
    out = tmp_path / "mix"
    assert main(["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--output", str(out),
                 "--loss", "sigmoid,bco_pair", "--loss-weights", "0.8,0.2", "--max-steps", "1", "--batch-size", "8",
                 "--warmup-steps", "0", "--no-save-final"]) == 0
    first = [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") != "eval"][0]
    assert first["loss"] == pytest.approx(1.2 * math.log(2), abs=1e-5)
    stored = json.loads((out / "checkpoint-000001" / "trainer_state.json").read_text())["config"]
    assert stored["loss"] == "sigmoid,bco_pair" and stored["loss_weights"] == "0.8,0.2"


def write_unpaired(pairs_path, path, n: int) -> str:
    """Unpaired (KTO) rows from the first `n` sentiment pairs: the chosen response labelled desirable for even
    pairs, the rejected one labelled undesirable for odd ones, so no prompt has both."""
    with open(pairs_path) as source, open(path, "w") as out:
        for i, line in zip(range(n), source):
            row = json.loads(line)
            good = i % 2 == 0
            out.write(json.dumps({"prompt": row["prompt"], "completion": row["chosen" if good else "rejected"],
                                  "label": good}) + "\n")
    return str(path)


def test_kto_trains_on_unpaired_data(tiny_model_dir, sentiment_data, tmp_path, capsys):
    """`dpokit dpo --loss kto` on unpaired data: at step 1 the policy is its reference (every log-ratio 0, KL 0), so
    the loss is 1 - sigmoid(0) = 0.5 exactly; after training, desirable completions gain reward over undesirable
    ones, and `dpokit eval --loss kto` reproduces the run's last evaluation."""
    train = write_unpaired(sentiment_data["train"], tmp_path / "train.jsonl", 64)
    held_out = write_unpaired(sentiment_data["eval"], tmp_path / "eval.jsonl", 16)
    out = tmp_path / "kto"
    assert main(["dpo", "--model", tiny_model_dir, "--data", train, "--eval-data", held_out, "--output", str(out),
                 "--loss", "kto", "--max-steps", "8", "--lr", "3e-3", "--optimizer", "adamw", "--warmup-steps", "0",
                 "--batch-size", "8", "--eval-every", "8"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    first = [r for r in rows if r["split"] == "train"][0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == 0.0
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    last = [r for r in rows if r["split"] == "eval"][-1]
    after = eval_json(capsys, "--model", str(out / "final"), "--ref-model", tiny_model_dir, "--data", held_out,
                      "--loss", "kto", "--batch-size", "8")
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert last[key] == pytest.approx(after[key], abs=1e-4), key
    assert after["loss"] < 0.5 - 0.02, after
    assert after["rewards/chosen"] > 0 > after["rewards/rejected"]

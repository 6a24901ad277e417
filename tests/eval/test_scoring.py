"""The implicit reward as a reward model: dpokit.eval.scoring, `dpokit score`, `dpokit rank` and the implicit judge.

The main check is the issue's: on held-out judge-labelled pairs (the synthetic sentiment set of conftest.py), the
implicit reward of a DPO model that `dpokit score` writes ranks the pairs with exactly the accuracy `dpokit eval`
reports, and each reward is the one dpokit's DPO loss computes for that pair.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from dpokit.api import EvalConfig, evaluate
from dpokit.data.batching import collate
from dpokit.cli.main import main
from dpokit.data import load_preferences
from dpokit.errors import ConfigError, DataError
from dpokit.judges.pointwise import function_judge, judge_continuations
from dpokit.judges.loader import load_judge
from dpokit.models.logprobs import sequence_logprobs
from dpokit.losses.dispatch import LossConfig, preference_loss
from dpokit.models.loading import load_model, load_tokenizer
from dpokit.eval.scoring import ImplicitReward, implicit_rewards, ranking
from dpokit.data.tokenize import TokenizeConfig, tokenize_examples

from conftest import NEGATIVE, NEUTRAL, POSITIVE

pytestmark = pytest.mark.usefixtures("single_thread")
QUIET = lambda *_: None  # noqa: E731


def sentiment_score(text: str) -> int:
    """The judge: positive words minus negative words."""
    return sum(w in POSITIVE for w in text.split()) - sum(w in NEGATIVE for w in text.split())


def judged_pairs(path, n: int, seed: int) -> str:
    """Held-out pairs labelled by the judge, from responses that mix positive, negative and neutral words: unlike
    the training pairs, some are close calls, so a model after a few DPO steps gets some of them wrong."""
    rng = random.Random(seed)
    words = POSITIVE + NEGATIVE + NEUTRAL
    rows = []
    while len(rows) < n:
        prompt = " ".join(rng.choice(NEUTRAL) for _ in range(rng.randint(2, 5)))
        a, b = (" " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 5))) for _ in range(2))
        if sentiment_score(a) != sentiment_score(b):
            chosen, rejected = (a, b) if sentiment_score(a) > sentiment_score(b) else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return write_jsonl(path, rows)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


@pytest.fixture(scope="module")
def dpo_model(tmp_path_factory, tiny_model_dir, sentiment_data):
    """Two DPO steps from the tiny random Llama on the sentiment pairs: its final/ directory."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the function-scoped single_thread fixture
    out = tmp_path_factory.mktemp("scoring") / "dpo"
    assert main(["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--output", str(out),
                 "--max-steps", "2", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "0", "--optimizer",
                 "adamw", "--seed", "0", "--beta", "0.1", "--no-data-cache"]) == 0
    torch.set_num_threads(threads)
    return str(out / "final")


@pytest.fixture(scope="module")
def held_out_file(tmp_path_factory):
    return judged_pairs(tmp_path_factory.mktemp("held-out") / "pairs.jsonl", 60, seed=2)


@pytest.fixture(scope="module")
def held_out(held_out_file):
    pairs, _ = load_preferences(held_out_file)
    return pairs


@pytest.fixture(scope="module")
def scored(dpo_model, tiny_model_dir, held_out, tmp_path_factory):
    """`dpokit score` on the held-out pairs as rows: chosen, rejected, chosen, rejected, ..."""
    root = tmp_path_factory.mktemp("score")
    data = write_jsonl(root / "responses.jsonl", [{"prompt": p.prompt, "response": r}
                                                 for p in held_out for r in (p.chosen, p.rejected)])
    assert main(["score", "--model", dpo_model, "--ref-model", tiny_model_dir, "--data", data,
                 "--output", str(root / "scores.jsonl"), "--batch-size", "7", "--threads", "1"]) == 0
    return read_jsonl(root / "scores.jsonl")


@pytest.mark.slow
def test_score_ranks_held_out_pairs_with_the_accuracy_eval_reports(scored, held_out, dpo_model, tiny_model_dir,
                                                                   held_out_file):
    assert [row["index"] for row in scored] == list(range(2 * len(held_out)))
    assert [(row["prompt"], row["response"]) for row in scored[:2]] == [
        (held_out[0].prompt, held_out[0].chosen), (held_out[0].prompt, held_out[0].rejected)]
    chosen = [row["reward"] for row in scored[0::2]]
    rejected = [row["reward"] for row in scored[1::2]]
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)

    report = evaluate(EvalConfig(model=dpo_model, data=held_out_file, ref_model=tiny_model_dir, beta=0.1), log=QUIET)
    assert report["examples"] == len(held_out) == 60
    assert accuracy == report["rewards/accuracies"]
    assert 0.5 < accuracy < 1  # a few steps: it learnt something, and not every pair is easy
    assert sum(chosen) / len(chosen) == pytest.approx(report["rewards/chosen"], abs=1e-5)
    assert sum(rejected) / len(rejected) == pytest.approx(report["rewards/rejected"], abs=1e-5)
    logps = [row["logp_policy"] for row in scored]
    assert sum(logps[0::2]) / len(chosen) == pytest.approx(report["logps/chosen"], abs=1e-4)

    # each pair's rewards are the ones the DPO loss computes, all pairs in one batch (another batching)
    tokenizer = load_tokenizer(dpo_model)
    examples, _ = tokenize_examples(held_out, tokenizer, TokenizeConfig())
    batch = collate(examples, list(range(len(examples))), pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        policy = sequence_logprobs(load_model(dpo_model), batch)
        reference = sequence_logprobs(load_model(tiny_model_dir), batch)
    out = preference_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2], LossConfig(beta=0.1))
    assert chosen == pytest.approx(out.chosen_rewards.tolist(), abs=1e-5)
    assert rejected == pytest.approx(out.rejected_rewards.tolist(), abs=1e-5)
    for row in scored:
        assert row["reward"] == pytest.approx(0.1 * (row["logp_policy"] - row["logp_reference"]), abs=1e-6)
        assert row["prompt_truncated"] is False and "skipped" not in row
    assert [row["response_tokens"] for row in scored] == [len(r) for e in examples for r in e.responses]


@pytest.mark.slow
def test_rank_orders_each_prompts_responses_by_the_implicit_reward(scored, held_out, dpo_model, tiny_model_dir,
                                                                   tmp_path):
    rows = [{"prompt": p.prompt, "responses": [p.rejected, p.chosen, p.chosen + " fun"]} for p in held_out[:10]]
    data = write_jsonl(tmp_path / "candidates.jsonl", rows)
    assert main(["rank", "--model", dpo_model, "--ref-model", tiny_model_dir, "--data", data,
                 "--output", str(tmp_path / "ranked.jsonl"), "--threads", "1", "--attention", "eager"]) == 0
    ranked = read_jsonl(tmp_path / "ranked.jsonl")
    assert [row["index"] for row in ranked] == list(range(10))
    for k, (row, given) in enumerate(zip(ranked, rows)):
        assert row["prompt"] == given["prompt"]
        rewards = [r["reward"] for r in row["ranking"]]
        assert rewards == sorted(rewards, reverse=True)
        assert sorted(r["response_index"] for r in row["ranking"]) == [0, 1, 2]
        assert all(r["response"] == given["responses"][r["response_index"]] for r in row["ranking"])
        assert row["best"] == row["ranking"][0]["response"] and row["best_reward"] == rewards[0]
        assert row["best_index"] == row["ranking"][0]["response_index"]
        # the rewards `dpokit score` gave the rejected (0) and chosen (1) responses, with another attention kernel
        by_index = {r["response_index"]: r["reward"] for r in row["ranking"]}
        assert by_index[1] == pytest.approx(scored[2 * k]["reward"], abs=1e-5)
        assert by_index[0] == pytest.approx(scored[2 * k + 1]["reward"], abs=1e-5)


@pytest.mark.slow
def test_implicit_judge_scores_continuations_given_their_prompt(scored, held_out, dpo_model, tiny_model_dir):
    judge = load_judge(f"implicit:{dpo_model}:{tiny_model_dir}")
    prompts, chosen = [p.prompt for p in held_out[:6]], [p.chosen for p in held_out[:6]]
    assert judge_continuations(judge, prompts, chosen) == pytest.approx(
        [row["reward"] for row in scored[0:12:2]], abs=1e-6)
    # full texts: each scored as the response to an empty prompt, so the prompt's tokens count too
    texts = [p + c for p, c in zip(prompts, chosen)]
    policy, reference = load_model(dpo_model), load_model(tiny_model_dir)
    alone = implicit_rewards(policy, reference, load_tokenizer(dpo_model), [""] * 6, texts, 0.1)
    assert judge(texts) == pytest.approx([r.reward for r in alone], abs=1e-6)
    doubled = load_judge(f"implicit:{dpo_model}:{tiny_model_dir}:0.2")
    assert doubled(texts) == pytest.approx([2 * r.reward for r in alone], abs=1e-5)
    with pytest.raises(DataError, match="text 1: longer than max_length=512"):  # the model's positions
        judge(["the film", " great" * 600])
    # any other judge gets the full text
    assert judge_continuations(function_judge(len), prompts, chosen) == [float(len(t)) for t in texts]


@pytest.mark.parametrize("spec, message", [
    ("implicit:only-one", "expected 'implicit:POLICY_DIR:REF_DIR'"),
    ("implicit:a:b:big", "BETA 'big' is not a number"),
    ("implicit:a:b:0.1:x", "expected"),
    ("implicit:a:b:-0.1", "beta must be positive"),
    ("implicit:/no/such/policy:/no/such/ref", "no such directory"),
])
def test_implicit_judge_spec_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_judge(spec)


def test_too_long_responses_are_reported_and_long_prompts_cut(tiny_model_dir, tmp_path, capsys):
    long_prompt = " ".join(["the film was really quite good"] * 6)
    rows = [{"prompt": long_prompt, "response": " great"},
            {"prompt": "the", "response": " great good fun" * 8},
            {"prompt": "", "response": " fun"}]
    data = write_jsonl(tmp_path / "r.jsonl", rows)
    args = ["score", "--model", tiny_model_dir, "--ref-model", tiny_model_dir, "--data", data,
            "--output", str(tmp_path / "s.jsonl"), "--max-length", "16", "--max-prompt-length", "8"]
    assert main(args) == 0
    out = read_jsonl(tmp_path / "s.jsonl")
    assert [row["index"] for row in out] == [0, 1, 2]
    assert out[0]["prompt_truncated"] is True and out[0]["reward"] == 0.0  # the reference is the policy
    assert out[1]["reward"] is None and out[1]["logp_policy"] is None
    assert "longer than max_length=16" in out[1]["skipped"]
    assert out[2]["prompt_truncated"] is False and out[2]["response_tokens"] >= 2  # " fun" and EOS
    assert "skipped 1" in capsys.readouterr().out
    assert main(args + ["--on-filtered", "error"]) == 2
    assert "longer than max_length=16" in capsys.readouterr().err


@pytest.mark.parametrize("command, row, message", [
    ("score", {"prompt": "the"}, "r.jsonl:2: missing field 'response' (score format)"),
    ("score", {"prompt": "the", "response": 3}, "r.jsonl:2: field 'response' must be a string, got int"),
    ("score", {"prompt": "the", "response": "  "}, "r.jsonl:2: field 'response' is empty"),
    ("score", {"prompt": [{"role": "user", "content": "hi"}], "response": [{"role": "user", "content": "x"}]},
     "r.jsonl:2: field 'response[0].role' is 'user'"),
    ("rank", {"prompt": "the", "responses": "good"}, "r.jsonl:2: field 'responses' must be a list"),
    ("rank", {"prompt": "the", "responses": []}, "r.jsonl:2: field 'responses' is empty"),
    ("rank", {"prompt": "the", "responses": [" good", ""]}, "r.jsonl:2: field 'responses[1]' is empty"),
    ("rank", {"prompt": "the"}, "r.jsonl:2: missing field 'responses' (rank format)"),
])
def test_bad_rows_are_named_by_line_and_field(command, row, message, tiny_model_dir, tmp_path, capsys):
    good = {"prompt": "the", "response": " good"} if command == "score" else {"prompt": "the", "responses": [" a"]}
    data = write_jsonl(tmp_path / "r.jsonl", [good, row])
    assert main([command, "--model", tiny_model_dir, "--ref-model", tiny_model_dir, "--data", data,
                 "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert message in err, err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("options, message", [
    (["--beta", "0"], "--beta must be positive"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--max-length", "4096"], "more than the 512 positions"),
])
def test_bad_options(options, message, tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "the", "response": " good"}])
    assert main(["score", "--model", tiny_model_dir, "--ref-model", tiny_model_dir, "--data", data,
                 "--output", str(tmp_path / "out.jsonl"), *options]) == 2
    assert message in capsys.readouterr().err


def test_conversational_rows_score_the_tokens_eval_scores(chat_tokenizer, tmp_path, capsys):
    from helpers import make_llama

    model_dir, ref_dir = tmp_path / "chat", tmp_path / "chat-ref"
    for path, seed in ((model_dir, 0), (ref_dir, 1)):
        make_llama(vocab_size=len(chat_tokenizer), seed=seed).save_pretrained(path)
        chat_tokenizer.save_pretrained(path)
    prompt = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "the film"}]
    pair = {"prompt": prompt, "chosen": "was great", "rejected": [{"role": "assistant", "content": "was awful"}]}
    pairs = write_jsonl(tmp_path / "pair.jsonl", [pair])
    report = evaluate(EvalConfig(model=str(model_dir), data=pairs, ref_model=str(ref_dir), beta=0.1), log=QUIET)
    data = write_jsonl(tmp_path / "r.jsonl", [{"prompt": prompt, "response": pair["chosen"]},
                                              {"prompt": prompt, "response": pair["rejected"]}])
    assert main(["score", "--model", str(model_dir), "--ref-model", str(ref_dir), "--data", data,
                 "--output", "-"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[1]["response"] == pair["rejected"]  # written back as given
    assert rows[0]["logp_policy"] == pytest.approx(report["logps/chosen"], abs=1e-5)
    assert rows[1]["logp_policy"] == pytest.approx(report["logps/rejected"], abs=1e-5)
    assert rows[0]["reward"] == pytest.approx(report["rewards/chosen"], abs=1e-5)
    assert rows[1]["reward"] == pytest.approx(report["rewards/rejected"], abs=1e-5)


def test_ranking_puts_skipped_responses_last():
    results = [ImplicitReward(0.5, -1, -2), ImplicitReward(None, None, None, skipped="too long"),
               ImplicitReward(2.0, -1, -3), ImplicitReward(0.5, -2, -3)]
    assert ranking(results) == [2, 0, 3, 1]
    assert results[1].row()["skipped"] == "too long" and "skipped" not in results[0].row()


def test_implicit_rewards_keeps_each_models_mode(tiny_model_dir):
    policy, reference, tokenizer = load_model(tiny_model_dir), load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    policy.train()  # a policy being trained, scored between steps
    (result,) = implicit_rewards(policy, reference, tokenizer, ["the film"], [" was fun"])
    assert result.reward == 0.0  # the same weights, dropout off: the same log-probs
    assert policy.training and not reference.training


def test_implicit_rewards_checks_its_arguments(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    with pytest.raises(ConfigError, match="beta must be positive"):
        implicit_rewards(model, model, tokenizer, ["a"], [" b"], beta=-1)
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        implicit_rewards(model, model, tokenizer, ["a"], [" b", " c"])
    with pytest.raises(DataError, match="longer than max_length"):
        implicit_rewards(model, model, tokenizer, ["a"], [" b" * 40],
                         settings=TokenizeConfig(max_length=8, max_prompt_length=4, on_filtered="error"))

"""`dpokit winrate` end to end on tiny models (dpokit/winrate_run.py, dpokit/commands/winrate.py): the JSON
output, the per-prompt records, several temperatures and their plot, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from dpokit.cli.main import main
from helpers import make_llama, make_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["the film was", "I watched it and", "boom the plot", "the acting is", "nan we saw"]


def by_length(text: str) -> float:
    """A pointwise judge for the tests (longer wins); it fails on "boom" and gives NaN for "nan" prompts."""
    if text.startswith("boom"):
        raise ValueError("exploded")
    return math.nan if text.startswith("nan") else float(len(text))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """Two different random tiny Llamas with the same tokenizer, and one with another tokenizer."""
    root = tmp_path_factory.mktemp("winrate")
    paths = {}
    for name, tok, seed in (("a", tokenizer, 0), ("b", tokenizer, 1), ("other", make_tokenizer(vocab_size=300), 2)):
        make_llama(vocab_size=len(tok), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2] + [""] + PROMPTS[3:4]) + "\n")  # a blank third line
    return str(path)


def _winrate(models, prompts, *extra):
    return main(["winrate", "--model", models["a"], "--baseline", models["b"], "--prompts", prompts,
                 "--judge", "test_winrate_run:by_length", "--max-new-tokens", "4", "--resamples", "200", *extra])


def test_json_output_and_records_agree_with_the_judge(models, prompts_file, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    assert _winrate(models, prompts_file, "--json", "--output", str(tmp_path / "out")) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # stdout holds the JSON object alone
    assert "skipped 1 blank line" in err and result["blank_lines_skipped"] == 1
    assert result["n"] == 3 and result["wins"] + result["losses"] + result["ties"] == 3 and result["skipped"] == 0
    assert result["win_rate"] == pytest.approx((result["wins"] + result["ties"] / 2) / 3)
    assert result["ci_low"] <= result["win_rate"] <= result["ci_high"]
    assert (result["temperature"], result["judge"]) == (1.0, "test_winrate_run:by_length")
    rows = [json.loads(line) for line in (tmp_path / "out" / "winrate.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the film was", "I watched it and", "the acting is"]
    assert [r["where"].rsplit(":", 1)[1] for r in rows] == ["1", "2", "4"]
    for r in rows:  # the verdict follows the judge whichever response was shown first
        mine, theirs = by_length(r["prompt"] + r["model_response"]), by_length(r["prompt"] + r["baseline_response"])
        assert r["outcome"] == ("win" if mine > theirs else "loss" if mine < theirs else "tie")
        assert r["shown_first"] in ("model", "baseline")
    assert sum(r["outcome"] == "win" for r in rows) == result["wins"]
    assert all(r["model_response"] != r["baseline_response"] for r in rows)  # independent samples


def test_several_temperatures_give_a_list_and_a_plot(models, prompts_file, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    out = tmp_path / "out"
    assert _winrate(models, prompts_file, "--temperatures", "0.5,1", "--json", "--output", str(out)) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["temperature"] for r in results] == [0.5, 1.0] and all(r["n"] == 3 for r in results)
    assert (out / "winrate.png").stat().st_size > 1000
    assert len((out / "winrate.jsonl").read_text().splitlines()) == 6



def test_an_llm_judge_with_a_template_of_ones_own(models, prompts_file, tmp_path, capsys):
    template = tmp_path / "judge.txt"
    template.write_text("Prompt: {prompt}\nA: {response_a}\nB: {response_b}\nBetter:")
    out = tmp_path / "out"
    assert main(["winrate", "--model", models["a"], "--baseline", models["b"], "--prompts", prompts_file,
                 "--judge", f"llm:{models['a']}", "--judge-template", str(template), "--no-both-orders",
                 "--max-new-tokens", "4", "--resamples", "200", "--json", "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3
    preferences = [json.loads(line)["first_preferred"] for line in (out / "winrate.jsonl").read_text().splitlines()]
    assert all(0 < p < 1 for p in preferences) and len(set(preferences)) == 3  # probabilities, not verdicts


def test_an_llm_judge_is_shown_the_tools_a_prompt_offers(tmp_path, capsys, monkeypatch):
    from dpokit.judges import llm

    clock = {"name": "get_time", "description": "the time now", "parameters": {"type": "object", "properties": {}}}
    tokenizer = make_tokenizer(chat_template="tools")  # the models sample with the tools rendered
    for name, seed in (("a", 0), ("b", 1)):
        make_llama(vocab_size=len(tokenizer), seed=seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the time now", "tools": [clock]}) + "\n"
                       + json.dumps({"prompt": "the film was"}) + "\n")
    questions = []

    def spy(tokenizer, template, prompt, first, second):  # the real question, recorded as the judge reads it
        ids = judge_input_ids(tokenizer, template, prompt, first, second)
        questions.append(tokenizer.decode(ids))
        return ids

    judge_input_ids = llm.judge_input_ids
    monkeypatch.setattr(llm, "judge_input_ids", spy)
    out = tmp_path / "out"
    assert main(["winrate", "--model", str(tmp_path / "a"), "--baseline", str(tmp_path / "b"), "--prompts",
                 str(prompts), "--judge", f"llm:{tmp_path / 'a'}", "--no-both-orders", "--max-new-tokens", "4",
                 "--resamples", "20", "--json", "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n"] == 2  # after any library's warnings
    with_tools = [q for q in questions if "Query: the time now" in q]
    assert with_tools and all(f"Tools available to the assistant:\n{json.dumps(clock)}" in q for q in with_tools)
    assert not any("Tools available" in q for q in questions if "Query: the film was" in q)
    rows = [json.loads(line) for line in (out / "winrate.jsonl").read_text().splitlines()]
    assert rows[0]["tools"] == [clock] and "tools" not in rows[1]  # the records say what the judge was shown


def test_bad_input_is_one_line_naming_the_cause(models, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    def error(*args, model="a", baseline="b"):
        code = main(["winrate", "--model", models[model], "--baseline", models[baseline], "--prompts", str(prompts),
                     "--judge", "test_winrate_run:by_length", "--max-new-tokens", "4", *args])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        return code, err

    code, err = error()
    assert code == 2 and "the judge failed on 2 of 5 prompts at temperature 1.0" in err
    assert f"{prompts}:3: ValueError: exploded" in err and f"{prompts}:5: the judge returned nan" in err
    assert _winrate(models, str(prompts), "--on-judge-error", "skip", "--temperature", "0") == 0
    lines = capsys.readouterr().out.splitlines()  # a table (no --json), after the progress lines
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["temperature", "win", "rate"])
    temperature, rate, low, high, wins, losses, ties, n, skipped = lines[header + 1].replace(",", "").split()
    assert (temperature, n, skipped) == ("0", "3", "2") and int(wins) + int(losses) + int(ties) == 3
    assert float(rate) == pytest.approx((int(wins) + int(ties) / 2) / 3, abs=1e-3)
    code, err = error(baseline="other")
    assert code == 2 and "--model and --baseline have different tokenizers: vocabularies of" in err
    empty = tmp_path / "prompts.jsonl"
    empty.write_text('"the film"\n\n""\n')
    code, err = error("--prompts", str(empty))
    assert code == 2 and err == f"dpokit winrate: error: {empty}:3: empty prompt"
    code, err = error("--temperatures", "0.5,1")
    assert code == 2 and "--temperatures draws a plot: give --output DIR" in err
    code, err = error("--top-p", "0")
    assert code == 2 and "--top-p must be in (0, 1]; got 0.0" in err
    code, err = error("--judge-template", str(prompts))
    assert code == 2 and "missing placeholder {prompt}, {response_a}, {response_b}" in err


def test_help_shows_the_template_without_importing_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "dpokit.cli.main", "winrate", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Response A:\n{response_a}" in result.stdout
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "dpokit" in imported and not {"torch", "transformers"} & imported

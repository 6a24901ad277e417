"""A text longer than max_length tokens could ever use is cut before tokenising (so one huge row cannot take the
tokenizer's memory), with the same tokens kept as without the cut, counted and named in the filtering report;
``on_long_rows="error"`` refuses it naming its row."""

from __future__ import annotations

import random

import pytest

from dpokit.cli.main import build_parser
from dpokit.data import arrays
from dpokit.data.records import Completion, PreferencePair
from dpokit.data.tokenize import TokenizeConfig, tokenize_examples
from dpokit.errors import DataError
from helpers import WORDS


def _words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture()
def no_cut(monkeypatch):
    """Tokenise as before the bound existed: no text is ever cut."""
    def run(records, tokenizer, config):
        with monkeypatch.context() as m:
            init = arrays.ChunkContext.__init__

            def unbounded(self, *args, **kwargs):
                init(self, *args, **kwargs)
                self.text_bound = 10**12

            m.setattr(arrays.ChunkContext, "__init__", unbounded)
            return tokenize_examples(records, tokenizer, config)
    return run


@pytest.mark.parametrize("truncation", ["keep_end", "keep_start"])
def test_a_huge_prompt_is_cut_and_keeps_the_same_tokens(tokenizer, no_cut, truncation):
    config = TokenizeConfig(max_length=48, max_prompt_length=24, truncation=truncation)
    records = [PreferencePair(_words(8, 1), " good", " bad", "d.jsonl:1"),
               PreferencePair(_words(30_000, 2), " fine film", " dull film", "d.jsonl:2"),
               PreferencePair(_words(9, 3), " yes", " no", "d.jsonl:3"),
               Completion(_words(20_000, 4), " the end", "d.jsonl:4")]
    cut, report = tokenize_examples(records, tokenizer, config)
    whole, whole_report = no_cut(records, tokenizer, config)
    assert len(records[1].prompt) > arrays.ChunkContext(tokenizer, config).text_bound
    assert cut == whole and report.counts == whole_report.counts
    assert report.prompts_truncated == whole_report.prompts_truncated == 2
    assert (report.rows_cut, report.rows_cut_examples) == (2, ["d.jsonl:2", "d.jsonl:4"])
    assert "cut 2 row(s) longer than max_length could use" in report.summary() and "d.jsonl:2" in report.summary()


def test_a_huge_response_is_cut_and_still_filtered_as_too_long(tokenizer, no_cut):
    config = TokenizeConfig(max_length=48, max_prompt_length=24)
    records = [PreferencePair("hello", " " + _words(30_000, 5), " short", "d.jsonl:7"),
               PreferencePair("hi", " a", " b", "d.jsonl:8")]
    cut, report = tokenize_examples(records, tokenizer, config)
    whole, whole_report = no_cut(records, tokenizer, config)
    assert cut == whole and len(cut) == 1
    assert report.counts == whole_report.counts == {"longer than max_length=48 after prompt truncation": 1}
    assert report.rows_cut_examples == ["d.jsonl:7"]


def test_on_long_rows_error_names_the_row(tokenizer):
    config = TokenizeConfig(max_length=48, max_prompt_length=24, on_long_rows="error")
    records = [PreferencePair("hi", " a", " b", "d.jsonl:1"), PreferencePair(_words(30_000, 6), " a", " b", "d.jsonl:2")]
    with pytest.raises(DataError, match=r"d\.jsonl:2: a text of [\d,]+ characters, more than --max-length 48"):
        tokenize_examples(records, tokenizer, config)


def test_normal_rows_are_never_cut(tokenizer):
    config = TokenizeConfig(max_length=48, max_prompt_length=24)
    _, report = tokenize_examples([PreferencePair(_words(200, 7), " a", " b", "d.jsonl:1")], tokenizer, config)
    assert report.rows_cut == 0 and "cut" not in report.summary()


@pytest.mark.parametrize("command", ["dpo", "sft", "eval", "score", "rank"])
def test_the_commands_that_tokenise_data_take_the_option(command):
    base = {"dpo": ["--model", "m", "--data", "d.jsonl", "--output", "o"],
            "sft": ["--model", "m", "--data", "d.jsonl", "--output", "o"],
            "eval": ["--model", "m", "--data", "d.jsonl"],
            "score": ["--model", "m", "--ref-model", "r", "--data", "d.jsonl", "--output", "o.jsonl"],
            "rank": ["--model", "m", "--ref-model", "r", "--data", "d.jsonl", "--output", "o.jsonl"]}[command]
    assert build_parser().parse_args([command, *base, "--on-long-rows", "error"]).on_long_rows == "error"

"""Property-based tests (hypothesis): random lengths, empty and whitespace fields, unicode, long lines and mixed
formats. Every batch layout gives the same log-probs; every row is either loaded or reported with its file, line
and field; tokenisation keeps or counts every example; configuration mistakes name the key and the file."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpokit.data.batching import LAYOUTS, collate
from dpokit.config import TrainConfig
from dpokit.config.options import read_yaml
from dpokit.data import load_preferences
from dpokit.data.records import PreferencePair
from dpokit.errors import ConfigError, DataError
from dpokit.models.logprobs import sequence_logprobs
from dpokit.data.tokenize import TokenizeConfig, TokenizedExample, tokenize_examples
from helpers import make_llama

pytestmark = pytest.mark.usefixtures("single_thread")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MODEL = make_llama()
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)


def _ids(draw, low, high):
    return tuple(draw(st.lists(st.integers(1, 319), min_size=low, max_size=high)))


@st.composite
def examples(draw):
    """1-5 examples, prompts of 1-30 tokens, responses of 1-25 (the last one EOS)."""
    n = draw(st.integers(1, 5))
    return [TokenizedExample(_ids(draw, 1, 30), (_ids(draw, 0, 24) + (0,), _ids(draw, 0, 24) + (0,)))
            for _ in range(n)]


@SETTINGS
@given(examples())
def test_every_layout_gives_the_same_log_probs(batch_examples):
    ids = list(range(len(batch_examples)))
    with torch.no_grad():
        results = {layout: sequence_logprobs(MODEL, collate(batch_examples, ids, layout=layout), chunked=chunked)
                   for layout in LAYOUTS for chunked in (True, False)}
    reference = results["plain"]
    for layout, values in results.items():
        torch.testing.assert_close(values, reference, rtol=1e-5, atol=1e-4, msg=layout)


FIELD = st.one_of(TEXT, st.just(""), st.just("   \n\t"), st.text(min_size=2000, max_size=3000),
                  st.integers(), st.none(), st.lists(TEXT, max_size=2))


@SETTINGS
@given(st.lists(st.fixed_dictionaries({"prompt": FIELD, "chosen": FIELD, "rejected": FIELD}), min_size=1,
                max_size=6))
def test_every_row_is_loaded_or_reported_with_its_line_and_field(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("rows") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    try:
        pairs, report = load_preferences(str(path))
    except DataError as error:
        message = str(error)
        if "no preference pairs" not in message:
            assert f"{path.name}:" in message, message
            line = int(message.split(f"{path.name}:")[1].split(":")[0].split()[0])
            assert 1 <= line <= len(rows)
            assert any(f"'{field}'" in message or field in message for field in ("prompt", "chosen", "rejected")), \
                message
        return
    assert report.rows == len(rows) and len(pairs) == len(rows)  # nothing dropped silently at this layer
    for pair, row in zip(pairs, rows):
        assert (pair.prompt, pair.chosen, pair.rejected) == (row["prompt"], row["chosen"], row["rejected"])


@SETTINGS
@given(st.lists(st.tuples(TEXT, TEXT.filter(str.strip), TEXT.filter(str.strip)), min_size=1, max_size=8),
       st.integers(8, 64))
def test_tokenisation_keeps_or_counts_every_example_and_ends_responses_with_eos(tokenizer, pairs, max_length):
    records = [PreferencePair(p, c, r, f"t:{i}") for i, (p, c, r) in enumerate(pairs)]
    settings_ = TokenizeConfig(max_length=max_length, max_prompt_length=max_length // 2)
    try:
        kept, report = tokenize_examples(records, tokenizer, settings_)
    except DataError as error:  # all filtered: an error that says why, with the counts
        message = str(error)
        assert "no usable examples left" in message and ("identical" in message or "max_length" in message), message
        return
    assert report.kept == len(kept) and report.kept + report.filtered == len(records)
    for example in kept:
        assert all(response[-1] == tokenizer.eos_token_id for response in example.responses)
        assert len(example.prompt_ids) + max(map(len, example.responses)) <= max_length
        assert len(example.prompt_ids) >= 1


def _yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,words", [
    ("beta: 0.1\nbta: 0.2\n", ["run.yaml", "unknown option", "bta"]),
    ("beta: fast\n", ["run.yaml", "'beta'", "a number", "'fast'"]),
    ("batch_size: 2.5\n", ["run.yaml", "'batch_size'", "int"]),
    ("precompute_ref: 1\n", ["run.yaml", "'precompute_ref'", "bool"]),
    ("model: [a, b]\n", ["run.yaml", "'model'", "str"]),
])
def test_config_file_mistakes_name_the_key_and_the_file(tmp_path, text, words):
    with pytest.raises(ConfigError) as caught:
        read_yaml(_yaml(tmp_path, text), TrainConfig, "dpo", "dpo")
    for word in words:
        assert word in str(caught.value)


def test_an_option_the_chosen_loss_does_not_take_is_an_error_before_any_work(tmp_path, capsys):
    from dpokit.cli.main import main

    code = main(["dpo", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.jsonl"),
                 "--output", str(tmp_path / "out"), "--loss", "hinge", "--label-smoothing", "0.1"])
    err = capsys.readouterr().err
    assert code == 2 and "label_smoothing" in err and "hinge" in err

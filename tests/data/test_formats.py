"""Tests for dpokit.data: sources, formats, validation messages and the eval split."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dpokit.data import (
    ColumnMap,
    Completion,
    PreferencePair,
    detect_format,
    load_completions,
    load_preferences,
    load_unpaired,
    read_rows,
    split_eval,
)
from dpokit.errors import ConfigError, DataError

ROWS = [
    {"prompt": "Q1", "chosen": "good 1", "rejected": "bad 1"},
    {"prompt": "Q2", "chosen": "good 2", "rejected": "bad 2"},
]


def write_jsonl(path: Path, rows: list, extra_lines: dict[int, str] | None = None) -> Path:
    """Write rows as JSON Lines; `extra_lines` inserts raw text at 0-based line positions."""
    lines = [json.dumps(r) for r in rows]
    for pos, text in sorted((extra_lines or {}).items()):
        lines.insert(pos, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def m(text: str) -> re.Pattern:
    """A regex matching `text` literally (error messages contain brackets, quotes and dots)."""
    return re.compile(re.escape(text))


# --- sources --------------------------------------------------------------------------------------


def test_jsonl_provenance_skips_blank_lines(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", ROWS, {1: "   "})
    got = list(read_rows(str(p)))
    assert [r for r, _ in got] == ROWS
    assert [prov for _, prov in got] == [f"{p}:1", f"{p}:3"]


def test_jsonl_invalid_json_names_line(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", ROWS, {1: "", 2: '{"prompt": "x",'})
    with pytest.raises(DataError, match=m("data.jsonl:3: invalid JSON:")):
        list(read_rows(p))


def test_jsonl_non_object_line(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", ROWS, {2: "[1, 2]"})
    with pytest.raises(DataError, match=m("data.jsonl:3: expected a JSON object, got array")):
        list(read_rows(p))


def test_json_list_and_object_forms(tmp_path):
    p = tmp_path / "list.json"
    p.write_text(json.dumps(ROWS))
    assert list(read_rows(p)) == [(ROWS[0], f"{p} row 0"), (ROWS[1], f"{p} row 1")]
    q = tmp_path / "obj.json"
    q.write_text(json.dumps({"meta": 1, "test": ROWS[:1], "data": ROWS}))
    assert [r for r, _ in read_rows(q)] == ROWS  # falls back to "data"
    assert [r for r, _ in read_rows(q, split="test")] == ROWS[:1]  # split key first
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"meta": 1}))
    with pytest.raises(DataError, match=m("bad.json: expected a list of objects")):
        list(read_rows(bad))
    notobj = tmp_path / "notobj.json"
    notobj.write_text(json.dumps([ROWS[0], "oops"]))
    with pytest.raises(DataError, match=m("notobj.json row 1: expected a JSON object, got string")):
        list(read_rows(notobj))


def test_json_file_holding_json_lines(tmp_path):
    p = write_jsonl(tmp_path / "lines.json", ROWS)
    assert [prov for _, prov in read_rows(p)] == [f"{p}:1", f"{p}:2"]


def test_parquet_and_csv(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS + [{"prompt": "", "chosen": "42", "rejected": "a,\nb"}])
    pq, csvp = tmp_path / "d.parquet", tmp_path / "d.csv"
    ds.to_parquet(str(pq))
    ds.to_csv(str(csvp), index=False)
    got = list(read_rows(str(pq)))
    assert [r for r, _ in got] == ds.to_list()
    assert [p for _, p in got] == [f"{pq} row 0", f"{pq} row 1", f"{pq} row 2"]
    got = list(read_rows(str(csvp)))
    # CSV cells stay strings (no "42" -> 42, no "" -> NaN) and provenance is the record's first line.
    assert [r for r, _ in got] == ds.to_list()
    assert [p for _, p in got] == [f"{csvp}:2", f"{csvp}:3", f"{csvp}:4"]
    pairs, report = load_preferences(str(csvp))
    assert pairs[2] == PreferencePair("", "42", "a,\nb", f"{csvp}:4")
    assert report.rows == 3 and report.format == "standard"


def test_csv_wrong_field_count(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,chosen,rejected\nq,a,b\nq,a\n")
    with pytest.raises(DataError, match=m("d.csv:3: expected 3 fields")):
        list(read_rows(p))


def test_save_to_disk_dataset_and_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    one = datasets.Dataset.from_list(ROWS)
    one.save_to_disk(str(tmp_path / "one"))
    got = list(read_rows(str(tmp_path / "one"), split="ignored"))
    assert got == [(ROWS[0], f"{tmp_path / 'one'} row 0"), (ROWS[1], f"{tmp_path / 'one'} row 1")]
    dd = datasets.DatasetDict({"train": one, "test": datasets.Dataset.from_list(ROWS[1:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    got = list(read_rows(str(tmp_path / "dd"), split="test"))
    assert got == [(ROWS[1], f"{tmp_path / 'dd'}[test] row 0")]
    with pytest.raises(DataError, match=r"dd: no split 'valid'; available splits: train, test"):
        read_rows(str(tmp_path / "dd"), split="valid")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: directory is not a data set written by"):
        read_rows(str(tmp_path / "empty"))


def test_missing_file_does_not_try_hub(tmp_path, monkeypatch):
    import dpokit.data.sources as sources

    monkeypatch.setattr(sources, "_read_hub", lambda *a: pytest.fail("tried the Hub"))
    monkeypatch.chdir(tmp_path)
    for spec in ("missing.jsonl", "sub/dir/missing.csv", str(tmp_path / "nope.parquet"), "./x"):
        with pytest.raises(DataError, match=m(f"{spec}: file not found")):
            read_rows(spec)


def test_hub_spec_parsed_into_name_and_config(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ROWS[:1])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert list(read_rows("org/name:cfg", split="test")) == [(ROWS[0], "org/name:cfg[test] row 0")]
    assert list(read_rows("org/name"))[0][1] == "org/name[train] row 0"
    assert calls == [("org/name", "cfg", "test"), ("org/name", None, "train")]


def test_unknown_extension(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("hello")
    with pytest.raises(DataError, match=r"data\.txt: unsupported file type '\.txt'; supported: \.jsonl, \.json, "):
        read_rows(p)


def test_empty_dataset(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataError, match=m(f"{p}: the data set has no rows")):
        load_preferences(p)


# --- formats ----------------------------------------------------------------------------------------


def test_standard_with_empty_prompt(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "", "chosen": " a", "rejected": "b "}, ROWS[0]])
    pairs, report = load_preferences(p)
    assert pairs == [PreferencePair("", " a", "b ", f"{p}:1"), PreferencePair("Q1", "good 1", "bad 1", f"{p}:2")]
    assert (report.rows, report.format, report.counts) == (2, "standard", {})


def test_conversational_dict_list_and_string_responses(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rows = [
        {"prompt": prompt, "chosen": {"role": "assistant", "content": "Hello!"}, "rejected": [
            {"role": "assistant", "content": "Go away."}]},
        {"prompt": prompt[1:], "chosen": "Hey", "rejected": [{"role": "assistant", "content": "a"},
                                                               {"role": "assistant", "content": "b"}]},
    ]
    p = write_jsonl(tmp_path / "c.jsonl", rows)
    pairs, report = load_preferences(p)
    assert report.format == "conversational"
    assert pairs[0] == PreferencePair(prompt, [{"role": "assistant", "content": "Hello!"}],
                                      [{"role": "assistant", "content": "Go away."}], f"{p}:1")
    assert pairs[1].chosen == [{"role": "assistant", "content": "Hey"}]
    assert pairs[1].rejected == rows[1]["rejected"]


def test_conversational_from_parquet_drops_null_keys(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": [{"role": "user", "content": "Hi", "name": None}, {"role": "user", "content": "x", "name": "n"}],
             "chosen": [{"role": "assistant", "content": "A", "name": None}],
             "rejected": [{"role": "assistant", "content": "B", "name": None}]}]
    p = tmp_path / "c.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(p))
    (pair,), _ = load_preferences(p)
    assert pair.prompt == [{"role": "user", "content": "Hi"}, {"role": "user", "content": "x", "name": "n"}]
    assert pair.chosen == [{"role": "assistant", "content": "A"}]


HH_PROMPT = "\n\nHuman: What is 2+2?\n\nAssistant:"


def test_implicit_hh_split_keeps_leading_space(tmp_path):
    rows = [{"chosen": HH_PROMPT + " Four.", "rejected": HH_PROMPT + " Five, I think."}]
    p = write_jsonl(tmp_path / "hh.jsonl", rows)
    pairs, report = load_preferences(p)
    assert report.format == "implicit"
    assert pairs == [PreferencePair(HH_PROMPT, " Four.", " Five, I think.", f"{p}:1")]


def test_implicit_multi_turn_uses_last_shared_marker(tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell me a joke.\n\nAssistant:"
    rows = [{"chosen": shared + " Why did the chicken... \n\nHuman: Ha\n\nAssistant: Thanks",
             "rejected": shared + " No."}]
    (pair,), _ = load_preferences(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert pair.prompt == shared
    assert pair.chosen == " Why did the chicken... \n\nHuman: Ha\n\nAssistant: Thanks"
    assert pair.rejected == " No."
    # Responses that share their first words: the marker, not the common prefix, ends the prompt.
    rows = [{"chosen": HH_PROMPT + " Four, of course.", "rejected": HH_PROMPT + " Four, maybe."}]
    (pair,), _ = load_preferences(write_jsonl(tmp_path / "hh2.jsonl", rows))
    assert (pair.prompt, pair.chosen, pair.rejected) == (HH_PROMPT, " Four, of course.", " Four, maybe.")


def test_implicit_without_shared_marker(tmp_path):
    rows = [{"chosen": HH_PROMPT + " a", "rejected": HH_PROMPT + " b"},
            {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: y\n\nAssistant: a"}]
    p = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError, match=m("hh.jsonl:2: chosen and rejected do not share a prompt ending in "
                                          "'\\n\\nAssistant:'")):
        load_preferences(p)


def test_ranked_expansion_with_tie(tmp_path):
    rows = [{"prompt": "Q", "responses": ["a", "b", "c", "d"], "scores": [1, 3, 1, 2.5]}]
    p = write_jsonl(tmp_path / "r.jsonl", rows)
    pairs, report = load_preferences(p)
    assert report.format == "ranked" and report.rows == 1
    assert report.counts == {"ties in ranked responses": 1}
    assert [(x.chosen, x.rejected, x.source) for x in pairs] == [
        ("b", "a", f"{p}:1 pair (0,1)"),
        ("d", "a", f"{p}:1 pair (0,3)"),
        ("b", "c", f"{p}:1 pair (1,2)"),
        ("b", "d", f"{p}:1 pair (1,3)"),
        ("d", "c", f"{p}:1 pair (2,3)"),
    ]
    assert all(x.prompt == "Q" for x in pairs)


def test_ranked_all_ties_is_an_error(tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Q", "responses": ["a", "b"], "scores": [1, 1]}])
    with pytest.raises(DataError, match=m("r.jsonl: no preference pairs")):
        load_preferences(p)


def test_detect_format():
    c = ColumnMap()
    assert detect_format({"prompt": "q", "chosen": "a", "rejected": "b"}, c) == "standard"
    assert detect_format({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}, c) == \
        "conversational"
    assert detect_format({"chosen": "a", "rejected": "b"}, c) == "implicit"
    assert detect_format({"prompt": "q", "responses": [], "scores": []}, c) == "ranked"
    assert detect_format({"prompt": "q", "completion": "a"}, c) == "completion"
    with pytest.raises(DataError, match=r"cannot detect the data format from columns \['chosen', 'text'\]"):
        detect_format({"text": "x", "chosen": "a"}, c)


def test_undetectable_first_row_names_row(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=m("d.jsonl:1: cannot detect the data format")):
        load_preferences(p)


def test_forced_format_and_missing_field(tmp_path):
    # Forcing "implicit" ignores the prompt column and splits the transcripts.
    rows = [{"prompt": "ignored", "chosen": HH_PROMPT + " a", "rejected": HH_PROMPT + " b"}]
    (pair,), report = load_preferences(write_jsonl(tmp_path / "a.jsonl", rows), format="implicit")
    assert (pair.prompt, pair.chosen, report.format) == (HH_PROMPT, " a", "implicit")
    p = write_jsonl(tmp_path / "b.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=m("b.jsonl:1: missing field 'prompt' (standard format)")):
        load_preferences(p, format="standard")
    p = write_jsonl(tmp_path / "c.jsonl", ROWS)
    with pytest.raises(DataError, match=m("c.jsonl:1: missing field 'responses' (ranked format)")):
        load_preferences(p, format="ranked")
    with pytest.raises(DataError, match=m("c.jsonl:1: field 'prompt' must be a list of messages, got str")):
        load_preferences(p, format="conversational")
    with pytest.raises(ConfigError, match="unknown data format 'pairs'"):
        load_preferences(p, format="pairs")


def test_row_of_another_shape(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=m("d.jsonl:2: missing field 'rejected' (standard format)")):
        load_preferences(p)


def test_custom_column_names(tmp_path):
    rows = [{"question": "Q", "good": "yes", "bad": "no"}]
    cols = ColumnMap(prompt="question", chosen="good", rejected="bad")
    (pair,), report = load_preferences(write_jsonl(tmp_path / "d.jsonl", rows), columns=cols)
    assert (pair.prompt, pair.chosen, pair.rejected, report.format) == ("Q", "yes", "no", "standard")
    rows = [{"question": "Q", "good": "yes", "bad": 3}]
    with pytest.raises(DataError, match=m("e.jsonl:1: field 'bad' must be a string, got int")):
        load_preferences(write_jsonl(tmp_path / "e.jsonl", rows), columns=cols)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "chosen": 5, "rejected": "b"}, "field 'chosen' must be a string, got int"),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string, got null"),
        ({"prompt": "q", "chosen": "a", "rejected": "  \n"}, "field 'rejected' is empty"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
        ({"prompt": [{"role": "user", "content": "q"}, {"role": "user"}], "chosen": "a", "rejected": "b"},
         "missing field 'prompt[1].content'"),
        ({"prompt": [{"content": "q"}], "chosen": "a", "rejected": "b"}, "missing field 'prompt[0].role'"),
        ({"prompt": [{"role": "user", "content": 1}], "chosen": "a", "rejected": "b"},
         "field 'prompt[0].content' must be a string, got int"),
        ({"prompt": [{"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"},
         "field 'prompt[0].role' must be one of system, user, assistant, tool, got 'human'"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": [{"role": "assistant",
                                                                                       "content": " "}]},
         "field 'rejected' is empty"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": ["a"], "rejected": "b"},
         "field 'chosen[0]' must be a message object"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": 3, "rejected": "b"},
         "field 'chosen' must be a list of messages, got int"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a",
          "rejected": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]},
         "field 'rejected[1].role' is 'user': a response holds only assistant messages"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": {"role": "system", "content": "a"}, "rejected": "b"},
         "field 'chosen.role' is 'system'"),
        ({"prompt": "q", "responses": ["a"], "scores": [1]}, "field 'responses' must hold at least 2 responses"),
        ({"prompt": "q", "responses": ["a", "b"], "scores": [1]}, "field 'scores' has 1 items but 'responses' has 2"),
        ({"prompt": "q", "responses": ["a", "b"], "scores": [1, "2"]}, "field 'scores[1]' must be a finite number"),
        ({"prompt": "q", "responses": ["a", "b"], "scores": [1, True]}, "field 'scores[1]' must be a finite number"),
        ({"prompt": "q", "responses": ["a", " "], "scores": [1, 2]}, "field 'responses[1]' is empty"),
        ({"prompt": "q", "responses": "ab", "scores": [1, 2]}, "field 'responses' must be a list, got str"),
        ({"chosen": HH_PROMPT + " a", "rejected": HH_PROMPT + "  "}, "field 'rejected' is empty"),
        ({"chosen": HH_PROMPT + " a", "rejected": 7}, "field 'rejected' must be a string, got int"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    p = write_jsonl(tmp_path / "data.jsonl", [row], {0: ""})  # blank first line: the row is line 2
    with pytest.raises(DataError, match=m(f"data.jsonl:2: {message}")):
        load_preferences(p)


def test_completion_data_rejected_for_dpo(tmp_path):
    p = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=m("sft.jsonl:1: prompt/completion data has no preferences")):
        load_preferences(p)


# --- completions (SFT) -----------------------------------------------------------------------------


def test_completions_from_each_format(tmp_path):
    p = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "completion": " a"}, {"prompt": "", "completion": "b"}])
    items, report = load_completions(p)
    assert items == [Completion("q", " a", f"{p}:1"), Completion("", "b", f"{p}:2")]
    assert (report.format, report.rows) == ("completion", 2)

    items, report = load_completions(write_jsonl(tmp_path / "pref.jsonl", ROWS))
    assert [(c.prompt, c.completion) for c in items] == [("Q1", "good 1"), ("Q2", "good 2")]

    hh = [{"chosen": HH_PROMPT + " Four.", "rejected": HH_PROMPT + " Five."}]
    (item,), report = load_completions(write_jsonl(tmp_path / "hh.jsonl", hh))
    assert (item.prompt, item.completion, report.format) == (HH_PROMPT, " Four.", "implicit")

    ranked = [{"prompt": "Q", "responses": ["a", "b", "c"], "scores": [1, 5, 5]}]
    (item,), _ = load_completions(write_jsonl(tmp_path / "r.jsonl", ranked))
    assert item.completion == "b"  # highest score, first on a tie

    chat = [{"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"}]
    (item,), _ = load_completions(write_jsonl(tmp_path / "chat.jsonl", chat))
    assert item.completion == [{"role": "assistant", "content": "hello"}]


def test_completions_bad_field(tmp_path):
    p = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""}])
    with pytest.raises(DataError, match=m("sft.jsonl:2: field 'completion' is empty")):
        load_completions(p)
    p = write_jsonl(tmp_path / "sft2.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q"}])
    with pytest.raises(DataError, match=m("sft2.jsonl:2: missing field 'completion' (completion format)")):
        load_completions(p)


# --- split_eval -----------------------------------------------------------------------------------


def test_split_eval_deterministic_and_ordered():
    items = list(range(20))
    train, evals = split_eval(items, 0.25, seed=1)
    assert len(evals) == 5 and len(train) == 15
    assert sorted(train + evals) == items
    assert train == sorted(train) and evals == sorted(evals)
    assert split_eval(items, 0.25, seed=1) == (train, evals)
    others = {tuple(split_eval(items, 0.25, seed=s)[1]) for s in range(2, 8)}
    assert len(others | {tuple(evals)}) > 1  # the seed matters
    assert split_eval(list(range(10)), 0.05, seed=0)[1] != []  # 0.5 rounds up to 1


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, True, "0.1"])
def test_split_eval_bad_fraction(fraction):
    with pytest.raises(ConfigError, match="eval fraction must be a number between 0 and 1"):
        split_eval(list(range(10)), fraction, seed=0)


def test_split_eval_empty_part():
    with pytest.raises(ConfigError, match="gives 0 eval and 4 train items"):
        split_eval(list(range(4)), 0.1, seed=0)
    with pytest.raises(ConfigError, match="gives 4 eval and 0 train items"):
        split_eval(list(range(4)), 0.9, seed=0)


# --- blank values, checked without copying the text (isspace, as strip() would) --------------------------------


@pytest.mark.parametrize("blank", ["", " ", "\t\n", "\u3000", "\x1c\x1f", "\u2028 \u00a0"])
def test_whitespace_only_fields_are_empty(tmp_path, blank):
    assert not blank.strip()  # the rule these checks keep
    p = write_jsonl(tmp_path / "w.jsonl", [{"prompt": "Q", "chosen": blank, "rejected": "b"}])
    with pytest.raises(DataError, match=m(":1: field 'chosen' is empty")):
        load_preferences(p)
    chat = [{"prompt": [{"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": blank}, {"role": "assistant", "content": " "}],
             "rejected": "b"}]
    with pytest.raises(DataError, match=m(":1: field 'chosen' is empty")):
        load_preferences(write_jsonl(tmp_path / "c.jsonl", chat))


def test_text_with_surrounding_whitespace_is_kept_as_it_is(tmp_path):
    p = write_jsonl(tmp_path / "w.jsonl", [{"prompt": "  Q ", "chosen": " a\u3000", "rejected": "\tb\n"}])
    (pair,), _ = load_preferences(p)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("  Q ", " a\u3000", "\tb\n")


def test_whitespace_only_jsonl_lines_are_skipped(tmp_path):
    p = tmp_path / "blank.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\u3000\n \t\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert [prov for _, prov in read_rows(p)] == [f"{p}:1", f"{p}:4"]


def test_prompts_glued_to_their_responses_are_counted():
    from dpokit.data.checks import glued_boundary_warning
    from dpokit.data.records import Completion, PreferencePair

    records = [PreferencePair("The film", "is a delight", " is dull", "pairs.jsonl:1"),
               PreferencePair("The film ", "was good", "was bad", "pairs.jsonl:2"),  # the space is in the prompt
               PreferencePair("The film", " was good", "\nwas bad", "pairs.jsonl:3"),
               PreferencePair("The film:", "good", "bad", "pairs.jsonl:4"),  # punctuation: a boundary anyway
               PreferencePair("Rate it", " fine", "5/10", "pairs.jsonl:5"),
               PreferencePair([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Yo"}],
                              [{"role": "assistant", "content": "No"}], "pairs.jsonl:6"),
               Completion("Once upon", "a time", "sft.jsonl:1")]
    warning = glued_boundary_warning(records)
    assert warning.startswith("warning: 3 of 7 examples join prompt and response with no space between two words "
                              "(e.g. 'The film' + 'is a delight' at pairs.jsonl:1)")
    assert glued_boundary_warning(records[1:4]) is None


# --- unpaired data (KTO) ---

UNPAIRED = [{"prompt": "Q1", "completion": " good", "label": True},
            {"prompt": [{"role": "user", "content": "Q2"}], "completion": "bad", "label": False}]


def test_unpaired_rows_detected_and_loaded(tmp_path):
    """prompt + completion + label is the unpaired format; a chat prompt's completion becomes an assistant turn."""
    assert detect_format(UNPAIRED[0]) == "unpaired"
    assert detect_format({"prompt": "Q", "completion": "A"}) == "completion"
    records, report = load_unpaired(write_jsonl(tmp_path / "u.jsonl", UNPAIRED))
    assert report.format == "unpaired"
    assert records == [Completion("Q1", " good", f"{tmp_path / 'u.jsonl'}:1", True),
                       Completion([{"role": "user", "content": "Q2"}], [{"role": "assistant", "content": "bad"}],
                                  f"{tmp_path / 'u.jsonl'}:2", False)]
    forced, _ = load_unpaired(write_jsonl(tmp_path / "u.jsonl", UNPAIRED), format="unpaired")
    assert forced == records


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "Q", "completion": "A", "label": "true"}, ":2: field 'label' must be true or false, got 'true'"),
    ({"prompt": "Q", "completion": "A", "label": 1}, ":2: field 'label' must be true or false, got 1"),
    ({"prompt": "Q", "completion": "A"}, ":2: missing field 'label' (unpaired format)"),
    ({"prompt": "Q", "completion": "", "label": True}, ":2: field 'completion' is empty"),
])
def test_bad_unpaired_rows_name_line_and_field(tmp_path, row, message):
    with pytest.raises(DataError, match=m(message)):
        load_unpaired(write_jsonl(tmp_path / "u.jsonl", [UNPAIRED[0], row]))


def test_unpaired_and_paired_data_need_their_losses(tmp_path):
    """Pairs for --loss kto, unpaired rows for a pair loss or SFT: one-line errors saying what to do."""
    with pytest.raises(DataError, match=m(":1: --loss kto needs unpaired data")):
        load_unpaired(write_jsonl(tmp_path / "p.jsonl", ROWS))
    unpaired = write_jsonl(tmp_path / "u.jsonl", UNPAIRED)
    with pytest.raises(DataError, match=m(":1: unpaired data (prompt, completion, label) has no preference pairs; "
                                          "train it with --loss kto")):
        load_preferences(unpaired)
    with pytest.raises(DataError, match=m("pass --format completion")):
        load_completions(unpaired)
    assert [c.label for c in load_completions(unpaired, format="completion")[0]] == [None, None]

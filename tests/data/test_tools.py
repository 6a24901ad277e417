"""Tool-call data: a row's `tools` (tool schemas) go to the chat template in tokenisation and generation, messages
with `tool_calls` and `tool` turns pass validation and render, and bad schemas are one-line DataErrors naming the
file, the row and the field."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dpokit.data.cache import cache_inputs
from dpokit.data.chat import prompt_token_ids
from dpokit.data.formats import ColumnMap, load_completions, load_preferences
from dpokit.data.prompts import read_prompts
from dpokit.data.tokenize import TokenizeConfig, tokenize_examples
from dpokit.errors import DataError
from dpokit.eval.generation import render_prompts
from helpers import make_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CLOCK = {"name": "get_time", "description": "the time now", "parameters": {"type": "object", "properties": {}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
PROMPT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the weather in Paris"},
          {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "sunny and fun"}]


@pytest.fixture(scope="module")
def tools_tokenizer():
    return make_tokenizer(chat_template="tools")


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_tools_and_tool_turns_are_rendered_and_the_boundary_stays_exact(tools_tokenizer, tmp_path):
    tok = tools_tokenizer
    rows = [{"prompt": PROMPT, "chosen": "it is sunny", "rejected": "no idea", "tools": [WEATHER, CLOCK]},
            # tools as a JSON string (Parquet, CSV), and a response that is itself a tool call
            {"prompt": PROMPT[1:2], "chosen": [{"role": "assistant", "content": "", "tool_calls": [CALL]}],
             "rejected": "it is sunny", "tools": json.dumps([WEATHER])},
            {"prompt": PROMPT[1:2], "chosen": "it is sunny", "rejected": "no idea"}]  # no tools
    pairs, _ = load_preferences(_write(tmp_path / "tools.jsonl", rows))
    assert [p.tools for p in pairs] == [[WEATHER, CLOCK], [WEATHER], None]
    examples, _ = tokenize_examples(pairs, tok, TokenizeConfig(max_length=512, max_prompt_length=400))
    assert len(examples) == 3
    for pair, example in zip(pairs, examples):
        extra = {"tools": pair.tools} if pair.tools else {}
        prompt_text = tok.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True, **extra)
        assert list(example.prompt_ids) == tok(prompt_text, add_special_tokens=False)["input_ids"]
        for response, ids in zip((pair.chosen, pair.rejected), example.responses):
            full = tok.apply_chat_template(pair.prompt + response, tokenize=False, **extra).rstrip()
            # prompt + response ids are the whole conversation's, split exactly where the prompt ends
            assert list(example.prompt_ids) + list(ids) == tok(full, add_special_tokens=False)["input_ids"]
            assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        # and the same prompt ids as generation renders (with the tools)
        assert list(example.prompt_ids) == prompt_token_ids(tok, pair.prompt, "p", pair.tools)
    first = tok.decode(examples[0].prompt_ids)
    assert '"name": "get_weather"' in first and '"name": "get_time"' in first and "# Tools" in first
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in first
    assert "<|im_start|>tool\nsunny and fun" in first
    assert "<tool_call>" in tok.decode(examples[1].responses[0])
    assert "# Tools" not in tok.decode(examples[2].prompt_ids)
    assert examples[2].prompt_ids != examples[1].prompt_ids  # the tools are part of the prompt


def test_sft_and_unpaired_rows_carry_their_tools(tmp_path):
    rows = [{"prompt": PROMPT[1:2], "completion": "it is sunny", "tools": [CLOCK]}]
    items, _ = load_completions(_write(tmp_path / "sft.jsonl", rows))
    assert items[0].tools == [CLOCK]


@pytest.mark.parametrize("tools, message", [
    ("not json", "field 'tools' is not valid JSON"),
    ({"name": "get_time"}, "field 'tools' must be a list of tool schemas"),
    ([{"description": "no name"}], "field 'tools[0]' must be a tool schema, an object with a 'name'"),
    ([CLOCK, 3], "field 'tools[1]' must be a tool schema"),
    ([{"type": "function", "function": {"name": ""}}], "field 'tools[0]' must be a tool schema"),
])
def test_bad_tool_schemas_are_one_line_errors_naming_file_row_and_field(tmp_path, tools, message):
    good = {"prompt": PROMPT[1:2], "chosen": "yes", "rejected": "no"}
    path = _write(tmp_path / "bad.jsonl", [good, {**good, "tools": tools}])
    with pytest.raises(DataError) as error:
        load_preferences(path)
    text = str(error.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text


@pytest.mark.parametrize("message, field", [
    ({"role": "user", "content": "hi", "tool_calls": [CALL]}, "'prompt[0].tool_calls' is on a 'user' message"),
    ({"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}, "'prompt[0].tool_calls[0]'"),
    ({"role": "assistant", "tool_calls": "get_weather"}, "'prompt[0].tool_calls' must be a list"),
    ({"role": "assistant"}, "missing field 'prompt[0].content'"),
])
def test_bad_tool_calls_are_named(tmp_path, message, field):
    path = _write(tmp_path / "calls.jsonl", [{"prompt": [message], "chosen": "yes", "rejected": "no"}])
    with pytest.raises(DataError, match=r"calls\.jsonl:1: .*" + __import__("re").escape(field)):
        load_preferences(path)


def test_tools_need_a_template_that_renders_them_and_a_conversation(tmp_path, chat_tokenizer, tools_tokenizer):
    path = _write(tmp_path / "t.jsonl", [{"prompt": PROMPT[1:2], "chosen": "yes", "rejected": "no",
                                          "tools": [CLOCK]}])
    pairs, _ = load_preferences(path)
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'tools' is given but the tokenizer's chat template "
                                        "does not render tools"):
        tokenize_examples(pairs, chat_tokenizer, TokenizeConfig())  # plain ChatML ignores tools
    plain = _write(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "yes", "rejected": "no", "tools": [CLOCK]}])
    pairs, _ = load_preferences(plain)
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'tools' needs a conversational prompt"):
        tokenize_examples(pairs, tools_tokenizer, TokenizeConfig())
    # --apply-chat-template makes the plain prompt a user turn, rendered with its tools
    examples, _ = tokenize_examples(pairs, tools_tokenizer, TokenizeConfig(apply_chat_template=True))
    assert "get_time" in tools_tokenizer.decode(examples[0].prompt_ids)


def test_prompt_files_carry_tools_to_generation(tmp_path, tools_tokenizer):
    path = _write(tmp_path / "prompts.jsonl", [{"prompt": PROMPT, "tools": [WEATHER]},
                                               {"prompt": "what time is it", "tools": json.dumps([CLOCK])},
                                               {"messages": PROMPT[1:2]}, '"plain text"'])
    prompts = read_prompts(path)
    assert [getattr(p, "tools", None) for p in prompts] == [[WEATHER], [CLOCK], None, None]
    assert prompts[1] == [{"role": "user", "content": "what time is it"}]
    encoded, sent = render_prompts(tools_tokenizer, prompts)
    assert "get_weather" in tools_tokenizer.decode(encoded[0]) and "get_time" in tools_tokenizer.decode(encoded[1])
    assert encoded[0] == prompt_token_ids(tools_tokenizer, PROMPT, "p", [WEATHER])
    assert "# Tools" not in tools_tokenizer.decode(encoded[2])
    assert sent[0].tools == [WEATHER]  # `dpokit generate` writes them back beside the conversation
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "x", "tools": [{"nameless": 1}]}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'tools\[0\]' must be a tool schema"):
        read_prompts(bad)


def test_tools_change_the_tokenised_cache_key(tmp_path, tools_tokenizer):
    row = {"prompt": PROMPT[1:2], "chosen": "yes", "rejected": "no"}
    keys = []
    for name, tools in (("a", None), ("b", [CLOCK]), ("c", [WEATHER])):
        path = _write(tmp_path / f"{name}.jsonl", [{**row, **({"tools": tools} if tools else {})}])
        config = SimpleNamespace(data=path, split="train", streaming=False, eval_data=None, eval_fraction=None,
                                 format="auto", seed=0)
        inputs, _ = cache_inputs(config, "dpo", tools_tokenizer, TokenizeConfig(), ColumnMap())
        inputs["data"].pop("spec")  # the same file name would give the same key but for its contents
        keys.append(json.dumps(inputs, sort_keys=True))
    assert len(set(keys)) == 3
    assert ColumnMap().tools == "tools"


def test_iterate_writes_the_prompts_tools_into_the_pairs_it_trains_on(tmp_path):
    from dpokit.data.records import ToolPrompt
    from dpokit.experiments.iterate import label_pairs, typed_pairs, write_pairs

    prompt = ToolPrompt(PROMPT[1:2], [WEATHER])
    settings = SimpleNamespace(labeling="argmax", min_score_gap=0.1, bt_scale=1.0)
    pairs, _ = label_pairs(prompt, ["it is sunny", "no idea"], [0.9, 0.1], settings, None, "prompt 0")
    write_pairs(tmp_path / "pairs.jsonl", typed_pairs(pairs))
    read, _ = load_preferences(tmp_path / "pairs.jsonl")
    assert read[0].tools == [WEATHER] and read[0].prompt == PROMPT[1:2]

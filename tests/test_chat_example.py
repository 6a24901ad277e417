"""The README's chat walk-through starts from examples/build_chat_model.py: its model directory is a chat model
dpokit loads, and its data files are what dpokit sft, dpo and generate read."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dpokit.data import load_completions, load_preferences
from dpokit.models.loading import load_tokenizer
from dpokit.data.prompts import read_prompts
from dpokit.data.chat import end_of_turn_id
from dpokit.data.tokenize import TokenizeConfig, tokenize_examples

pytestmark = pytest.mark.usefixtures("single_thread")
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "build_chat_model.py"


def test_the_example_builds_a_chat_model_and_chat_data(tmp_path):
    spec = importlib.util.spec_from_file_location("build_chat_model", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.build(tmp_path, seed=0, sft_rows=40, pairs=20)
    tokenizer = load_tokenizer(str(tmp_path / "base"))
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    sft, report = load_completions(tmp_path / "sft.jsonl")
    assert report.format == "completion" and len(sft) == 40 and all(isinstance(r.prompt, list) for r in sft)
    pairs, report = load_preferences(tmp_path / "pairs.jsonl")
    assert report.format == "conversational" and len(pairs) == 20
    assert any(len(p.prompt) >= 3 for p in pairs)  # multi-turn prompts are among them
    asked = {p.prompt[-1]["content"] for p in pairs}
    held_out = read_prompts(tmp_path / "prompts.jsonl")
    assert held_out and not asked & {p[-1]["content"] for p in held_out}
    examples, report = tokenize_examples(pairs, tokenizer, TokenizeConfig(max_length=256, max_prompt_length=128))
    assert report.kept == 20 and all(e.responses[0][-1] == end_of_turn_id(tokenizer) for e in examples)

"""The LLM judge (dpokit/llm_judge.py): its question goes through the judge's chat template, and its verdict is
read from the next-token probabilities of the label tokens, checked against the logits computed by hand."""

from __future__ import annotations

import json

import pytest
import torch

from dpokit.errors import ConfigError
from dpokit.judges.llm import first_preferences, judge_input_ids, label_token_ids, llm_judge
from dpokit.data.records import ToolPrompt
from dpokit.judges.pairwise import DEFAULT_TEMPLATE, fill_template, judge_prompt_text, prompt_text
from dpokit.judges.loader import load_pairwise_judge
from helpers import make_llama, make_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["the film", [{"role": "user", "content": "hello"}], "was the acting good"]
FIRSTS = ["was great", "sure I help", "no"]
SECONDS = ["awful and boring and long", "no", "yes really very good acting"]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    tokenizer = make_tokenizer(chat_template=True)
    path = tmp_path_factory.mktemp("judge") / "chat"
    # a wide initialisation: verdicts far apart (0.005 to 0.96), so that a wrong position or token shows
    make_llama(vocab_size=len(tokenizer), seed=1, initializer_range=0.3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@torch.no_grad()
def _by_hand(model, tokenizer, prompt: str, first: str, second: str) -> float:
    """P(A) / (P(A) + P(B)) from one unpadded forward pass over the chat-templated question."""
    question = fill_template(DEFAULT_TEMPLATE, prompt, first, second)
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")  # the next token is the answer
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    probs = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)
    p_a = sum(probs[i] for i in label_token_ids(tokenizer, "A"))
    p_b = sum(probs[i] for i in label_token_ids(tokenizer, "B"))
    return float(p_a / (p_a + p_b))


def test_the_verdict_is_read_from_the_label_tokens_next_token_probabilities(judge_dir):
    from dpokit.models.loading import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(judge_dir), load_model(judge_dir)
    a_ids = label_token_ids(tokenizer, "A")
    assert a_ids and all(tokenizer.decode([i]).strip() == "A" for i in a_ids)
    texts = ["the film", "hello", "was the acting good"]  # the one-user-turn prompt reads as its content
    expected = [_by_hand(model, tokenizer, *triple) for triple in zip(texts, FIRSTS, SECONDS)]
    assert max(expected) - min(expected) > 0.5
    lengths = {len(judge_input_ids(tokenizer, DEFAULT_TEMPLATE, *t)) for t in zip(PROMPTS, FIRSTS, SECONDS)}
    assert len(lengths) == 3
    # batched with left padding (lengths differ) and one at a time: the same numbers
    for batch_size in (3, 1):
        got = first_preferences(model, tokenizer, DEFAULT_TEMPLATE, PROMPTS, FIRSTS, SECONDS, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-5)
    backward = [_by_hand(model, tokenizer, *triple) for triple in zip(texts, SECONDS, FIRSTS)]
    one_order = llm_judge(judge_dir, template=DEFAULT_TEMPLATE, both_orders=False)
    assert one_order(PROMPTS, FIRSTS, SECONDS) == pytest.approx(expected, abs=1e-5)
    both = load_pairwise_judge(f"llm:{judge_dir}", batch_size=2)  # both orders by default: the average
    assert both(PROMPTS, FIRSTS, SECONDS) == pytest.approx([(f + 1 - b) / 2 for f, b in zip(expected, backward)],
                                                           abs=1e-5)
    # a position bias cancels: swapping the responses mirrors the verdict
    assert [1 - p for p in both(PROMPTS, SECONDS, FIRSTS)] == pytest.approx(both(PROMPTS, FIRSTS, SECONDS), abs=1e-6)


def test_a_judge_without_a_chat_template_reads_the_raw_question_and_long_inputs_fail(tmp_path):
    tokenizer = make_tokenizer()
    model = make_llama(vocab_size=len(tokenizer), max_position_embeddings=64)
    ids = judge_input_ids(tokenizer, "Q: {prompt} A: {response_a} B: {response_b} Answer:", "x", "y", "z")
    assert ids == tokenizer("Q: x A: y B: z Answer:")["input_ids"]
    with pytest.raises(ValueError, match="pair 1 is .* tokens, more than the judge's 64 positions"):
        first_preferences(model, tokenizer, DEFAULT_TEMPLATE, ["the film"], ["a"], ["b"])
    with pytest.raises(ConfigError, match="no single token for the answer"):
        label_token_ids(tokenizer, "Z" * 40)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CLOCK = {"name": "get_time", "description": "the time now", "parameters": {"type": "object", "properties": {}}}


def test_a_prompt_offered_tools_is_shown_to_the_judge_with_them(judge_dir):
    from dpokit.models.loading import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(judge_dir), load_model(judge_dir)
    messages = [{"role": "user", "content": "the weather in Paris"}]
    offered = ToolPrompt(messages, [WEATHER, CLOCK])
    shown = judge_prompt_text(offered)
    assert shown == ("the weather in Paris\n\nTools available to the assistant:\n" + json.dumps(WEATHER) + "\n"
                     + json.dumps(CLOCK))
    first = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    question = tokenizer.decode(judge_input_ids(tokenizer, DEFAULT_TEMPLATE, offered, first, "it is sunny"))
    assert f"Query: {shown}\n\nResponse A:\n{first}" in question  # every schema in full, in the question
    # the verdict is the judge's answer to that question (its chat template gets no tools: they are the text's);
    # one short schema, so that the question fits the tiny judge's 512 positions
    clock = ToolPrompt(messages, [CLOCK])
    (verdict,) = first_preferences(model, tokenizer, DEFAULT_TEMPLATE, [clock], ["get_time"], ["it is sunny"])
    assert verdict == pytest.approx(_by_hand(model, tokenizer, judge_prompt_text(clock), "get_time", "it is sunny"),
                                    abs=1e-5)
    (bare,) = first_preferences(model, tokenizer, DEFAULT_TEMPLATE, [messages], ["get_time"], ["it is sunny"])
    assert abs(verdict - bare) > 1e-4, (verdict, bare)
    # no tools: the question is what it always was
    for prompt in (messages, ToolPrompt(messages, None), ToolPrompt(messages, []), "the film"):
        assert judge_prompt_text(prompt) == prompt_text(prompt)
        assert judge_input_ids(tokenizer, DEFAULT_TEMPLATE, prompt, "a", "b") == judge_input_ids(
            tokenizer, DEFAULT_TEMPLATE, list(prompt) if isinstance(prompt, list) else prompt, "a", "b")
    assert "Tools available" not in tokenizer.decode(judge_input_ids(tokenizer, DEFAULT_TEMPLATE, messages, "a", "b"))


def test_the_judge_reads_a_conversations_tool_calls_and_results():
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    conversation = ToolPrompt([{"role": "user", "content": "the weather in Paris"},
                               {"role": "assistant", "content": "", "tool_calls": [call]},
                               {"role": "tool", "content": "sunny"}], [WEATHER])
    assert judge_prompt_text(conversation) == (
        "user: the weather in Paris\n\nassistant:\ntool call: "
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n\ntool: sunny'
        "\n\nTools available to the assistant:\n" + json.dumps(WEATHER))

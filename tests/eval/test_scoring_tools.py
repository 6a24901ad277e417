"""The implicit reward and a reward model's score of a response whose prompt is offered tools: the tool schemas go
to the chat template with the conversation, as training tokenises a row's tools column, so the scores are those of
the conversation rendered with its tools (checked against forward passes over ids rendered by hand)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from dpokit.data.records import ToolPrompt
from dpokit.data.tokenize import TokenizeConfig
from dpokit.errors import DataError
from dpokit.eval.reward_scoring import model_rewards
from dpokit.eval.scoring import ImplicitJudge, implicit_rewards, per_input_tools
from helpers import make_llama, make_tokenizer
from helpers import TOOL_CALL as CALL, TOOL_CLOCK as CLOCK, TOOL_PROMPT as PROMPT, TOOL_WEATHER as WEATHER

pytestmark = pytest.mark.usefixtures("single_thread")

RESPONSES = [[{"role": "assistant", "content": "", "tool_calls": [CALL]}],
             [{"role": "assistant", "content": "it is sunny"}],
             [{"role": "assistant", "content": "no idea"}]]
SETTINGS = TokenizeConfig(max_length=512, max_prompt_length=400)


@pytest.fixture(scope="module")
def models():
    """A tokenizer whose chat template renders tools, and two different tiny Llamas (policy, reference)."""
    tokenizer = make_tokenizer(chat_template="tools")
    return (make_llama(vocab_size=len(tokenizer), seed=0), make_llama(vocab_size=len(tokenizer), seed=1),
            tokenizer)


def rendered_ids(tokenizer, prompt, response, tools) -> tuple[list[int], int]:
    """The ids of the whole conversation rendered with `tools` by the chat template, and where the response
    starts (the prompt rendered with its generation prompt is a prefix of it)."""
    extra = {"tools": tools} if tools else {}
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **extra)
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False, **extra).rstrip()
    assert full.startswith(head)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the scored turn ends the text
    return ids, start


@torch.no_grad()
def logp_by_hand(model, ids: list[int], start: int) -> float:
    """The summed log-prob of ids[start:] given what precedes them, from one unpadded forward pass."""
    logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logps[t - 1, ids[t]] for t in range(start, len(ids))))


def implicit_by_hand(policy, reference, tokenizer, response, tools, beta: float = 0.1) -> float:
    ids, start = rendered_ids(tokenizer, PROMPT, response, tools)
    return beta * (logp_by_hand(policy, ids, start) - logp_by_hand(reference, ids, start))


def test_implicit_rewards_render_each_prompts_tools(models):
    policy, reference, tokenizer = models
    tools = [[WEATHER, CLOCK], [WEATHER], None]  # per input; None: no tools
    got = implicit_rewards(policy, reference, tokenizer, [PROMPT] * 3, RESPONSES, 0.1, settings=SETTINGS,
                           tools=tools)
    expected = [implicit_by_hand(policy, reference, tokenizer, r, t) for r, t in zip(RESPONSES, tools)]
    assert [g.reward for g in got] == pytest.approx(expected, abs=5e-5)  # float32 sums against float64
    without = [implicit_by_hand(policy, reference, tokenizer, r, None) for r in RESPONSES[:2]]
    # the tools are part of the prompt the rewards are conditioned on: without them the numbers differ
    assert all(abs(w - g.reward) > 1e-3 for w, g in zip(without, got[:2])), (without, got)
    # a ToolPrompt's own tools are used when no tools are passed (winrate and iterate prompts are ToolPrompts)
    own = implicit_rewards(policy, reference, tokenizer, [ToolPrompt(PROMPT, [WEATHER, CLOCK])], RESPONSES[:1],
                           0.1, settings=SETTINGS)
    assert own[0].reward == pytest.approx(got[0].reward, abs=1e-6)


def test_the_implicit_judge_scores_a_tool_prompts_continuation_with_its_tools(models):
    policy, reference, tokenizer = models
    judge = ImplicitJudge(policy, reference, tokenizer, 0.1, SETTINGS)
    (score,) = judge.continuations([ToolPrompt(PROMPT, [WEATHER])], RESPONSES[1:2])
    assert score == pytest.approx(implicit_by_hand(policy, reference, tokenizer, RESPONSES[1], [WEATHER]), abs=5e-5)


def test_tools_need_a_template_that_renders_them_and_match_the_prompts(models):
    policy, reference, _ = models
    plain_chat = make_tokenizer(chat_template=True)  # ChatML that ignores tools: refused, not scored without them
    with pytest.raises(DataError, match="p 0: field 'tools' is given but the tokenizer's chat template does not"):
        implicit_rewards(policy, reference, plain_chat, [PROMPT], RESPONSES[1:2], settings=SETTINGS,
                         sources=["p 0"], tools=[[CLOCK]])
    with pytest.raises(ValueError, match="2 prompts but 1 tools entries"):
        per_input_tools([PROMPT, PROMPT], [[CLOCK]])
    assert per_input_tools([PROMPT, ToolPrompt(PROMPT, [CLOCK])], None) == [None, [CLOCK]]
    assert per_input_tools([PROMPT], [[]]) == [None]  # an empty list is no tools, as in training


def test_a_reward_models_score_is_read_from_the_conversation_with_its_tools(models):
    tokenizer = models[2]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    tools = [[WEATHER, CLOCK], [CLOCK], None]
    got = model_rewards(model, tokenizer, [PROMPT] * 3, RESPONSES, settings=SETTINGS, tools=tools)
    with torch.no_grad():
        def by_hand(response, schemas):
            ids, _ = rendered_ids(tokenizer, PROMPT, response, schemas)
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])

        expected = [by_hand(r, t) for r, t in zip(RESPONSES, tools)]
        without = [by_hand(r, None) for r in RESPONSES[:2]]
    assert [g.reward for g in got] == pytest.approx(expected, abs=1e-5)
    assert all(abs(w - g.reward) > 1e-3 for w, g in zip(without, got[:2])), (without, got)

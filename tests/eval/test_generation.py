"""Sampling (dpokit/generation.py, dpokit/prompts.py): chat templates applied as in training, stop at the
end-of-turn token, length-sorted batches in the prompts' order, seeds, prompts from the command line."""

from __future__ import annotations

import json

import pytest
import torch

from dpokit.cli.main import main
from dpokit.data.records import Completion
from dpokit.errors import ConfigError, DataError
from dpokit.eval.generation import generate, render_prompts, sample_ids, stop_token_ids
from dpokit.data.prompts import parse_prompt, read_prompts
from dpokit.data.tokenize import TokenizeConfig, tokenize_examples
from helpers import make_llama, make_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

QA = [("hello", "sure"), ("help", "yes I help"), ("the film", "was great")]
IM_END = 2  # <|im_end|> in the ChatML test tokenizer


@pytest.fixture(scope="module")
def chat_model():
    """A tiny Llama trained (80 Adam steps, ~2 s) on three ChatML conversations until it answers each question,
    then stops with <|im_end|>: a chat model in miniature."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer(chat_template=True)
    model = make_llama(vocab_size=len(tokenizer))
    rows = []
    for question, answer in QA:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}], tokenize=False).rstrip()
        rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def chat_model_dir(chat_model, tmp_path_factory):
    model, tokenizer = chat_model
    path = tmp_path_factory.mktemp("chat") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_a_chat_model_answers_through_its_template_and_stops_at_end_of_turn(chat_model):
    model, tokenizer = chat_model
    samples = sample_ids(model, tokenizer, [q for q, _ in QA], temperature=0, max_new_tokens=12)
    for (_, answer), (s,) in zip(QA, samples):
        assert s.text == answer
        assert s.ids[-1] == IM_END and IM_END not in s.ids[:-1] and len(s.ids) < 12  # stopped there
        assert s.messages[-1]["role"] == "user"
    # the issue's failure, kept visible: the raw question makes the model close its (unopened) turn at once, and
    # without the template <|im_end|> is no stop token, so it runs on
    (raw,), = sample_ids(model, tokenizer, ["hello"], temperature=0, max_new_tokens=12, chat_template=False)
    assert raw.messages is None and raw.ids[0] == IM_END and len(raw.ids) == 12


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_prompts_are_tokenised_exactly_as_training_tokenises_them(template):
    """Generation and training give the same prompt ids: a string as one user turn, a --system message first,
    a message list as it is; without the template, raw text with the tokenizer's special tokens."""
    tokenizer = make_tokenizer(chat_template=template)
    multi = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
             {"role": "assistant", "content": "sure"}, {"role": "user", "content": "the film"}]
    ids, messages = render_prompts(tokenizer, ["hello", multi, "help"], system="be kind")
    expected = [[{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}], multi,
                [{"role": "system", "content": "be kind"}, {"role": "user", "content": "help"}]]
    assert messages == expected  # the prompt's own system message is kept, not doubled
    records = [Completion(m, [{"role": "assistant", "content": "x"}], f"row {i}") for i, m in enumerate(expected)]
    examples, _ = tokenize_examples(records, tokenizer, TokenizeConfig())
    assert ids == [list(e.prompt_ids) for e in examples]
    if template == "llama3":  # the BOS comes from the template, once
        assert ids[0][0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[0][1:]
    raw, none = render_prompts(tokenizer, ["the film"], chat_template=False)
    assert none == [None] and raw == [tokenizer("the film")["input_ids"]]


def test_stop_tokens_are_eos_the_models_own_and_the_end_of_turn_token():
    chatml, llama3, plain = (make_tokenizer(chat_template=t) for t in (True, "llama3", False))
    assert stop_token_ids(chatml) == [0, IM_END]
    assert stop_token_ids(llama3) == [0, llama3.convert_tokens_to_ids("<|eot_id|>")]
    assert stop_token_ids(chatml, chat=False) == [0] and stop_token_ids(plain) == [0]
    model = make_llama()
    model.generation_config.eos_token_id = [0, 7]  # a chat model's generation config lists its end tokens
    assert stop_token_ids(chatml, model) == [0, 7, IM_END]
    # a template that renders a finished conversation differently from prompt + reply (as "thinking" templates
    # do) hides its end-of-turn token: sampling still works, stopping at EOS and the model's own EOS ids
    odd = make_tokenizer(chat_template=True)
    odd.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    assert stop_token_ids(odd, model) == [0, 7]


def test_length_sorted_batches_come_back_in_prompt_order_and_seeds_are_honoured(tokenizer, capsys):
    model = make_llama(vocab_size=len(tokenizer))
    prompts = ["the film was really quite", "I", "the plot and the acting", "we saw", "a"]
    options = dict(max_new_tokens=6, num_samples=2, batch_size=3)
    first = sample_ids(model, tokenizer, prompts, seed=5, **options)
    err = capsys.readouterr().err  # 10 sequences in 4 batches: a progress bar of samples and tokens/s
    assert "generating" in err and "10/10" in err and "new tokens/s" in err
    again = sample_ids(model, tokenizer, prompts, seed=5, **options)
    other = sample_ids(model, tokenizer, prompts, seed=6, **options)
    assert [[s.ids for s in g] for g in first] == [[s.ids for s in g] for g in again]
    assert [[s.ids for s in g] for g in first] != [[s.ids for s in g] for g in other]
    for prompt, group in zip(prompts, first):
        assert len(group) == 2 and all(s.prompt_ids == tokenizer(prompt)["input_ids"] for s in group)
    # greedy: left padding in sorted batches changes nothing; one batch shows no bar
    greedy = sample_ids(model, tokenizer, prompts, temperature=0, max_new_tokens=6, batch_size=2)
    capsys.readouterr()
    alone = [sample_ids(model, tokenizer, [p], temperature=0, max_new_tokens=6)[0] for p in prompts]
    assert "generating" not in capsys.readouterr().err
    assert [g[0].ids for g in greedy] == [a[0].ids for a in alone]


def test_message_lists_and_system_need_the_template(chat_tokenizer, tokenizer):
    with pytest.raises(ConfigError, match="list of messages, which needs the chat template"):
        render_prompts(tokenizer, [[{"role": "user", "content": "hi"}]])
    with pytest.raises(ConfigError, match="list of messages"):
        render_prompts(chat_tokenizer, ["a", [{"role": "user", "content": "hi"}]], chat_template=False)
    with pytest.raises(ConfigError, match="--system needs the chat template"):
        render_prompts(chat_tokenizer, ["hi"], chat_template=False, system="be kind")
    with pytest.raises(ConfigError, match="no chat template"):
        render_prompts(tokenizer, ["hi"], chat_template=True)


def test_prompt_parsing():
    assert parse_prompt("What is the capital of France?") == "What is the capital of France?"
    assert parse_prompt('[{"role": "user", "content": "hi"}]') == [{"role": "user", "content": "hi"}]
    assert parse_prompt("[So, this movie] was") == "[So, this movie] was"  # not JSON: text
    with pytest.raises(DataError, match=r"--prompt: field 'messages\[0\].role' must be one of"):
        parse_prompt('[{"role": "bot", "content": "hi"}]')
    with pytest.raises(DataError, match=r"--prompt: field 'messages\[0\]' must be a message object"):
        parse_prompt('["hi"]')


def test_prompts_files(tmp_path):
    good = tmp_path / "prompts.jsonl"
    good.write_text('"plain text"\n\n[{"role": "user", "content": "hi"}]\n'
                    '{"prompt": "as a field"}\n{"messages": [{"role": "system", "content": "s"}, '
                    '{"role": "user", "content": "q"}]}\n'
                    '{"prompt": [{"role": "user", "content": "q2"}], "completion": "earlier output"}\n')
    assert read_prompts(good) == [
        "plain text", [{"role": "user", "content": "hi"}], "as a field",
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], [{"role": "user", "content": "q2"}]]
    text = tmp_path / "prompts.txt"
    text.write_text("The film\n\n[not json] either\n")
    assert read_prompts(text) == ["The film", "[not json] either"]
    for body, message in [('"ok"\n{"prompt": \n', r"prompts.jsonl:2: not valid JSON"),
                          ('"ok"\n\n42\n', r"prompts.jsonl:3: expected a JSON string, a list of messages"),
                          ('[{"role": "user"}]\n', r"prompts.jsonl:1: missing field 'messages\[0\].content'"),
                          ('{"text": "hi"}\n', r"prompts.jsonl:1: expected .* 'prompt' or 'messages'"),
                          ("\n\n", "no prompts")]:
        good.write_text(body)
        with pytest.raises(DataError, match=message):
            read_prompts(good)
    with pytest.raises(ConfigError, match="no such file"):
        read_prompts(tmp_path / "missing.jsonl")


def test_api_generate_applies_the_template_and_takes_options(chat_model_dir):
    assert generate(chat_model_dir, ["hello", [{"role": "user", "content": "help"}]], temperature=0,
                    max_new_tokens=12) == [["sure"], ["yes I help"]]
    with pytest.raises(ConfigError, match="--system needs the chat template"):
        generate(chat_model_dir, ["hello"], system="x", chat_template=False)


def test_cli_generate_prints_the_conversation_and_the_reply(chat_model_dir, tmp_path, capsys):
    assert main(["generate", "--model", chat_model_dir, "--prompt", "hello", "--temperature", "0",
                 "--max-new-tokens", "12", "--system", "be brief"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["prompt"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert set(row) == {"prompt", "completion"} and isinstance(row["completion"], str)  # (never saw a system turn)
    assert main(["generate", "--model", chat_model_dir, "--prompt", "hello", "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    assert json.loads(capsys.readouterr().out) == {"prompt": [{"role": "user", "content": "hello"}],
                                                   "completion": "sure"}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"help"\n[{"role": "user", "content": "the film"}]\n')
    assert main(["generate", "--model", chat_model_dir, "--prompts", str(prompts), "--temperature", "0",
                 "--max-new-tokens", "12", "--num-samples", "2", "--batch-size", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in rows] == ["yes I help"] * 2 + ["was great"] * 2
    # the output reads back: as prompts, and as SFT data (conversational prompt/completion)
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_prompts(out)[2] == [{"role": "user", "content": "the film"}]
    from dpokit.data import load_completions

    records, report = load_completions(out)
    assert report.format == "completion" and records[2].completion == [{"role": "assistant", "content": "was great"}]
    assert main(["generate", "--model", chat_model_dir, "--prompt", "hello", "--no-chat-template",
                 "--max-new-tokens", "3", "--jsonl"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "hello"


@pytest.mark.parametrize("args,message", [
    (["--prompt", '[{"role": "user", "content": "hi"}]', "--no-chat-template"], "needs the chat template"),
    (["--prompt", "hi", "--no-chat-template", "--system", "s"], "--system needs the chat template"),
    (["--prompts", "PROMPTS"], "prompts.jsonl:2: not valid JSON"),
    (["--prompt", "hi", "--top-p", "0"], "0 < top_p <= 1"),
])
def test_cli_generate_errors_are_one_line(args, message, chat_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"fine"\n{broken\n')
    args = [str(prompts) if a == "PROMPTS" else a for a in args]
    assert main(["generate", "--model", chat_model_dir, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("dpokit generate: error:")


def test_a_prompt_no_model_could_hold_is_refused_before_tokenising(tiny_model_dir):
    """A prompt of more characters than the model's positions could hold in tokens is a one-line DataError
    naming it, before the tokenizer sees it (one huge line would otherwise take its memory)."""
    from dpokit.errors import DataError
    from dpokit.models.loading import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    huge = "the film " * (model.config.max_position_embeddings * 200)
    with pytest.raises(DataError, match=r"prompt 2: [\d,]+ characters, more than the model's \d+ positions"):
        sample_ids(model, tokenizer, ["hello", huge], max_new_tokens=2)
    assert len(sample_ids(model, tokenizer, ["hello"], max_new_tokens=2)[0]) == 1

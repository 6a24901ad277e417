"""Tokenisation rules: boundary, EOS, chat templates, truncation, filtering (see dpokit/tokenize.py)."""

import pytest
from tokenizers import processors

from dpokit.data.records import Completion, PreferencePair
from dpokit.errors import ConfigError, DataError
from dpokit.tokenize import TokenizeConfig, tokenize_examples
from helpers import make_tokenizer


def _one(tokenizer, record, **settings):
    examples, report = tokenize_examples([record], tokenizer, TokenizeConfig(**settings))
    return examples[0], report


def test_prompt_and_responses_are_tokenised_separately_with_eos(tokenizer):
    pair = PreferencePair("the film was", " great fun", " awful", "x:1")
    example, _ = _one(tokenizer, pair)
    eos = tokenizer.eos_token_id
    assert list(example.prompt_ids) == tokenizer("the film was")["input_ids"]
    assert list(example.responses[0]) == tokenizer(" great fun", add_special_tokens=False)["input_ids"] + [eos]
    assert list(example.responses[1]) == tokenizer(" awful", add_special_tokens=False)["input_ids"] + [eos]
    # The scored tokens are exactly what generation after the prompt ids would have to produce.
    assert tokenizer.decode(example.responses[0], skip_special_tokens=True) == " great fun"


def test_boundary_differs_from_joint_tokenisation_where_bpe_merges_across_it(tokenizer):
    # "the" + "ater" style merges: tokenising jointly can merge across the boundary; dpokit never does.
    prompt, response = "the fil", "m was great"
    example, _ = _one(tokenizer, PreferencePair(prompt, response, " bad", "x:1"))
    assert list(example.prompt_ids) + list(example.responses[0][:-1]) == (
        tokenizer(prompt)["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"]
    )


def test_empty_prompt_starts_with_eos_when_there_is_no_bos(tokenizer):
    example, _ = _one(tokenizer, PreferencePair("", "great", "bad", "x:1"))
    assert example.prompt_ids == (tokenizer.eos_token_id,)


def test_completion_has_one_response(tokenizer):
    example, _ = _one(tokenizer, Completion("the plot", " was slow", "x:1"))
    assert len(example.responses) == 1


def test_chat_template_renders_prompt_with_generation_prompt_and_no_extra_eos(chat_tokenizer):
    prompt = [{"role": "user", "content": "hello"}]
    pair = PreferencePair(prompt, [{"role": "assistant", "content": "sure"}],
                          [{"role": "assistant", "content": "no"}], "x:1")
    example, _ = _one(chat_tokenizer, pair)
    assert chat_tokenizer.decode(example.prompt_ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    # The response ends with the template's end-of-turn special token, so no EOS is appended after it.
    assert chat_tokenizer.decode(example.responses[0]) == "sure<|im_end|>"
    assert example.responses[0][-1] == chat_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_conversational_data_without_chat_template_is_a_clear_error(tokenizer):
    pair = PreferencePair([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "a"}],
                          [{"role": "assistant", "content": "b"}], "data.jsonl:4")
    with pytest.raises(ConfigError, match=r"data.jsonl:4: .*chat template"):
        tokenize_examples([pair], tokenizer, TokenizeConfig())


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_long_prompt_is_cut_to_max_prompt_length(tokenizer, mode):
    prompt = " ".join(["the film was good"] * 20)
    ids = tokenizer(prompt)["input_ids"]
    example, report = _one(tokenizer, PreferencePair(prompt, " yes", " no", "x:1"),
                           max_length=30, max_prompt_length=10, truncation=mode)
    assert list(example.prompt_ids) == (ids[-10:] if mode == "keep_end" else ids[:10])
    assert report.prompts_truncated == 1


def test_truncation_keeps_a_leading_bos():
    tokenizer = make_tokenizer()
    bos = "<|im_start|>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    tokenizer.bos_token = bos
    prompt = " ".join(["the plot"] * 20)
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    example, _ = _one(tokenizer, PreferencePair(prompt, " yes", " no", "x:1"), max_length=20, max_prompt_length=8)
    assert list(example.prompt_ids) == [tokenizer.bos_token_id] + ids[-7:]


def test_prompt_is_not_cut_when_everything_fits(tokenizer):
    prompt = " ".join(["the film"] * 10)
    example, report = _one(tokenizer, PreferencePair(prompt, " yes", " no", "x:1"), max_length=200,
                           max_prompt_length=5)
    assert list(example.prompt_ids) == tokenizer(prompt)["input_ids"]
    assert report.prompts_truncated == 0


def test_identical_and_too_long_pairs_are_counted_and_skipped(tokenizer):
    long_response = " " + " ".join(["boring"] * 80)
    pairs = [
        PreferencePair("a", " good", " bad", "d.jsonl:1"),
        PreferencePair("a", " same", " same", "d.jsonl:2"),
        PreferencePair("a", long_response, " bad", "d.jsonl:3"),
        PreferencePair("a", " fun", " dull", "d.jsonl:4"),
    ]
    examples, report = tokenize_examples(pairs, tokenizer, TokenizeConfig(max_length=40, max_prompt_length=20))
    assert [e.source for e in examples] == ["d.jsonl:1", "d.jsonl:4"]
    assert report.counts == {"identical chosen and rejected": 1,
                             "longer than max_length=40 after prompt truncation": 1}
    assert "d.jsonl:2" in report.summary() and "d.jsonl:3" in report.summary()


def test_filtered_pairs_fail_the_run_on_request(tokenizer):
    pairs = [PreferencePair("a", " good", " bad", "d.jsonl:1"), PreferencePair("a", " x", " x", "d.jsonl:2")]
    with pytest.raises(DataError, match=r"filtered 1 \(identical chosen and rejected; e\.g\. d\.jsonl:2\)"):
        tokenize_examples(pairs, tokenizer, TokenizeConfig(on_filtered="error"))


def test_nothing_left_is_an_error(tokenizer):
    with pytest.raises(DataError, match="no usable examples"):
        tokenize_examples([PreferencePair("a", " x", " x", "d:1")], tokenizer, TokenizeConfig())


@pytest.mark.parametrize("settings,message", [
    (dict(truncation="middle"), "truncation"),
    (dict(on_filtered="drop"), "on_filtered"),
    (dict(max_length=10, max_prompt_length=10), "max_prompt_length"),
])
def test_bad_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        TokenizeConfig(**settings)


def _bos_tokenizer():
    """The test tokenizer with a BOS that it adds to every encoding with special tokens, Llama style."""
    tokenizer = make_tokenizer()
    bos = "<|im_start|>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    tokenizer.bos_token = bos
    return tokenizer


def test_responses_get_no_special_tokens_only_the_prompt_starts_with_bos():
    """A BOS inside a response would be scored as a token the model must emit mid-answer; only the prompt gets
    the tokenizer's special tokens (its BOS), and it gets exactly one."""
    tokenizer = _bos_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert tokenizer(" great fun")["input_ids"][0] == bos  # the tokenizer really adds one
    records = [PreferencePair("the film was", " great fun", " awful", "x:1"),
               PreferencePair("", " good", " bad", "x:2"),
               Completion("the plot", " was slow", "x:3")]
    examples, _ = tokenize_examples(records, tokenizer, TokenizeConfig())
    assert [e.prompt_ids.count(bos) for e in examples] == [1, 1, 1]
    assert all(e.prompt_ids[0] == bos for e in examples)
    assert examples[1].prompt_ids == (bos,)  # an empty prompt is the BOS alone
    for example, record in zip(examples, records):
        texts = (record.chosen, record.rejected) if isinstance(record, PreferencePair) else (record.completion,)
        for ids, text in zip(example.responses, texts):
            assert bos not in ids
            assert list(ids) == tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]

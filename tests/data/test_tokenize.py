"""Tokenisation rules: boundary, EOS, chat templates, truncation, filtering (see dpokit/tokenize.py)."""

import re

import pytest
from tokenizers import processors

from dpokit.data.records import Completion, PreferencePair
from dpokit.errors import ConfigError, DataError
from dpokit.data.tokenize import TokenizeConfig, tokenize_examples
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


MULTI_TURN = PreferencePair(
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "sure"}, {"role": "user", "content": "the film"}],
    [{"role": "assistant", "content": "was great"}],
    [{"role": "assistant", "content": "no"}, {"role": "assistant", "content": "was bad"}],  # two messages
    "multi.jsonl:1")
# Pinned ids. ChatML: <|im_start|> 1, <|im_end|> 2, "\n" 201, EOS 0. Llama 3: <|begin_of_text|> 320,
# <|start_header_id|> 321, <|end_header_id|> 322, <|eot_id|> 323. The shared words: "was great" 89 282 294 271 264,
# "no" 80 81, "was bad" 89 282 274 67 70, "assistant" 282 85 267 86 278 86.
PINNED = {
    "chatml": (
        [1, 85, 91, 85, 86, 71, 79, 201, 68, 71, 274, 84, 75, 71, 72, 2, 201, 1, 87, 85, 269, 201, 287, 263, 2, 201,
         1, 282, 85, 267, 86, 278, 86, 201, 85, 87, 271, 2, 201, 1, 87, 85, 269, 201, 86, 265, 283, 317, 2, 201,
         1, 282, 85, 267, 86, 278, 86, 201],
        [89, 282, 294, 271, 264, 2],
        [80, 81, 2, 201, 1, 282, 85, 267, 86, 278, 86, 201, 89, 282, 274, 67, 70, 2],
        "was great<|im_end|>", "no<|im_end|>\n<|im_start|>assistant\nwas bad<|im_end|>"),
    "llama3": (
        [320, 321, 85, 91, 85, 86, 71, 79, 322, 201, 201, 68, 71, 274, 84, 75, 71, 72, 323, 321, 87, 85, 269, 322,
         201, 201, 287, 263, 323, 321, 282, 85, 267, 86, 278, 86, 322, 201, 201, 85, 87, 271, 323, 321, 87, 85,
         269, 322, 201, 201, 86, 265, 283, 317, 323, 321, 282, 85, 267, 86, 278, 86, 322, 201, 201],
        [89, 282, 294, 271, 264, 323],
        [80, 81, 323, 321, 282, 85, 267, 86, 278, 86, 322, 201, 201, 89, 282, 274, 67, 70, 323],
        "was great<|eot_id|>", "no<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nwas bad<|eot_id|>"),
}


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_multi_turn_conversations_score_exactly_the_final_assistant_turns(template):
    """A prompt of system, user, assistant, user turns ends in the generation prompt; the scored tokens are the
    final assistant turn(s) the template renders, through the end-of-turn token (no EOS after it: <|eot_id|> is
    special although Llama 3 does not name it in a special-token slot); the BOS comes once, from the template."""
    tokenizer = make_tokenizer(chat_template=template)
    example, _ = _one(tokenizer, MULTI_TURN)
    prompt_ids, chosen_ids, rejected_ids, chosen_text, rejected_text = PINNED[template]
    assert list(example.prompt_ids) == prompt_ids
    assert [list(r) for r in example.responses] == [chosen_ids, rejected_ids]
    assert [tokenizer.decode(r) for r in example.responses] == [chosen_text, rejected_text]
    full = tokenizer.apply_chat_template(MULTI_TURN.prompt + MULTI_TURN.rejected, tokenize=False)
    assert tokenizer.decode(example.prompt_ids + example.responses[1]) == full.rstrip()
    assert tokenizer.eos_token_id not in example.prompt_ids + example.responses[0] + example.responses[1]


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_apply_chat_template_tokenises_plain_text_exactly_like_conversational_data(template):
    tokenizer = make_tokenizer(chat_template=template)
    plain = [PreferencePair("the film", "was great", "was bad", "a:1"), Completion("", "sure", "a:2")]
    chat = [PreferencePair([{"role": "user", "content": "the film"}], [{"role": "assistant", "content": "was great"}],
                           [{"role": "assistant", "content": "was bad"}], "a:1"),
            Completion([{"role": "user", "content": ""}], [{"role": "assistant", "content": "sure"}], "a:2")]
    wrapped = [_one(tokenizer, r, apply_chat_template=True)[0] for r in plain]
    assert wrapped == [_one(tokenizer, r)[0] for r in chat]
    assert tokenizer.decode(wrapped[0].responses[0]) == PINNED[template][3]
    raw = _one(tokenizer, plain[0])[0]  # without the setting: raw text, prompt and response glued
    assert raw.prompt_ids == tuple(tokenizer("the film")["input_ids"]) and raw.responses[0][-1] == 0


def test_plain_text_with_a_chat_template_is_warned_with_the_count(tokenizer, chat_tokenizer):
    from dpokit.data.tokenize import plain_text_warning

    records = [PreferencePair("a", "b", "c", "x:1"), MULTI_TURN, Completion("d", "e", "x:3")]
    warning = plain_text_warning(records, chat_tokenizer, TokenizeConfig())
    assert warning.startswith("warning: 2 of 3 examples are plain text") and "--apply-chat-template" in warning
    assert plain_text_warning(records, chat_tokenizer, TokenizeConfig(apply_chat_template=True)) is None
    assert plain_text_warning(records, tokenizer, TokenizeConfig()) is None  # no template: raw text is right
    assert plain_text_warning([MULTI_TURN], chat_tokenizer, TokenizeConfig()) is None
    with pytest.raises(ConfigError, match="--apply-chat-template needs a tokenizer with a chat template"):
        tokenize_examples(records[:1], tokenizer, TokenizeConfig(apply_chat_template=True))


def test_a_template_that_refuses_a_conversation_is_a_data_error_naming_the_record():
    tokenizer = make_tokenizer(chat_template=True)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('no system turns') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match="multi.jsonl:1: the chat template refused the conversation: no system"):
        _one(tokenizer, MULTI_TURN)


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
    tokenizer = _bos_tokenizer()
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


# --- the batched, chunked implementation against the per-row reference ------------------------------------------

def reference_tokenize_examples(records, tokenizer, config):
    """dpokit's tokenisation before the chunked numpy implementation (commit 7a49e62), kept as the reference: the
    rules applied record by record on Python lists. Returns (examples, report) or raises as it did."""
    from dpokit.data.chat import render_chat
    from dpokit.data.tokenize import FilterReport, TokenizedExample

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
    # rules version 2: tokens added as special count as special even outside the named slots
    specials = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    bos = tokenizer.bos_token_id
    start = bos if bos is not None else eos
    report = FilterReport()
    examples = []

    def truncate(ids, limit, mode):
        keep_bos = bos is not None and ids and ids[0] == bos
        head, body = (ids[:1], ids[1:]) if keep_bos else ([], ids)
        room = limit - len(head)
        body = body[-room:] if mode == "keep_end" else body[:room]
        return head + body

    rendered = []
    for record in records:
        responses = (record.chosen, record.rejected) if isinstance(record, PreferencePair) else (record.completion,)
        if isinstance(record.prompt, list):
            prompt_text, texts = render_chat(tokenizer, record.prompt, responses, record.source)
            rendered.append((prompt_text, False, texts))
        else:
            rendered.append((record.prompt, True, list(responses)))
    for record, (prompt, special, texts) in zip(records, rendered):
        prompt_ids = list(tokenizer(prompt, add_special_tokens=special)["input_ids"])
        if special and len(prompt_ids) > 1 and prompt_ids[-1] == eos:
            prompt_ids = prompt_ids[:-1]
        if not prompt_ids:
            prompt_ids = [start]
        resps = []
        for text in texts:
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids or ids[-1] not in specials:
                ids.append(eos)
            resps.append(ids)
        if len(resps) == 2 and resps[0] == resps[1]:
            report.add("identical chosen and rejected", record.source)
            continue
        longest = max(len(r) for r in resps)
        if len(prompt_ids) + longest > config.max_length and len(prompt_ids) > config.max_prompt_length:
            prompt_ids = truncate(prompt_ids, config.max_prompt_length, config.truncation)
            report.prompts_truncated += 1
        if len(prompt_ids) + longest > config.max_length:
            report.add(f"longer than max_length={config.max_length} after prompt truncation", record.source)
            continue
        examples.append(TokenizedExample(tuple(prompt_ids), tuple(tuple(r) for r in resps), record.source))
    report.kept = len(examples)
    if report.filtered and config.on_filtered == "error":
        raise DataError(f"{report.summary()} (pass --on-filtered skip to drop them instead)")
    if not examples:
        raise DataError(f"no usable examples left after tokenisation: {report.summary()}")
    return examples, report


def _eos_appending_tokenizer():
    """The test tokenizer with a post-processor that appends EOS to every encoding with special tokens."""
    tokenizer = make_tokenizer()
    eos = "<|endoftext|>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, tokenizer.eos_token_id)])
    return tokenizer


def _bos_chat_tokenizer():
    tokenizer = make_tokenizer(chat_template=True)
    bos = "<|im_start|>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    tokenizer.bos_token = bos
    return tokenizer


def varied_records(n: int, seed: int, chat: bool = False, mixed: bool = False) -> list:
    """Records exercising every rule: empty, short and long prompts, identical and nearly identical responses,
    responses ending in special-token text, empty-after-render responses, repeated texts, pairs and completions."""
    import random

    from helpers import WORDS

    rng = random.Random(seed)

    def text(lo, hi, space=True):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
        return (" " if space and rng.random() < 0.7 else "") + words

    records = []
    shared_prompt = text(3, 30, space=False)
    for i in range(n):
        kind = rng.random()
        prompt = "" if kind < 0.08 else shared_prompt if kind < 0.2 else text(1, 60 if kind < 0.7 else 150, False)
        chosen = text(1, 40)
        roll = rng.random()
        if roll < 0.08:
            rejected = chosen  # identical
        elif roll < 0.14:
            rejected, chosen = chosen + "<|endoftext|>", chosen  # identical once EOS is appended
        elif roll < 0.2:
            rejected = text(1, 10) + rng.choice(["<|im_end|>", "<|endoftext|>", "<|im_start|>"])
        elif roll < 0.25:
            rejected = text(60, 120)  # long response: filtered at small max_length
        elif roll < 0.35:
            rejected = chosen.rsplit(" ", 1)[0] + " " + rng.choice(WORDS)  # differs in at most its last word
        else:
            rejected = text(1, 40)
        source = f"d.jsonl:{i + 1}"
        if chat and rng.random() < 0.6:
            messages = [{"role": "user", "content": prompt or "hi"}]
            if rng.random() < 0.3:
                messages = [{"role": "system", "content": text(1, 8, False)}] + messages
            records.append(PreferencePair(messages, [{"role": "assistant", "content": chosen}],
                                          [{"role": "assistant", "content": rejected if roll > 0.03 else " "}],
                                          source))
        elif mixed and rng.random() < 0.3:
            records.append(Completion(prompt, chosen, source))
        else:
            records.append(PreferencePair(prompt, chosen, rejected, source))
    return records


def _same(records, tokenizer, chunk_size, **settings):
    from dpokit.data.tokenize import tokenize_examples as batched

    config = TokenizeConfig(**settings)
    try:
        expected = reference_tokenize_examples(records, tokenizer, config)
    except (DataError, ConfigError) as error:
        with pytest.raises(type(error), match=re.escape(str(error))):
            batched(records, tokenizer, config, chunk_size=chunk_size)
        return None
    examples, report = batched(records, tokenizer, config, chunk_size=chunk_size)
    assert examples == expected[0]
    assert [type(t) for e in examples[:3] for t in e.prompt_ids] == [int] * sum(len(e.prompt_ids) for e in examples[:3])
    assert vars(report) == vars(expected[1])
    return report


def _bos_declared_eos_appending_tokenizer():
    """Appends EOS to every encoding and declares a BOS that it does not add: an empty prompt encodes to EOS."""
    tokenizer = _eos_appending_tokenizer()
    tokenizer.bos_token = "<|im_start|>"
    return tokenizer


TOKENIZERS = {
    "gpt2-style": lambda: make_tokenizer(),
    "bos": _bos_tokenizer,
    "eos-appending": _eos_appending_tokenizer,
    "bos-declared-eos-appending": _bos_declared_eos_appending_tokenizer,
    "chat": lambda: make_tokenizer(chat_template=True),
    "bos-chat": _bos_chat_tokenizer,
}


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("settings", [
    dict(),  # nothing truncated
    dict(max_length=64, max_prompt_length=24, truncation="keep_end"),
    dict(max_length=64, max_prompt_length=24, truncation="keep_start"),
    dict(max_length=40, max_prompt_length=1, truncation="keep_end"),  # a kept BOS leaves no room
    dict(max_length=40, max_prompt_length=1, truncation="keep_start"),
    dict(max_length=48, max_prompt_length=16, on_filtered="error"),
])
def test_batched_tokenisation_equals_the_per_row_reference(name, settings):
    tokenizer = TOKENIZERS[name]()
    chat = tokenizer.chat_template is not None
    records = varied_records(300, seed=len(name), chat=chat, mixed=not chat)
    report = _same(records, tokenizer, chunk_size=37, **settings)  # chunk boundaries everywhere
    if report is not None and settings.get("max_length"):
        assert report.prompts_truncated and report.filtered  # the rules were exercised


def test_batched_tokenisation_equal_for_any_chunk_size_and_single_records(tokenizer, chat_tokenizer):
    records = varied_records(120, seed=7, mixed=True)
    for chunk_size in (1, 2, 1000):
        _same(records, tokenizer, chunk_size, max_length=64, max_prompt_length=24)
    chats = varied_records(60, seed=8, chat=True)
    _same(chats, chat_tokenizer, 5, max_length=64, max_prompt_length=24)
    for record in records[:30]:
        _same([record], tokenizer, 1000, max_length=64, max_prompt_length=24)


def test_batched_tokenisation_edge_cases(tokenizer):
    # everything filtered; nothing at all; all prompts empty; one identical pair in the middle of a chunk
    _same([PreferencePair("a", " x", " x", "d:1"), PreferencePair("b", " y", " y", "d:2")], tokenizer, 1000)
    _same([], tokenizer, 1000)
    _same([PreferencePair("", " x", " y", "d:1"), PreferencePair("", " y", " x", "d:2")], tokenizer, 1000)
    _same([PreferencePair("a", " x", " y", "d:1"), PreferencePair("a", " z", " z", "d:2"),
           PreferencePair("a", " y", " x", "d:3")], tokenizer, 1000)
    # same-length responses that differ in exactly one token are not identical
    from helpers import WORDS

    single = [w for w in WORDS if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1][:2]
    assert len(single) == 2
    _same([PreferencePair("a", " the film" + " " + single[0], " the film" + " " + single[1], "d:1"),
           PreferencePair("a", " " + single[0], " " + single[1], "d:2")], tokenizer, 1000)
    # empty responses (validation rejects them, tokenisation still defines them): EOS alone, even after a
    # response that ends with a special token
    _same([PreferencePair("a", " x<|endoftext|>", "", "d:1"), Completion("b", "", "d:2"),
           PreferencePair("", "", " y", "d:3")], tokenizer, 1000)


def test_the_tokenizer_is_called_once_per_chunk_and_kind_of_text(monkeypatch):
    """No per-row tokenizer calls: a chunk of records costs one call for its prompts and one for its responses
    (plus one for rendered chat prompts), and a text repeated in a chunk is tokenised once."""
    from dpokit.data.tokenize import tokenize_examples as batched

    tokenizer = make_tokenizer()
    calls = []
    real = type(tokenizer).__call__

    def counting(self, text, *a, **k):
        calls.append(len(text) if isinstance(text, list) else 1)
        return real(self, text, *a, **k)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    records = [PreferencePair("the same prompt", f" good {i % 7}", f" bad {i}", f"d:{i}") for i in range(2500)]
    examples, _ = batched(records, tokenizer, TokenizeConfig(), chunk_size=1000)
    assert len(examples) == 2500
    # per chunk: the shared prompt once; its 7 distinct chosen and 1000 (or 500) rejected responses
    assert calls == [1, 1007, 1, 1007, 1, 507]

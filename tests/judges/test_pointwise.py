"""Tests for dpokit.judges.pointwise."""

import math

import pytest

from dpokit.errors import ConfigError
from dpokit.judges.pointwise import POSITIVE_THRESHOLD, classifier_judge, function_judge, reward_judge, vader_judge
from dpokit.judges.loader import load_judge

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: extra threads only contend (conftest.py)


def text_length(text: str) -> float:  # used through load_judge("test_pointwise:...") below
    return float(len(text))


def test_vader_positive_negative():
    judge = vader_judge()
    pos, neg, neu = judge(["This movie is wonderful, a great film!", "An awful, boring and terrible mess.", "The film"])
    assert pos > 0.5 and neg < -0.5
    assert abs(neu) <= POSITIVE_THRESHOLD
    assert all(-1.0 <= s <= 1.0 for s in (pos, neg, neu))
    assert judge([]) == []


def test_function_judge():
    judge = function_judge(lambda t: t.count("a"))
    assert judge(["a", "banana", ""]) == [1.0, 3.0, 0.0]
    assert all(isinstance(x, float) for x in judge(["aa"]))
    with pytest.raises(ConfigError):
        function_judge(42)


def test_load_judge_specs(monkeypatch):
    v = load_judge("vader")
    assert v(["great"])[0] > POSITIVE_THRESHOLD
    assert load_judge(" VADER ")(["awful"])[0] < 0
    f = load_judge("builtins:len")
    assert f(["abc", ""]) == [3.0, 0.0]
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    assert load_judge("test_pointwise:text_length")(["abc"]) == [3.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("nonsense", "bad judge spec"),
        ("math:", "bad judge spec"),
        ("no_such_module_xyz:f", "cannot import"),
        ("math:no_such_function", "no attribute"),
        ("math:pi", "not callable"),
        ("classifier:onlypath", "classifier:PATH:LABEL"),
        ("classifier:/no/such/dir:POSITIVE", "not a local model directory"),
    ],
)
def test_load_judge_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_judge(spec)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("clf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a great film", "an awful film", "the acting is wonderful", "boring plot"] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(fast), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                     num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
                     pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    GPT2ForSequenceClassification(cfg).save_pretrained(path)
    return str(path)


def test_classifier_judge(tiny_classifier):
    texts = ["a great film", "an awful film that goes on and on", "x", "the acting is wonderful"]
    pos = classifier_judge(tiny_classifier, "POSITIVE", batch_size=3)(texts)
    neg = classifier_judge(tiny_classifier, "negative")(texts)  # case-insensitive fallback
    assert len(pos) == len(texts) == len(neg)
    assert all(0.0 <= p <= 1.0 for p in pos + neg)
    assert all(math.isclose(p + n, 1.0, abs_tol=1e-5) for p, n in zip(pos, neg))
    # batching does not change the scores (padding is handled)
    single = classifier_judge(tiny_classifier, "POSITIVE", batch_size=1)(texts)
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(pos, single))
    via_spec = load_judge(f"classifier:{tiny_classifier}:POSITIVE")(texts)
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(pos, via_spec))


def test_classifier_judge_unknown_label(tiny_classifier):
    with pytest.raises(ConfigError, match="NEGATIVE, POSITIVE"):
        classifier_judge(tiny_classifier, "joy")
    with pytest.raises(ConfigError, match="not one of"):
        load_judge(f"classifier:{tiny_classifier}:neutral")


def test_reward_judge_returns_the_raw_score_of_a_one_output_model(tiny_classifier, tmp_path):
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})  # not EOS, so that an appended EOS is pooled, not padding
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64, num_labels=1,
                     pad_token_id=tokenizer.pad_token_id, initializer_range=0.5)
    model = GPT2ForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    texts = ["a great film", "an awful film that goes on and on", "x"]
    with torch.no_grad():  # one text at a time: no padding
        expected = [model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    assert max(expected) - min(expected) > 0.1 and not all(0 <= e <= 1 for e in expected)  # raw, not a probability
    assert reward_judge(str(tmp_path), batch_size=2)(texts) == pytest.approx(expected, abs=1e-5)
    assert load_judge(f"reward:{tmp_path}")(texts) == pytest.approx(expected, abs=1e-5)
    with torch.no_grad():  # append_eos: the text then EOS, as dpokit trains a reward model
        with_eos = [model(torch.tensor([tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]])).logits[0, 0].item()
                    for t in texts]
    assert with_eos != pytest.approx(expected, abs=1e-3)
    assert reward_judge(str(tmp_path), batch_size=2, append_eos=True)(texts) == pytest.approx(with_eos, abs=1e-5)
    with pytest.raises(ConfigError, match="has 2 outputs, a reward model has one"):
        load_judge(f"reward:{tiny_classifier}")
    with pytest.raises(ConfigError, match="expected 'reward:PATH'"):
        load_judge("reward:")

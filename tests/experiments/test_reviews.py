"""Tests for the generated movie-review corpus (dpokit.experiments.reviews)."""

import re

import pytest

from dpokit.experiments import reviews
from dpokit.experiments.reviews import generate_labeled_reviews, generate_reviews, review_prefixes


@pytest.fixture(scope="module")
def vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    a = SentimentIntensityAnalyzer()
    return lambda t: a.polarity_scores(t)["compound"]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small byte-level BPE tokenizer trained on the corpus (like the shipped one, built here)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(generate_reviews(2000, seed=5), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_deterministic_given_seed():
    assert generate_reviews(50, seed=3) == generate_reviews(50, seed=3)
    assert generate_reviews(50, seed=3) != generate_reviews(50, seed=4)
    assert generate_reviews(0, seed=1) == []


def test_shape_of_reviews():
    for text in generate_reviews(300, seed=11):
        n_sent = len(re.findall(r"[.!:](?:\s|$)", text))
        assert 2 <= n_sent <= 6, text  # 2-5 sentences (a "My review of X:" opening adds a colon)
        assert text[0].isupper() and text[-1] in ".!"
        assert "  " not in text and "{" not in text


def test_variety():
    texts = generate_reviews(200, seed=7)
    assert len(set(texts)) >= 0.9 * len(texts)
    words = {w.strip(".,!:'").lower() for t in generate_reviews(3000, seed=7) for w in t.split()}
    assert len(words) >= 500
    openings = {" ".join(t.split()[:2]) for t in texts}
    assert len(openings) >= 10


def test_sentiment_mix_and_classes(vader):
    labeled = generate_labeled_reviews(1500, seed=2)
    by = {s: [vader(t) for c, t in labeled if c == s] for s in ("positive", "negative", "neutral")}
    shares = {s: len(v) / len(labeled) for s, v in by.items()}
    assert abs(shares["positive"] - 0.4) < 0.05 and abs(shares["negative"] - 0.4) < 0.05
    assert sum(x > 0.05 for x in by["positive"]) / len(by["positive"]) > 0.95
    assert sum(x < -0.05 for x in by["negative"]) / len(by["negative"]) > 0.85
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(by["positive"]) > 0.6 and mean(by["negative"]) < -0.5
    assert mean(by["negative"]) < mean(by["neutral"]) < mean(by["positive"])
    # the mix parameter is honoured
    only_pos = generate_labeled_reviews(100, seed=2, sentiment_mix=(1.0, 0.0, 0.0))
    assert {c for c, _ in only_pos} == {"positive"}
    assert [t for _, t in labeled[:20]] == generate_reviews(20, seed=2)[:20]
    with pytest.raises(ValueError):
        generate_reviews(5, seed=0, sentiment_mix=(0.0, 0.0, 0.0))


def test_prefixes_token_counts(bpe_tokenizer):
    prefixes = review_prefixes(200, seed=1, tokenizer=bpe_tokenizer)
    assert len(prefixes) == 200
    counts = [len(bpe_tokenizer.encode(p, add_special_tokens=False)) for p in prefixes]
    assert all(2 <= c <= 8 for c in counts)
    assert len(set(counts)) >= 4  # a spread of lengths
    assert len(set(prefixes)) >= 40
    assert review_prefixes(30, seed=1, tokenizer=bpe_tokenizer) == prefixes[:30]
    short = review_prefixes(50, seed=2, tokenizer=bpe_tokenizer, min_tokens=3, max_tokens=4)
    assert all(3 <= len(bpe_tokenizer.encode(p, add_special_tokens=False)) <= 4 for p in short)


def test_prefixes_are_decoded_token_prefixes(bpe_tokenizer):
    """A prefix cut at a word boundary equals the decoded first k tokens of a review starting with it."""
    for p in review_prefixes(100, seed=3, tokenizer=bpe_tokenizer):
        ids = bpe_tokenizer.encode(p + " and it was great.", add_special_tokens=False)
        k = len(bpe_tokenizer.encode(p, add_special_tokens=False))
        assert bpe_tokenizer.decode(ids[:k]) == p


def test_prefixes_are_sentiment_neutral(vader, bpe_tokenizer):
    prefixes = review_prefixes(300, seed=4, tokenizer=bpe_tokenizer)
    assert all(vader(p) == 0.0 for p in prefixes), [p for p in prefixes if vader(p) != 0.0]


def test_neutral_vocabulary_is_unscored():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lex = SentimentIntensityAnalyzer().lexicon
    pools = [v for k, v in vars(reviews).items() if k.endswith("_NEU") or k in ("_FIRST_NAMES", "_SURNAME_HEADS")]
    words = {w.lower() for pool in pools for item in pool for part in (item if isinstance(item, tuple) else (item,))
             for w in part.split()}
    assert words and not sorted(w for w in words if w in lex)


def test_base_model_path():
    path = reviews.base_model_path()
    assert path.replace("\\", "/").endswith("dpokit/assets/base")

"""Reference log-probs: the cache equals the model, is reused when nothing changed, and invalidated otherwise."""

import pytest
import torch

from dpokit.data.batching import collate
from dpokit.data.records import PreferencePair
from dpokit.train.reference import (CachedReference, ModelReference, cached_reference_logps, compute_reference_logps,
                              weights_digest)
from dpokit.data.tokenize import TokenizeConfig, tokenize_examples
from helpers import make_llama, make_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: extra threads only contend (conftest.py)

PAIRS = [PreferencePair(f"the film {w}", f" was great {w}", f" was bad {w}", f"d:{i}")
         for i, w in enumerate("a b c d e f".split())]


def _examples(tokenizer, **settings):
    return tokenize_examples(PAIRS, tokenizer, TokenizeConfig(**settings))[0]


def _cache(model, tokenizer, examples, tmp_path):
    return cached_reference_logps(ModelReference(model), weights_digest(model), tokenizer, examples, tmp_path,
                                  batch_size=4, layout="packed", chunked=True, log=lambda *_: None)


def test_cached_table_equals_the_model(tokenizer, tmp_path):
    model, examples = make_llama(), _examples(tokenizer)
    table, path, reused = _cache(model, tokenizer, examples, tmp_path)
    assert not reused and path.exists() and table.shape == (len(examples), 2)
    ids = [3, 0, 5]
    batch = collate([examples[i] for i in ids], ids)
    torch.testing.assert_close(CachedReference(table)(batch), ModelReference(model)(batch), rtol=1e-5, atol=1e-5)


def test_cache_is_reused_only_when_nothing_changed(tokenizer, tmp_path):
    model, examples = make_llama(), _examples(tokenizer)
    _, first, _ = _cache(model, tokenizer, examples, tmp_path)
    _, again, reused = _cache(model, tokenizer, examples, tmp_path)
    assert reused and again == first

    other_weights = make_llama(seed=1)
    assert _cache(other_weights, tokenizer, examples, tmp_path)[1] != first
    other_data = examples[:-1]
    assert _cache(model, tokenizer, other_data, tmp_path)[1] != first
    longest = max(max(map(len, e.responses)) for e in examples)
    truncated = _examples(tokenizer, max_length=longest + 2, max_prompt_length=2)  # a tokenisation setting
    assert truncated != examples
    assert _cache(model, tokenizer, truncated, tmp_path)[1] != first
    other_tokenizer = make_tokenizer()
    other_tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    assert _cache(model, other_tokenizer, examples, tmp_path)[1] != first
    assert len(list(tmp_path.glob("*.safetensors"))) == 5


def test_cache_key_covers_how_log_probs_are_computed(tokenizer, tmp_path):
    """`chunked` (the chunked log-softmax of dpokit.models.logprobs, or the full one) is part of the key: a table
    computed one way is never reused for the other, whose float sums may differ in the last bits."""
    model, examples = make_llama(), _examples(tokenizer)
    runs = {}
    for chunked in (True, False):
        runs[chunked] = cached_reference_logps(ModelReference(model, chunked=chunked), weights_digest(model), tokenizer,
                                               examples, tmp_path, batch_size=4, layout="packed", chunked=chunked,
                                               log=lambda *_: None)
    assert not runs[True][2] and not runs[False][2]
    assert runs[True][1] != runs[False][1] and len(list(tmp_path.glob("*.safetensors"))) == 2
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-5)
    assert _cache(model, tokenizer, examples, tmp_path)[1:] == (runs[True][1], True)  # each way's own table reused


def test_reference_model_is_frozen(tokenizer):
    model = make_llama().train()
    reference = ModelReference(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    batch = collate(_examples(tokenizer), range(len(PAIRS)))
    assert reference(batch).grad_fn is None


@pytest.mark.slow
def test_precomputed_reference_trains_exactly_like_a_resident_one(tmp_path, tokenizer):
    import json

    from dpokit.api import train_dpo
    from dpokit.config import TrainConfig
    from dpokit.train.metrics import read_metrics

    model_dir = tmp_path / "base"
    make_llama().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in PAIRS * 3))
    losses = {}
    for precompute in (False, True):
        out = tmp_path / f"run-{precompute}"
        train_dpo(TrainConfig(model=str(model_dir), data=str(data), output=str(out), batch_size=4, max_steps=3,
                              lr=1e-3, optimizer="adamw", warmup_steps=0, precompute_ref=precompute,
                              save_final=False))
        losses[precompute] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
        assert (out / "ref_cache").exists() == precompute
    assert losses[True] == pytest.approx(losses[False], abs=1e-6)


def test_precompute_runs_without_gradients_longest_first(tokenizer):
    # the reference pass builds no autograd graph, and batches come longest example first (less padding)
    examples = _examples(tokenizer) + tokenize_examples(
        [PreferencePair("the film the film the film", " was good good good", " was bad", "long:0")], tokenizer,
        TokenizeConfig())[0]
    seen = []

    def reference(batch):
        seen.append((torch.is_grad_enabled(), batch.example_ids.tolist()))
        return torch.ones(batch.num_sequences)

    table = compute_reference_logps(reference, examples, batch_size=3, layout="packed", pad_token_id=0)
    assert table.shape == (len(examples), 2) and bool((table == 1).all())
    assert [grad for grad, _ in seen] == [False, False, False]
    order = [i for _, ids in seen for i in ids]
    assert sorted(order) == list(range(len(examples))) and order[0] == len(examples) - 1
    lengths = [examples[i].length for i in order]
    assert lengths == sorted(lengths, reverse=True)

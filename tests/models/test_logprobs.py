"""Log-probs: every layout and the chunked path give the plain, full-logits numbers and gradients."""

import random
import warnings

import pytest
import torch
from torch import nn

from dpokit.data.batching import collate
from dpokit.data.records import PreferencePair
from dpokit.train.engine import Scorer
from dpokit.models.attention import sliding_window
from dpokit.models.logprobs import check_layout, sequence_logprobs, supports_chunked_logits
from dpokit.data.tokenize import TokenizeConfig, TokenizedExample, tokenize_examples
from helpers import WORDS, make_gpt2, make_llama, make_mistral

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: extra threads only contend (conftest.py)


@pytest.fixture(scope="module")
def examples(tokenizer):
    rng = random.Random(0)

    def text(n):
        return " " + " ".join(rng.choice(WORDS) for _ in range(n))

    pairs = [PreferencePair(text(rng.randint(1, 15)), text(rng.randint(1, 9)), text(rng.randint(1, 12)), f"r{i}")
             for i in range(7)]
    return tokenize_examples(pairs, tokenizer, TokenizeConfig(max_length=128, max_prompt_length=64))[0]


def _logps_and_grads(model, examples, layout, chunked, chunk_size=1024):
    model.zero_grad()
    logps = sequence_logprobs(model, collate(examples, range(len(examples)), layout=layout), chunked=chunked,
                              chunk_size=chunk_size)
    (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()  # unequal weights, like a real loss
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return logps.detach(), grads


@pytest.mark.parametrize("family", [make_llama, make_gpt2])
@pytest.mark.parametrize("layout,chunked", [("plain", True), ("shared", False), ("shared", True),
                                            ("packed", False), ("packed", True)])
def test_optimised_paths_equal_plain_full_logits(examples, family, layout, chunked):
    model = family()
    base_logps, base_grads = _logps_and_grads(model, examples, "plain", False)
    logps, grads = _logps_and_grads(model, examples, layout, chunked, chunk_size=7)
    torch.testing.assert_close(logps, base_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads, base_grads, rtol=1e-5, atol=1e-5)


def test_logps_are_sums_of_token_logprobs(examples):
    model = make_llama()
    batch = collate(examples[:1], [0], layout="plain")
    e = examples[0]
    with torch.no_grad():
        logits = model(batch.input_ids[:1]).logits[0].float().log_softmax(-1)
        p = len(e.prompt_ids)
        expected = sum(logits[p - 1 + k, t].item() for k, t in enumerate(e.responses[0]))
        got = sequence_logprobs(model, batch)[0].item()
    assert got == pytest.approx(expected, abs=1e-4)


def test_lm_head_bias_is_included(examples):
    model = make_llama()
    head = nn.Linear(32, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_()
    model.lm_head = head
    base_logps, base_grads = _logps_and_grads(model, examples, "plain", False)
    logps, grads = _logps_and_grads(model, examples, "packed", True)
    torch.testing.assert_close(logps, base_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads, base_grads, rtol=1e-5, atol=1e-5)


def test_models_that_transform_logits_use_the_full_path(examples):
    model = make_llama()
    model.config.final_logit_softcapping = 30.0
    assert not supports_chunked_logits(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logps = sequence_logprobs(model, collate(examples, range(len(examples))))
    assert any("full logits" in str(w.message) for w in caught)
    assert torch.isfinite(logps).all()


def test_bfloat16_model_gives_float32_logps_close_to_float32(examples):
    model = make_llama()
    reference = sequence_logprobs(model, collate(examples, range(len(examples))))
    logps = sequence_logprobs(model.to(torch.bfloat16), collate(examples, range(len(examples))))
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, reference, rtol=3e-2, atol=0.5)


class _IgnoresCustomMasks(nn.Module):
    """A stand-in for a model family that drops 4-D masks and uses plain causal attention instead."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask, position_ids = None, None
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    def get_output_embeddings(self):
        return None  # forces the full path, which goes through forward()


def test_check_layout_falls_back_to_plain_for_models_that_ignore_the_mask(examples):
    good = make_llama()
    assert check_layout(Scorer(good), examples, "packed", 0, device="cpu", max_length=512) == "packed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_layout(Scorer(_IgnoresCustomMasks(make_llama())), examples, "shared", 0, device="cpu",
                            max_length=512) == "plain"
    assert any("does not support the shared layout" in str(w.message) for w in caught)


def test_check_layout_tries_a_sliding_window_model_past_its_window(monkeypatch):
    """Sequences may outrun the window while the few examples checked do not: check_layout adds one that does,
    so a layout whose masks lack the window falls back to plain, and one whose masks have it is kept."""
    import dpokit.models.attention as attention

    short = [TokenizedExample(tuple(range(1, 6)), (tuple(range(40, 45)), tuple(range(60, 66))))]  # 11 tokens
    model = make_mistral(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no warning
        assert check_layout(Scorer(model), short, "shared", 0, device="cpu", max_length=512) == "shared"
        assert check_layout(Scorer(model), short, "packed", 0, device="cpu", max_length=None) == "packed"
    monkeypatch.setattr(attention, "_by_layer_type", lambda model, full, windowed: full)  # masks without the window
    assert check_layout(Scorer(model), short, "shared", 0, device="cpu", max_length=16) == "shared"  # cannot tell
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_layout(Scorer(model), short, "shared", 0, device="cpu", max_length=17) == "plain"
    assert any("longer than its sliding window of 16 tokens" in str(w.message) for w in caught)


def test_sliding_window_reads_the_models_config():
    from transformers import Gemma3TextConfig, Qwen2Config

    assert sliding_window(make_mistral(16)) == 16
    assert sliding_window(make_mistral(None)) is None
    assert sliding_window(make_llama()) is None
    qwen = Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, sliding_window=16, use_sliding_window=False)
    gemma = Gemma3TextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16)
    holder = torch.nn.Module()
    for config, expected in ((qwen, None), (gemma, 16)):
        holder.config = config
        assert sliding_window(holder) == expected


@pytest.mark.parametrize("layout,chunked", [("plain", False), ("packed", True), ("shared", True)])
def test_wpo_alignment_logprobs_by_hand(examples, layout, chunked):
    """WPO's weight exponent per response: mean over its tokens of log p(y_t) - log sum_v p(v)^2, from full logits."""
    model = make_llama(initializer_range=0.3)
    batch = collate(examples[:3], [0, 1, 2], layout=layout)
    expected = []
    with torch.no_grad():
        for e in examples[:3]:
            for response in e.responses:
                ids = torch.tensor([list(e.prompt_ids) + list(response)])
                logp = model(ids).logits[0].float().log_softmax(-1)
                p = len(e.prompt_ids)
                terms = [logp[p - 1 + k, t] - torch.logsumexp(2 * logp[p - 1 + k], -1) for k, t in enumerate(response)]
                expected.append(torch.stack(terms).mean())
        got = Scorer(model, chunked=chunked)(batch, alignment=True)
    assert not got.requires_grad
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert got.std() > 0.01  # responses differ: not a constant


def test_the_in_place_logsumexp_is_torchs_bit_for_bit():
    from dpokit.models.logprobs import _exp_shifted_

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 500, generator=generator) * 10
    logits[0, 3] = float("-inf")  # a masked logit
    logits[1] = float("-inf")  # a row with nothing allowed: -inf, as torch gives
    expected = torch.logsumexp(logits, dim=-1)
    maxes, sums = _exp_shifted_(logits.clone())
    assert torch.equal(sums.log().add_(maxes), expected)


@pytest.fixture
def kept_softmax(monkeypatch):
    """Records, for every pass through the chunked output layer, whether it kept its softmax for the backward."""
    import dpokit.models.logprobs as logprobs

    kept = []
    real_forward = logprobs._ChunkedTargetLogProb.forward

    def forward(ctx, *args):
        out = real_forward(ctx, *args)
        kept.append(ctx.softmax is not None)
        return out

    monkeypatch.setattr(logprobs._ChunkedTargetLogProb, "forward", staticmethod(forward))
    return kept


@pytest.mark.parametrize("keep_bytes", [0, 2**30], ids=["recomputed", "kept"])
def test_the_output_layer_backward_from_a_kept_or_recomputed_softmax(examples, monkeypatch, kept_softmax,
                                                                     keep_bytes):
    """Both ways the chunked backward gets its softmax give the full-logits gradients, and say which they took."""
    import dpokit.models.logprobs as logprobs

    monkeypatch.setattr(logprobs, "KEEP_SOFTMAX_BYTES", keep_bytes)
    model = make_llama()
    base_logps, base_grads = _logps_and_grads(model, examples, "plain", False)
    logps, grads = _logps_and_grads(model, examples, "packed", True, chunk_size=7)
    assert kept_softmax == [keep_bytes > 0]
    torch.testing.assert_close(logps, base_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads, base_grads, rtol=1e-5, atol=1e-5)


def test_a_second_backward_through_a_kept_softmax_gives_the_same_gradients(examples):
    """The kept softmax is consumed in place by the first backward; a retained graph's second backward recomputes."""
    model = make_llama()
    logps = sequence_logprobs(model, collate(examples, range(len(examples)), layout="packed"), chunk_size=7)
    loss = (logps * torch.linspace(0.5, 1.5, len(logps))).sum()
    first = torch.autograd.grad(loss, model.lm_head.weight, retain_graph=True)[0]
    second = torch.autograd.grad(loss, model.lm_head.weight)[0]
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-6)
    assert first.abs().max() > 0


def test_no_softmax_is_kept_without_gradients(examples, kept_softmax):
    """A pass under torch.no_grad (the reference, a precompute or an evaluation of a trainable policy) keeps nothing
    for a backward that never comes, though the output layer's weight requires gradients."""
    model = make_llama()
    assert model.lm_head.weight.requires_grad
    with torch.no_grad():
        sequence_logprobs(model, collate(examples, range(len(examples)), layout="packed"), chunk_size=7)
    sequence_logprobs(model, collate(examples, range(len(examples)), layout="packed"), chunk_size=7)
    assert kept_softmax == [False, True]
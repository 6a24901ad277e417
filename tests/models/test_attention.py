"""dpokit.models.attention: the FlexAttention block mask and the per-segment SDPA calls give the dense shared/packed
mask's log-probs (and gradients), and the kernel choice rules (FlexAttention on CUDA and segments on CPU for the
block layouts, an error for training with FlexAttention on a CPU)."""

import pytest
import torch

from dpokit.api import EvalConfig, evaluate
import dpokit.models.attention as attention
from dpokit.models.attention import SEGMENTS, block_mask, choose_attention, model_mask, set_attention, uses_attention
from dpokit.data.batching import collate
from dpokit.errors import ConfigError
from dpokit.models.logprobs import sequence_logprobs
from dpokit.data.tokenize import TokenizedExample
from helpers import make_llama, make_mistral, make_mixed_window, make_tiny

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def eager_flex(monkeypatch):
    """transformers runs FlexAttention through torch.compile; its eager form computes the same masked attention
    (the reference implementation) without a C++ build, which keeps this test fast on CPU."""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(hf_flex.WrappedFlexAttention, "__call__", lambda self: flex_attention)


def _examples() -> list[TokenizedExample]:  # prompts and responses of different lengths: padding in every layout
    return [TokenizedExample(tuple(range(5 + i, 12 + 3 * i)), (tuple(range(20, 24 + 2 * i)), tuple(range(40, 42 + i))))
            for i in range(5)]


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_block_mask_admits_exactly_the_dense_masks_pairs(layout):
    batch = collate(_examples(), list(range(5)), layout=layout, pad_token_id=0)
    mask = block_mask(batch)
    rows, length = batch.token_example.shape
    q = torch.arange(length)[:, None].expand(length, length)
    k = torch.arange(length)[None, :].expand(length, length)
    for row in range(rows):
        b = torch.full_like(q, row)
        assert torch.equal(mask.mask_mod(b, None, q, k), batch.attention_mask[row])


SLIDING = {"mistral": lambda: make_mistral(16), "qwen2": lambda: make_mixed_window("qwen2", 16),
           "gemma2": lambda: make_mixed_window("gemma2", 16), "gemma3": lambda: make_mixed_window("gemma3", 16)}


def _past_window() -> list[TokenizedExample]:  # 16-34 tokens each: all but the first cross a 16-token window,
    # and the last one's prompt alone is longer than the window
    return [TokenizedExample(tuple(range(3 + i, 9 + 2 * i)), (tuple(range(20, 30 + 3 * i)), tuple(range(50, 55 + i))))
            for i in range(5)] + [TokenizedExample(tuple(range(60, 80)), ((81, 82, 83), (84, 85)))]


@pytest.mark.parametrize("layout", ["shared", "packed"])
@pytest.mark.parametrize("family", ["llama", *SLIDING])
def test_flex_attention_gives_the_plain_layouts_logprobs(layout, family, eager_flex):
    model = make_llama().eval() if family == "llama" else SLIDING[family]()
    examples = _examples() if family == "llama" else _past_window()
    ids = list(range(len(examples)))
    with torch.no_grad():
        plain = sequence_logprobs(model, collate(examples, ids, layout="plain", pad_token_id=0))
        model.set_attn_implementation("flex_attention")
        flex = sequence_logprobs(model, collate(examples, ids, layout=layout, pad_token_id=0))
    torch.testing.assert_close(flex, plain, rtol=0, atol=1e-5)


def test_dpokit_eval_with_flex_attention_matches_sdpa(tiny_model_dir, sentiment_data, eager_flex):
    common = dict(ref_model=tiny_model_dir, batch_size=16, threads=1)
    quiet = lambda *_: None  # noqa: E731
    sdpa = evaluate(EvalConfig(model=tiny_model_dir, data=sentiment_data["eval"], attention="sdpa", **common), quiet)
    flex = evaluate(EvalConfig(model=tiny_model_dir, data=sentiment_data["eval"], attention="flex", **common), quiet)
    for key in ("loss", "logps/chosen", "logps/rejected"):
        assert flex[key] == pytest.approx(sdpa[key], abs=1e-5)


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_segment_attention_gives_the_dense_masks_logprobs_and_gradients(layout, monkeypatch):
    monkeypatch.setattr(attention, "SEGMENTS_MIN_LENGTH", 0)  # these rows are short: force the per-segment calls
    model = make_llama(num_key_value_heads=1)  # grouped-query attention too
    examples = _examples() + [TokenizedExample((), ((50, 51, 52), (60, 61)))]  # and an empty prompt (SFT-like)
    batch = collate(examples, list(range(len(examples))), layout=layout, pad_token_id=0)
    _assert_segments_match_dense(model, batch)


@pytest.mark.parametrize("layout", ["shared", "packed"])
@pytest.mark.parametrize("family,kernel", [(f, k) for f in SLIDING for k in ("sdpa", SEGMENTS)
                                           if (f, k) != ("gemma2", "sdpa")])  # Gemma 2 cannot run SDPA
def test_block_layouts_apply_a_sliding_window(layout, family, kernel, monkeypatch):
    """Past the window, the block layouts' log-probs and gradients are the plain layout's: the mask of the sliding
    layers has the window (one mask per layer type where the model mixes them), and so do the segments kernel's
    per-segment masks, a prompt longer than the window included."""
    monkeypatch.setattr(attention, "SEGMENTS_MIN_LENGTH", 0)  # the per-segment calls for the full layers
    model = SLIDING[family]()
    examples = _past_window()
    results = {}
    for name, kernel_used, batch_layout in (("plain", None, "plain"), ("block", kernel, layout)):  # None: its own
        set_attention(model, kernel_used)
        model.zero_grad()
        logps = sequence_logprobs(model, collate(examples, list(range(6)), layout=batch_layout, pad_token_id=0))
        (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()
        results[name] = (logps.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["block"][0], results["plain"][0], rtol=1e-5, atol=1e-5)
    for block_grad, plain_grad in zip(results["block"][1], results["plain"][1]):
        torch.testing.assert_close(block_grad, plain_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3"])
def test_no_split_after_a_common_prompt_longer_than_the_window(family, monkeypatch):
    """The split's prefix call is plain causal: with every row's first prompt longer than the window, the sliding
    layers must take the dense (windowed) mask instead."""
    monkeypatch.setattr(attention, "SPLIT_MIN_PREFIX", 4)
    model = SLIDING[family]()
    examples = [TokenizedExample(tuple(range(60 - i, 80)), ((81, 82 + i, 83), (84, 85))) for i in range(3)]
    with torch.no_grad():
        plain = sequence_logprobs(model, collate(examples, [0, 1, 2], layout="plain", pad_token_id=0))
        set_attention(model, SEGMENTS)
        for layout in ("shared", "packed"):
            block = sequence_logprobs(model, collate(examples, [0, 1, 2], layout=layout, pad_token_id=0))
            torch.testing.assert_close(block, plain, rtol=1e-5, atol=1e-5)


def test_a_model_that_cannot_run_sdpa_keeps_its_own_attention():
    """Gemma 2 soft-caps its attention scores, which SDPA cannot: the segments kernel (SDPA calls) leaves it on
    its own kernel with the dense mask, and asking for SDPA outright is a clear error, not a crash mid-run."""
    model = SLIDING["gemma2"]()
    own = uses_attention(model)
    set_attention(model, choose_attention("auto", "cpu", "packed"))
    assert uses_attention(model) == own == "eager"
    with pytest.raises(ConfigError, match="--attention sdpa: Gemma2ForCausalLM cannot run it"):
        set_attention(model, choose_attention("sdpa", "cpu", "packed"))


def test_the_window_is_in_the_mask_only_when_an_example_reaches_past_it():
    short = [TokenizedExample((3, 4, 5), ((20, 21, 22), (30, 31)))]
    for make in SLIDING.values():
        model = make()
        assert isinstance(model_mask(collate(short, [0], layout="shared", pad_token_id=0), model), torch.Tensor)
    long = collate(_past_window(), list(range(6)), layout="shared", pad_token_id=0)
    mistral, gemma = SLIDING["mistral"](), SLIDING["gemma3"]()
    windowed = model_mask(long, mistral)  # every Mistral layer slides: one mask
    full = model_mask(long, make_llama())
    assert isinstance(windowed, torch.Tensor) and (windowed < 0).sum() > (full < 0).sum()
    per_type = model_mask(long, gemma)
    assert set(per_type) == {"full_attention", "sliding_attention"}
    assert torch.equal(per_type["full_attention"], full) and torch.equal(per_type["sliding_attention"], windowed)
    row = int(long.position_ids.max(dim=1).values.argmax())  # the longest example's row
    q = int(long.position_ids[row].argmax())  # its last chosen token, 31 positions after the row's first
    assert full[row, 0, q, 0] == 0 and windowed[row, 0, q, 0] < 0


# Other popular families (helpers.make_tiny), with their own fields; "-sw": a sliding window of 16
FAMILIES = {
    "qwen3": ("Qwen3", dict(head_dim=8)),
    "qwen3-sw": ("Qwen3", dict(head_dim=8, use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    "phi3-sw": ("Phi3", dict(sliding_window=16, pad_token_id=0)),
    "starcoder2-sw": ("Starcoder2", dict(sliding_window=16)),
    "mixtral-sw": ("Mixtral", dict(sliding_window=16, num_local_experts=2, num_experts_per_tok=1)),
    "gemma": ("Gemma", dict(head_dim=8)),
    "olmo2": ("Olmo2", dict(eos_token_id=0, pad_token_id=0)),
    "gpt-neox": ("GPTNeoX", {}),
    "phi": ("Phi", {}),
    "granite": ("Granite", {}),
    "smollm3": ("SmolLM3", dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_block_layouts_give_the_plain_layouts_logprobs_across_families(family, monkeypatch):
    """What `--layout packed` and `--attention auto` do on a CPU, through each family's own attention code: the
    per-segment calls and the two-call split both run (thresholds lowered for these short rows), and sequences
    reach past the window of the sliding-window families."""
    monkeypatch.setattr(attention, "SEGMENTS_MIN_LENGTH", 24)
    monkeypatch.setattr(attention, "SPLIT_MIN_PREFIX", 4)
    name, own = FAMILIES[family]
    model = make_tiny(name, **own)
    examples = _past_window()
    with torch.no_grad():
        plain = sequence_logprobs(model, collate(examples, list(range(6)), layout="plain", pad_token_id=0))
        for layout in ("shared", "packed"):
            set_attention(model, choose_attention("auto", "cpu", layout))
            block = sequence_logprobs(model, collate(examples, list(range(6)), layout=layout, pad_token_id=0))
            torch.testing.assert_close(block, plain, rtol=1e-5, atol=1e-5)


def _assert_segments_match_dense(model, batch) -> None:
    """The segments kernel's log-probs and gradients on `batch` are the dense SDPA call's (1e-5)."""
    results = {}
    for kernel in ("sdpa", SEGMENTS):
        set_attention(model, kernel)
        model.zero_grad()
        logps = sequence_logprobs(model, batch)
        logps.sum().backward()
        results[kernel] = (logps.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results[SEGMENTS][0], results["sdpa"][0], rtol=0, atol=1e-5)
    for segments_grad, dense_grad in zip(results[SEGMENTS][1], results["sdpa"][1]):
        torch.testing.assert_close(segments_grad, dense_grad, rtol=0, atol=1e-5)


def _expected_calls(spans, split_from: int) -> list[int]:
    """The query lengths of one layer's SDPA calls in the short-row path: per example, its prompt and the rest
    when the prompt has `split_from` tokens or more, else the whole example."""
    calls = []
    for row in spans:
        for prompt_start, prompt_length, responses in row:
            end = max([prompt_start + prompt_length] + [start + size for start, size in responses])
            if prompt_length >= split_from:
                calls += [prompt_length] + ([end - prompt_start - prompt_length] if end > prompt_start + prompt_length
                                            else [])
            else:
                calls.append(end - prompt_start)
    return calls


@pytest.mark.parametrize("split_from", [3, 10_000], ids=["prompt-split", "whole-example"])
@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_one_call_per_example_gives_the_dense_masks_logprobs_and_gradients(layout, split_from, monkeypatch):
    import transformers.integrations.sdpa_attention as hf_sdpa

    monkeypatch.setattr(attention, "SPLIT_MIN_PREFIX", split_from)  # these prompts have 7-19 tokens
    calls = []
    real_sdpa = hf_sdpa.sdpa_attention_forward
    monkeypatch.setattr(hf_sdpa, "sdpa_attention_forward",
                        lambda module, query, *a, **k: calls.append(query.shape[2]) or real_sdpa(module, query, *a, **k))
    model = make_llama(num_key_value_heads=1)  # grouped-query attention through every call
    examples = _examples() + [TokenizedExample((), ((50, 51, 52), (60, 61)))]  # and an example without a prompt
    batch = collate(examples, list(range(len(examples))), layout=layout, pad_token_id=0)
    if layout == "packed":
        assert max(len(row) for row in batch.spans) > 1  # rows that hold several examples
    _assert_segments_match_dense(model, batch)
    expected = _expected_calls(batch.spans, split_from)
    assert calls[-len(expected):] == expected  # the last layer's calls: one or two per example, none per row


def test_segment_attention_is_plain_sdpa_for_generation():
    model = make_llama().eval()
    prompt = torch.tensor([[3, 4, 5, 6]])
    dense = model.generate(prompt, max_new_tokens=4, do_sample=False)
    set_attention(model, SEGMENTS)
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), dense)


def test_attention_choice():
    assert choose_attention("auto", "cpu", "packed") == SEGMENTS  # per-segment SDPA calls on a CPU
    assert choose_attention("auto", "cuda", "packed") == "flex_attention"
    assert choose_attention("auto", "cuda", "plain") is None  # a 2-D padding mask: nothing to skip
    assert choose_attention("auto", "cpu", "plain") is None
    assert choose_attention("sdpa", "cuda", "packed") == "sdpa"
    assert choose_attention("flex", "cpu", "packed", training=False) == "flex_attention"
    with pytest.raises(ConfigError, match="no backward pass on CPU"):
        choose_attention("flex", "cpu", "packed")

"""The fast path for images (docs/vision.md, Layouts): on a LLaVA-style model the shared-prompt and packed layouts give
the plain layout's log-probs and gradients with each prompt and its images computed once per pair; a Qwen2-VL-style
model (multimodal rotary positions from get_rope_index) falls back to the plain layout with a one-line warning and
still trains; `dpokit dpo` trains in the shared layout with the plain layout's first-step loss; `--precompute-ref`
on image pairs gives the resident reference's first-step loss, and its cache key changes with the pixels.

The tiny models are tests/vlm_helpers.py's (random init, processors built offline), in float32.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import yaml
from PIL import Image

from dpokit.cli.main import main
from dpokit.data.batching import collate
from dpokit.data.formats import load_preferences
from dpokit.data.tokenize import TokenizeConfig
from dpokit.data.vision import tokenize_vision_examples
from dpokit.errors import DpokitWarning
from dpokit.models import logprobs
from dpokit.models.attention import SEGMENTS, set_attention
from dpokit.models.loading import load_model, load_tokenizer
from dpokit.models.logprobs import check_layout, sequence_logprobs, token_logprobs
from dpokit.train.engine import Scorer
from dpokit.train.reference import fingerprint
from vlm_helpers import COLOURS, make_llava, make_qwen2_vl, shape_image

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: extra threads only contend (conftest.py)
N_PAIRS = 6
FALLBACK = ("Qwen2VLForConditionalGeneration does not support the shared layout with images (its multimodal rotary "
            "positions are computed from the token ids of whole rows by get_rope_index, not taken from the layout's "
            "position ids); using the plain layout")


def _rows(n: int) -> list[dict]:
    """Pairs about a coloured shape whose prompts differ in length: one or two images, a system turn or none, a
    question of growing length; responses of different lengths."""
    colours = list(COLOURS)
    rows = []
    for i in range(n):
        colour, other = colours[i % 4], colours[(i + 1) % 4]
        images = [f"shape{i}.png"] + ([f"shape{i}b.png"] if i % 2 == 0 else [])
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": "what colour is it" + " now" * i}]
        prompt = [{"role": "user", "content": parts}]
        if i % 3 == 1:
            prompt = [{"role": "system", "content": [{"type": "text", "text": "answer briefly"}]}] + prompt
        rows.append({"images": images, "prompt": prompt, "chosen": f"the shape is {colour}",
                     "rejected": f"it is {other} and round" * (1 + i % 2)})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-layout")
    rows = _rows(N_PAIRS)
    for i, row in enumerate(rows):
        for j, name in enumerate(row["images"]):
            shape_image(list(COLOURS)[(i + j) % 4], "square" if (i + j) % 2 else "circle").save(root / name)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "data": str(root / "pairs.jsonl"), "llava": make_llava(root / "llava", seed=1),
            "qwen2_vl": make_qwen2_vl(root / "qwen2_vl", seed=1)}


def _examples(model_dir: str, data: str):
    records, _ = load_preferences(data)
    examples, _ = tokenize_vision_examples(records, load_tokenizer(model_dir),
                                           TokenizeConfig(max_length=512, max_prompt_length=256))
    return examples


def _logps_and_grads(model, examples, layout: str, chunked: bool):
    """Per-token log-probs, their per-response sums and the gradient of a weighted sum of those, for `examples`
    collated in `layout`."""
    model.zero_grad()
    batch = collate(examples, range(len(examples)), layout=layout)
    tokens = token_logprobs(model, batch, chunked=chunked)
    sums = torch.zeros(batch.num_sequences).index_add(0, batch.target_seq, tokens)
    (sums * torch.linspace(0.5, 1.5, len(sums))).sum().backward()  # unequal weights, like a real loss
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return tokens.detach(), sums.detach(), grads, batch


@pytest.mark.parametrize(("layout", "attention"), [("shared", "sdpa"), ("shared", "segments"),
                                                   ("packed", "segments")])
def test_shared_image_prompt_gives_the_plain_layouts_logprobs(setup, layout, attention, monkeypatch):
    examples = _examples(setup["llava"], setup["data"])
    assert len(examples) == N_PAIRS and len({len(e.prompt_ids) for e in examples}) >= 3
    model = load_model(setup["llava"], dtype="float32")
    model.train(False)
    if attention == "segments":  # one SDPA call per prompt and per response, even for these short rows
        monkeypatch.setattr("dpokit.models.attention.SEGMENTS_MIN_LENGTH", 0)
    set_attention(model, SEGMENTS if attention == "segments" else None)
    plain_tokens, plain, plain_grads, plain_batch = _logps_and_grads(model, examples, "plain", chunked=False)
    tokens, sums, grads, batch = _logps_and_grads(model, examples, layout, chunked=True)
    images = sum(e.vision["pixel_values"].shape[0] for e in examples)
    assert plain_batch.vision["pixel_values"].shape[0] == 2 * images  # the plain layout: once per response
    assert batch.vision["pixel_values"].shape[0] == images  # the prompt once per pair: its images once
    assert torch.equal(batch.target_ids, plain_batch.target_ids)
    print(f"{layout}/{attention}: max |shared - plain| per token {(tokens - plain_tokens).abs().max().item():.3g}, "
          f"per response {(sums - plain).abs().max().item():.3g} (sums down to {plain.min().item():.1f}), "
          f"gradients {(grads - plain_grads).abs().max().item():.3g} (up to {plain_grads.abs().max().item():.3g})")
    torch.testing.assert_close(tokens, plain_tokens, rtol=0, atol=1e-5)
    # a float32 sum of ~-240 is resolved to ~1.5e-5 (one unit in the last place): within 1e-5 or 1e-6 of itself
    torch.testing.assert_close(sums, plain, rtol=1e-6, atol=1e-5)
    # gradients up to ~80 (this peaked model's): 1e-5 of the largest, elementwise
    torch.testing.assert_close(grads, plain_grads, rtol=1e-5, atol=1e-5 * plain_grads.abs().max().item())
    # the comparison can fail: the same batch with each example's images given to another example does
    swapped = dict(batch.vision, pixel_values=batch.vision["pixel_values"].flip(0))
    with torch.no_grad():
        wrong = sequence_logprobs(model, dataclasses.replace(batch, vision=swapped))
    assert (wrong - plain).abs().max().item() > 1e-2


def test_check_layout_keeps_the_shared_layout_for_llava_and_not_for_qwen2_vl(setup, monkeypatch):
    monkeypatch.setattr(logprobs, "_warned", set())  # each warning is shown once per process
    llava = Scorer(load_model(setup["llava"], dtype="float32"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DpokitWarning)  # no fallback for LLaVA
        for layout in ("shared", "packed"):
            assert check_layout(llava, _examples(setup["llava"], setup["data"]), layout, 0, device="cpu",
                                max_length=512) == layout
    qwen = Scorer(load_model(setup["qwen2_vl"], dtype="float32"))
    with pytest.warns(DpokitWarning) as caught:
        assert check_layout(qwen, _examples(setup["qwen2_vl"], setup["data"]), "shared", 0, device="cpu",
                            max_length=512) == "plain"
    assert [str(w.message) for w in caught if issubclass(w.category, DpokitWarning)] == [FALLBACK]


def _dpo(setup, family: str, out, *extra: str) -> list[dict]:
    assert main(["dpo", "--model", setup[family], "--data", setup["data"], "--output", str(out), "--max-steps", "2",
                 "--batch-size", "3", "--learning-rate", "1e-2", "--beta", "0.1", "--seed", "0", *extra]) == 0
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def _resolved_layout(out) -> str:
    return yaml.safe_load((out / "run_config.yaml").read_text())["resolved"]["layout"]


def test_dpo_trains_llava_in_the_shared_layout_as_in_the_plain_one(setup, tmp_path):
    shared = _dpo(setup, "llava", tmp_path / "shared", "--layout", "shared")
    plain = _dpo(setup, "llava", tmp_path / "plain", "--layout", "plain")
    assert _resolved_layout(tmp_path / "shared") == "shared" and _resolved_layout(tmp_path / "plain") == "plain"
    assert len(shared) == len(plain) == 2
    assert shared[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-5)
    assert shared[1]["loss"] != pytest.approx(shared[0]["loss"], abs=1e-4)  # the first step changed the policy
    assert all(s["loss"] == pytest.approx(p["loss"], abs=1e-4) for s, p in zip(shared, plain))


def test_qwen2_vl_falls_back_to_plain_with_the_warning_and_trains(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(logprobs, "_warned", set())
    capsys.readouterr()
    metrics = _dpo(setup, "qwen2_vl", tmp_path / "run", "--layout", "shared")
    assert f"dpokit: warning: {FALLBACK}\n" in capsys.readouterr().err  # the command line's one line
    assert _resolved_layout(tmp_path / "run") == "plain"
    assert len(metrics) == 2 and all(m["loss"] == m["loss"] for m in metrics)  # finite, not NaN
    assert (tmp_path / "run" / "final").is_dir()


def test_precompute_ref_on_image_pairs_gives_the_resident_references_loss(setup, tmp_path, capsys):
    resident = _dpo(setup, "llava", tmp_path / "resident")
    capsys.readouterr()
    cached = _dpo(setup, "llava", tmp_path / "cached", "--precompute-ref")
    assert "reference log-probs: computed for 6 examples" in capsys.readouterr().out
    assert _resolved_layout(tmp_path / "cached") == "packed"  # the default layout, kept for LLaVA with images
    assert cached[0]["loss"] == pytest.approx(resident[0]["loss"], abs=1e-5)
    assert cached[1]["loss"] == pytest.approx(resident[1]["loss"], abs=1e-4)


def test_the_reference_cache_key_changes_with_the_pixels(setup, tmp_path):
    """An image's tokens are the same whatever its pixels: the key must read the pixels too."""
    tokenizer = load_tokenizer(setup["llava"])
    before = _examples(setup["llava"], setup["data"])
    for name in ("pairs.jsonl", "shape0b.png", *(f"shape{i}.png" for i in range(N_PAIRS)),
                 *(f"shape{i}b.png" for i in range(2, N_PAIRS, 2))):
        (tmp_path / name).write_bytes((setup["root"] / name).read_bytes())
    image = Image.open(tmp_path / "shape3.png").convert("RGB")
    image.putpixel((16, 16), (0, 0, 0))
    image.save(tmp_path / "shape3.png")
    after = _examples(setup["llava"], str(tmp_path / "pairs.jsonl"))
    assert [e.prompt_ids for e in before] == [e.prompt_ids for e in after]  # the token ids alone cannot tell
    keys = [fingerprint("weights", tokenizer, examples, {"chunked": True}) for examples in (before, before, after)]
    assert keys[0] == keys[1] != keys[2]

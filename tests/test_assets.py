"""The embedded default model (dpokit/assets/base) built by scripts/build_base_model.py."""

import json
import math
from importlib import resources
from pathlib import Path

import pytest
import torch

from dpokit.experiments.reviews import base_model_path, generate_reviews

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: extra threads only contend (conftest.py)

BASE = resources.files("dpokit") / "assets" / "base"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BASE))
    model = AutoModelForCausalLM.from_pretrained(str(BASE)).eval()
    return model, tok


def test_files_and_size():
    assert Path(base_model_path()) == Path(str(BASE))
    names = {p.name for p in BASE.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "build_info.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    size = (BASE / "model.safetensors").stat().st_size
    assert size <= 25 * 2**20
    info = json.loads((BASE / "build_info.json").read_text())
    assert {"seed", "steps", "final_train_loss", "params", "command", "samples"} <= set(info)
    assert info["samples"] and all(s["continuation"].strip() for s in info["samples"])


def test_config_and_special_tokens(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id is not None and tok.pad_token_id == tok.eos_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert len(tok) <= model.config.vocab_size
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    assert tok.encode("The film", add_special_tokens=True) == tok.encode("The film", add_special_tokens=False)


def test_greedy_generation_is_words(model_and_tokenizer):
    model, tok = model_and_tokenizer
    enc = tok("The film", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=20, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    words = text.split()
    assert len(words) >= 3, text
    assert sum(w.strip(".,!:'").isalpha() for w in words) >= 0.8 * len(words), text


def test_loss_on_fresh_reviews_is_low(model_and_tokenizer):
    model, tok = model_and_tokenizer
    texts = generate_reviews(40, seed=987_654)  # a seed the build did not use
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"]
            ids = torch.cat([ids, torch.tensor([[tok.eos_token_id]])], dim=1)
            loss = model(input_ids=ids, labels=ids).loss.item()
            total += loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    per_token = total / count
    assert per_token < 0.5 * math.log(len(tok)), per_token

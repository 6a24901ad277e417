"""Model inputs a user has: GGUF checkpoints (--gguf-file), adapter directories as PEFT writes them, and load
errors that name their real cause (no tokenizer files, a GGUF-only directory, a GGUF file given as a directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf_helpers import write_llama_gguf
from helpers import make_llama

from dpokit.cli.main import main
from dpokit.errors import ConfigError
from dpokit.models.loading import load_model, load_tokenizer, model_max_positions

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory, tokenizer):
    """A directory holding only `model.gguf` (weights and tokenizer) and the model it was written from."""
    model = make_llama(vocab_size=len(tokenizer), seed=3)
    root = tmp_path_factory.mktemp("gguf")
    write_llama_gguf(model, tokenizer, root / "model.gguf")
    write_llama_gguf(model, tokenizer, root / "model-q8_0.gguf", quantize=True)
    return root, model


def test_a_gguf_checkpoint_loads_with_its_weights_and_tokenizer(gguf_dir, tokenizer):
    root, original = gguf_dir
    loaded = load_model(str(root), gguf_file="model.gguf")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, original(IDS).logits, rtol=0, atol=0)
    quantized = load_model(str(root), gguf_file="model-q8_0.gguf")  # dequantised: close, not equal
    with torch.no_grad():
        error = (quantized(IDS).logits - original(IDS).logits).abs().max().item()
    assert 0 < error < 0.05
    from_gguf = load_tokenizer(str(root), gguf_file="model.gguf")
    text = "the film was great and I loved it"
    assert from_gguf(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert from_gguf.eos_token == tokenizer.eos_token
    assert model_max_positions(str(root), gguf_file="model.gguf") == 512


def test_dpo_from_a_gguf_checkpoint_saves_a_hugging_face_directory(gguf_dir, sentiment_data, tmp_path, capsys):
    root, original = gguf_dir
    out = tmp_path / "run"
    assert main(["dpo", "--model", str(root), "--gguf-file", "model.gguf", "--data", sentiment_data["train"],
                 "--output", str(out), "--max-steps", "2", "--batch-size", "4", "--warmup-steps", "0",
                 "--lr", "1e-3"]) == 0
    capsys.readouterr()
    final = out / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert not list(final.glob("*.gguf"))
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    trained = load_model(str(final))  # a plain Hugging Face model directory, no --gguf-file
    assert type(trained).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert (trained(IDS).logits - original(IDS).logits).abs().max() > 1e-4  # trained, from the GGUF weights
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][0]
    assert first["rewards/margins"] == 0  # step 1: the reference (a second copy of the GGUF) equals the policy


def _error(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_gguf_mistakes_say_what_to_do(gguf_dir, sentiment_data, tmp_path, capsys):
    root, _ = gguf_dir
    base = ["--data", sentiment_data["train"], "--output", str(tmp_path / "out")]
    line = _error(["dpo", "--model", str(root), *base], capsys)
    assert "holds a GGUF checkpoint (model-q8_0.gguf, model.gguf)" in line and "--gguf-file model-q8_0.gguf" in line
    line = _error(["dpo", "--model", str(root / "model.gguf"), *base], capsys)
    assert "a GGUF file" in line and "--gguf-file model.gguf" in line
    line = _error(["dpo", "--model", str(root), "--gguf-file", "other.gguf", *base], capsys)
    assert "--gguf-file other.gguf: no such file" in line and "model.gguf" in line
    assert not (tmp_path / "out").exists()


def test_tokenizer_errors_name_the_cause(tiny_model_dir, tmp_path):
    bare = tmp_path / "no-tokenizer"
    make_llama().save_pretrained(bare)
    with pytest.raises(ConfigError, match="no-tokenizer: no tokenizer files .*save_pretrained"):
        load_tokenizer(str(bare))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer_config.json", "model.safetensors"):  # a whole model, but its tokenizer
        (broken / name).write_bytes((Path(tiny_model_dir) / name).read_bytes())
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ConfigError, match="cannot load the tokenizer of .*broken.*: [A-Za-z]+Error: "):
        load_tokenizer(str(broken))


def test_an_adapter_directory_as_peft_writes_it_trains_and_evaluates(tiny_model_dir, sentiment_data, tmp_path,
                                                                    capsys):
    """PEFT's own save_pretrained: inference_mode true, no tokenizer files (the base model's are used)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["inference_mode"] is True
    assert not (adapter / "tokenizer.json").exists()
    out = tmp_path / "run"
    assert main(["dpo", "--model", str(adapter), "--data", sentiment_data["train"], "--output", str(out),
                 "--max-steps", "1", "--batch-size", "4", "--warmup-steps", "0", "--lr", "1e-2"]) == 0
    assert (out / "final" / "adapter_config.json").is_file()
    assert main(["eval", "--model", str(out / "final"), "--ref-model", str(adapter), "--data", sentiment_data["eval"],
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["examples"] == 60 and metrics["rewards/margins"] != 0


def test_max_positions_come_from_the_config(tiny_model_dir, tmp_path):
    from helpers import make_gpt2

    assert model_max_positions(tiny_model_dir) == 512
    make_gpt2().save_pretrained(tmp_path / "gpt2")
    assert model_max_positions(str(tmp_path / "gpt2")) == 512  # n_positions
    from dpokit.experiments.reviews import base_model_path

    assert model_max_positions(str(base_model_path())) == 256  # the embedded demo model


def test_eval_fits_the_default_max_length_to_the_model_and_refuses_a_larger_one(tmp_path, sentiment_data):
    from helpers import make_tokenizer

    from dpokit.api import EvalConfig, evaluate

    small = tmp_path / "small"
    make_llama(vocab_size=len(make_tokenizer()), max_position_embeddings=48).save_pretrained(small)
    make_tokenizer().save_pretrained(small)
    lines = []
    metrics = evaluate(EvalConfig(model=str(small), data=sentiment_data["eval"], reference_free=True), log=lines.append)
    assert metrics["examples"] == 60
    assert f"note: --max-length 48, not the default 512: {small} has 48 positions; --max-prompt-length 24" in lines
    with pytest.raises(ConfigError, match="--max-length 64 is more than the 48 positions"):
        evaluate(EvalConfig(model=str(small), data=sentiment_data["eval"], reference_free=True, max_length=64),
                            log=lines.append)


def test_generate_samples_from_a_gguf_checkpoint(gguf_dir, tokenizer, tmp_path, capsys):
    root, original = gguf_dir
    original_dir = tmp_path / "original"
    original.save_pretrained(original_dir)
    tokenizer.save_pretrained(original_dir)
    args = ["generate", "--prompt", "the film was", "--temperature", "0", "--max-new-tokens", "6", "--jsonl"]
    assert main([*args, "--model", str(original_dir)]) == 0
    expected = capsys.readouterr().out
    assert main([*args, "--model", str(root), "--gguf-file", "model.gguf"]) == 0
    assert capsys.readouterr().out == expected  # the GGUF's weights and tokenizer: the same greedy reply
    assert json.loads(expected)["prompt"] == "the film was"

"""Broken model directories are one-line errors that name the file and the fix, before anything is loaded (and
through the command line before any data work): truncated or corrupt weights, a config without weights, a sharded
index naming a missing shard, an adapter whose base is gone, a tokenizer larger than the model's vocabulary."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import make_llama, make_tokenizer

from dpokit.cli.main import main
from dpokit.errors import ConfigError
from dpokit.models.files import check_model_files
from dpokit.models.loading import load_model, load_tokenizer


@pytest.fixture()
def model_dir(tmp_path, tiny_model_dir):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def _one_line_error(call, *words):
    with pytest.raises(ConfigError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, (word, message)
    return message


def test_a_whole_model_passes(model_dir):
    check_model_files(str(model_dir))
    assert load_tokenizer(str(model_dir)).eos_token_id is not None


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_weights_name_the_file(model_dir, keep):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(4, int(len(data) * keep))])
    _one_line_error(lambda: load_tokenizer(str(model_dir)), str(weights), "truncated or corrupt", "again")
    _one_line_error(lambda: load_model(str(model_dir)), str(weights))


def test_a_config_without_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    _one_line_error(lambda: load_tokenizer(str(model_dir)), str(model_dir), "no weights", "save_pretrained")


def test_a_damaged_config(model_dir):
    (model_dir / "config.json").write_text("{not json")
    _one_line_error(lambda: load_tokenizer(str(model_dir)), "config.json", "not a readable JSON file")


def test_a_sharded_index_naming_a_missing_shard(tmp_path, tokenizer):
    directory = tmp_path / "sharded"
    make_llama(vocab_size=len(tokenizer)).save_pretrained(directory, max_shard_size="100KB")
    tokenizer.save_pretrained(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    check_model_files(str(directory))
    (directory / shards[-1]).unlink()
    _one_line_error(lambda: load_tokenizer(str(directory)), "model.safetensors.index.json", shards[-1], "missing")


def test_an_adapter_whose_base_is_missing(tmp_path, model_dir):
    from peft import LoraConfig, get_peft_model

    from dpokit.models.loading import load_model as load

    adapter = tmp_path / "adapter"
    get_peft_model(load(str(model_dir)), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    check_model_files(str(adapter))
    shutil.rmtree(model_dir)
    _one_line_error(lambda: load_tokenizer(str(adapter)), str(adapter), "base model is missing",
                    "base_model_name_or_path")


def test_a_tokenizer_larger_than_the_vocabulary(tmp_path, model_dir):
    big = make_tokenizer(vocab_size=320)
    big.add_tokens([f"extra{i}" for i in range(40)])
    big.save_pretrained(model_dir)
    _one_line_error(lambda: load_tokenizer(str(model_dir)), str(model_dir), f"{len(big)} tokens", "vocab_size")


def test_the_command_line_says_it_in_one_line_before_any_data_work(model_dir, tmp_path, capsys):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    data = tmp_path / "never-read.jsonl"  # an empty file would be a data error: the model's error must come first
    data.write_text("")
    code = main(["dpo", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "out"),
                 "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(weights) in err[0] and "truncated or corrupt" in err[0], err

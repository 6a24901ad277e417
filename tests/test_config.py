"""TrainConfig: defaults that remember they were not given, checks raised on construction (before any work),
--warmup-ratio, --max-length fitted to the model, YAML mappings with "did you mean" hints."""

from __future__ import annotations

import dataclasses

import json

import pytest

from dpokit.config import Default, TrainConfig
from dpokit.config.options import load_yaml_mapping, read_yaml
from dpokit.errors import ConfigError


def config(**values) -> TrainConfig:
    return TrainConfig(**{"model": "m", "data": "d", "output": "o", **values})


def test_a_default_is_the_plain_number_but_remembers_it_was_not_given():
    cfg = config()
    assert cfg.max_length == 512 and repr(cfg.max_length) == "512" and json.dumps(cfg.max_length) == "512"
    assert cfg.is_default("max_length") and cfg.is_default("warmup_steps")
    given = config(max_length=512, warmup_steps=150)
    assert given.max_length == cfg.max_length and not given.is_default("max_length")
    assert not given.is_default("warmup_steps")
    assert isinstance(Default(3), int)


@pytest.mark.parametrize("values,message", [
    ({"beta": -0.1}, "beta must be a finite number > 0"),
    ({"warmup_steps": -1}, "--warmup-steps must not be negative"),
    ({"warmup_ratio": 1.5}, r"--warmup-ratio must be in \[0, 1\)"),
    ({"warmup_ratio": 0.1, "warmup_steps": 10}, "--warmup-ratio and --warmup-steps exclude each other"),
    ({"warmup_ratio": 0.1, "warmup_steps": 150}, "exclude each other"),  # given, though equal to the default
    ({"epochs": 0}, "--epochs must be positive"),
    ({"eval_every": -2}, "--eval-every must not be negative"),
    ({"max_length": 128, "max_prompt_length": 128}, r"--max-prompt-length \(128\) must be less than --max-length"),
    ({"batch_size": 0}, "--batch-size must be positive"),
])
def test_bad_values_are_refused_on_construction(values, message):
    with pytest.raises(ConfigError, match=message):
        config(**values)


def test_warmup_ratio_alone_is_accepted_and_a_small_max_length_lowers_the_default_prompt_length():
    assert config(warmup_ratio=0.1).warmup_ratio == 0.1
    cfg = config(max_length=128)
    assert cfg.max_prompt_length == 64 and cfg.is_default("max_prompt_length")
    assert config(max_length=1024).max_prompt_length == 256


def test_max_length_fits_the_model():
    cfg = config()
    max_length, max_prompt_length, note = cfg.fit_lengths(256, "tiny")
    assert max_length == 256 and max_prompt_length == 128
    assert note == "note: --max-length 256, not the default 512: tiny has 256 positions; --max-prompt-length 128"
    assert cfg.max_length == 512 and cfg.is_default("max_length")  # the options stay as given
    fitted = dataclasses.replace(cfg, max_length=max_length, max_prompt_length=max_prompt_length)
    assert fitted.fit_lengths(256, "tiny")[2] is None  # nothing left to change
    assert config().fit_lengths(1024, "big")[2] is None and config().fit_lengths(None, "unknown")[2] is None
    with pytest.raises(ConfigError, match="--max-length 512 is more than the 256 positions of tiny"):
        config(max_length=512).fit_lengths(256, "tiny")
    with pytest.raises(ConfigError, match="--max-prompt-length 300 must be less than the 256 positions"):
        config(max_prompt_length=300).fit_lengths(256, "tiny")
    _, kept_prompt, note = config(max_prompt_length=100).fit_lengths(256, "tiny")
    assert "prompt" not in note and kept_prompt == 100


def test_yaml_unknown_keys_get_the_closest_option(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("bta: 0.2\nmax-lenght: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown option\(s\) for `dpokit dpo`: bta \(did you mean "
                                          r"beta\?\), max-lenght \(did you mean max_length\?\)"):
        read_yaml(path, TrainConfig, "dpo", "dpo")
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="a config must be a mapping"):
        load_yaml_mapping(path, "eval", ["model"])
    with pytest.raises(ConfigError, match="a directory, not a YAML config file"):
        load_yaml_mapping(tmp_path, "eval", ["model"])
    path.write_text("warmup-ratio: 0.05\nmax_length: 64\n")
    assert read_yaml(path, TrainConfig, "sft", "sft") == {"warmup_ratio": 0.05, "max_length": 64}


def test_yaml_numbers_written_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-6` as a string; a float option takes it as the number it is written as, and
    anything else that is not a number is still an error."""
    from dpokit.config.options import read_yaml

    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-6\nbeta: 5E-1\nweight_decay: -0\n")
    assert read_yaml(path, TrainConfig, "dpo", "dpo") == {"lr": 1e-6, "beta": 0.5, "weight_decay": 0}
    for text in ("lr: fast\n", "lr: 1e-6x\n", "batch_size: 1e2\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="must be"):
            read_yaml(path, TrainConfig, "dpo", "dpo")
